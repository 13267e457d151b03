"""A Commet that answers what is not Commet's, refuses the key, or is slow at shutdown: each
failure is classified, nothing counts as delivered before Commet recorded it, nothing is lost."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from commet_middleware import CommetSettings, UsageEvent
from commet_middleware.delivery import DeliveryQueue, UndeliveredError
from commet_middleware.testing import FakeCommet

from .conftest import DeadLetters, FastSleep, QueueFactory, wait_until


class ScaledSleep(FastSleep):
    """Records the delays asked for and waits a thousandth of each."""

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(delay / 1000)


@pytest.fixture
def fake() -> FakeCommet:
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_customer("cus_1")
    return fake


@pytest.fixture
def build(fake: FakeCommet, dead_letters: DeadLetters) -> Iterator[QueueFactory]:
    made: list[DeliveryQueue] = []

    def make(**overrides: object) -> DeliveryQueue:
        values: dict[str, object] = {
            "api_key": "ck_test_secret",
            "base_url": "http://commet.test",
            "transport": fake.transport,
            "dead_letter": dead_letters,
            # One event, one request: each fault below meets an event of its own.
            "fold_when_behind": False,
        }
        values.update(overrides)
        queue = DeliveryQueue(CommetSettings(**values), sleep=ScaledSleep())  # type: ignore[arg-type]
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close(1)


def usage(n: int, prefix: str = "evt") -> list[UsageEvent]:
    return [
        UsageEvent.create("cus_1", "api_calls", 1, idempotency_key=f"{prefix}-{i}")
        for i in range(n)
    ]


def ledger(fake: FakeCommet) -> Counter[str | None]:
    return Counter(recorded.idempotency_key for recorded in fake.events())


@pytest.mark.parametrize("fault", ["html_next", "truncated_next"])
def test_a_2xx_that_is_not_commets_answer_is_retried_not_counted(
    build: QueueFactory, fake: FakeCommet, dead_letters: DeadLetters, fault: str
) -> None:
    """An HTML 200 (a proxy's login page) or a truncated 201 is a transient failure: the events
    are sent again, each lands exactly once, and none counted as sent before Commet had it."""
    getattr(fake.faults, fault)(5)
    queue = build(max_concurrency=1)
    events = usage(8)
    for event in events:
        queue.enqueue(event)
    assert queue.flush(10)
    assert ledger(fake) == Counter(event.idempotency_key for event in events)
    stats = queue.stats()
    assert (stats.sent, stats.retried, stats.dead_lettered) == (8, 5, 0)
    assert dead_letters.received == []


@pytest.mark.parametrize(
    ("fault", "fix"),
    [
        ("unauthorized_next", "COMMET_API_KEY"),
        ("forbidden_next", "403"),
        ("bare_not_found_next", "COMMET_BASE_URL"),
    ],
)
def test_a_configuration_failure_holds_the_events_and_says_so_once(
    build: QueueFactory,
    fake: FakeCommet,
    dead_letters: DeadLetters,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    fix: str,
) -> None:
    """401, 403 and a 404 without a Commet code for the first sends: no event is dead-lettered,
    one ERROR names the fix (without the key), and once it is fixed every event lands once."""
    getattr(fake.faults, fault)(6)
    queue = build(max_concurrency=2)
    events = usage(10)
    with caplog.at_level(logging.INFO, logger="commet_middleware.delivery"):
        for event in events:
            queue.enqueue(event)
        assert queue.flush(10)
    assert ledger(fake) == Counter(event.idempotency_key for event in events)
    assert dead_letters.received == []
    assert queue.stats().dead_lettered == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert fix in errors[0].getMessage()
    assert "ck_test_secret" not in caplog.text
    assert "recovered" in caplog.text


def test_configuration_failures_wait_minutes_not_seconds(fake: FakeCommet) -> None:
    """A refused key is retried on the slow schedule: the waits grow to minutes, not 30 s."""
    fake.faults.unauthorized_next(12)
    sleep = ScaledSleep()
    queue = DeliveryQueue(
        CommetSettings(
            api_key="ck_test",
            base_url="http://commet.test",
            transport=fake.transport,
            fold_when_behind=False,
        ),
        sleep=sleep,
    )
    try:
        queue.enqueue(usage(1)[0])
        assert wait_until(lambda: len(sleep.delays) >= 12, timeout=30)
        assert max(sleep.delays) > 60  # past the transient cap of 30 s
        assert max(sleep.delays) <= 300
    finally:
        queue.close(60)
    assert fake.usage_total("cus_1", "api_calls") == 1


def test_permanent_refusals_are_dead_lettered_with_one_log_line_per_code_and_feature(
    build: QueueFactory,
    fake: FakeCommet,
    dead_letters: DeadLetters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fifty events of an unknown customer each reach the hook and the counter, and the log
    gets one ERROR for them, not fifty; the close summary counts the rest."""
    queue = build()
    with caplog.at_level(logging.INFO, logger="commet_middleware.delivery"):
        for i in range(50):
            queue.enqueue(UsageEvent.create("cus_nobody", "api_calls", 1, idempotency_key=f"n{i}"))
        assert queue.flush(10)
        queue.close(1)
    assert len(dead_letters.received) == 50
    assert queue.stats().dead_lettered == 50
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert "customer_not_found" in errors[0]
    assert "49 more" in errors[1]


def test_a_stuck_shutdown_reports_exactly_what_was_not_delivered(
    fake: FakeCommet, dead_letters: DeadLetters, caplog: pytest.LogCaptureFixture
) -> None:
    """Commet holds two sends past the close timeout: the report names exactly the events Commet
    has not recorded, and tells the two in flight (maybe recorded) from those never sent."""
    hold = fake.faults.hold_next(2)
    queue = DeliveryQueue(
        CommetSettings(
            api_key="ck_test",
            base_url="http://commet.test",
            transport=fake.transport,
            dead_letter=dead_letters,
            max_concurrency=2,
            fold_when_behind=False,
        )
    )
    events = usage(6)
    try:
        for event in events:
            queue.enqueue(event)
        assert hold.wait_until_held(2)
        with caplog.at_level(logging.ERROR, logger="commet_middleware.delivery"):
            assert not queue.close(0.5)
    finally:
        hold.release()
    assert len(dead_letters.received) == 6
    maybe = [op.idempotency_key for op, err in dead_letters.received if err.maybe_delivered]  # type: ignore[attr-defined]
    assert len(maybe) == 2
    assert all(isinstance(error, UndeliveredError) for _, error in dead_letters.received)
    assert "4 never sent, 2 sent without an answer" in caplog.text
    assert queue.stats().pending == 0


def test_a_send_answered_within_the_close_grace_counts_as_delivered(
    fake: FakeCommet, dead_letters: DeadLetters
) -> None:
    """Sends in flight when the flush runs out of time get the close's grace to be answered: an
    answer then counts them delivered, and nothing is reported undelivered."""
    hold = fake.faults.hold_next(2)
    queue = DeliveryQueue(
        CommetSettings(
            api_key="ck_test",
            base_url="http://commet.test",
            transport=fake.transport,
            dead_letter=dead_letters,
            max_concurrency=2,
            fold_when_behind=False,
        )
    )
    for event in usage(2):
        queue.enqueue(event)
    assert hold.wait_until_held(2)

    def answer_once_the_flush_gave_up() -> None:
        wait_until(lambda: queue._state.closing)  # the close stopped taking: the grace began
        hold.release()

    releaser = threading.Thread(target=answer_once_the_flush_gave_up)
    releaser.start()
    try:
        assert queue.close(2.5)  # 2 s of flush (held: runs out), then up to 0.5 s of grace
    finally:
        hold.release()
        releaser.join()
    assert dead_letters.received == []
    assert len(fake.events()) == 2
    assert queue.stats().sent == 2
