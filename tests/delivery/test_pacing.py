"""Pacing: a sender behind takes partial batches at most every PACE seconds, so events fold."""

from __future__ import annotations

import time

import pytest

from commet_middleware import UsageEvent
from commet_middleware.delivery import _pacing
from commet_middleware.delivery._items import Item
from commet_middleware.delivery._pacing import BURST, Pacer
from commet_middleware.delivery._state import QueueState

from .conftest import FakeSender, QueueFactory, event, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _state_with(waiting: int) -> QueueState:
    state = QueueState(limit=100)
    for i in range(waiting):
        state.queue.append(Item(event(f"w{i}")))
    return state


def test_a_burst_of_partial_takes_goes_at_once_then_one_per_pace() -> None:
    """BURST partial takes are never delayed; the next waits one pace, and time refills it."""
    clock = Clock()
    state = _state_with(1)
    pacer = Pacer(state, full=8, pace=0.02, burst=BURST, clock=clock)
    for _ in range(BURST):
        assert pacer.delay() == 0.0
        pacer.took(1)
    assert pacer.delay() == pytest.approx(0.02)
    clock.now += 0.01
    assert pacer.delay() == pytest.approx(0.01)
    clock.now += 0.01
    assert pacer.delay() == 0.0
    pacer.took(1)
    assert pacer.delay() == pytest.approx(0.02)
    # A quiet spell refills the burst, and no more than the burst.
    clock.now += 60
    for _ in range(BURST):
        assert pacer.delay() == 0.0
        pacer.took(1)
    assert pacer.delay() > 0


def test_full_takes_empty_queues_and_flushes_are_never_paced() -> None:
    """A take that fills a batch (many groups waiting), an empty queue (the take idles) and a
    waiting flush or close never wait, even with the bucket spent."""
    clock = Clock()
    state = _state_with(3)
    pacer = Pacer(state, full=3, pace=1.0, burst=1, clock=clock)
    pacer.took(1)
    assert pacer.delay() == 0.0  # three waiting: a full take
    pacer.took(3)  # a full take spends nothing
    state.queue.pop()
    assert pacer.delay() == pytest.approx(1.0)
    state.flushing = 1
    assert pacer.delay() == 0.0
    state.flushing = 0
    state.closing = True
    assert pacer.delay() == 0.0
    state.closing = False
    state.queue.clear()
    assert pacer.delay() == 0.0


def _usage(key: str, customer: str = "cus_1") -> UsageEvent:
    return UsageEvent.create(customer, "api_calls", 1, idempotency_key=key)


def test_a_paced_sender_folds_what_arrives_and_a_flush_sends_it_at_once(
    make_queue: QueueFactory, sender: FakeSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the burst spent and a pace of a minute, a stream of 50 events of one group waits as
    one fold (not 50 sends); a flush does not wait for the pace and delivers it exactly."""
    monkeypatch.setattr(_pacing, "PACE", 60.0)
    queue = make_queue(fold_when_behind=True)
    delivered: list[float] = []
    queue.add_listener(lambda operation, result: delivered.append(operation.value))  # type: ignore[union-attr]
    for i in range(BURST):  # each alone, at once: the burst
        queue.enqueue(_usage(f"solo{i}"))
        assert wait_until(lambda i=i: len(sender.completed) == i + 1)
    assert sender.completed == [f"solo{i}" for i in range(BURST)]
    for i in range(50):  # a steady stream, 5 ms apart: an unpaced sender sends each alone
        queue.enqueue(_usage(f"late{i}"))
        time.sleep(0.005)
    # Paced: at most the first of them went alone before the bucket was empty.
    assert len(sender.completed) <= BURST + 1
    assert queue.flush(5)
    assert sum(delivered) == BURST + 50
    assert len(sender.completed) <= BURST + 2
    assert queue.stats().dead_lettered == 0


def test_many_groups_waiting_are_taken_at_full_speed_however_spent_the_bucket(
    make_queue: QueueFactory, sender: FakeSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pacing never holds back a full batch: with the bucket spent and a pace of a minute,
    40 events of 40 customers (nothing can fold) are delivered without any flush."""
    monkeypatch.setattr(_pacing, "PACE", 60.0)
    queue = make_queue(fold_when_behind=True, max_concurrency=4)
    for i in range(BURST):
        queue.enqueue(_usage(f"solo{i}"))
        assert wait_until(lambda i=i: len(sender.completed) == i + 1)
    sender.gated_prefix = "many"  # hold the first sends so the rest queue up behind them
    for i in range(40):
        queue.enqueue(_usage(f"many{i}", customer=f"cus_{i}"))
    sender.gate.set()
    assert wait_until(lambda: len(sender.completed) >= BURST + 36, timeout=10)
    assert queue.flush(5)
    assert len(sender.completed) == BURST + 40


def test_window_aggregation_and_folding_off_have_no_pacer(make_queue: QueueFactory) -> None:
    """The pacer exists only while folding: a window decides by itself, and without folding
    every event is its own send as soon as a slot is free."""
    assert make_queue(fold_when_behind=True)._pump._pacer is not None
    assert make_queue(fold_when_behind=True, aggregate_window=0.5)._pump._pacer is None
    assert make_queue(fold_when_behind=False)._pump._pacer is None
