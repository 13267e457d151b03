"""Opt-in aggregation of quota adds: one add per key and window, order kept, refusals split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commet_middleware import (
    CommetAPIError,
    CommetSettings,
    CommetTransportError,
    QuotaChange,
    UsageEvent,
)
from commet_middleware._models import Operation, QuotaAction
from commet_middleware.delivery import MAX_UNEXPECTED_ATTEMPTS, DeliveryQueue
from commet_middleware.delivery._aggregation import (
    AGGREGATE_KEY_PREFIX,
    QUOTA_AGGREGATE_KEY_PREFIX,
    Aggregator,
    aggregate_events,
    aggregate_key,
    aggregate_quota_adds,
    quota_group_key,
)
from commet_middleware.testing import FakeCommet

from .conftest import DeadLetters, FakeSender, FastSleep, QueueFactory, wait_until

# A window no test waits out: windows are sealed by seal_now(), a flush, or a remove or set.
LONG_WINDOW = 1000.0
TIMEOUT = 10.0


def change(
    key: str,
    action: QuotaAction = "add",
    count: int = 1,
    customer: str = "cus_a",
    feature: str = "tasks",
) -> QuotaChange:
    return QuotaChange.create(customer, feature, action, count, idempotency_key=key)


def quota_key(*members: str) -> str:
    return aggregate_key(list(members), prefix=QUOTA_AGGREGATE_KEY_PREFIX)


def refusal(code: str = "included_limit_reached", status: int = 400) -> CommetAPIError:
    return CommetAPIError(status, type="billing_error", code=code)


def recorder(queue: DeliveryQueue) -> list[Operation]:
    """Return a list the queue's listeners append every reported operation to."""
    heard: list[Operation] = []
    queue.add_listener(lambda operation, result: heard.append(operation))
    return heard


class SentOperations:
    """An encoder that keeps every operation it encodes (once per item: the first attempt)."""

    def __init__(self) -> None:
        self.operations: list[Operation] = []

    def __call__(self, operation: Operation, dialect: str) -> bytes:
        self.operations.append(operation)
        return json.dumps({"key": operation.idempotency_key}).encode()


# -- the aggregate itself ------------------------------------------------------------------


def test_quota_aggregate_keys_never_meet_usage_aggregate_keys() -> None:
    """The same member keys give a quota aggregate and a usage aggregate different keys."""
    usage = aggregate_events(
        [UsageEvent.create("cus_a", "tasks", 1, idempotency_key=k) for k in "ab"]
    )
    quota = aggregate_quota_adds([change("a"), change("b")])
    assert usage.idempotency_key.startswith(AGGREGATE_KEY_PREFIX)
    assert quota.idempotency_key.startswith(QUOTA_AGGREGATE_KEY_PREFIX)
    assert quota.idempotency_key != usage.idempotency_key
    assert quota.idempotency_key == quota_key("b", "a")


def test_a_quota_aggregate_sums_its_members_and_counts_a_repeated_key_once() -> None:
    """One add for the key with the members' total; an app's own retry in the window counts once."""
    aggregate = aggregate_quota_adds(
        [change("k1", count=2), change("k1", count=2), change("k2", count=3)]
    )
    assert (aggregate.customer_id, aggregate.feature, aggregate.action) == ("cus_a", "tasks", "add")
    assert aggregate.count == 5
    assert aggregate.idempotency_key == quota_key("k1", "k2")


def test_take_group_takes_one_keys_full_and_open_groups_oldest_first() -> None:
    """A key's full group and its newer open group come out in order; other keys stay open."""
    aggregator: Aggregator[str] = Aggregator(LONG_WINDOW, lambda: 0.0, max_members=2)
    aggregator.add(change("a1"), "a1")
    aggregator.add(change("b1", customer="cus_b"), "b1")
    aggregator.add(change("a2"), "a2")  # full: waits for the sender
    aggregator.add(change("a3"), "a3")
    # A usage group of the same customer and feature is not a quota group.
    aggregator.add(UsageEvent.create("cus_a", "tasks", 1, idempotency_key="u1"), "u1")
    assert aggregator.take_group(quota_group_key("cus_a", "tasks")) == [["a1", "a2"], ["a3"]]
    assert aggregator.members == 2
    assert aggregator.take_due(everything=True) == [["b1"], ["u1"]]


# -- through the queue, with the fake sender -----------------------------------------------


def test_adds_of_one_key_become_one_add_per_window(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """Adds of 2 customers x 2 features go out as 4 adds with exact counts; listeners hear each."""
    encoder = SentOperations()
    queue = make_queue(encode=encoder, aggregate_window=LONG_WINDOW)
    heard = recorder(queue)
    enqueued = [
        change(f"{customer}-{feature}-{n}", count=1 + n % 2, customer=customer, feature=feature)
        for n in range(5)
        for customer in ("cus_a", "cus_b")
        for feature in ("tasks", "seats")
    ]
    for operation in enqueued:
        queue.enqueue(operation)
    assert queue.stats().pending == 20
    assert sender.attempts == []  # held until sealed
    assert queue.flush(TIMEOUT)
    sent = [op for op in encoder.operations if isinstance(op, QuotaChange)]
    assert sorted((op.customer_id, op.feature, op.action, op.count) for op in sent) == [
        ("cus_a", "seats", "add", 7),
        ("cus_a", "tasks", "add", 7),
        ("cus_b", "seats", "add", 7),
        ("cus_b", "tasks", "add", 7),
    ]
    assert all(op.idempotency_key.startswith(QUOTA_AGGREGATE_KEY_PREFIX) for op in sent)
    assert sorted(op.idempotency_key for op in heard) == sorted(
        op.idempotency_key for op in enqueued
    )
    stats = queue.aggregation_stats()
    assert (stats.aggregated_members, stats.aggregates_sent, stats.open_members) == (20, 4, 0)
    assert (queue.stats().sent, queue.stats().pending) == (4, 0)


@pytest.mark.parametrize("action", ["remove", "set"])
def test_a_remove_or_set_seals_the_held_adds_ahead_of_it(
    make_queue: QueueFactory, sender: FakeSender, action: QuotaAction
) -> None:
    """add, add, remove, add: the first two go out as one add before the remove, at once."""
    queue = make_queue(aggregate_window=LONG_WINDOW)
    heard = recorder(queue)
    for operation in (change("a1"), change("a2"), change("r3", action), change("a4")):
        queue.enqueue(operation)
    # No flush: the remove (or set) sealed the adds before it and both went out on their own.
    assert wait_until(lambda: len(sender.completed) == 2)
    assert sender.completed == [quota_key("a1", "a2"), "r3"]
    assert queue.aggregation_stats().open_members == 1  # a4 waits for its window
    assert queue.flush(TIMEOUT)
    assert sender.completed == [quota_key("a1", "a2"), "r3", "a4"]
    assert [op.idempotency_key for op in heard] == ["a1", "a2", "r3", "a4"]


def test_a_refused_aggregate_is_split_into_its_members_in_order(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """A final refusal re-sends each member alone, in order, before the remove queued behind it."""
    sender.script[quota_key("m1", "m2", "m3", "m4")] = [refusal()]
    sender.failing["m3"] = refusal()
    queue = make_queue(aggregate_window=LONG_WINDOW, max_concurrency=8)
    heard = recorder(queue)
    for key in ("m1", "m2", "m3", "m4"):
        queue.enqueue(change(key))
    queue.enqueue(change("r5", "remove"))
    assert queue.flush(TIMEOUT)
    assert [key for key, _ in sender.attempts] == [
        quota_key("m1", "m2", "m3", "m4"), "m1", "m2", "m3", "m4", "r5",
    ]  # fmt: skip
    assert sender.completed == ["m1", "m2", "m4", "r5"]
    assert [op.idempotency_key for op in heard] == ["m1", "m2", "m4", "r5"]
    assert dead_letters.keys == ["m3"]
    stats = queue.stats()
    assert (stats.sent, stats.dead_lettered, stats.pending, stats.retried) == (4, 1, 0, 0)
    aggregation = queue.aggregation_stats()
    assert (aggregation.aggregates_split, aggregation.aggregates_sent) == (1, 0)


def test_a_retryable_failure_retries_the_aggregate_not_its_members(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """Transport errors and 503s resend the aggregate's very bytes and key; it is never split."""
    key = quota_key("r1", "r2", "r3")
    sender.script[key] = [CommetTransportError("reset"), CommetAPIError(503, code="internal_error")]
    queue = make_queue(aggregate_window=LONG_WINDOW)
    for member in ("r1", "r2", "r3"):
        queue.enqueue(change(member))
    assert queue.flush(TIMEOUT)
    bodies = sender.attempts_for(key)
    assert len(bodies) == 3
    assert len(set(bodies)) == 1
    assert sender.completed == [key]
    assert queue.aggregation_stats().aggregates_split == 0


@pytest.mark.swallows_errors
@pytest.mark.parametrize(
    "error",
    [
        pytest.param(RuntimeError("a bug after the send"), id="unexpected"),
        pytest.param(refusal("idempotency_key_mismatch", 409), id="key_mismatch"),
    ],
)
def test_a_failure_that_may_have_applied_the_aggregate_resends_no_member(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters, error: Exception
) -> None:
    """When the aggregate may have counted, its members are each dead-lettered, never re-sent."""
    key = quota_key("u1", "u2")
    sender.failing[key] = error
    queue = make_queue(aggregate_window=LONG_WINDOW)
    queue.enqueue(change("u1"))
    queue.enqueue(change("u2"))
    assert queue.flush(TIMEOUT)
    attempts = MAX_UNEXPECTED_ATTEMPTS if isinstance(error, RuntimeError) else 1
    assert [k for k, _ in sender.attempts] == [key] * attempts
    assert dead_letters.keys == ["u1", "u2"]
    assert (queue.stats().dead_lettered, queue.stats().pending) == (2, 0)


def test_close_reports_each_member_of_an_undelivered_aggregate(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """An aggregate still in flight at close reaches the dead-letter hook as its members."""
    sender.gated_prefix = QUOTA_AGGREGATE_KEY_PREFIX
    queue = make_queue(aggregate_window=LONG_WINDOW)
    for key in ("c1", "c2", "c3"):
        queue.enqueue(change(key))
    queue.seal_now()
    assert wait_until(lambda: bool(sender.attempts))
    assert not queue.close(0.2)
    assert dead_letters.keys == ["c1", "c2", "c3"]
    assert (queue.stats().dead_lettered, queue.stats().pending) == (3, 0)


def test_with_a_spool_quota_adds_go_out_one_by_one(
    make_queue: QueueFactory, sender: FakeSender, tmp_path: Path
) -> None:
    """With a spool configured, quota adds keep their own rows and keys; usage still aggregates."""
    queue = make_queue(aggregate_window=LONG_WINDOW, spool_path=str(tmp_path / "s.sqlite3"))
    for key in ("s1", "s2", "s3"):
        queue.enqueue(change(key))
    queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key="u1"))
    queue.enqueue(UsageEvent.create("cus_a", "api_calls", 1, idempotency_key="u2"))
    assert queue.flush(TIMEOUT)
    assert [key for key in sender.completed if key.startswith("s")] == ["s1", "s2", "s3"]
    assert aggregate_key(["u1", "u2"]) in sender.completed
    assert queue.aggregation_stats().aggregated_members == 2


# -- against the emulator ------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeCommet:
    """Tasks with 3 included and no overage: a hard ceiling."""
    fake = FakeCommet()
    fake.add_feature("tasks", quota=True, included=3)
    fake.add_customer("acme")
    return fake


def emulator_queue(fake: FakeCommet, dead_letters: DeadLetters, sleep: FastSleep) -> DeliveryQueue:
    settings = CommetSettings(
        api_key="ck_test",
        base_url="http://commet.test",
        transport=fake.transport,
        dead_letter=dead_letters,
        max_concurrency=8,
        aggregate_window=LONG_WINDOW,
    )
    return DeliveryQueue(settings, sleep=sleep)


def test_the_emulator_sees_add_add_remove_add_add_in_order(
    fake: FakeCommet, dead_letters: DeadLetters, sleep: FastSleep
) -> None:
    """Under a ceiling of 3: +2, -1, +2 applied in that order (any other order is refused)."""
    queue = emulator_queue(fake, dead_letters, sleep)
    try:
        for i, action in enumerate(("add", "add", "remove", "add", "add")):
            queue.enqueue(change(f"k{i}", action, customer="acme"))
        assert queue.flush(TIMEOUT)
    finally:
        assert queue.close(1)
    assert not dead_letters.received
    events = fake.quota_events("acme", "tasks")
    assert [(e.action, e.count, e.new_balance) for e in events] == [
        ("add", 2, 2),
        ("remove", 1, 1),
        ("add", 2, 3),
    ]
    assert fake.quota("acme", "tasks").current == 3


def test_the_emulator_records_exactly_the_members_it_accepts_after_a_split(
    fake: FakeCommet, dead_letters: DeadLetters, sleep: FastSleep
) -> None:
    """Balance 1 of 3, four adds: the +4 is refused, then two members pass and two are refused."""
    queue = emulator_queue(fake, dead_letters, sleep)
    heard = recorder(queue)
    try:
        queue.enqueue(change("s0", "set", count=1, customer="acme"))
        for key in ("m1", "m2", "m3", "m4"):
            queue.enqueue(change(key, customer="acme"))
        assert queue.flush(TIMEOUT)
    finally:
        assert queue.close(1)
    events = fake.quota_events("acme", "tasks")
    assert [(e.action, e.count, e.new_balance) for e in events] == [
        ("set", 1, 1),
        ("add", 1, 2),
        ("add", 1, 3),
    ]
    assert fake.quota("acme", "tasks").current == 3
    # The +4, then each member alone: m1, m2 accepted, m3, m4 refused.
    adds = [r.status for r in fake.requests if r.method == "POST" and r.path.endswith("/quota")]
    assert adds == [400, 200, 200, 400, 400]
    assert dead_letters.keys == ["m3", "m4"]
    assert {getattr(error, "code", None) for _, error in dead_letters.received} == {
        "included_limit_reached"
    }
    assert [op.idempotency_key for op in heard] == ["s0", "m1", "m2"]
    assert queue.aggregation_stats().aggregates_split == 1
