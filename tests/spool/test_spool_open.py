"""Processes that open one fresh spool file at the same moment all get their writes in."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from commet_middleware import UsageEvent
from commet_middleware._spool import Spool

PROCESSES = 6
ROUNDS = 8


def _write_one(path: str, start: multiprocessing.synchronize.Event, n: int) -> None:
    start.wait(10)
    event = UsageEvent.create("cust_1", "api_calls", idempotency_key=f"k{n}")
    Spool(path).add(event, "v1", None, claim=False)  # raises (exit code 1) if the open failed


def test_simultaneous_first_opens_lose_no_write(tmp_path: Path) -> None:
    """Six processes open a new spool and write at once, eight times over: every row is there."""
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        path = str(tmp_path / f"spool-{round_}.sqlite3")
        start = context.Event()
        workers = [
            context.Process(target=_write_one, args=(path, start, n)) for n in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(30)
        assert [worker.exitcode for worker in workers] == [0] * PROCESSES
        assert Spool(path).stats().pending == PROCESSES
