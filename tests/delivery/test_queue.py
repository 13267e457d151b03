"""The delivery pipeline against a fake sender: order, concurrency, retries, dead letters, flush."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time

import pytest

from commet_middleware import CommetAPIError, CommetSettings, CommetTransportError
from commet_middleware.delivery import (
    BACKOFF_CAP,
    MAX_UNEXPECTED_ATTEMPTS,
    DeliveryQueue,
    UndeliveredError,
    close_default_queues,
    default_queue,
    retry_delay,
)
from commet_middleware.delivery._workers import ThreadWorker

from .conftest import (
    DeadLetters,
    FakeResult,
    FakeSender,
    FastSleep,
    QueueFactory,
    RecordingEncoder,
    event,
)


def api_error(status: int, code: str, **extra: object) -> CommetAPIError:
    return CommetAPIError(status, code=code, type="test_error", **extra)  # type: ignore[arg-type]


def test_events_are_sent_in_enqueue_order(make_queue: QueueFactory, sender: FakeSender) -> None:
    """With one send in flight, Commet sees the events in the order they were enqueued."""
    queue = make_queue(max_concurrency=1)
    keys = [f"k{i}" for i in range(50)]
    for key in keys:
        queue.enqueue(event(key))
    assert queue.flush(5)
    assert sender.completed == keys


def test_a_backlog_larger_than_a_batch_drains_completely(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """A backlog many batches long is delivered whole, each event once."""
    sender.gated_prefix = "k"
    queue = make_queue(batch_size=7, max_concurrency=3)
    keys = [f"k{i}" for i in range(500)]
    for key in keys:
        queue.enqueue(event(key))
    sender.gate.set()
    assert queue.flush(10)
    assert sorted(sender.completed) == sorted(keys)
    stats = queue.stats()
    assert (stats.queued, stats.sent, stats.pending, stats.in_flight) == (500, 500, 0, 0)


def test_never_more_than_max_concurrency_in_flight(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """At most settings.max_concurrency sends are in flight at once, and that many are used."""
    sender.delay = 0.005
    queue = make_queue(max_concurrency=4)
    for i in range(80):
        queue.enqueue(event(f"k{i}"))
    assert queue.flush(10)
    assert sender.max_concurrent == 4


def test_retryable_failures_are_retried_with_the_same_bytes(
    make_queue: QueueFactory, sender: FakeSender, encoder: RecordingEncoder, sleep: FastSleep
) -> None:
    """5xx, transport errors, 429, idempotency_in_progress: retried to success, same body."""
    sender.script["k"] = [
        api_error(503, "internal_error", retryable=True),
        CommetTransportError("connection reset"),
        api_error(429, "rate_limited", retryable=True, retry_after=7.0),
        api_error(409, "idempotency_in_progress"),
        api_error(429, "rate_limited"),  # no Retry-After, not flagged: still worth retrying
    ]
    queue = make_queue()
    queue.enqueue(event("k"))
    assert queue.flush(5)
    bodies = sender.attempts_for("k")
    assert len(bodies) == 6
    assert len(set(bodies)) == 1
    assert bodies[0] is not None
    assert encoder.calls["k"] == 1
    assert sleep.delays[2] >= 7.0
    stats = queue.stats()
    assert (stats.sent, stats.retried, stats.dead_lettered) == (1, 5, 0)


def test_non_retryable_failures_go_to_the_dead_letter_hook(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """Exactly the operations Commet rejects for good reach the hook, with their error; no retry."""
    bad: dict[str, Exception] = {
        "validation": api_error(422, "validation_error"),
        "no-customer": api_error(404, "customer_not_found"),
        "no-feature": api_error(404, "feature_not_found"),
        "balance": api_error(400, "insufficient_balance"),
        "mismatch": api_error(409, "idempotency_key_mismatch"),
        "invalid-locally": ValueError("invalid feature code"),
    }
    for key, error in bad.items():
        sender.script[key] = [error]
    queue = make_queue()
    keys = ["ok1", *bad, "ok2"]
    for key in keys:
        queue.enqueue(event(key))
    assert queue.flush(5)
    assert sorted(dead_letters.keys) == sorted(bad)
    for operation, received in dead_letters.received:
        assert received is bad[operation.idempotency_key]
    assert sorted(sender.completed) == ["ok1", "ok2"]
    assert all(len(sender.attempts_for(key)) == 1 for key in bad)
    stats = queue.stats()
    assert (stats.sent, stats.dead_lettered, stats.retried) == (2, len(bad), 0)


def test_a_duplicate_counts_as_delivered(make_queue: QueueFactory, sender: FakeSender) -> None:
    """A 409 duplicate answer is a delivery, counted in sent and in duplicates."""
    sender.script["k"] = [FakeResult(duplicate=True)]
    queue = make_queue()
    queue.enqueue(event("k"))
    queue.enqueue(event("other"))
    assert queue.flush(5)
    stats = queue.stats()
    assert (stats.sent, stats.duplicates, stats.dead_lettered) == (2, 1, 0)


def test_unexpected_sender_errors_are_retried_a_few_times_then_dead_lettered(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """A sender bug is not retried forever: MAX_UNEXPECTED_ATTEMPTS tries, then the hook."""
    sender.failing["k"] = RuntimeError("bug")
    queue = make_queue()
    queue.enqueue(event("k"))
    assert queue.flush(5)
    assert len(sender.attempts_for("k")) == MAX_UNEXPECTED_ATTEMPTS
    assert dead_letters.keys == ["k"]


@pytest.mark.swallows_errors
def test_an_encoder_failure_dead_letters_that_operation_only(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """An operation that cannot be encoded is dead-lettered; the others still go out."""

    def encode(operation: object, dialect: str) -> bytes:
        if getattr(operation, "idempotency_key", "") == "bad":
            raise ValueError("cannot encode")
        return b"{}"

    queue = make_queue(encode=encode)
    for key in ("a", "bad", "b"):
        queue.enqueue(event(key))
    assert queue.flush(5)
    assert dead_letters.keys == ["bad"]
    assert sorted(sender.completed) == ["a", "b"]


@pytest.mark.swallows_errors
def test_a_raising_dead_letter_hook_is_contained(
    make_queue: QueueFactory, sender: FakeSender, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is logged and ignored; delivery of the rest goes on."""

    def hook(operation: object, error: BaseException) -> None:
        raise RuntimeError("hook broke")

    sender.script["bad"] = [api_error(404, "customer_not_found")]
    queue = make_queue(dead_letter=hook)
    queue.enqueue(event("bad"))
    queue.enqueue(event("good"))
    assert queue.flush(5)
    assert sender.completed == ["good"]
    assert "dead_letter hook raised" in caplog.text


def test_dead_letter_logs_never_show_the_api_key(
    make_queue: QueueFactory, sender: FakeSender, caplog: pytest.LogCaptureFixture
) -> None:
    """An error message that carries the API key is logged with the key masked."""
    sender.script["k"] = [api_error(422, "validation_error", message="bad key ck_test_secret")]
    queue = make_queue()
    queue.enqueue(event("k"))
    with caplog.at_level(logging.INFO, logger="commet_middleware.delivery"):
        assert queue.flush(5)
    assert "giving up" in caplog.text
    assert "ck_test_secret" not in caplog.text


@pytest.mark.swallows_errors
def test_enqueue_never_raises_into_the_caller(
    make_queue: QueueFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An internal failure on the enqueue path is logged, never raised into the request."""
    queue = make_queue()

    def broken() -> bool:
        raise RuntimeError("internal bug")

    monkeypatch.setattr(queue._slot, "ensure", broken)
    queue.enqueue(event("k"))
    assert "could not enqueue" in caplog.text


@pytest.mark.swallows_errors
def test_a_failing_client_factory_is_retried_not_raised(
    sender: FakeSender, sleep: FastSleep
) -> None:
    """If building the client fails, the sender logs, waits and tries again."""
    calls = []

    def factory(settings: CommetSettings) -> FakeSender:
        calls.append(settings)
        if len(calls) < 3:
            raise RuntimeError("cannot build client")
        return sender

    queue = DeliveryQueue(
        CommetSettings(), sender_factory=factory, encoder=RecordingEncoder(), sleep=sleep
    )
    queue.enqueue(event("k"))
    assert queue.flush(5)
    assert sender.completed == ["k"]
    assert queue.close(2)


def test_a_slow_commet_adds_no_latency_to_enqueue(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """1000 enqueues while every send takes 1 s finish far inside a second."""
    sender.delay = 1.0
    queue = make_queue(max_concurrency=2)
    start = time.perf_counter()
    for i in range(1000):
        queue.enqueue(event(f"k{i}"))
    assert time.perf_counter() - start < 0.5
    assert queue.stats().queued == 1000
    queue.close(0.05)


def test_flush_times_out_while_commet_is_down_and_succeeds_after(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """flush is False while delivery cannot finish, True once it has."""
    sender.gated_prefix = "k"
    queue = make_queue()
    queue.enqueue(event("k1"))
    assert queue.flush(0.05) is False
    sender.gate.set()
    assert queue.flush(5) is True


def test_close_reports_what_it_could_not_deliver(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """close returns False and hands every undelivered operation to the hook, reason shutdown."""
    sender.failing["stuck"] = api_error(503, "internal_error", retryable=True)
    sender.gated_prefix = "held"
    queue = make_queue()
    queue.enqueue(event("ok"))
    queue.enqueue(event("stuck"))
    queue.enqueue(event("held"))
    assert queue.close(0.2) is False
    assert sorted(dead_letters.keys) == ["held", "stuck"]
    assert all(
        isinstance(error, UndeliveredError) and error.reason == "shutdown"
        for _, error in dead_letters.received
    )
    stats = queue.stats()
    assert (stats.sent, stats.pending, stats.dead_lettered) == (1, 0, 2)


def test_close_is_true_when_all_delivered_and_the_queue_stays_usable(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """close after a full delivery returns True; a later enqueue starts a new sender."""
    queue = make_queue()
    queue.enqueue(event("a"))
    assert queue.close(5) is True
    assert sender.closed == 1
    queue.enqueue(event("b"))
    assert queue.flush(5)
    assert sender.completed == ["a", "b"]


def test_stats_is_a_frozen_snapshot(make_queue: QueueFactory) -> None:
    """stats() returns an immutable value with every counter."""
    stats = make_queue().stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.sent = 1  # type: ignore[misc]
    assert set(dataclasses.asdict(stats)) == {
        "queued",
        "sent",
        "retried",
        "duplicates",
        "dead_lettered",
        "dropped",
        "in_flight",
        "pending",
        "queue_depth",
    }


def test_retry_delay_doubles_with_jitter_up_to_the_cap() -> None:
    """Each step is base * 2**(n-1), jittered into its upper half, capped at BACKOFF_CAP."""
    rng = random.Random(1)
    for attempt in range(1, 12):
        step = min(BACKOFF_CAP, 0.5 * 2 ** (attempt - 1))
        for _ in range(50):
            delay = retry_delay(attempt, base=0.5, rng=rng)
            assert step / 2 <= delay <= step
    assert retry_delay(1000, base=0.5, rng=rng) <= BACKOFF_CAP


def test_retry_delay_honours_retry_after_within_its_cap() -> None:
    """Retry-After is a floor on the delay, itself capped by retry_after_cap."""
    assert retry_delay(1, base=0.5, retry_after=3.0) >= 3.0
    assert retry_delay(1, base=0.5, retry_after=500.0, retry_after_cap=30.0) == 30.0


def test_sync_flush_on_the_senders_own_loop_does_not_deadlock(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """flush() called on the sender's event loop returns at once instead of waiting on itself."""
    sender.gated_prefix = "k"
    queue = make_queue()

    async def main() -> bool:
        queue.start()
        queue.enqueue(event("k"))
        await asyncio.sleep(0.01)
        return queue.flush(5)

    start = time.perf_counter()
    assert asyncio.run(main()) is False
    assert time.perf_counter() - start < 2


def test_default_queue_is_shared_per_settings() -> None:
    """Equal settings share one process-wide queue; another transport gets its own."""
    settings = CommetSettings(api_key="ck_test")
    try:
        first = default_queue(settings)
        assert default_queue(settings) is first
        assert default_queue(CommetSettings(api_key="ck_test")) is first
        assert default_queue(CommetSettings(api_key="ck_test", transport=object())) is not first
        assert default_queue(CommetSettings(api_key="ck_other")) is not first
    finally:
        assert close_default_queues(1)
    assert default_queue(settings) is not first
    close_default_queues(1)


def test_delivery_from_many_threads_loses_nothing(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """Events enqueued concurrently from many threads are each delivered exactly once."""
    queue = make_queue(max_concurrency=4)

    def produce(worker: int) -> None:
        for i in range(200):
            queue.enqueue(event(f"w{worker}-{i}"))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert queue.flush(10)
    assert len(sender.completed) == len(set(sender.completed)) == 1600


@pytest.mark.swallows_errors
def test_a_crashed_sender_is_replaced_and_loses_nothing(
    make_queue: QueueFactory, sender: FakeSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the sender itself dies on an internal error, the next enqueue starts a new one."""
    queue = make_queue()
    real_take = queue._pump.take
    crashes: list[int] = []

    def take_once_broken(*args: object) -> object:
        if not crashes:
            crashes.append(1)
            raise RuntimeError("sender bug")
        return real_take(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(queue._pump, "take", take_once_broken)
    queue.enqueue(event("a"))
    crashed = queue._state.worker
    assert isinstance(crashed, ThreadWorker)
    assert crashed.thread is not None
    crashed.thread.join(2)
    assert not crashed.alive()
    queue.enqueue(event("b"))
    assert queue.flush(5)
    assert sorted(sender.completed) == ["a", "b"]
    assert crashes == [1]


@pytest.mark.swallows_errors
def test_listeners_hear_of_each_accepted_operation_only(
    make_queue: QueueFactory, sender: FakeSender, dead_letters: DeadLetters
) -> None:
    """A listener gets (operation, result) for each success, nothing for a dead letter."""
    sender.script["bad"] = [api_error(422, "validation_error")]
    heard: list[tuple[str, object]] = []
    queue = make_queue()
    queue.add_listener(lambda op, result: heard.append((op.idempotency_key, result)))
    queue.add_listener(lambda op, result: 1 / 0)  # a raising listener harms nobody
    for key in ("a", "bad", "b"):
        queue.enqueue(event(key))
    assert queue.flush(5)
    assert sorted(key for key, _ in heard) == ["a", "b"]
    assert all(isinstance(result, FakeResult) for _, result in heard)
    assert dead_letters.keys == ["bad"]
