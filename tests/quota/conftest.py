"""Fixtures for the quota gate tests: an emulated Commet, a fake clock, and gates built on them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from commet_middleware._client import CommetClient
from commet_middleware._settings import CommetSettings
from commet_middleware.quota import AllowanceCache, QuotaGate
from commet_middleware.testing import FakeCommet

from .redis_server import RedisServer, redis_server_or_skip

API_KEY = "ck_test_quota_secret_0123456789"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake() -> FakeCommet:
    """An emulated Commet with one customer on a plan holding every kind of quota feature."""
    fake = FakeCommet()
    fake.add_feature("tasks", quota=True, included=5)
    fake.add_feature("seats", quota=True, included=5, overage=True)
    fake.add_feature("automations", quota=True, unlimited=True)
    fake.add_feature("numbers", quota=True, included=2)
    fake.add_feature("api_calls")
    fake.add_customer("user_1", ["tasks", "seats", "automations", "api_calls"])
    fake.add_customer("user_2", ["tasks"])
    fake.add_customer("lapsed", subscribed=False)
    return fake


@pytest.fixture
def settings(fake: FakeCommet) -> CommetSettings:
    """Settings that reach the emulator in-process, with no retries."""
    return CommetSettings(
        api_key=API_KEY, base_url="http://commet.test", transport=fake.transport, max_retries=0
    )


@pytest.fixture
def admin(settings: CommetSettings) -> Iterator[CommetClient]:
    """A client to arrange balances with (its requests are counted too: measure deltas)."""
    with CommetClient(settings) as client:
        yield client


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for the cache TTL."""
    return FakeClock()


@pytest.fixture
def gate(settings: CommetSettings, clock: FakeClock) -> Iterator[QuotaGate]:
    """A gate with a 5 s cache on the fake clock, for the sync path."""
    gate = QuotaGate(settings, cache=AllowanceCache(5.0, clock=clock))
    yield gate
    gate.close()


@pytest.fixture
async def agate(settings: CommetSettings, clock: FakeClock) -> AsyncIterator[QuotaGate]:
    """A gate with a 5 s cache on the fake clock, for the async path."""
    gate = QuotaGate(settings, cache=AllowanceCache(5.0, clock=clock))
    yield gate
    await gate.aclose()


def quota_reads(fake: FakeCommet) -> int:
    """How many allowance reads the emulator has received."""
    return sum(1 for r in fake.requests if r.method == "GET" and r.path.endswith("/quota"))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own on 127.0.0.1 (skipped without one, failed in CI)."""
    with redis_server_or_skip() as server:
        yield server
