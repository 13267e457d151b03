"""The spool's group commit: responses complete only once committed; a crash loses none answered."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from commet_middleware import CommetMiddleware, CommetWSGIMiddleware
from commet_middleware._spool import NewRow, Spool
from commet_middleware.customers import from_header
from commet_middleware.delivery import DeliveryQueue, _spool_writer

from .conftest import QueueFactory, RecordingSender, enqueue_committed, event, rows

WORKER = str(Path(__file__).with_name("worker.py"))
BOUND = 10.0  # seconds; only a bound on a wait that ends much sooner when things work


class GatedSpool(Spool):
    """A spool whose group commits wait until ``gate`` opens; ``entered`` says one is waiting."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.groups: list[int] = []

    def add_many(self, entries: Sequence[NewRow]) -> list[int]:
        self.groups.append(len(entries))
        self.entered.set()
        assert self.gate.wait(BOUND)
        return super().add_many(entries)


def through_the_writer(queue: DeliveryQueue) -> DeliveryQueue:
    """``queue``, whose spool groups all go through its writer thread, as on an event loop."""
    assert queue._bridge is not None
    queue._bridge.writer.leads = False
    return queue


# -- in-process: who waits for what ---------------------------------------------------------


def test_a_thread_without_a_loop_commits_alone_when_the_writer_is_idle(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """A WSGI-like thread finding the writer idle commits its own group: done when enqueue
    returns, nothing to wait for."""
    sender.gate.clear()
    queue = make_queue()
    assert queue.enqueue(event("k1")) is None
    assert [key for key, _ in rows(spool_path)] == ["k1"]

    async def on_a_loop() -> object:
        return queue.enqueue(event("k2"))

    commit = asyncio.run(on_a_loop())  # never on an event loop: the writer commits it
    assert isinstance(commit, _spool_writer.GroupCommit)
    assert commit.wait(BOUND)
    assert [key for key, _ in rows(spool_path)] == ["k1", "k2"]


def test_operations_that_gather_while_a_commit_runs_share_the_next_one(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """While one group commits, the next operations join one open group: two commits for 11."""
    sender.gate.clear()
    spool = GatedSpool(spool_path)
    queue = through_the_writer(make_queue(spool=spool))
    first = queue.enqueue(event("k0"))
    assert spool.entered.wait(BOUND)
    later = [queue.enqueue(event(f"k{n}")) for n in range(1, 11)]
    assert first is not None
    assert not first.done
    assert len({id(commit) for commit in later}) == 1
    spool.gate.set()
    assert all(commit is not None and commit.wait(BOUND) for commit in [first, *later])
    assert spool.groups == [1, 10]
    assert [key for key, _ in rows(spool_path)] == [f"k{n}" for n in range(11)]


def test_nothing_reaches_the_sender_before_its_commit(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """The writer places an operation in the queue only after its row is committed."""
    spool = GatedSpool(spool_path)
    queue = through_the_writer(make_queue(spool=spool))
    queue.start()
    commit = queue.enqueue(event("k1"))
    assert spool.entered.wait(BOUND)
    stats = queue.stats()
    # Accepted and pending; ``pending`` may also hold the places an idle worker's spool poll
    # reserved for a claim, which waits for this very commit (see SpoolBridge.claim).
    assert (stats.queued, stats.sent) == (1, 0)
    assert stats.pending >= 1
    assert not queue.flush(0.2)  # the commit is held: nothing can have been sent
    assert sender.attempts == []
    spool.gate.set()
    assert commit is not None
    assert commit.wait(BOUND)
    assert queue.flush(5)
    assert sender.delivered == ["k1"]


def test_one_wake_up_per_loop_per_group(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """Twenty requests of one loop awaiting one group commit cost the writer one loop call."""
    spool = GatedSpool(spool_path)
    queue = through_the_writer(make_queue(spool=spool))
    woken: list[object] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if callback is _spool_writer._set_done:
                woken.append(args)
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        commit = queue.enqueue(event("k0"))
        assert commit is not None
        waiters = [asyncio.ensure_future(_await(commit)) for _ in range(20)]
        await asyncio.sleep(0)
        spool.gate.set()
        await asyncio.wait_for(asyncio.gather(*waiters), BOUND)

    asyncio.run(main())
    assert len(woken) == 1


async def _await(commit: Any) -> None:
    await commit


def _asgi_app() -> Any:
    async def hello(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"5")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello"})

    return hello


def test_asgi_holds_the_completing_message_until_the_commit(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """The ASGI middleware forwards the last body message only once the group is committed."""
    sender.gate.clear()  # the row stays until we looked
    spool = GatedSpool(spool_path)
    queue = through_the_writer(make_queue(spool=spool))
    app = CommetMiddleware(
        _asgi_app(), meter="api_calls", customer=from_header("X-Customer-Id"), sink=queue
    )
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/hello",
        "headers": [(b"x-customer-id", b"cus_1")],
    }
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    async def main() -> None:
        request = asyncio.ensure_future(app(scope, receive, send))
        while not spool.entered.is_set():  # noqa: ASYNC110 - set from the writer's thread
            await asyncio.sleep(0.005)
        for _ in range(20):
            await asyncio.sleep(0)
        assert sent == ["http.response.start"]
        assert not request.done()
        spool.gate.set()
        await asyncio.wait_for(request, BOUND)

    asyncio.run(main())
    assert sent == ["http.response.start", "http.response.body"]
    assert len(rows(spool_path)) == 1


def test_wsgi_holds_the_last_chunk_until_the_commit(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """The WSGI middleware hands the server its last chunk only once the group is committed."""
    sender.gate.clear()  # the row stays until we looked
    spool = GatedSpool(spool_path)
    queue = through_the_writer(make_queue(spool=spool))

    def hello(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "5")])
        return [b"hello"]

    app = CommetWSGIMiddleware(
        hello, meter="api_calls", customer=from_header("X-Customer-Id"), sink=queue
    )
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/hello", "HTTP_X_CUSTOMER_ID": "cus_1"}
    chunks: list[bytes] = []

    def server() -> None:
        body = app(environ, lambda status, headers, exc_info=None: None)
        chunks.extend(body)

    thread = threading.Thread(target=server)
    thread.start()
    assert spool.entered.wait(BOUND)
    thread.join(0.1)
    assert thread.is_alive()
    assert chunks == []
    spool.gate.set()
    thread.join(BOUND)
    assert chunks == [b"hello"]
    assert len(rows(spool_path)) == 1


def test_rows_kept_at_close_are_released_outside_the_queue_lock(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """close() gives undelivered rows back to the spool, and never while holding the queue lock."""
    sender.gate.clear()
    holders: list[bool] = []

    class LockCheckingSpool(Spool):
        def release(self, row_ids: Sequence[int] | None = None) -> int:
            # Not re-entrant: with the lock held by this very thread this would time out.
            free = queue._state.lock.acquire(timeout=2)
            if free:
                queue._state.lock.release()
            holders.append(free)
            return super().release(row_ids)

    queue = make_queue(spool=LockCheckingSpool(spool_path))
    enqueue_committed(queue, *(event(f"k{n}") for n in range(3)))
    assert queue.close(0.1) is False
    assert holders == [True]
    assert Spool(spool_path).stats().pending == 3  # released: claimable at once


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_forked_child_starts_a_writer_of_its_own(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """A child never inherits the parent's writer thread; it commits with one of its own."""
    sender.gate.clear()
    queue = through_the_writer(make_queue())
    commit = queue.enqueue(event("parent-0"))
    assert commit is not None
    assert commit.wait(BOUND)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            os.close(read_end)
            inherited = [t.name for t in threading.enumerate() if "spool-writer" in t.name]
            queue.start()  # the child's queue starts afresh, with a writer of its own
            child = through_the_writer(queue).enqueue(event("child-0"))
            report = {
                "inherited": inherited,
                "durable": child is not None and child.wait(BOUND) and child.durable,
            }
            os.write(write_end, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {"inherited": [], "durable": True}
    after = queue.enqueue(event("parent-1"))
    assert after is not None
    assert after.wait(BOUND)
    assert after.durable
    assert sorted(key for key, _ in rows(spool_path)) == ["child-0", "parent-0", "parent-1"]


# -- real servers, real kills ---------------------------------------------------------------


@contextmanager
def serving(mode: str, spool_path: Path, kill_at: int = 0) -> Iterator[subprocess.Popen[str]]:
    """Run the worker's server; yield it once it printed its port (``server.port``)."""
    server = subprocess.Popen(  # noqa: S603 - this interpreter running our own worker script
        [sys.executable, WORKER, mode, str(spool_path), str(kill_at)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        server.port = int(server.stdout.readline())  # type: ignore[attr-defined]
        yield server
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(BOUND)


def get_all(port: int, customers: list[str], threads: int) -> list[str]:
    """GET /hello once per customer from ``threads`` clients; return the customers answered."""
    answered: list[str] = []

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=BOUND) as client:

        def get(customer: str) -> None:
            try:
                response = client.get("/hello", headers={"X-Customer-Id": customer})
            except httpx.TransportError:
                return  # the server died before it answered
            if response.status_code == 200 and response.content == b"hello":
                answered.append(customer)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(get, customers))
    return answered


def spooled_customers(path: Path) -> list[str]:
    """The customer of every row of ``pending``."""
    with sqlite3.connect(path) as conn:
        return [json.loads(text)["customer_id"] for (text,) in conn.execute(
            "SELECT operation FROM pending")]  # fmt: skip


@pytest.mark.server
@pytest.mark.parametrize("mode", ["serve-asgi", "serve-wsgi"])
def test_a_kill_right_after_the_responses_loses_none_of_them(mode: str, spool_path: Path) -> None:
    """SIGKILL as soon as the last response arrived: every answered request is in the spool."""
    customers = [f"cus_{n}" for n in range(60)]
    with serving(mode, spool_path) as server:
        answered = get_all(server.port, customers, threads=8)  # type: ignore[attr-defined]
        server.send_signal(signal.SIGKILL)
    assert sorted(answered) == sorted(customers)
    assert sorted(spooled_customers(spool_path)) == sorted(customers)


@pytest.mark.server
@pytest.mark.parametrize("mode", ["serve-asgi", "serve-wsgi"])
def test_a_kill_in_the_middle_of_a_group_loses_only_unanswered_requests(
    mode: str, spool_path: Path
) -> None:
    """SIGKILL as the writer starts its fifth group: each answered request is in the spool, and
    what is missing from it was never answered."""
    customers = [f"cus_{n}" for n in range(40)]
    with serving(mode, spool_path, kill_at=5) as server:
        answered = get_all(server.port, customers, threads=4)  # type: ignore[attr-defined]
        assert server.wait(BOUND) == -signal.SIGKILL
    spooled = set(spooled_customers(spool_path))
    assert answered  # four groups were committed and answered before the kill
    assert set(answered) <= spooled
    assert len(spooled) < len(customers)  # the fifth group and everything after it


@pytest.mark.parametrize("count", [1, 120, 300])
def test_add_many_returns_each_rows_id(spool_path: Path, count: int) -> None:
    """A group's rows get the ids add_many returns, in order, in one statement or several."""
    spool = Spool(spool_path)
    spool.add(event("before"), "v1", b"{}", claim=False)
    operations = [event(f"k{n}") for n in range(count)]
    ids = spool.add_many([(op, "v1", b"{}", n % 2 == 0) for n, op in enumerate(operations)])
    with sqlite3.connect(spool_path) as conn:
        stored = dict(conn.execute("SELECT idempotency_key, id FROM pending"))
    assert ids == [stored[op.idempotency_key] for op in operations]
    assert len(set(ids)) == count
