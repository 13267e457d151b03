"""Opt-in aggregation: usage events of one group and window go out as one event, totals exact."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable

import pytest

from commet_middleware import CommetSettings, CommetTransportError, QuotaChange, UsageEvent
from commet_middleware._models import Operation
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.delivery._aggregation import (
    AGGREGATE_KEY_PREFIX,
    QUOTA_AGGREGATE_KEY_PREFIX,
    Aggregator,
    aggregate_events,
    aggregate_key,
    sum_values,
)
from commet_middleware.testing import FakeCommet

from .conftest import FakeSender, QueueFactory

CUSTOMERS = ("cus_a", "cus_b", "cus_c")
# A window no test waits out: windows are sealed by seal_now() or a flush.
LONG_WINDOW = 1000.0


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recorder(queue: DeliveryQueue) -> list[Operation]:
    """Return a list the queue appends every accepted operation to."""
    accepted: list[Operation] = []
    queue.add_listener(lambda operation, result: accepted.append(operation))
    return accepted


def enqueue_grid(queue: DeliveryQueue, per_group: int) -> None:
    """Enqueue ``per_group`` ints of api_calls and floats of ai_tokens for every customer."""
    for n in range(per_group):
        for customer in CUSTOMERS:
            queue.enqueue(
                UsageEvent.create(customer, "api_calls", 2, idempotency_key=f"{customer}-c{n}")
            )
            queue.enqueue(
                UsageEvent.create(customer, "ai_tokens", 0.1, idempotency_key=f"{customer}-t{n}")
            )


def test_sum_values_is_exact_for_ints_and_floats() -> None:
    """Ints sum to an int; floats are summed with math.fsum (no accumulated rounding)."""
    assert sum_values([1, 2, 3]) == 6
    assert isinstance(sum_values([1, 2, 3]), int)
    assert sum_values([0.1] * 10) == 1.0
    assert sum_values([1, 0.5]) == 1.5


def test_aggregate_key_is_deterministic_and_order_free() -> None:
    """The same members give the same key in any order; other members give another key."""
    assert aggregate_key(["a", "b"]) == aggregate_key(["b", "a"])
    assert aggregate_key(["a", "b"]) != aggregate_key(["a", "c"])
    assert aggregate_key(["a"]).startswith(AGGREGATE_KEY_PREFIX)


def test_aggregate_takes_the_first_members_timestamp_and_properties() -> None:
    """An aggregate is billed at its window's first timestamp, with the shared properties."""
    first = UsageEvent.create(
        "cus_a", "api_calls", 1, idempotency_key="k1", timestamp="2026-01-01T00:00:00Z",
        properties={"model": "small"},
    )  # fmt: skip
    second = UsageEvent.create(
        "cus_a", "api_calls", 4, idempotency_key="k2", timestamp="2026-01-01T00:00:01Z",
        properties={"model": "small"},
    )  # fmt: skip
    aggregate = aggregate_events([first, second])
    assert aggregate.value == 5
    assert aggregate.timestamp == first.timestamp
    assert aggregate.properties == first.properties
    assert aggregate.idempotency_key == aggregate_key(["k1", "k2"])


def test_a_key_repeated_within_a_window_counts_once() -> None:
    """An app's own retry (same idempotency key) inside one window is not summed twice."""
    first = UsageEvent.create("cus_a", "api_calls", 2, idempotency_key="k1")
    again = UsageEvent.create("cus_a", "api_calls", 2, idempotency_key="k1")
    other = UsageEvent.create("cus_a", "api_calls", 3, idempotency_key="k2")
    aggregate = aggregate_events([first, again, other])
    assert aggregate.value == 5
    assert aggregate.idempotency_key == aggregate_key(["k1", "k2"])


def test_aggregator_seals_a_group_when_its_window_ends() -> None:
    """Manual clock: only groups whose window ran out are due; a full group is due at once."""
    clock = ManualClock()
    aggregator: Aggregator[str] = Aggregator(0.5, clock, max_members=3)
    early = UsageEvent.create("cus_a", "api_calls", 1, idempotency_key="e")
    late = UsageEvent.create("cus_b", "api_calls", 1, idempotency_key="l")
    assert aggregator.add(early, "e1") is True  # the first deadline: wake the sender
    clock.now = 0.3
    assert aggregator.add(late, "l1") is False
    assert aggregator.add(early, "e2") is False
    assert aggregator.next_deadline() == 0.5
    assert aggregator.take_due() == []
    clock.now = 0.5
    assert aggregator.take_due() == [["e1", "e2"]]
    assert aggregator.members == 1
    assert aggregator.add(late, "l2") is False
    assert aggregator.add(late, "l3") is True  # full: seal now
    assert aggregator.take_due() == [["l1", "l2", "l3"]]
    assert aggregator.next_deadline() is None


def test_groups_become_one_aggregate_each_with_exact_sums(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """N events for 3 customers x 2 features become 6 aggregates with exact int and float sums."""
    queue = make_queue(aggregate_window=LONG_WINDOW)
    accepted = recorder(queue)
    enqueue_grid(queue, 50)
    assert queue.stats().pending == 300
    assert sender.attempts == []  # held until sealed
    queue.seal_now()
    assert queue.flush(5)
    assert len(accepted) == 6
    totals = {
        (op.customer_id, op.feature): op.value for op in accepted if isinstance(op, UsageEvent)
    }
    for customer in CUSTOMERS:
        assert totals[(customer, "api_calls")] == 100
        assert isinstance(totals[(customer, "api_calls")], int)
        assert totals[(customer, "ai_tokens")] == math.fsum([0.1] * 50)
    assert all(op.idempotency_key.startswith(AGGREGATE_KEY_PREFIX) for op in accepted)
    stats = queue.aggregation_stats()
    assert (stats.aggregated_members, stats.aggregates_sent, stats.open_members) == (300, 6, 0)
    assert queue.stats().sent == 6


def test_different_properties_are_not_merged(make_queue: QueueFactory) -> None:
    """Events that differ only in their properties stay in separate aggregates."""
    queue = make_queue(aggregate_window=LONG_WINDOW)
    accepted = recorder(queue)
    for n in range(4):
        for model in ("small", "large"):
            queue.enqueue(
                UsageEvent.create(
                    "cus_a",
                    "ai_tokens",
                    3,
                    idempotency_key=f"{model}-{n}",
                    properties={"model": model},
                )
            )
    assert queue.flush(5)
    by_model = {
        dict(op.properties)["model"]: op.value for op in accepted if isinstance(op, UsageEvent)
    }
    assert by_model == {"small": 12, "large": 12}


def test_quota_changes_keep_their_order_beside_usage_groups(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """Quota changes go out in enqueue order; the adds after the remove share one aggregate."""
    queue = make_queue(aggregate_window=LONG_WINDOW)
    accepted = recorder(queue)
    changes = [
        QuotaChange.create("cus_a", "seats", action, 1, idempotency_key=f"q{n}")
        for n, action in enumerate(("add", "remove", "add", "add"))
    ]
    for n, change in enumerate(changes):
        queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key=f"u{n}"))
        queue.enqueue(change)
    assert queue.flush(5)
    # Listeners hear of every member, in order, the aggregated ones included.
    assert [op for op in accepted if isinstance(op, QuotaChange)] == changes
    quota_keys = [key for key in sender.completed if not key.startswith(AGGREGATE_KEY_PREFIX)]
    assert quota_keys == [
        "q0",
        "q1",
        aggregate_key(["q2", "q3"], prefix=QUOTA_AGGREGATE_KEY_PREFIX),
    ]
    usage = [op for op in accepted if isinstance(op, UsageEvent)]
    assert [op.value for op in usage] == [4]


def test_a_retried_aggregate_resends_identical_bytes_with_the_same_key(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """A failed aggregate is retried with the very same body and key, never re-split."""
    key = aggregate_key(["r1", "r2", "r3"])
    sender.script[key] = [CommetTransportError("connection reset"), CommetTransportError("again")]
    queue = make_queue(aggregate_window=LONG_WINDOW)
    for member in ("r1", "r2", "r3"):
        queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key=member))
    queue.seal_now()
    assert queue.flush(5)
    bodies = sender.attempts_for(key)
    assert len(bodies) == 3
    assert len(set(bodies)) == 1
    assert sender.completed == [key]
    assert queue.stats().retried == 2


def test_flush_seals_and_delivers(make_queue: QueueFactory, sender: FakeSender) -> None:
    """flush seals the open groups at once and returns only when the aggregates are delivered."""
    queue = make_queue(aggregate_window=LONG_WINDOW)
    for n in range(10):
        queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key=f"f{n}"))
    assert queue.aggregation_stats().open_members == 10
    assert queue.flush(5)
    assert queue.stats().pending == 0
    assert sender.completed == [aggregate_key([f"f{n}" for n in range(10)])]


def test_close_seals_open_groups(make_queue: QueueFactory, sender: FakeSender) -> None:
    """close delivers the open groups as aggregates and reports everything delivered."""
    queue = make_queue(aggregate_window=LONG_WINDOW)
    queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key="c1"))
    queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key="c2"))
    assert queue.close(5) is True
    assert sender.completed == [aggregate_key(["c1", "c2"])]


def test_a_window_seals_on_the_sender_without_a_flush(make_queue: QueueFactory) -> None:
    """With a short window the sender's timer seals and sends the group on its own."""
    queue = make_queue(aggregate_window=0.01)
    accepted = recorder(queue)
    for n in range(5):
        queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key=f"w{n}"))
    # Waits for the sender's timer, not for a flush (which would seal the group itself).
    give_up = time.monotonic() + 5
    while not accepted and time.monotonic() < give_up:
        time.sleep(0.01)
    assert [op.value for op in accepted if isinstance(op, UsageEvent)] == [5]


FaultSetup = Callable[[FakeCommet], None]


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param(lambda fake: None, id="no_faults"),
        pytest.param(lambda fake: fake.faults.fail_next(3, status=503), id="fail_next"),
        pytest.param(lambda fake: fake.faults.drop_after_write_next(3), id="drop_after_write"),
    ],
)
def test_fake_commet_records_one_event_per_group_with_exact_totals(faults: FaultSetup) -> None:
    """FakeCommet, faults too: one recorded event per group, exact totals, nothing doubled."""
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_feature("ai_tokens")
    for customer in CUSTOMERS:
        fake.add_customer(customer)
    faults(fake)
    settings = CommetSettings(
        api_key="ck_test",
        transport=fake.transport,
        aggregate_window=LONG_WINDOW,
        backoff_base=0.001,
    )
    queue = DeliveryQueue(settings, backoff_cap=0.01)
    try:
        enqueue_grid(queue, 40)
        assert queue.flush(10)
    finally:
        assert queue.close(5)
    for customer in CUSTOMERS:
        assert fake.usage_total(customer, "api_calls") == 80
        assert fake.usage_total(customer, "ai_tokens") == pytest.approx(math.fsum([0.1] * 40))
    recorded = Counter(event.idempotency_key for event in fake.events())
    assert len(recorded) == 6
    assert max(recorded.values()) == 1
    assert len(fake.events()) == 6


def test_aflush_seals_on_an_event_loop_sender(make_queue: QueueFactory, sender: FakeSender) -> None:
    """On an app's event loop (an asyncio sender), aflush seals and delivers the aggregate."""
    queue = make_queue(aggregate_window=LONG_WINDOW)

    async def main() -> bool:
        for n in range(4):
            queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key=f"a{n}"))
        delivered = await queue.aflush(5)
        await queue.aclose(5)
        return delivered

    assert asyncio.run(main())
    assert sender.completed == [aggregate_key([f"a{n}" for n in range(4)])]


def test_a_burst_larger_than_the_queue_limit_within_one_window_is_not_refused(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """1,000 events of one group in one window under queue_limit=100: all delivered, summed.

    Held members count against the limit, so a group seals at a quarter of it; one group that
    could grow to the limit would leave the next enqueue no room until its window ended.
    """
    queue = make_queue(aggregate_window=LONG_WINDOW, queue_limit=100)
    accepted = recorder(queue)
    for n in range(1000):
        queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key=f"b{n}"))
    assert queue.flush(10)
    stats = queue.stats()
    assert stats.dropped == 0
    assert sum(op.value for op in accepted if isinstance(op, UsageEvent)) == 1000
    # Sealed at 25 members each (a quarter of the limit), not one aggregate of 1,000.
    assert len(sender.completed) >= 1000 // 25
