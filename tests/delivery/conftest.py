"""A fake sender, a recording encoder and a fast sleep: the seams the delivery tests use."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from commet_middleware import CommetSettings, UsageEvent
from commet_middleware._models import Operation
from commet_middleware.delivery import DeliveryQueue, Encoder


@dataclass
class FakeResult:
    duplicate: bool = False
    replayed: bool = False


@dataclass
class FakeSender:
    """Records every attempt; ``script`` maps an idempotency key to outcomes, in order."""

    script: dict[str, list[BaseException | FakeResult]] = field(default_factory=dict)
    # Keys whose every attempt fails with the given error.
    failing: dict[str, BaseException] = field(default_factory=dict)
    delay: float = 0.0
    # While cleared, sends of keys starting with ``gated_prefix`` wait.
    gate: threading.Event = field(default_factory=threading.Event)
    gated_prefix: str | None = None
    attempts: list[tuple[str, bytes | None]] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    concurrent: int = 0
    max_concurrent: int = 0
    closed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def send_once(
        self, operation: Operation, *, request_body: bytes | None = None
    ) -> FakeResult:
        key = operation.idempotency_key
        with self.lock:
            self.attempts.append((key, request_body))
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.gated_prefix is not None and key.startswith(self.gated_prefix):
                # A threading.Event, polled: the gate is opened from other threads and loops.
                while not self.gate.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.002)
            if self.delay:
                await asyncio.sleep(self.delay)
            with self.lock:
                outcomes = self.script.get(key)
                outcome = outcomes.pop(0) if outcomes else self.failing.get(key, FakeResult())
            if isinstance(outcome, BaseException):
                raise outcome
            with self.lock:
                self.completed.append(key)
            return outcome
        finally:
            with self.lock:
                self.concurrent -= 1

    async def aclose(self) -> None:
        self.closed += 1

    def attempts_for(self, key: str) -> list[bytes | None]:
        with self.lock:
            return [body for k, body in self.attempts if k == key]


class RecordingEncoder:
    """Encodes deterministically and counts how often each key was encoded."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __call__(self, operation: Operation, dialect: str) -> bytes:
        key = operation.idempotency_key
        self.calls[key] = self.calls.get(key, 0) + 1
        return json.dumps({"key": key, "customer": operation.customer_id}).encode()


class FastSleep:
    """Records the delays asked for and yields once instead of waiting them out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


@dataclass
class DeadLetters:
    """A dead-letter hook that remembers what it was given."""

    received: list[tuple[Operation, BaseException]] = field(default_factory=list)

    def __call__(self, operation: Operation, error: BaseException) -> None:
        self.received.append((operation, error))

    @property
    def keys(self) -> list[str]:
        return [operation.idempotency_key for operation, _ in self.received]


def event(key: str, customer: str = "cus_1", feature: str = "api_calls") -> UsageEvent:
    """A valid usage event with a given idempotency key."""
    return UsageEvent.create(customer, feature, 1, idempotency_key=key)


QueueFactory = Callable[..., DeliveryQueue]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "swallows_errors: the test provokes internal errors the pipeline logs"
    )


@pytest.fixture(autouse=True)
def _no_swallowed_errors(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """Fail a test in which the pipeline swallowed an exception it did not expect."""
    yield
    if request.node.get_closest_marker("swallows_errors"):
        return
    swallowed = [
        record
        for record in caplog.get_records("call")
        if record.name.startswith("commet_middleware") and record.exc_info
    ]
    assert not swallowed, "swallowed: " + "; ".join(r.getMessage() for r in swallowed)


@pytest.fixture
def sender() -> FakeSender:
    return FakeSender()


@pytest.fixture
def encoder() -> RecordingEncoder:
    return RecordingEncoder()


@pytest.fixture
def sleep() -> FastSleep:
    return FastSleep()


@pytest.fixture
def dead_letters() -> DeadLetters:
    return DeadLetters()


@pytest.fixture
def make_queue(
    sender: FakeSender, encoder: RecordingEncoder, sleep: FastSleep, dead_letters: DeadLetters
) -> Iterator[QueueFactory]:
    """Build queues over the fake sender; close them all at teardown."""
    made: list[DeliveryQueue] = []

    def build(encode: Encoder | None = None, **overrides: object) -> DeliveryQueue:
        values: dict[str, object] = {
            "api_key": "ck_test_secret",
            "dead_letter": dead_letters,
            # Per-event mechanics: folding (the default) has its own tests in test_folding.py.
            "fold_when_behind": False,
        }
        values.update(overrides)
        queue = DeliveryQueue(
            CommetSettings(**values),  # type: ignore[arg-type]
            sender_factory=lambda settings: sender,
            encoder=encode or encoder,
            sleep=sleep,
        )
        made.append(queue)
        return queue

    yield build
    sender.gate.set()
    for queue in made:
        queue.close(0.2)
