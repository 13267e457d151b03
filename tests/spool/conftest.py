"""Fixtures for the spool tests: a recording sender, a spool path, queues closed at teardown."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from commet_middleware import CommetSettings, UsageEvent
from commet_middleware._models import Operation
from commet_middleware._spool import Spool
from commet_middleware.delivery import DeliveryQueue


@dataclass
class Result:
    duplicate: bool = False


@dataclass
class RecordingSender:
    """Records each attempt; ``failing`` maps keys to the error every attempt raises."""

    failing: dict[str, BaseException] = field(default_factory=dict)
    # While cleared, every send waits.
    gate: threading.Event = field(default_factory=threading.Event)
    attempts: list[tuple[str, bytes | None]] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.gate.set()

    async def send_once(self, operation: Operation, *, request_body: bytes | None = None) -> Result:
        key = operation.idempotency_key
        with self.lock:
            self.attempts.append((key, request_body))
        while not self.gate.is_set():  # noqa: ASYNC110 - opened from another thread
            await asyncio.sleep(0.002)
        error = self.failing.get(key)
        if error is not None:
            raise error
        with self.lock:
            self.delivered.append(key)
        return Result()


def encode(operation: Operation, dialect: str) -> bytes:
    """A deterministic body that names the operation."""
    return json.dumps({"key": operation.idempotency_key, "dialect": dialect}).encode()


def event(key: str, customer: str = "cus_1") -> UsageEvent:
    """A valid usage event with a given idempotency key."""
    return UsageEvent.create(customer, "api_calls", 1, idempotency_key=key)


def enqueue_committed(queue: DeliveryQueue, *operations: Operation) -> None:
    """Enqueue ``operations`` and wait for the spool commits ``enqueue`` hands back (None: the
    calling thread committed it itself)."""
    commits = [queue.enqueue(operation) for operation in operations]
    for commit in commits:
        assert commit is None or commit.wait(10)


def rows(path: Path, table: str = "pending") -> list[tuple[str, bytes | None]]:
    """(idempotency key, body) of every row of ``table``, read over a connection of our own."""
    with sqlite3.connect(path) as conn:
        # S608: ``table`` is one of the spool's two table names, chosen by the test.
        return list(conn.execute(f"SELECT idempotency_key, body FROM {table} ORDER BY id"))  # noqa: S608


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool.sqlite3"


@pytest.fixture
def sender() -> RecordingSender:
    return RecordingSender()


@dataclass
class DeadLetters:
    received: list[tuple[Operation, BaseException]] = field(default_factory=list)

    def __call__(self, operation: Operation, error: BaseException) -> None:
        self.received.append((operation, error))

    @property
    def keys(self) -> list[str]:
        return [operation.idempotency_key for operation, _ in self.received]


@pytest.fixture
def dead_letters() -> DeadLetters:
    return DeadLetters()


QueueFactory = Callable[..., DeliveryQueue]


async def _no_wait(delay: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
def make_queue(
    spool_path: Path, sender: RecordingSender, dead_letters: DeadLetters
) -> Iterator[QueueFactory]:
    """Build spooled queues over the recording sender; close them at teardown."""
    made: list[DeliveryQueue] = []

    def build(spool: Spool | None = None, **overrides: object) -> DeliveryQueue:
        values: dict[str, object] = {
            "api_key": "ck_test",
            "dead_letter": dead_letters,
            "spool_path": str(spool_path),
            # Per-event mechanics: folding (the default) has its own tests in test_folding.py.
            "fold_when_behind": False,
        }
        values.update(overrides)
        queue = DeliveryQueue(
            CommetSettings(**values),  # type: ignore[arg-type]
            sender_factory=lambda settings: sender,
            encoder=encode,
            sleep=_no_wait,
            spool=spool,
        )
        made.append(queue)
        return queue

    yield build
    sender.gate.set()
    for queue in made:
        queue.close(1.0)
