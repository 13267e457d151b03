"""@quota_guard with aggregation: a burst's adds reach Commet as one, and the gate stays exact."""

# No "from __future__ import annotations": FastAPI reads these endpoints' annotations at runtime.

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from commet_middleware import (
    CommetError,
    CommetMiddleware,
    CommetSettings,
    quota_guard,
    quota_release,
)
from commet_middleware._client import CommetClient
from commet_middleware._models import Operation
from commet_middleware.customers import from_header
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.quota import QuotaGate
from commet_middleware.testing import FakeCommet

from .conftest import USER, DeadLetters, quota_writes

# A window no test waits out: the adds are held until the test flushes the queue.
LONG_WINDOW = 1000.0


class Billing:
    """A gate and a coalescing queue wired as the middleware wires its own: the gate hears of
    every delivered change (listener) and every abandoned one (dead-letter hook)."""

    def __init__(self, settings: CommetSettings, dead_letters: DeadLetters) -> None:
        self.gate = QuotaGate(settings)

        def dead_letter(operation: Operation, error: CommetError | Exception) -> None:
            self.gate.forget(operation, error)
            dead_letters(operation, error)

        self.queue = DeliveryQueue(
            settings.replace(aggregate_window=LONG_WINDOW, dead_letter=dead_letter)
        )

    def close(self) -> None:
        self.queue.close(5.0)
        self.gate.close()


def build_app(billing: Billing, *, is_async: bool) -> FastAPI:
    """POST /tasks holds a task unit, DELETE /tasks frees one; sync or async endpoints."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware,
        customer=from_header("X-Customer-ID"),
        sink=billing.queue,
        quota_gate=billing.gate,
    )
    if is_async:

        @app.post("/tasks", status_code=201)
        @quota_guard("tasks")
        async def create() -> dict[str, bool]:
            return {"ok": True}

        @app.delete("/tasks")
        @quota_release("tasks")
        async def delete() -> dict[str, bool]:
            return {"ok": True}

    else:

        @app.post("/tasks", status_code=201)
        @quota_guard("tasks")
        def create() -> dict[str, bool]:  # type: ignore[misc]
            return {"ok": True}

        @app.delete("/tasks")
        @quota_release("tasks")
        def delete() -> dict[str, bool]:  # type: ignore[misc]
            return {"ok": True}

    return app


@pytest.fixture(params=["sync", "async"])
def is_async(request: pytest.FixtureRequest) -> bool:
    """Each test runs against sync (threadpool) and async endpoints."""
    return bool(request.param == "async")


@pytest.fixture
def billing(settings: CommetSettings, dead_letters: DeadLetters) -> Iterator[Billing]:
    """The gate and queue under test; closed at teardown."""
    billing = Billing(settings, dead_letters)
    yield billing
    billing.close()


@pytest.fixture
def admin_settings(fake: FakeCommet) -> CommetSettings:
    """Settings for arranging balances directly, behind the gate's back."""
    return CommetSettings(
        api_key="ck_test_admin", base_url="http://commet.test", transport=fake.transport
    )


def cached_balance(gate: QuotaGate) -> Any:
    allowance = gate.cache.last_known("user_1", "tasks")
    return None if allowance is None else allowance.current


def test_a_coalesced_burst_leaves_the_gate_exact(
    billing: Billing, is_async: bool, fake: FakeCommet, dead_letters: DeadLetters
) -> None:
    """Four guarded creates: exact RateLimit headers, one +4 to Commet, the cache equal to it,
    and the next lone change confirmed by Commet."""
    with TestClient(build_app(billing, is_async=is_async)) as client:
        for left in (4, 3, 2, 1):
            response = client.post("/tasks", headers=USER)
            assert response.status_code == 201
            assert response.headers["RateLimit"] == f'"tasks";r={left}'
        assert quota_writes(fake) == 0  # held in the window
        assert billing.queue.flush(5.0)
        assert quota_writes(fake) == 1
        assert [e.count for e in fake.quota_events("user_1", "tasks")] == [4]
        assert cached_balance(billing.gate) == fake.quota("user_1", "tasks").current == 4
        # Overlapping changes are never confirmed; every one of them has settled, though, so a
        # later lone change is.
        assert billing.gate.stats.snapshot()["confirmed"] == 0
        assert client.delete("/tasks", headers=USER).status_code == 200
        assert billing.queue.flush(5.0)
    assert billing.gate.stats.snapshot()["confirmed"] == 1
    assert cached_balance(billing.gate) == fake.quota("user_1", "tasks").current == 3
    assert not dead_letters.items


@pytest.mark.usefixtures("allow_commet_errors")
def test_a_refused_burst_is_split_and_the_gate_forgets_each_refused_add(
    billing: Billing,
    is_async: bool,
    fake: FakeCommet,
    dead_letters: DeadLetters,
    admin_settings: CommetSettings,
) -> None:
    """Commet's balance moved behind the gate's back: the +3 is refused, split, one member
    counts, two are dead-lettered and forgotten, and the gate settles every one of them."""
    with TestClient(build_app(billing, is_async=is_async)) as client:
        assert client.post("/tasks", headers=USER).status_code == 201
        assert billing.queue.flush(5.0)
        assert billing.gate.stats.snapshot()["confirmed"] == 1
        with CommetClient(admin_settings) as admin:
            admin.add_quota("user_1", "tasks", 3)  # Commet: 4 of 5; the gate still thinks 1
        for _ in range(3):
            assert client.post("/tasks", headers=USER).status_code == 201
        assert billing.queue.flush(5.0)
        assert [e.count for e in fake.quota_events("user_1", "tasks")] == [1, 3, 1]
        assert fake.quota("user_1", "tasks").current == 5
        assert [getattr(error, "code", None) for _, error in dead_letters.items] == [
            "included_limit_reached"
        ] * 2
        assert billing.gate.stats.snapshot()["abandoned"] == 2
        assert billing.queue.aggregation_stats().aggregates_split == 1
        # The cache was dropped: the next check asks Commet and refuses.
        assert cached_balance(billing.gate) is None
        assert client.post("/tasks", headers=USER).status_code == 402
        # Every change of the burst has settled: a lone one is confirmed again.
        assert client.delete("/tasks", headers=USER).status_code == 200
        assert billing.queue.flush(5.0)
    assert billing.gate.stats.snapshot()["confirmed"] == 2
    assert cached_balance(billing.gate) == fake.quota("user_1", "tasks").current == 4
