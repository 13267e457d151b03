"""The pipeline with the real client against the emulator: what Commet recorded is what was sent."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from commet_middleware import CommetSettings, QuotaChange, UsageEvent
from commet_middleware._errors import CommetAPIError
from commet_middleware._settings import Dialect
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.testing import FakeCommet

from .conftest import DeadLetters, FastSleep, QueueFactory


class ScaledSleep(FastSleep):
    """Records the delays asked for and waits a thousandth of each."""

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(delay / 1000)


@pytest.fixture
def fake() -> FakeCommet:
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_feature("seats", quota=True, included=100)
    fake.add_customer("cus_1")
    fake.add_customer("cus_2")
    return fake


@pytest.fixture
def scaled_sleep() -> ScaledSleep:
    return ScaledSleep()


@pytest.fixture
def build(
    fake: FakeCommet, scaled_sleep: ScaledSleep, dead_letters: DeadLetters
) -> Iterator[QueueFactory]:
    made: list[DeliveryQueue] = []

    def make(dialect: Dialect = "v1", **overrides: object) -> DeliveryQueue:
        settings = CommetSettings(
            api_key="ck_test",
            base_url="http://commet.test",
            transport=fake.transport,
            dialect=dialect,
            dead_letter=dead_letters,
            **{"fold_when_behind": False, **overrides},  # type: ignore[arg-type]
        )
        queue = DeliveryQueue(settings, sleep=scaled_sleep)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close(1)


def usage(n: int, prefix: str = "evt", customer: str = "cus_1") -> list[UsageEvent]:
    return [
        UsageEvent.create(customer, "api_calls", 1, idempotency_key=f"{prefix}-{i}")
        for i in range(n)
    ]


def ledger(fake: FakeCommet) -> Counter[str | None]:
    return Counter(recorded.idempotency_key for recorded in fake.events())


def assert_exactly_once(fake: FakeCommet, events: list[UsageEvent]) -> None:
    assert ledger(fake) == Counter(event.idempotency_key for event in events)


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_a_burst_of_5xx_loses_and_doubles_nothing(
    build: QueueFactory, fake: FakeCommet, dialect: Dialect
) -> None:
    """Ten 503s in a row are retried; the ledger holds every event exactly once."""
    fake.faults.fail_next(10, status=503)
    queue = build(dialect)
    events = usage(20)
    for event in events:
        queue.enqueue(event)
    assert queue.flush(10)
    assert_exactly_once(fake, events)
    assert queue.stats().retried >= 10
    assert fake.usage_total("cus_1", "api_calls") == 20


def test_429_waits_at_least_retry_after(
    build: QueueFactory, fake: FakeCommet, scaled_sleep: ScaledSleep
) -> None:
    """A 429 with Retry-After is retried no sooner than it says; nothing lost or doubled."""
    fake.faults.rate_limit_next(3, retry_after=2)
    queue = build(max_concurrency=1)
    events = usage(5)
    for event in events:
        queue.enqueue(event)
    assert queue.flush(10)
    assert_exactly_once(fake, events)
    assert len(scaled_sleep.delays) == 3
    assert all(delay >= 2.0 for delay in scaled_sleep.delays)


def test_latency_at_commet_does_not_reach_the_caller(build: QueueFactory, fake: FakeCommet) -> None:
    """With every request slowed, enqueue stays instant and all events land once."""
    fake.faults.latency(0.2)
    queue = build(max_concurrency=8)
    events = usage(16)
    start = time.perf_counter()
    for event in events:
        queue.enqueue(event)
    assert time.perf_counter() - start < 0.2
    assert queue.flush(10)
    assert_exactly_once(fake, events)


def test_dropped_connections_are_retried(build: QueueFactory, fake: FakeCommet) -> None:
    """Connections dropped before Commet read the request are retried; each event lands once."""
    fake.faults.drop_next(6)
    queue = build()
    events = usage(10)
    for event in events:
        queue.enqueue(event)
    assert queue.flush(10)
    assert_exactly_once(fake, events)


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_a_lost_response_after_the_write_lands_exactly_once(
    build: QueueFactory, fake: FakeCommet, dialect: Dialect
) -> None:
    """Commet commits then answers 503 (or drops): the retry is deduplicated, not recorded twice."""
    fake.faults.fail_after_write_next(4, status=503)
    fake.faults.drop_after_write_next(3)
    queue = build(dialect)
    events = usage(10)
    for event in events:
        queue.enqueue(event)
    assert queue.flush(10)
    assert_exactly_once(fake, events)
    stats = queue.stats()
    assert (stats.sent, stats.dead_lettered) == (10, 0)
    assert stats.retried >= 7


def test_the_same_event_twice_is_recorded_once(
    build: QueueFactory, fake: FakeCommet, dead_letters: DeadLetters
) -> None:
    """An event enqueued twice (same key, same bytes) is counted delivered twice, recorded once."""
    queue = build(max_concurrency=1)
    [event] = usage(1)
    queue.enqueue(event)
    assert queue.flush(5)
    queue.enqueue(event)
    assert queue.flush(5)
    assert_exactly_once(fake, [event])
    assert queue.stats().sent == 2
    assert dead_letters.received == []


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_a_recorded_key_sent_again_with_another_body_is_recorded_once(
    build: QueueFactory, fake: FakeCommet, dead_letters: DeadLetters, dialect: Dialect
) -> None:
    """Same key, new timestamp (a re-executed request): legacy answers 409 duplicate, v1
    idempotency_key_mismatch; both mean Commet has it, so it is recorded once, nothing is lost."""
    queue = build(dialect, max_concurrency=1)
    for second in (0, 1):
        queue.enqueue(
            UsageEvent.create(
                "cus_1",
                "api_calls",
                1,
                idempotency_key="same",
                timestamp=f"2026-01-01T00:00:0{second}.000Z",
            )
        )
        assert queue.flush(5)
    assert ledger(fake) == Counter({"same": 1})
    stats = queue.stats()
    assert (stats.sent, stats.duplicates, stats.dead_lettered) == (2, 1, 0)
    assert dead_letters.received == []


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_one_event_key_for_two_customers_bills_both(
    build: QueueFactory, fake: FakeCommet, dead_letters: DeadLetters, dialect: Dialect
) -> None:
    """Event keys are per customer at Commet: the same key for two customers records two events."""
    queue = build(dialect)
    for customer in ("cus_1", "cus_2"):
        queue.enqueue(UsageEvent.create(customer, "api_calls", 1, idempotency_key="shared"))
    assert queue.flush(5)
    assert sorted(event.customer_id for event in fake.events()) == ["cus_1", "cus_2"]
    assert queue.stats().duplicates == 0
    assert dead_letters.received == []


def test_rejected_operations_reach_the_dead_letter_hook_and_nothing_else_does(
    build: QueueFactory, fake: FakeCommet, dead_letters: DeadLetters
) -> None:
    """Unknown customer, unknown feature and a quota removal below zero are dead-lettered; the
    good ones are recorded once."""
    queue = build()
    good = usage(5)
    bad: list[UsageEvent | QuotaChange] = [
        UsageEvent.create("cus_missing", "api_calls", 1, idempotency_key="bad-customer"),
        UsageEvent.create("cus_1", "no_such_feature", 1, idempotency_key="bad-feature"),
        QuotaChange.create("cus_2", "seats", "remove", 3, idempotency_key="bad-balance"),
    ]
    for operation in [*good[:2], *bad, *good[2:]]:
        queue.enqueue(operation)
    assert queue.flush(10)
    assert_exactly_once(fake, good)
    assert sorted(dead_letters.keys) == ["bad-balance", "bad-customer", "bad-feature"]
    codes = {
        op.idempotency_key: err.code
        for op, err in dead_letters.received
        if isinstance(err, CommetAPIError)
    }
    assert codes == {
        "bad-customer": "customer_not_found",
        "bad-feature": "feature_not_found",
        "bad-balance": "insufficient_balance",
    }
    assert queue.stats().dead_lettered == 3


def test_quota_changes_survive_faults_exactly_once(build: QueueFactory, fake: FakeCommet) -> None:
    """Quota adds through 5xx and lost responses move the balance exactly once each."""
    fake.faults.fail_next(3)
    fake.faults.fail_after_write_next(2)
    queue = build()
    for i in range(4):
        queue.enqueue(QuotaChange.create("cus_1", "seats", "add", 2, idempotency_key=f"q-{i}"))
    assert queue.flush(10)
    assert fake.quota("cus_1", "seats").current == 8
    assert len(fake.quota_events("cus_1", "seats")) == 4


def test_a_queue_on_an_asgi_style_loop_delivers_through_the_real_client(
    build: QueueFactory, fake: FakeCommet
) -> None:
    """Started on a running loop and closed with aclose, events land once over the real client."""
    queue = build()
    events = usage(10)

    async def lifespan() -> bool:
        queue.start()
        for event in events:
            queue.enqueue(event)
        delivered: bool = await queue.aclose(10)
        return delivered

    fake.faults.fail_next(3)
    assert asyncio.run(lifespan())
    assert_exactly_once(fake, events)
