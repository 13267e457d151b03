"""What each kind of sender costs: a task on the app's loop, a thread of its own, a hand-off.

    ./dev bench worker_modes [--events N] [--customers K] [--rounds R]

The delivery queue runs its sender as an asyncio task when it starts inside a running event loop,
and as a daemon thread with a loop of its own otherwise; a task whose loop ends hands its work
to a thread. Each mode is measured here in a fresh process pinned to core 0, delivering to the
HTTP benchmark's counting sink (``bench/http/sink.py``) on core 1:

- ``task``: ``asyncio.run`` of a coroutine that enqueues N events (yielding to the loop every 64,
  as a server does between requests) and then ``await queue.aflush()``: the sender is a task on
  that loop.
- ``thread``: the same N enqueues from a thread without a loop, then ``queue.flush()``: the
  sender is a thread.
- ``handoff``: ``asyncio.run`` of a coroutine that enqueues the N events and returns at once: the
  loop ends with the events queued and the sender's task cancelled, the work goes to a thread,
  and ``queue.flush()`` from the main thread waits for it.

Each event is for customer ``cus_{i % K}``; by default K = N, one customer per event, so nothing
can fold and every event is one send (with K smaller, events of one customer waiting together
fold, and the runs measure fewer sends). Per run: the process's CPU time over
enqueue-to-delivered (``time.process_time()``, every thread), so **CPU us per event**, and wall
events/s. The check: the sink's usage total rose by exactly N + 1 (the warm-up event) in every
run, else the command exits 1. Re-sends of a key the sink already recorded are counted and
shown (``re-sent``): a hand-off cancels the sends in flight when the loop ends, and the thread
sends them again with the same key, which Commet deduplicates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.http.runner import ROOT, SERVER_CORE, free_port, pinned, sink_snapshot, start_sink

MODES = ("task", "thread", "handoff")


def _queue(url: str) -> Any:
    from commet_middleware import CommetSettings
    from commet_middleware.delivery import DeliveryQueue

    return DeliveryQueue(
        CommetSettings(api_key="ck_bench", base_url=url, max_retries=0, shutdown_timeout=60)
    )


def _events(n: int, customers: int, prefix: str) -> list[Any]:
    from commet_middleware import UsageEvent

    return [
        UsageEvent.create(f"cus_{i % customers}", "api_calls", 1, idempotency_key=f"{prefix}-{i}")
        for i in range(n)
    ]


def _one_run(mode: str, url: str, n: int, customers: int, prefix: str) -> dict[str, float]:
    """Run in the child: deliver ``n`` events with the sender of ``mode``; CPU and wall time."""
    events = _events(n, customers, prefix)
    queue = _queue(url)
    # Warm the client and the connection: the first send builds both.
    warm = _events(1, 1, prefix + "-warm")[0]
    started_cpu = time.process_time()
    started = time.perf_counter()
    if mode == "thread":
        queue.enqueue(warm)
        for event in events:
            queue.enqueue(event)
        delivered = queue.flush(60)
    else:

        async def record() -> bool:
            queue.enqueue(warm)
            for i, event in enumerate(events):
                queue.enqueue(event)
                if i % 64 == 63:
                    await asyncio.sleep(0)
            if mode == "task":
                return await queue.aflush(60)
            return True  # handoff: the loop ends with the events queued

        delivered = asyncio.run(record())
        if mode == "handoff":
            delivered = queue.flush(60)
    wall = time.perf_counter() - started
    cpu = time.process_time() - started_cpu
    queue.close(5)
    return {"cpu": cpu, "wall": wall, "delivered": float(delivered)}


def _child(argv: list[str]) -> int:
    mode, url, n, customers, prefix = argv
    result = _one_run(mode, url, int(n), int(customers), prefix)
    print(json.dumps(result))
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="bench worker_modes")
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--customers", type=int, default=0, help="0: one per event")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    customers = args.customers or args.events
    port = free_port()
    sink = start_sink(port, None)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    failures: list[str] = []
    try:
        for round_ in range(args.rounds):
            order = MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]
            for mode in order:
                before = sink_snapshot(url).counters
                prefix = f"{mode}-r{round_}"
                argv_child = [sys.executable, "-m", "bench", "worker_modes", "--child"]
                argv_child += [mode, url, str(args.events), str(customers), prefix]
                done = subprocess.run(
                    pinned(SERVER_CORE, argv_child),
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
                lines = done.stdout.strip().splitlines()
                if done.returncode or not lines:
                    failures.append(f"{mode} round {round_}: {done.stderr.strip()[-500:]}")
                    continue
                run = json.loads(lines[-1])
                after = sink_snapshot(url).counters
                arrived = after["usage_total"] - before["usage_total"]
                sends = after["commet_events"] - before["commet_events"]
                resent = after["duplicate_events"] - before["duplicate_events"]
                run["resent"] = resent
                run["sends"] = sends
                # The warm-up event counts too.
                if arrived != args.events + 1 or not run["delivered"]:
                    failures.append(
                        f"{mode} round {round_}: usage total {arrived} of {args.events + 1}, "
                        f"flush {'ok' if run['delivered'] else 'timed out'}"
                    )
                results[mode].append(run)
                cost = run["cpu"] / args.events * 1e6
                print(
                    f"round {round_ + 1} {mode:8} {cost:7.1f} us CPU/event "
                    f"{args.events / run['wall']:9,.0f} events/s wall, usage {arrived}, "
                    f"{sends} events recorded, {resent} re-sent",
                    flush=True,
                )
    finally:
        sink.terminate()
        sink.wait(10)
    print()
    print("| sender | CPU us per event (median) | wall events/s (median) | re-sent keys | runs |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        runs = results[mode]
        if not runs:
            continue
        cpu = statistics.median(r["cpu"] / args.events * 1e6 for r in runs)
        wall = statistics.median(args.events / r["wall"] for r in runs)
        resent_all = sum(int(r["resent"]) for r in runs)
        print(f"| {mode} | {cpu:.1f} | {wall:,.0f} | {resent_all} | {len(runs)} |")
    print()
    if failures:
        print("CHECK FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(
        f"Check: in every run the sink's usage total rose by exactly {args.events + 1:,} "
        "(the events and the warm-up; a re-sent key counts once)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
