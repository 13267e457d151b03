"""Quota changes of one (customer, feature) reach Commet one at a time, in enqueue order."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from commet_middleware import CommetAPIError, CommetSettings, QuotaChange, UsageEvent
from commet_middleware._models import Operation, QuotaAction
from commet_middleware._spool import Spool
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.testing import FakeCommet

from .conftest import DeadLetters, FakeResult, FastSleep, RecordingEncoder, wait_until

TIMEOUT = 10.0


def unavailable() -> CommetAPIError:
    return CommetAPIError(503, code="internal_error", type="test_error")


def change(
    key: str, action: QuotaAction = "add", customer: str = "cus_1", feature: str = "tasks"
) -> QuotaChange:
    return QuotaChange.create(customer, feature, action, 1, idempotency_key=key)


def usage(key: str) -> UsageEvent:
    return UsageEvent.create("cus_1", "api_calls", 1, idempotency_key=key)


@dataclass
class OrderingSender:
    """Records attempts and completions; can slow, fail or hold chosen idempotency keys."""

    # Keys whose first attempt yields to the loop this many times before answering.
    slow_first: dict[str, int] = field(default_factory=dict)
    # Keys whose first attempt fails with a retryable error.
    fail_first: set[str] = field(default_factory=set)
    # Keys that wait for ``release`` before answering.
    held: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    attempts: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    in_flight: dict[tuple[str, str], int] = field(default_factory=dict)
    # The most sends of one (customer, feature) in flight at once, per kind of operation.
    max_per_key: dict[str, int] = field(default_factory=dict)
    keys_in_flight_together: set[tuple[str, str]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def send_once(
        self, operation: Operation, *, request_body: bytes | None = None
    ) -> FakeResult:
        key = operation.idempotency_key
        slot = (operation.customer_id, operation.feature)
        with self.lock:
            first = key not in self.attempts
            self.attempts.append(key)
            self.in_flight[slot] = self.in_flight.get(slot, 0) + 1
            busy = {name for name, count in self.in_flight.items() if count}
            if len(busy) > len(self.keys_in_flight_together):
                self.keys_in_flight_together = busy
            self.max_per_key[operation.kind] = max(
                self.max_per_key.get(operation.kind, 0), self.in_flight[slot]
            )
        try:
            if first:
                for _ in range(self.slow_first.get(key, 0)):
                    await asyncio.sleep(0)
            while key in self.held and not self.release.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            if first and key in self.fail_first:
                raise unavailable()
            with self.lock:
                self.completed.append(key)
            return FakeResult()
        finally:
            with self.lock:
                self.in_flight[slot] -= 1


@pytest.fixture
def ordering_sender() -> OrderingSender:
    return OrderingSender()


QueueBuilder = Callable[..., DeliveryQueue]


@pytest.fixture
def build(
    ordering_sender: OrderingSender,
    encoder: RecordingEncoder,
    sleep: FastSleep,
    dead_letters: DeadLetters,
) -> Iterator[QueueBuilder]:
    """Queues over the ordering sender with eight sends in flight; closed at teardown."""
    made: list[DeliveryQueue] = []

    def make(**overrides: object) -> DeliveryQueue:
        values: dict[str, object] = {
            "api_key": "ck_test",
            "dead_letter": dead_letters,
            "max_concurrency": 8,
            # Per-event mechanics: folding (the default) has its own tests in test_folding.py.
            "fold_when_behind": False,
        }
        values.update(overrides)
        queue = DeliveryQueue(
            CommetSettings(**values),  # type: ignore[arg-type]
            sender_factory=lambda settings: ordering_sender,
            encoder=encoder,
            sleep=sleep,
        )
        made.append(queue)
        return queue

    yield make
    ordering_sender.release.set()
    for queue in made:
        queue.close(1)


def test_changes_of_one_key_arrive_in_enqueue_order(
    build: QueueBuilder, ordering_sender: OrderingSender
) -> None:
    """With eight sends allowed, a slow first change of a key is still not overtaken."""
    keys = [f"q{i}" for i in range(12)]
    ordering_sender.slow_first = {"q0": 50, "q3": 20}
    queue = build()
    for i, key in enumerate(keys):
        queue.enqueue(change(key, "add" if i % 2 == 0 else "remove"))
    assert queue.flush(TIMEOUT)
    assert ordering_sender.attempts == keys
    assert ordering_sender.completed == keys
    assert ordering_sender.max_per_key["quota"] == 1
    assert queue.stats().pending == 0


def test_a_retried_change_is_not_overtaken(
    build: QueueBuilder, ordering_sender: OrderingSender, dead_letters: DeadLetters
) -> None:
    """Change 2 is not sent while change 1 waits to be retried, nor before it is delivered."""
    ordering_sender.fail_first = {"q1"}
    queue = build()
    for key in ("q1", "q2", "q3"):
        queue.enqueue(change(key))
    assert queue.flush(TIMEOUT)
    assert ordering_sender.attempts == ["q1", "q1", "q2", "q3"]
    assert ordering_sender.completed == ["q1", "q2", "q3"]
    assert queue.stats().retried == 1
    assert not dead_letters.received


def test_different_keys_still_go_concurrently(
    build: QueueBuilder, ordering_sender: OrderingSender
) -> None:
    """Changes of different customers or features are in flight at the same time."""
    ordering_sender.held = {"a1", "b1", "c1"}
    queue = build()
    queue.enqueue(change("a1", customer="cus_1"))
    queue.enqueue(change("a2", customer="cus_1"))
    queue.enqueue(change("b1", customer="cus_2"))
    queue.enqueue(change("c1", customer="cus_1", feature="seats"))
    together = {("cus_1", "tasks"), ("cus_2", "tasks"), ("cus_1", "seats")}
    assert wait_until(lambda: ordering_sender.keys_in_flight_together == together)
    assert "a2" not in ordering_sender.attempts
    ordering_sender.release.set()
    assert queue.flush(TIMEOUT)
    completed = ordering_sender.completed
    assert completed.index("a1") < completed.index("a2")
    assert sorted(completed) == ["a1", "a2", "b1", "c1"]


def test_usage_events_are_not_held_behind_quota_changes(
    build: QueueBuilder, ordering_sender: OrderingSender
) -> None:
    """Usage events are delivered while a quota change and the one parked behind it wait."""
    ordering_sender.held = {"q1"}
    queue = build()
    queue.enqueue(change("q1"))
    queue.enqueue(change("q2", "remove"))
    events = [f"u{i}" for i in range(20)]
    for key in events:
        queue.enqueue(usage(key))
    assert wait_until(lambda: sorted(ordering_sender.completed) == sorted(events))
    assert queue.stats().pending == 2  # the held change and the one parked behind it
    ordering_sender.release.set()
    assert queue.flush(TIMEOUT)
    assert ordering_sender.completed[-2:] == ["q1", "q2"]


def test_close_hands_back_parked_changes(
    build: QueueBuilder, ordering_sender: OrderingSender, dead_letters: DeadLetters
) -> None:
    """A change parked behind one that never finishes is reported at close, not lost."""
    ordering_sender.held = {"q1"}
    queue = build()
    queue.enqueue(change("q1"))
    queue.enqueue(change("q2"))
    assert wait_until(lambda: "q1" in ordering_sender.attempts)
    assert not queue.close(0.2)
    assert sorted(dead_letters.keys) == ["q1", "q2"]
    assert queue.stats().pending == 0
    # The queue stays usable and the key is free again.
    ordering_sender.release.set()
    queue.enqueue(change("q3"))
    assert queue.flush(TIMEOUT)
    assert ordering_sender.completed[-1] == "q3"


# -- against the emulator ------------------------------------------------------------------

CEILING = 5


def balanced_script(length: int = 20, seed: int = 7) -> list[QuotaAction]:
    """Adds and removes whose running balance, applied in order, stays within 0..CEILING."""
    rng = random.Random(seed)
    actions: list[QuotaAction] = []
    balance = 0
    for i in range(length):
        if i < CEILING or balance == 0:
            action: QuotaAction = "add"
        elif balance == CEILING:
            action = "remove"
        else:
            action = rng.choice(("add", "remove"))
        balance += 1 if action == "add" else -1
        actions.append(action)
    return actions


def expected_balance(actions: list[QuotaAction]) -> int:
    return sum(1 if action == "add" else -1 for action in actions)


@pytest.fixture
def fake() -> FakeCommet:
    fake = FakeCommet()
    fake.add_feature("tasks", quota=True, included=CEILING)
    fake.add_customer("acme")
    return fake


def emulator_settings(
    fake: FakeCommet, dead_letters: DeadLetters, **extra: object
) -> CommetSettings:
    return CommetSettings(
        api_key="ck_test",
        base_url="http://commet.test",
        transport=fake.transport,
        dead_letter=dead_letters,
        max_concurrency=8,
        **extra,  # type: ignore[arg-type]
    )


def run_script(fake: FakeCommet, queue: DeliveryQueue, prefix: str) -> list[QuotaAction]:
    actions = balanced_script()
    fake.faults.fail_next(3)
    fake.faults.latency(0.002)
    try:
        for i, action in enumerate(actions):
            queue.enqueue(change(f"{prefix}-{i}", action, customer="acme"))
        assert queue.flush(TIMEOUT)
    finally:
        queue.close(1)
    return actions


@pytest.mark.parametrize("fold", [False, True], ids=["one-by-one", "folding"])
def test_interleaved_changes_under_a_hard_ceiling_all_count(
    fake: FakeCommet, dead_letters: DeadLetters, sleep: FastSleep, fold: bool
) -> None:
    """Adds and removes near a hard ceiling, with failures and latency, end at the right balance;
    folded adds (the default) apply in the same order, unit for unit."""
    assert balanced_script().count("remove") >= 5
    queue = DeliveryQueue(emulator_settings(fake, dead_letters, fold_when_behind=fold), sleep=sleep)
    actions = run_script(fake, queue, "mem")
    assert not dead_letters.received
    assert fake.faults.injected["fail_next"] == 3
    assert fake.quota("acme", "tasks").current == expected_balance(actions)
    applied = [e.action for e in fake.quota_events("acme", "tasks") for _ in range(e.count)]
    assert applied == actions
    if not fold:
        assert len(fake.quota_events("acme", "tasks")) == len(actions)


@pytest.mark.parametrize("queue_limit", [1000, 6], ids=["in-memory", "spilling"])
def test_interleaved_changes_with_the_spool_all_count(
    fake: FakeCommet, dead_letters: DeadLetters, sleep: FastSleep, tmp_path: Path, queue_limit: int
) -> None:
    """The same through the spool, also when changes spill past a small in-memory window."""
    spool_path = tmp_path / "s.sqlite3"
    settings = emulator_settings(
        fake, dead_letters, spool_path=str(spool_path), queue_limit=queue_limit
    )
    queue = DeliveryQueue(settings, sleep=sleep)
    actions = run_script(fake, queue, "spool")
    assert not dead_letters.received
    assert fake.quota("acme", "tasks").current == expected_balance(actions)
    assert [e.action for e in fake.quota_events("acme", "tasks")] == actions
    spool = Spool(spool_path)
    try:
        assert (spool.stats().pending, spool.stats().dead) == (0, 0)
    finally:
        spool.close()


def test_replayed_spool_rows_keep_their_order(
    fake: FakeCommet, dead_letters: DeadLetters, sleep: FastSleep, tmp_path: Path
) -> None:
    """Rows another process left in the spool are replayed one at a time per key, oldest first."""
    spool_path = tmp_path / "s.sqlite3"
    actions = balanced_script()
    left = Spool(spool_path)
    try:
        for i, action in enumerate(actions):
            left.add(change(f"left-{i}", action, customer="acme"), "v1", None, claim=False)
    finally:
        left.close()
    fake.faults.fail_next(3)
    fake.faults.latency(0.002)
    settings = emulator_settings(fake, dead_letters, spool_path=str(spool_path))
    queue = DeliveryQueue(settings, sleep=sleep)
    try:
        assert queue.flush(TIMEOUT)
    finally:
        queue.close(1)
    assert not dead_letters.received
    assert fake.quota("acme", "tasks").current == expected_balance(actions)
    assert [e.action for e in fake.quota_events("acme", "tasks")] == actions
