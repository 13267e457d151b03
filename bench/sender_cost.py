"""What the background sender's client costs per delivered event, before and after a change.

    ./dev bench sender_cost [--events N] [--rounds R] [--customers K] [--concurrency C]
                            [--warmup W] [--baseline REV] [--httpx] [--profile]

A many-customers load where nothing can fold: event ``i`` is for customer ``cus_{i % K}``
(1,000 by default, round-robin), each with its own key. The sink is the HTTP benchmark's
counting sink (``bench/http/sink.py``: asyncio + httptools on 127.0.0.1, answering 201 with a
``usage_event`` body and counting each (customer, event key) once), in its own process on core
1. Each run is a fresh client process on core 0 that builds the client exactly as the delivery
queue does (``_delivery._default_sender_factory``, bodies from ``_default_encoder``), sends
``--warmup`` events (not measured), then N events with ``send_once`` and C in flight, a task
per event as the sender does. Measured: the client process's CPU time over the N sends
(``time.process_time()``), so **events/s per core = N / client CPU seconds**, and wall time.

Variants, each run in every round, in an order rotated per round:

- ``after``: the client of this working tree, as the queue builds it (no transport set).
- ``before`` (with ``--baseline REV``): the ``commet_middleware`` package of git revision REV
  (``git archive``), put first on the client's ``sys.path``; the run records which file it
  imported, so a run cannot silently measure the wrong code.
- ``httpx`` (with ``--httpx``): this tree's client with ``settings.transport`` set to
  ``httpx.AsyncHTTPTransport()``: the seam tests and the emulator use, which stays on httpx.

The check: for every run the sink's count of distinct events rose by exactly warm-up + N and
no send failed (and no duplicate delivery); the command exits 1 otherwise. ``--profile`` adds
one cProfile run per variant: Python calls per event and the top functions by own time.
The results print as a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STATS_PATH = "/__bench/stats"


# --- the sink (its own process, core 1) -------------------------------------------------------


def serve() -> None:
    """Serve the counting sink on a free port of 127.0.0.1 (printed first) until killed."""
    from bench.http.sink import CountingSink, _Protocol

    async def run() -> None:
        sink = CountingSink()
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(lambda: _Protocol(sink), sock=sock, backlog=1024)
        print(sock.getsockname()[1], flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


def _stats(url: str) -> dict[str, Any]:
    import http.client

    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", STATS_PATH)
        result: dict[str, Any] = json.loads(connection.getresponse().read())
        return result
    finally:
        connection.close()


# --- one run (its own process, core 0) --------------------------------------------------------


async def _send_all(client: Any, batch: list[tuple[Any, bytes]], concurrency: int) -> int:
    """Send every event with ``concurrency`` in flight, a task each; return the failures."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    failures = 0
    running: set[asyncio.Task[None]] = set()

    async def deliver(event: Any, body: bytes) -> None:
        nonlocal failures
        try:
            await client.send_once(event, request_body=body)
        except Exception as exc:
            failures += 1
            if failures == 1:
                print(f"send failed: {exc!r}", file=sys.stderr)
        finally:
            slots.release()

    for event, body in batch:
        await slots.acquire()
        task = loop.create_task(deliver(event, body))
        running.add(task)
        task.add_done_callback(running.discard)
    for _ in range(concurrency):
        await slots.acquire()
    return failures


async def _client_run(args: argparse.Namespace) -> dict[str, Any]:
    from commet_middleware._delivery import _default_encoder, _default_sender_factory

    import commet_middleware
    from commet_middleware import CommetSettings, UsageEvent

    transport = None
    if args.variant == "httpx":
        import httpx

        transport = httpx.AsyncHTTPTransport()
    settings = CommetSettings(
        api_key="ck_bench", base_url=args.client, transport=transport, max_concurrency=8
    )

    def batch(n: int, label: str) -> list[tuple[Any, bytes]]:
        events = []
        for i in range(n):
            customer = f"cus_{i % args.customers:04d}"
            event = UsageEvent.create(customer, "api_calls", 1, idempotency_key=f"{label}-{i}")
            events.append((event, _default_encoder(event, "v1")))
        return events

    client = _default_sender_factory(settings)
    try:
        warm_failures = await _send_all(client, batch(args.warmup, f"{args.label}-w"), 8)
        measured = batch(args.events, args.label)
        gc.collect()
        profiler = cProfile.Profile() if args.profile_out else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        failures = await _send_all(client, measured, args.concurrency)
        if profiler is not None:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if profiler is not None:
            profiler.dump_stats(args.profile_out)
    finally:
        await client.aclose()
    return {
        "variant": args.variant,
        "events": args.events,
        "cpu_s": cpu,
        "wall_s": wall,
        "failures": failures + warm_failures,
        "code": str(Path(commet_middleware.__file__).parent),
        "client": f"{type(client).__module__}.{type(client).__name__}",
    }


def _client_main(args: argparse.Namespace) -> None:
    if args.code:
        # Before anything imports commet_middleware: the baseline's package comes first.
        sys.path.insert(0, args.code)
    print(json.dumps(asyncio.run(_client_run(args))), flush=True)


# --- the orchestrator --------------------------------------------------------------------------


def _pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if shutil.which("taskset") else argv


def _export(rev: str, into: Path) -> Path:
    """Write revision ``rev``'s ``commet_middleware`` package under ``into``; return the dir."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "commet_middleware"],  # noqa: S607 - git from PATH, as a developer runs it
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into)  # noqa: S202 - our own repository's archive, made just above
    return into


def _run(
    url: str, args: argparse.Namespace, variant: str, label: str, code: Path | None, *extra: str
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.sender_cost", "--client", url, "--variant", variant]
    argv += ["--label", label, "--events", str(args.events), "--warmup", str(args.warmup)]
    argv += ["--customers", str(args.customers), "--concurrency", str(args.concurrency)]
    if code is not None:
        argv += ["--code", str(code)]
    before = _stats(url)
    done = subprocess.run(
        _pinned(0, [*argv, *extra]), capture_output=True, text=True, cwd=ROOT, check=False
    )
    after = _stats(url)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {variant} client failed")
    record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    arrived = after["commet_events"] - before["commet_events"]
    duplicates = after["duplicate_events"] - before["duplicate_events"]
    expected = args.events + args.warmup
    if code is not None and not record["code"].startswith(str(code)):
        raise SystemExit(f"the before run imported {record['code']}, not the baseline")
    record.update(arrived=arrived, duplicates=duplicates, expected=expected)
    record["ok"] = record["failures"] == 0 and arrived == expected and duplicates == 0
    return record


def _profile(
    url: str, args: argparse.Namespace, variant: str, code: Path | None, workdir: Path
) -> list[str]:
    out = workdir / f"{variant}.pstats"
    run = _run(url, args, variant, f"profile-{variant}", code, "--profile-out", str(out))
    stats = pstats.Stats(str(out))
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    calls = sum(entry[1] for entry in table.values()) / args.events
    top = sorted(table.items(), key=lambda item: -item[1][2])[:8]
    lines = [
        f"`{variant}` under cProfile: {calls:,.0f} Python calls per event "
        f"({run['cpu_s'] / args.events * 1e6:,.0f} µs per event, slowed by the profiler); "
        "top functions by own time:",
        "",
        "| function | own time share | calls per event |",
        "|---|---|---|",
    ]
    total = sum(entry[2] for entry in table.values())
    for (file, line, name), (_prim, ncalls, tottime, _cum, _callers) in top:
        short = file.split("site-packages/")[-1].split("commet_middleware/")[-1]
        where = f"{Path(short).name}:{line}" if file != "~" else "builtin"
        lines.append(
            f"| `{name}` ({where}) | {100 * tottime / total:.1f} % | {ncalls / args.events:.1f} |"
        )
    return [*lines, ""]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _report(
    args: argparse.Namespace, runs: list[dict[str, Any]], load: tuple[str, str]
) -> list[str]:
    variants = [v for v in ("before", "after", "httpx") if any(r["variant"] == v for r in runs)]
    command = (
        f"./dev bench sender_cost --events {args.events} --rounds {args.rounds} "
        f"--customers {args.customers} --concurrency {args.concurrency} --warmup {args.warmup}"
    )
    if args.baseline:
        command += f" --baseline {args.baseline}"
    if args.httpx:
        command += " --httpx"
    lines = [
        "## sender_cost: the sender's client per delivered event, many customers",
        "",
        f"`{command}`",
        "",
        f"Machine: {os.cpu_count()} cores, shared (load average {load[0]} before, {load[1]} "
        f"after); client on core 0, counting sink on core 1. Python "
        f"{platform.python_version()}. {args.events:,} measured events per run to "
        f"{args.customers:,} customers round-robin, {args.concurrency} in flight.",
        "",
        "| variant | events/s per core (median) | client CPU µs/event (median) | wall events/s "
        "(median) | vs before (median of per-round ratios) | runs |",
        "|---|---|---|---|---|---|",
    ]
    before = {r["round"]: r for r in runs if r["variant"] == "before"}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        per_core = _median([r["events"] / r["cpu_s"] for r in mine])
        cpu = _median([r["cpu_s"] / r["events"] * 1e6 for r in mine])
        wall = _median([r["events"] / r["wall_s"] for r in mine])
        ratio = "-"
        if before and variant != "before":
            ratios = [
                (r["events"] / r["cpu_s"])
                / (before[r["round"]]["events"] / before[r["round"]]["cpu_s"])
                for r in mine
                if r["round"] in before
            ]
            ratio = f"{_median(ratios):.1f}x"
        lines.append(
            f"| {variant} | {per_core:,.0f} | {cpu:,.0f} | {wall:,.0f} | {ratio} | {len(mine)} |"
        )
    lines += ["", "Per run (events/s per core, in round order):", ""]
    for variant in variants:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["round"])
        figures = ", ".join(f"{r['events'] / r['cpu_s']:,.0f}" for r in mine)
        lines.append(f"- {variant} ({mine[0]['client']}): {figures}")
    failed = [r for r in runs if not r["ok"]]
    lines += [
        "",
        f"Check: {len(runs) - len(failed)} of {len(runs)} runs had every event arrive at the sink "
        f"exactly once (distinct (customer, key) count rose by warm-up + events; no failed "
        f"send, no duplicate).",
    ]
    for r in failed:
        lines.append(
            f"- FAILED {r['variant']} round {r['round']}: arrived {r['arrived']} of "
            f"{r['expected']}, failures {r['failures']}, duplicates {r['duplicates']}"
        )
    return lines


def _orchestrate(args: argparse.Namespace) -> int:
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    sink_argv = _pinned(1, [sys.executable, "-m", "bench.sender_cost", "--serve"])
    with (
        subprocess.Popen(sink_argv, stdout=subprocess.PIPE, text=True, cwd=ROOT) as sink,
        tempfile.TemporaryDirectory(prefix="sender_cost-") as tmp,
    ):
        try:
            assert sink.stdout is not None
            url = f"http://127.0.0.1:{sink.stdout.readline().strip()}"
            codes: dict[str, Path | None] = {"after": None}
            if args.baseline:
                codes["before"] = _export(args.baseline, Path(tmp) / "baseline")
            if args.httpx:
                codes["httpx"] = None
            order = list(codes)
            runs = []
            for round_no in range(args.rounds):
                shift = round_no % len(order)
                for variant in order[shift:] + order[:shift]:
                    record = _run(url, args, variant, f"r{round_no}-{variant}", codes[variant])
                    record["round"] = round_no
                    runs.append(record)
                    print(
                        f"round {round_no} {variant}: {record['events'] / record['cpu_s']:,.0f} "
                        f"events/s per core, ok={record['ok']}",
                        file=sys.stderr,
                    )
            profile_lines: list[str] = []
            if args.profile:
                for variant in order:
                    profile_lines += _profile(url, args, variant, codes[variant], Path(tmp))
        finally:
            sink.terminate()
            sink.wait(10)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = _report(args, runs, (load_before, load_after))
    if profile_lines:
        lines += ["", *profile_lines]
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in runs) else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench sender_cost", description=__doc__)
    parser.add_argument("--events", type=int, default=5_000, help="measured events per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=8, help="sends in flight")
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured events per run")
    parser.add_argument("--baseline", metavar="REV", help="also run REV's client as 'before'")
    parser.add_argument("--httpx", action="store_true", help="also run the httpx seam")
    parser.add_argument("--profile", action="store_true", help="one cProfile run per variant")
    # The child processes' modes.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="after", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="run", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.client:
        _client_main(args)
        return 0
    return _orchestrate(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
