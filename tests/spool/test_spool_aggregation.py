"""Aggregation with the spool: members durable at once, sealed in one transaction, never doubled."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from commet_middleware import UsageEvent
from commet_middleware._models import Operation
from commet_middleware._spool import Spool, SpoolSealError
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.delivery._aggregation import aggregate_events, aggregate_key

from .conftest import QueueFactory, RecordingSender, encode, enqueue_committed, rows

LONG_WINDOW = 1000.0
CUSTOMERS = ("cus_a", "cus_b")


def members(customer: str, count: int = 5) -> list[UsageEvent]:
    """``count`` usage events of one customer's group, values 1..count."""
    return [
        UsageEvent.create(customer, "api_calls", n + 1, idempotency_key=f"{customer}-{n}")
        for n in range(count)
    ]


def totals(operations: list[Operation]) -> dict[str, int | float]:
    """Sum the accepted usage values per customer."""
    summed: dict[str, int | float] = defaultdict(int)
    for operation in operations:
        if isinstance(operation, UsageEvent):
            summed[operation.customer_id] += operation.value
    return dict(summed)


def recorder(queue: DeliveryQueue) -> list[Operation]:
    """Return a list the queue appends every accepted operation to."""
    accepted: list[Operation] = []
    queue.add_listener(lambda operation, result: accepted.append(operation))
    return accepted


def crashed_queue(make_queue: QueueFactory, spool: Spool) -> DeliveryQueue:
    """A queue whose sender never runs: what it holds is only in the spool and in memory."""
    queue = make_queue(spool=spool, aggregate_window=LONG_WINDOW)
    queue._slot.ensure = lambda **kwargs: True  # type: ignore[method-assign]
    return queue


def crash(queue: DeliveryQueue, spool: Spool) -> None:
    """Lose the queue's memory and let its spool leases run out, as a SIGKILL would."""
    queue._reset()
    spool.release()


def test_members_are_spooled_once_their_commit_is_done(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """With aggregation on, every member is committed to the file when its commit is done."""
    queue = make_queue(aggregate_window=LONG_WINDOW)
    events = members("cus_a", 3)
    enqueue_committed(queue, *events)
    assert rows(spool_path) == [(op.idempotency_key, encode(op, "v1")) for op in events]
    assert sender.attempts == []


def test_seal_replaces_the_members_by_one_aggregate_row(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """After the seal the file holds only the aggregate, with its key and encoded body."""
    sender.gate.clear()
    queue = make_queue(aggregate_window=LONG_WINDOW)
    events = members("cus_a")
    enqueue_committed(queue, *events)
    queue.seal_now()
    aggregate = aggregate_events(events)
    assert rows(spool_path) == [(aggregate.idempotency_key, encode(aggregate, "v1"))]
    sender.gate.set()
    assert queue.flush(5)
    assert rows(spool_path) == []
    assert sender.delivered == [aggregate.idempotency_key]


def test_crash_before_seal_replays_the_members(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """Members spooled but never sealed are replayed by the next queue: the total is exact."""
    spool = Spool(spool_path)
    first = crashed_queue(make_queue, spool)
    for customer in CUSTOMERS:
        enqueue_committed(first, *members(customer))
    crash(first, spool)
    second = make_queue(aggregate_window=LONG_WINDOW)
    accepted = recorder(second)
    assert second.flush(5)
    assert totals(accepted) == {"cus_a": 15, "cus_b": 15}
    assert sorted(sender.delivered) == sorted(
        op.idempotency_key for customer in CUSTOMERS for op in members(customer)
    )
    assert rows(spool_path) == []


def test_crash_after_seal_replays_the_aggregate_once(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """A sealed aggregate is replayed byte for byte under its key, once: the total is exact."""
    spool = Spool(spool_path)
    first = crashed_queue(make_queue, spool)
    for customer in CUSTOMERS:
        enqueue_committed(first, *members(customer))
    first.seal_now()
    crash(first, spool)
    second = make_queue(aggregate_window=LONG_WINDOW)
    accepted = recorder(second)
    assert second.flush(5)
    assert totals(accepted) == {"cus_a": 15, "cus_b": 15}
    expected = {aggregate_events(members(customer)) for customer in CUSTOMERS}
    assert sorted(sender.attempts) == sorted(
        (aggregate.idempotency_key, encode(aggregate, "v1")) for aggregate in expected
    )
    assert rows(spool_path) == []


def test_a_seal_that_cannot_hold_every_member_changes_nothing(spool_path: Path) -> None:
    """The seal transaction is all or nothing: never members and their aggregate together."""
    spool = Spool(spool_path)
    events = members("cus_a", 3)
    ids = [spool.add(op, "v1", encode(op, "v1"), claim=True) for op in events]
    aggregate = aggregate_events(events)
    with sqlite3.connect(spool_path) as conn:  # another process took one member over
        conn.execute("UPDATE pending SET claimed_by = 'elsewhere' WHERE id = ?", (ids[-1],))
    with pytest.raises(SpoolSealError):
        spool.seal_aggregate(ids, aggregate, "v1", encode(aggregate, "v1"))
    assert [key for key, _ in rows(spool_path)] == [op.idempotency_key for op in events]
    spool.seal_aggregate(ids[:-1], aggregate_events(events[:-1]), "v1", None)
    assert [key for key, _ in rows(spool_path)] == [
        events[-1].idempotency_key,
        aggregate_key([op.idempotency_key for op in events[:-1]]),
    ]


def test_a_failed_seal_sends_the_members_one_by_one(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """If a member's row was taken over, the group goes out singly, each under its own key."""
    queue = make_queue(aggregate_window=LONG_WINDOW)
    accepted = recorder(queue)
    events = members("cus_a", 3)
    enqueue_committed(queue, *events)
    with sqlite3.connect(spool_path) as conn:
        conn.execute(
            "UPDATE pending SET claimed_by = 'elsewhere' WHERE idempotency_key = 'cus_a-2'"
        )
    queue.seal_now()
    assert queue.flush(5)
    assert sorted(sender.delivered) == sorted(op.idempotency_key for op in events)
    assert totals(accepted) == {"cus_a": 6}


def test_rows_this_queue_did_not_write_are_sent_as_they_are(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """Rows left by another process (or spilled) are never folded into an aggregate."""
    other = Spool(spool_path)
    events = members("cus_a", 3)
    for operation in events:
        other.add(operation, "v1", encode(operation, "v1"), claim=False)
    queue = make_queue(aggregate_window=LONG_WINDOW)
    assert queue.flush(5)
    assert sorted(sender.delivered) == sorted(op.idempotency_key for op in events)
