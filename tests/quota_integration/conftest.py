"""Fixtures for the quota guard tests: an emulated Commet, settings reaching it, dead letters."""

from __future__ import annotations

import threading

import pytest
from unit.support import (  # noqa: F401 - fixtures shared with the middleware tests
    _fail_on_swallowed_errors,
    allow_commet_errors,
)

from commet_middleware import CommetError, CommetSettings
from commet_middleware._models import Operation
from commet_middleware.testing import FakeCommet

API_KEY = "ck_test_guard_secret_0123456789"
USER = {"X-Customer-ID": "user_1"}


class DeadLetters:
    """A dead-letter hook that keeps what it was given."""

    def __init__(self) -> None:
        self.items: list[tuple[Operation, CommetError | Exception]] = []
        self._lock = threading.Lock()

    def __call__(self, operation: Operation, error: CommetError | Exception) -> None:
        with self._lock:
            self.items.append((operation, error))


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio."""
    return "asyncio"


@pytest.fixture
def fake() -> FakeCommet:
    """An emulated Commet: 5 tasks included (hard ceiling), seats with overage, unlimited
    automations; user_1 has them all, user_2 a plan without tasks, lapsed no subscription."""
    fake = FakeCommet()
    fake.add_feature("tasks", quota=True, included=5)
    fake.add_feature("seats", quota=True, included=5, overage=True)
    fake.add_feature("automations", quota=True, unlimited=True)
    fake.add_customer("user_1", ["tasks", "seats", "automations"])
    fake.add_customer("user_2", ["seats"])
    fake.add_customer("lapsed", subscribed=False)
    return fake


@pytest.fixture
def dead_letters() -> DeadLetters:
    """Collects dead-lettered operations."""
    return DeadLetters()


@pytest.fixture
def settings(fake: FakeCommet, dead_letters: DeadLetters) -> CommetSettings:
    """Settings reaching the emulator in-process, with quick retries and a dead-letter hook."""
    return CommetSettings(
        api_key=API_KEY,
        base_url="http://commet.test",
        transport=fake.transport,
        backoff_base=0.01,
        dead_letter=dead_letters,
    )


def quota_reads(fake: FakeCommet) -> int:
    """How many allowance reads the emulator has received."""
    return sum(1 for r in fake.requests if r.method == "GET" and r.path.endswith("/quota"))


def quota_writes(fake: FakeCommet, suffix: str = "/quota") -> int:
    """How many quota mutations (add: ``/quota``, remove: ``/quota/remove``) were sent."""
    return sum(1 for r in fake.requests if r.method != "GET" and r.path.endswith(suffix))
