"""A full queue: memory stays bounded and no event disappears without a trace."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from commet_middleware.delivery import UndeliveredError

from .conftest import DeadLetters, FakeSender, QueueFactory, event


def test_drop_refuses_loudly_when_full(
    make_queue: QueueFactory,
    sender: FakeSender,
    dead_letters: DeadLetters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """overflow='drop' counts each refusal, calls the hook for each, and logs one ERROR line
    with customer and feature (rate-limited per feature: no log storm under overload)."""
    sender.gated_prefix = "k"
    queue = make_queue(queue_limit=3, overflow="drop", overflow_block_timeout=5.0)
    start = time.perf_counter()
    for i in range(5):
        queue.enqueue(event(f"k{i}", customer="cus_9", feature="storage_gb"))
    assert time.perf_counter() - start < 1.0  # drop never waits
    assert dead_letters.keys == ["k3", "k4"]
    assert all(
        isinstance(error, UndeliveredError) and error.reason == "queue_full"
        for _, error in dead_letters.received
    )
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "queue full" in r.message]
    assert len(errors) == 1
    assert "cus_9" in errors[0].message
    assert "storage_gb" in errors[0].message
    assert queue.stats().dropped == 2
    sender.gate.set()
    assert queue.flush(5)
    assert sorted(sender.completed) == ["k0", "k1", "k2"]


def test_block_waits_for_room_and_then_accepts(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """overflow='block' waits for the sender to make room, and the event is accepted."""
    sender.gated_prefix = "k"
    queue = make_queue(queue_limit=2, overflow="block", overflow_block_timeout=5.0)
    queue.enqueue(event("k0"))
    queue.enqueue(event("k1"))
    threading.Timer(0.05, sender.gate.set).start()
    queue.enqueue(event("k2"))  # blocks until the gate opens and a send finishes
    assert queue.flush(5)
    assert sorted(sender.completed) == ["k0", "k1", "k2"]
    assert queue.stats().dropped == 0
    assert dead_letters.received == []


def test_block_refuses_loudly_after_its_timeout(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """When no room appears within overflow_block_timeout the event goes to the hook, counted."""
    sender.gated_prefix = "k"
    queue = make_queue(queue_limit=2, overflow="block", overflow_block_timeout=0.02)
    for i in range(3):
        queue.enqueue(event(f"k{i}"))
    assert dead_letters.keys == ["k2"]
    assert queue.stats().dropped == 1


def test_block_never_blocks_an_event_loop(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """On an event loop a full queue refuses at once: waiting would stall every request."""
    sender.gated_prefix = "k"
    queue = make_queue(queue_limit=1, overflow="block", overflow_block_timeout=5.0)

    async def main() -> float:
        queue.enqueue(event("k0"))
        start = time.perf_counter()
        queue.enqueue(event("k1"))
        return time.perf_counter() - start

    assert asyncio.run(main()) < 1.0
    assert dead_letters.keys == ["k1"]


def test_spool_behaves_like_block_for_now_and_says_so_once(
    make_queue: QueueFactory,
    sender: FakeSender,
    dead_letters: DeadLetters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """overflow='spool' blocks like 'block' until the spool exists, with one warning."""
    sender.gated_prefix = "k"
    queue = make_queue(queue_limit=1, overflow="spool", overflow_block_timeout=0.01)
    for i in range(3):
        queue.enqueue(event(f"k{i}"))
    assert dead_letters.keys == ["k1", "k2"]
    assert caplog.text.count("not implemented yet") == 1


def test_retries_waiting_count_against_the_limit(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """Operations waiting to be retried still hold their place: memory stays bounded."""
    from commet_middleware import CommetTransportError

    sender.failing["k0"] = CommetTransportError("down")
    sender.failing["k1"] = CommetTransportError("down")
    queue = make_queue(queue_limit=2, overflow="drop")
    queue.enqueue(event("k0"))
    queue.enqueue(event("k1"))
    queue.enqueue(event("k2"))
    assert dead_letters.keys == ["k2"]
    assert queue.stats().pending == 2
