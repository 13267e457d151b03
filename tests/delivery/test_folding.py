"""Folding by default: a sender that falls behind sums waiting events; nothing is ever refused."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from commet_middleware import UsageEvent
from commet_middleware.delivery._aggregation import aggregate_events
from commet_middleware.delivery._folding import Folds, UsageFold

from .conftest import DeadLetters, FakeSender, QueueFactory, event, wait_until


def _usage(
    key: str, value: int | float = 1, customer: str = "cus_1", feature: str = "api_calls"
) -> UsageEvent:
    return UsageEvent.create(customer, feature, value, idempotency_key=key)


def test_a_lone_event_is_sent_as_itself(make_queue: QueueFactory, sender: FakeSender) -> None:
    """At low load each event goes alone, with its own key: nothing folds."""
    queue = make_queue(fold_when_behind=True)
    for i in range(5):
        queue.enqueue(event(f"solo{i}"))
        assert queue.flush(5)
    assert sender.completed == [f"solo{i}" for i in range(5)]
    assert queue.aggregation_stats().aggregated_members == 0


def test_a_sender_behind_folds_waiting_events_into_exact_totals(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """While the only send slot is busy, 2,000 events of two groups wait as two folds; the total
    Commet is sent equals the total enqueued, and nothing is refused or dead-lettered."""
    sender.gated_prefix = "first"
    queue = make_queue(max_concurrency=1, queue_limit=10, fold_when_behind=True)
    queue.enqueue(event("first"))
    assert wait_until(lambda: len(sender.attempts) == 1)
    for i in range(1000):
        queue.enqueue(_usage(f"a{i}", 2, customer="cus_1"))
        queue.enqueue(_usage(f"b{i}", 3, customer="cus_2"))
    stats = queue.stats()
    assert (stats.pending, stats.dropped) == (2001, 0)
    sender.gate.set()
    assert queue.flush(5)
    assert dead_letters.received == []
    # Two aggregates followed the first event; their keys are sealed, their totals exact.
    assert len(sender.completed) == 3
    assert queue.stats().sent == 3
    assert queue.aggregation_stats().aggregated_members == 1998


def test_the_queue_holds_one_entry_per_distinct_group_however_fast_events_come(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """Twelve threads enqueueing 30,000 events of 5 groups against a stalled sender never meet
    a full queue (limit 50): each group waits as one fold, and the totals delivered are exact."""
    sender.gated_prefix = ""  # every send waits, aggregates too
    queue = make_queue(max_concurrency=2, queue_limit=50, fold_when_behind=True)
    delivered: list[float] = []
    queue.add_listener(lambda operation, result: delivered.append(operation.value))  # type: ignore[union-attr]

    def burst(t: int) -> None:
        for i in range(2500):
            queue.enqueue(_usage(f"k{t}-{i}", customer=f"cus_{i % 5}"))

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = queue.stats()
    assert stats.dropped == 0
    assert stats.queued == 30_000
    # Two sends in flight, at most one waiting fold per customer behind them.
    assert stats.queue_depth <= 2 + 5
    sender.gate.set()
    assert queue.flush(10)
    assert queue.stats().dead_lettered == 0
    assert sum(delivered) == 30_000


def test_fold_sums_ints_exactly_and_floats_correctly_rounded() -> None:
    """A fold's total is the exact int sum, or math.fsum of every float, without keeping them."""
    fold = UsageFold(_usage("f0", 0.1), None, None, 0.0)
    for i in range(1, 10):
        fold.join(_usage(f"f{i}", 0.1), None)
    sealed = fold.aggregate()
    assert sealed.value == 1.0  # fsum: sum() of ten 0.1 gives 0.9999999999999999
    ints = UsageFold(_usage("i0", 10**15), None, None, 0.0)
    ints.join(_usage("i1", 7), None)
    assert ints.aggregate().value == 10**15 + 7


def test_a_key_folded_twice_counts_once() -> None:
    """An event enqueued twice into one fold adds its value once, as Commet would count it."""
    fold = UsageFold(_usage("dup", 5), None, None, 0.0)
    fold.join(_usage("dup", 5), None)
    fold.join(_usage("other", 1), None)
    sealed = fold.aggregate()
    assert (sealed.value, fold.members) == (6, 3)
    assert sealed.idempotency_key.startswith("cm_agg_")


def test_a_full_or_old_fold_takes_no_more_members() -> None:
    """A fold closes at its member cap or age, so one aggregate never spans an outage's length."""
    now = [0.0]
    folds = Folds(quota=True, max_members=3, max_age=10.0, clock=lambda: now[0])
    first = folds.add_usage(_usage("a"), None, None)
    assert first is not None
    assert folds.add_usage(_usage("b"), None, None) is None
    assert folds.add_usage(_usage("c"), None, None) is None
    second = folds.add_usage(_usage("d"), None, None)  # the first holds 3: a new fold
    assert second is not None
    assert second is not first
    now[0] = 11.0
    third = folds.add_usage(_usage("e"), None, None)  # the second is too old
    assert third is not None
    assert third is not second
    assert (first.members, second.members, third.members) == (3, 1, 1)


@pytest.mark.parametrize("value", [1, 0.25])
def test_the_fold_key_is_the_aggregate_key_of_its_members(value: float) -> None:
    """A sealed fold carries the same key a window aggregate of the same members would."""
    members = [_usage(f"m{i}", value) for i in range(4)]
    fold = UsageFold(members[0], None, None, 0.0)
    for member in members[1:]:
        fold.join(member, None)
    assert fold.aggregate() == aggregate_events(members)
    assert Counter([fold.aggregate().idempotency_key]) == Counter(
        [aggregate_events(members).idempotency_key]
    )
