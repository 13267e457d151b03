"""A sender that lives as long as the process: events recorded on loops that ended still go out."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import commet_middleware
from commet_middleware import CommetSettings, QuotaChange, UsageEvent
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.testing import FakeCommet

from .conftest import DeadLetters, FakeSender, QueueFactory, event, wait_until


@pytest.fixture
def fake() -> FakeCommet:
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_feature("seats", quota=True, included=100)
    fake.add_customer("cus_1")
    return fake


@pytest.fixture
def emulated(fake: FakeCommet, dead_letters: DeadLetters) -> Iterator[DeliveryQueue]:
    queue = DeliveryQueue(
        CommetSettings(
            api_key="ck_test",
            base_url="http://commet.test",
            transport=fake.transport,
            dead_letter=dead_letters,
        )
    )
    yield queue
    queue.close(2)


def test_events_of_two_successive_asyncio_run_loops_arrive_while_the_process_lives(
    emulated: DeliveryQueue, fake: FakeCommet, dead_letters: DeadLetters
) -> None:
    """Usage events and quota adds recorded inside two asyncio.run calls (no lifespan, no flush)
    reach Commet exactly once while the process goes on: the sender outlives each loop."""

    async def requests(prefix: str) -> None:
        emulated.start()  # as the middleware does on its first request: a task on this loop
        for i in range(3):
            emulated.enqueue(
                UsageEvent.create("cus_1", "api_calls", 1, idempotency_key=f"{prefix}{i}")
            )
            emulated.enqueue(
                QuotaChange.create("cus_1", "seats", "add", 1, idempotency_key=f"q{prefix}{i}")
            )

    asyncio.run(requests("a"))
    asyncio.run(requests("b"))
    assert wait_until(
        lambda: (
            fake.usage_total("cus_1", "api_calls") == 6
            and fake.quota("cus_1", "seats").current == 6
        )
    )
    assert dead_letters.received == []
    assert emulated.stats().pending == 0


def test_a_loop_that_ends_mid_send_hands_its_work_to_a_thread(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """Sends cut off by the end of their loop are taken up by a thread at once, not at exit."""
    sender.gated_prefix = "k"
    queue = make_queue()

    async def request_handling() -> None:
        queue.start()
        for i in range(4):
            queue.enqueue(event(f"k{i}"))
        await asyncio.sleep(0.02)  # the sends have started and hang on the gate

    asyncio.run(request_handling())
    sender.gate.set()
    assert wait_until(lambda: sorted(sender.completed) == [f"k{i}" for i in range(4)])
    assert wait_until(lambda: queue.stats().pending == 0)


def test_module_flush_delivers_every_queue_of_the_process(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """commet_middleware.flush() waits for every live queue, as a script or job worker needs."""
    first, second = make_queue(), make_queue()
    sender.delay = 0.01
    for i in range(5):
        first.enqueue(event(f"a{i}"))
        second.enqueue(event(f"b{i}"))
    assert commet_middleware.flush(5)
    assert sorted(sender.completed) == sorted(
        [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    )


def test_module_aflush_does_not_block_the_loop(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """await commet_middleware.aflush() delivers everything, for a serverless handler's end."""
    queue = make_queue()

    async def handler() -> bool:
        for i in range(5):
            queue.enqueue(event(f"h{i}"))
        return await commet_middleware.aflush(5)

    assert asyncio.run(handler())
    assert sorted(sender.completed) == [f"h{i}" for i in range(5)]


def test_module_flush_reports_a_timeout(make_queue: QueueFactory, sender: FakeSender) -> None:
    """flush() returns False when its timeout runs out with work still pending."""
    sender.gated_prefix = "stuck"
    queue = make_queue()
    queue.enqueue(event("stuck-1"))
    assert not commet_middleware.flush(0.1)
    sender.gate.set()
    assert commet_middleware.flush(5)


def test_close_on_the_thread_of_a_loop_closed_under_its_sender(
    make_queue: QueueFactory, sender: FakeSender, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop closed without cancelling the sender's task (``run_until_complete`` then
    ``close()``, as some harnesses do), everything delivered, then ``close()`` on that same
    thread: the dead sender is not woken on its closed loop (which raised "Event loop is
    closed" out of close); close reports success, and a later event still goes out."""
    queue = make_queue(fold_when_behind=True)
    loop = asyncio.new_event_loop()

    async def record() -> None:
        queue.enqueue(event("on-loop"))
        assert await asyncio.to_thread(wait_until, lambda: sender.completed == ["on-loop"])

    loop.run_until_complete(record())
    loop.close()
    assert queue.close(5)
    assert "close failed" not in caplog.text
    queue.enqueue(event("after"))
    assert queue.flush(5)
    assert sender.completed == ["on-loop", "after"]


def test_a_closed_queue_no_longer_holds_up_the_process_wide_flush(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """A queue closed with an event it could not deliver (its sends hang) is off the process's
    list: ``commet_middleware.flush()`` answers for the queues still in use at once instead of
    waiting its whole timeout on it. An enqueue after the close puts it back on the list, and
    the module flush delivers that event."""
    from commet_middleware.delivery import _process

    stuck = make_queue()
    sender.gated_prefix = "stuck"
    stuck.enqueue(event("stuck-1"))
    assert wait_until(lambda: len(sender.attempts) == 1)
    assert not stuck.close(0.3)
    assert stuck not in _process.live_queues
    assert commet_middleware.flush(5)
    sender.gated_prefix = None
    stuck.enqueue(event("again"))
    assert stuck in _process.live_queues
    assert commet_middleware.flush(5)
    assert "again" in sender.completed
