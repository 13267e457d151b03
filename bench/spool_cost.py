"""What the durable spool costs per event, by commit strategy and ``synchronous`` level.

    python -m bench spool_cost [--events N] [--group N] [--threads N] [--dir DIR]

WAL journal in every case. For ``synchronous`` NORMAL and FULL:

1. commit per operation: ``Spool.add`` (one INSERT, one commit) per event, each timed;
2. fixed groups: the same rows, ``--group`` per transaction, the cost divided per event (what a
   group commit costs the writer at best);
3. ``DeliveryQueue.enqueue`` end to end (encode + hand-over, NORMAL) with a no-op sender,
   against the same queue without a spool: what the caller pays (enqueue returns before the
   commit), then enqueue plus the wait for the group commit that a request does before its
   response completes: one caller alone (every group has one operation), ``--threads`` callers
   (WSGI threads) and as many tasks on one event loop (ASGI), with the groups the writer made.

``--dir`` picks the filesystem (default: a fresh directory under the current one, since /tmp
is often tmpfs where fsync costs nothing); the filesystem type is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

from commet_middleware import CommetSettings, UsageEvent
from commet_middleware._models import Operation
from commet_middleware._spool import Spool, operation_to_json
from commet_middleware._wire import encode_body
from commet_middleware.delivery import DeliveryQueue


class NoopSender:
    async def send_once(self, operation: Operation, *, request_body: bytes | None = None) -> None:
        return None


def filesystem(path: Path) -> str:
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return f"{kind} ({best or '?'})"


def events(n: int, prefix: str) -> list[UsageEvent]:
    return [
        UsageEvent.create(f"cus_{i % 50}", "api_calls", 1, idempotency_key=f"{prefix}-{i}")
        for i in range(n)
    ]


def summary(costs_ns: list[int]) -> str:
    costs = sorted(costs_ns)
    median = statistics.median(costs) / 1000
    p99 = costs[int(len(costs) * 0.99) - 1] / 1000
    return f"median {median:8.1f} us   p99 {p99:8.1f} us"


def per_enqueue(path: Path, level: Literal["NORMAL", "FULL"], batch: list[UsageEvent]) -> str:
    spool = Spool(path, synchronous=level)
    clock = time.perf_counter_ns
    costs = []
    for event in batch:
        body = encode_body(event, "v1")
        start = clock()
        spool.add(event, "v1", body, claim=True)
        costs.append(clock() - start)
    spool.close()
    return summary(costs)


def group(path: Path, level: str, batch: list[UsageEvent], size: int) -> str:
    Spool(path).stats()  # create the schema
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {level}")
    rows = [
        (e.idempotency_key, e.kind, operation_to_json(e), "v1", encode_body(e, "v1"), time.time())
        for e in batch
    ]
    start = time.perf_counter_ns()
    for i in range(0, len(rows), size):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO pending (idempotency_key, kind, operation, dialect, body, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows[i : i + size],
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter_ns() - start
    conn.close()
    return f"mean {elapsed / len(rows) / 1000:8.1f} us per event"


def make_queue(path: Path | None, n: int) -> DeliveryQueue:
    queue = DeliveryQueue(
        CommetSettings(queue_limit=n + 1, spool_path=str(path) if path else None),
        sender_factory=lambda settings: NoopSender(),
    )
    queue.start()
    return queue


def groups_made(queue: DeliveryQueue) -> str:
    bridge = queue._bridge
    if bridge is None:
        return ""
    writer = bridge.writer
    return f"   {writer.groups} groups, {writer.operations / max(writer.groups, 1):.1f} per group"


def end_to_end(path: Path | None, batch: list[UsageEvent], *, wait: bool = False) -> str:
    queue = make_queue(path, len(batch))
    clock = time.perf_counter_ns
    costs = []
    for event in batch:
        start = clock()
        commit = queue.enqueue(event)
        if wait and commit is not None:
            commit.wait()
        costs.append(clock() - start)
    queue.close(60)
    return summary(costs) + (groups_made(queue) if wait else "")


def threads(path: Path | None, batch: list[UsageEvent], count: int) -> str:
    """``count`` threads, each enqueueing its share and waiting for each commit (WSGI)."""
    queue = make_queue(path, len(batch))
    shares = [batch[i::count] for i in range(count)]

    def run(share: list[UsageEvent]) -> None:
        for event in share:
            commit = queue.enqueue(event)
            if commit is not None:
                commit.wait()

    workers = [threading.Thread(target=run, args=(share,)) for share in shares]
    start = time.perf_counter_ns()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter_ns() - start
    queue.close(60)
    return f"mean {elapsed / len(batch) / 1000:8.1f} us per event (wall){groups_made(queue)}"


def tasks(path: Path | None, batch: list[UsageEvent], count: int) -> str:
    """``count`` tasks on one event loop, each enqueueing its share and awaiting (ASGI)."""
    queue = make_queue(path, len(batch))
    shares = [batch[i::count] for i in range(count)]

    async def run(share: list[UsageEvent]) -> None:
        for event in share:
            commit = queue.enqueue(event)
            if commit is not None:
                await commit

    async def main() -> int:
        start = time.perf_counter_ns()
        await asyncio.gather(*(run(share) for share in shares))
        return time.perf_counter_ns() - start

    elapsed = asyncio.run(main())
    queue.close(60)
    return f"mean {elapsed / len(batch) / 1000:8.1f} us per event (wall){groups_made(queue)}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench spool_cost", description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--group", type=int, default=100)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="spool-cost-", dir=args.dir or os.getcwd()))
    try:
        print(f"{args.events} events, WAL, filesystem {filesystem(workdir)}, sqlite3 "
              f"{sqlite3.sqlite_version}")  # fmt: skip
        n = args.events
        for level in ("NORMAL", "FULL"):
            cost = per_enqueue(workdir / f"per-{level}.db", level, events(n, f"p{level}"))
            print(f"commit per enqueue   synchronous={level:<6}  {cost}")
        for level in ("NORMAL", "FULL"):
            cost = group(workdir / f"group-{level}.db", level, events(n, f"g{level}"), args.group)
            print(f"group of {args.group:<4}        synchronous={level:<6}  {cost}")
        t, db = args.threads, workdir
        for label, cost in (
            ("enqueue, no spool", lambda: end_to_end(None, events(n, "m"))),
            ("enqueue, spool (the caller's cost)", lambda: end_to_end(db / "e", events(n, "s"))),
            ("enqueue + wait, spool, one caller",
             lambda: end_to_end(db / "w", events(n, "w"), wait=True)),
            (f"no spool, {t} threads", lambda: threads(None, events(n, "tm"), t)),
            (f"enqueue + wait, spool, {t} threads", lambda: threads(db / "t", events(n, "t"), t)),
            (f"no spool, {t} tasks on one loop", lambda: tasks(None, events(n, "am"), t)),
            (f"enqueue + await, spool, {t} tasks", lambda: tasks(db / "a", events(n, "a"), t)),
        ):  # fmt: skip
            print(f"{label:<42}{cost()}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
