"""Where the sender runs: a daemon thread, the app's event loop, after a loop dies, after a fork."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from .conftest import FakeSender, QueueFactory, event


def delivery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "commet-delivery"]


def test_without_a_loop_the_sender_is_a_daemon_thread(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """Enqueue from plain code starts one daemon sender thread, which delivers."""
    queue = make_queue()
    before = set(delivery_threads())
    queue.enqueue(event("a"))
    queue.enqueue(event("b"))
    started = set(delivery_threads()) - before
    assert len(started) == 1
    assert all(thread.daemon for thread in started)
    assert queue.flush(5)
    assert sender.completed == ["a", "b"]
    assert queue.close(5)
    assert not any(thread.is_alive() for thread in started)


def test_start_inside_a_loop_runs_the_sender_as_a_task(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """start() on a running loop (ASGI lifespan) runs the sender there, no thread; aclose drains."""
    queue = make_queue()
    before = set(delivery_threads())

    async def main() -> bool:
        queue.start()
        for key in ("a", "b", "c"):
            queue.enqueue(event(key))
        assert await queue.aflush(5)
        return await queue.aclose(5)

    assert asyncio.run(main()) is True
    assert set(delivery_threads()) == before
    assert sender.completed == ["a", "b", "c"]
    assert sender.closed == 1


def test_first_enqueue_inside_a_loop_starts_the_sender_lazily(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """Without lifespan, the first enqueue from a loop starts the sender on that loop."""
    queue = make_queue()
    before = set(delivery_threads())

    async def main() -> bool:
        queue.enqueue(event("a"))
        return await queue.aflush(5)

    assert asyncio.run(main())
    assert set(delivery_threads()) == before
    assert sender.completed == ["a"]


def test_aclose_from_a_loop_closes_a_thread_sender(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """aclose on a loop that is not the sender's (sender in a thread) drains without blocking it."""
    queue = make_queue()
    queue.enqueue(event("a"))

    async def main() -> bool:
        return await queue.aclose(5)

    assert asyncio.run(main())
    assert sender.completed == ["a"]


def test_events_survive_the_loop_they_were_sent_on_closing(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """When the sender's loop closes mid-send, a later flush restarts it and nothing is lost."""
    sender.gated_prefix = "k"
    queue = make_queue()
    keys = [f"k{i}" for i in range(5)]

    async def request_handling() -> None:
        for key in keys:
            queue.enqueue(event(key))
        await asyncio.sleep(0.02)  # the sends have started and hang on the gate

    asyncio.run(request_handling())  # the loop ends and is closed, sends cancelled
    assert queue.stats().pending == 5
    sender.gate.set()
    assert queue.flush(5)
    assert sorted(sender.completed) == keys
    assert len(sender.attempts) == 10  # five cut off with the loop, five re-sent
    stats = queue.stats()
    assert (stats.sent, stats.pending) == (5, 0)


def test_the_next_enqueue_restarts_a_sender_whose_loop_closed(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """A test client's loop closes; the next request on a new loop gets a new sender."""
    queue = make_queue()

    async def one_request(key: str) -> bool:
        queue.enqueue(event(key))
        return await queue.aflush(5)

    assert asyncio.run(one_request("a"))
    assert asyncio.run(one_request("b"))
    queue.enqueue(event("c"))  # and then from plain code: a thread
    assert queue.flush(5)
    assert sender.completed == ["a", "b", "c"]


def test_a_loop_sender_accepts_events_from_worker_threads(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """A sync endpoint in a threadpool enqueues to the sender running on the app's loop."""
    queue = make_queue()

    async def main() -> bool:
        queue.start()
        await asyncio.sleep(0.01)  # let it go idle
        await asyncio.to_thread(queue.enqueue, event("from-thread"))
        return await queue.aflush(5)

    assert asyncio.run(main())
    assert sender.completed == ["from-thread"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_forked_child_delivers_its_own_events_and_the_parent_is_unaffected(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """After fork the child starts its own sender for its own events; the parent's are untouched."""
    sender.gated_prefix = "parent"
    queue = make_queue()
    for i in range(3):
        queue.enqueue(event(f"parent-{i}"))
    parent_thread = delivery_threads()
    assert len(parent_thread) == 1

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            os.close(read_end)
            inherited = queue.stats()
            for i in range(4):
                queue.enqueue(event(f"child-{i}"))
            flushed = queue.flush(5)
            report = {
                "inherited_pending": inherited.pending,
                "flushed": flushed,
                "stats": [queue.stats().sent, queue.stats().queued, queue.stats().pending],
                "completed": [k for k in sender.completed if k.startswith("child")],
            }
            os.write(write_end, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    report = json.loads(b"".join(chunks))
    assert report["inherited_pending"] == 0
    assert report["flushed"] is True
    assert report["stats"] == [4, 4, 0]
    assert sorted(report["completed"]) == [f"child-{i}" for i in range(4)]

    # The parent: its sender thread was stopped for the fork and another took over the three
    # events, still pending, then delivered.
    assert len(delivery_threads()) == 1
    assert delivery_threads() != parent_thread
    assert queue.stats().pending == 3
    sender.gate.set()
    assert queue.flush(5)
    assert sorted(sender.completed) == [f"parent-{i}" for i in range(3)]


def test_flush_drains_on_its_own_loop_when_no_thread_can_start(
    make_queue: QueueFactory, sender: FakeSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At interpreter shutdown (no new threads), flush and close still deliver, inline."""
    queue = make_queue()

    def no_threads(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", no_threads)
    queue.enqueue(event("a"))
    queue.enqueue(event("b"))
    assert queue.close(5)
    assert sender.completed == ["a", "b"]


@pytest.mark.swallows_errors
def test_aclose_replaces_a_crashed_loop_sender_and_delivers(
    make_queue: QueueFactory, sender: FakeSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the loop's sender died on an internal error, aclose still drains through a new one."""
    queue = make_queue()
    real_take = queue._pump.take
    crashes: list[int] = []

    def take_once_broken(*args: object) -> object:
        if not crashes:
            crashes.append(1)
            raise RuntimeError("sender bug")
        return real_take(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(queue._pump, "take", take_once_broken)

    async def lifespan() -> bool:
        queue.start()
        queue.enqueue(event("a"))
        await asyncio.sleep(0.01)  # the sender crashes here
        delivered: bool = await queue.aclose(5)
        return delivered

    assert asyncio.run(lifespan())
    assert sender.completed == ["a"]
    assert crashes == [1]


def _run_in_thread(main: Callable[[], Coroutine[Any, Any, None]], timeout: float) -> bool:
    """Run ``asyncio.run(main())`` in a daemon thread; True if it returned within ``timeout``."""
    done = threading.Event()

    def target() -> None:
        asyncio.run(main())
        done.set()

    threading.Thread(target=target, daemon=True).start()
    return done.wait(timeout)


@pytest.mark.parametrize("window", [None, 30.0])
def test_a_loop_that_ends_with_a_wake_up_pending_still_ends(
    make_queue: QueueFactory, sender: FakeSender, window: float | None
) -> None:
    """The loop's end cancels the sender even when a wake-up arrived in the same turn.

    asyncio.wait_for (3.11) loses a cancellation that races with the result it waits for;
    the sender then waited again, for ever, and asyncio.run() never returned.
    """
    queue = make_queue(aggregate_window=window, spool_path=None)

    async def main() -> None:
        queue.enqueue(event("a"))  # starts the sender on this loop
        await asyncio.sleep(0.05)  # it delivered "a" and now waits to be woken
        queue.seal_now()  # wakes it in this very turn...
        queue.enqueue(event("b"))
        # ...and returning now makes asyncio.run cancel it in the next one.

    assert _run_in_thread(main, 10), "asyncio.run() hung on the delivery sender"
