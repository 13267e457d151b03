"""@quota_guard and @quota_release on FastAPI against the Commet emulator, sync and async."""

# No "from __future__ import annotations": FastAPI reads these endpoints' annotations at runtime.

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from commet_middleware import CommetMiddleware, CommetSettings, quota_guard, quota_release
from commet_middleware.customers import from_header
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.quota import QuotaGate
from commet_middleware.testing import FakeCommet

from .conftest import USER, DeadLetters, quota_reads, quota_writes


def build_app(settings: CommetSettings, *, is_async: bool, **options: Any) -> FastAPI:
    """One app per test: the same endpoints written sync or async."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware, customer=from_header("X-Customer-ID"), settings=settings, **options
    )
    # (path, feature, guard options); the response is 201 {"ok": true} unless asked otherwise.
    guarded: list[tuple[str, str, dict[str, Any]]] = [
        ("/tasks", "tasks", {}),
        ("/tasks/closed", "tasks", {"on_unavailable": "closed"}),
        ("/tasks/429", "tasks", {"refusal_status": 429}),
        (
            "/tasks/custom",
            "tasks",
            {"on_refused": lambda d: (409, {"detail": d.code}, {"X-Quota": "out"})},
        ),
        ("/tasks/broken-hook", "tasks", {"on_refused": lambda d: 1 / 0}),
        ("/seats", "seats", {}),
        ("/seats/hard", "seats", {"hard_limit": True}),
        ("/automations", "automations", {}),
    ]
    for path, feature, guard_options in guarded:
        if is_async:

            @quota_guard(feature, **guard_options)
            async def create(fail: int = 0) -> Any:
                if fail == 1:
                    raise RuntimeError("endpoint bug")
                return JSONResponse({"ok": True}, status_code=fail or 201)

        else:

            @quota_guard(feature, **guard_options)
            def create(fail: int = 0) -> Any:  # type: ignore[misc]
                if fail == 1:
                    raise RuntimeError("endpoint bug")
                return JSONResponse({"ok": True}, status_code=fail or 201)

        app.post(path)(create)

    if is_async:

        @app.post("/tasks/bulk")
        @quota_guard("tasks", count=lambda n: n)
        async def bulk(n: int) -> dict[str, int]:
            return {"created": n}

        @app.delete("/tasks")
        @quota_release("tasks", count=lambda result: result["deleted"])
        async def delete(n: int = 1) -> dict[str, int]:
            return {"deleted": n}

    else:

        @app.post("/tasks/bulk")
        @quota_guard("tasks", count=lambda n: n)
        def bulk(n: int) -> dict[str, int]:  # type: ignore[misc]
            return {"created": n}

        @app.delete("/tasks")
        @quota_release("tasks", count=lambda result: result["deleted"])
        def delete(n: int = 1) -> dict[str, int]:  # type: ignore[misc]
            return {"deleted": n}

    return app


@pytest.fixture(params=["sync", "async"])
def is_async(request: pytest.FixtureRequest) -> bool:
    """Each test runs against sync (threadpool) and async endpoints."""
    return bool(request.param == "async")


@pytest.fixture
def client(settings: CommetSettings, is_async: bool) -> Iterator[TestClient]:
    """A TestClient whose lifespan shutdown flushes the delivery queue to the emulator."""
    with TestClient(build_app(settings, is_async=is_async), raise_server_exceptions=False) as c:
        yield c


def test_refuses_at_the_ceiling(settings: CommetSettings, is_async: bool, fake: FakeCommet) -> None:
    """Five creates pass with RateLimit headers counting down; the sixth gets the 402 body."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        for left in (4, 3, 2, 1, 0):
            response = client.post("/tasks", headers=USER)
            assert response.status_code == 201
            assert response.headers["RateLimit"] == f'"tasks";r={left}'
            assert response.headers["RateLimit-Policy"] == '"tasks";q=5'
        refused = client.post("/tasks", headers=USER)
    assert refused.status_code == 402
    assert refused.json() == {
        "error": {
            "type": "quota_error",
            "code": "quota_exceeded",
            "message": refused.json()["error"]["message"],
            "feature": "tasks",
            "current": 5,
            "included": 5,
            "remaining": 0,
        }
    }
    assert refused.headers["RateLimit"] == '"tasks";r=0'
    assert refused.headers["content-type"] == "application/json"
    assert fake.quota("user_1", "tasks").current == 5


def test_refusal_status_is_configurable(client: TestClient) -> None:
    """refusal_status=429 replaces the 402 of quota_exceeded."""
    for _ in range(5):
        assert client.post("/tasks", headers=USER).status_code == 201
    assert client.post("/tasks/429", headers=USER).status_code == 429


def test_on_refused_shapes_the_answer(client: TestClient) -> None:
    """on_refused(decision) returns the status, body and headers of the refusal."""
    for _ in range(5):
        assert client.post("/tasks", headers=USER).status_code == 201
    refused = client.post("/tasks/custom", headers=USER)
    assert (refused.status_code, refused.json()) == (409, {"detail": "quota_exceeded"})
    assert refused.headers["X-Quota"] == "out"


@pytest.mark.usefixtures("allow_commet_errors")
def test_a_failing_on_refused_hook_keeps_the_default(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is logged and the default 402 is sent."""
    for _ in range(5):
        assert client.post("/tasks", headers=USER).status_code == 201
    assert client.post("/tasks/broken-hook", headers=USER).status_code == 402
    assert any("on_refused hook failed" in r.getMessage() for r in caplog.records)


def test_error_responses_carry_no_ratelimit_headers(client: TestClient) -> None:
    """Only responses that use the reserved units say how many are left."""
    assert "RateLimit" not in client.post("/tasks", params={"fail": 500}, headers=USER).headers


def test_count_from_the_arguments(client: TestClient) -> None:
    """count= as a function of the endpoint's arguments reserves that many units."""
    assert client.post("/tasks/bulk", params={"n": 4}, headers=USER).status_code == 200
    refused = client.post("/tasks/bulk", params={"n": 2}, headers=USER)
    assert refused.status_code == 402
    assert refused.json()["error"]["remaining"] == 1


def test_overage_is_allowed(settings: CommetSettings, is_async: bool, fake: FakeCommet) -> None:
    """A plan with overage enabled lets creates past the included amount."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        assert all(client.post("/seats", headers=USER).status_code == 201 for _ in range(7))
    assert fake.quota("user_1", "seats").current == 7


def test_hard_limit_caps_overage(client: TestClient) -> None:
    """hard_limit=True makes the included amount a ceiling even with overage enabled."""
    assert all(client.post("/seats/hard", headers=USER).status_code == 201 for _ in range(5))
    refused = client.post("/seats/hard", headers=USER)
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "quota_exceeded"


def test_unlimited_is_never_refused(client: TestClient) -> None:
    """An unlimited feature passes every time and carries no RateLimit headers."""
    for _ in range(8):
        response = client.post("/automations", headers=USER)
        assert response.status_code == 201
        assert "RateLimit" not in response.headers


def test_release_lowers_the_balance(
    settings: CommetSettings, is_async: bool, fake: FakeCommet
) -> None:
    """Creates then a delete of two: after the flush Commet's balance went up 3, down 2."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        for _ in range(3):
            assert client.post("/tasks", headers=USER).status_code == 201
        assert client.delete("/tasks", params={"n": 2}, headers=USER).json() == {"deleted": 2}
        # The cache moved at once: 5 - 3 + 2 = 4 left.
        assert client.post("/tasks/bulk", params={"n": 4}, headers=USER).status_code == 200
    assert fake.quota("user_1", "tasks").current == 5
    assert [e.action for e in fake.quota_events("user_1", "tasks")][3] == "remove"


@pytest.mark.parametrize(("method", "path"), [("POST", "/tasks"), ("DELETE", "/tasks")])
def test_missing_customer_is_401(client: TestClient, method: str, path: str) -> None:
    """A guarded or releasing request with no customer gets 401 customer_required."""
    response = client.request(method, path)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "customer_required"


@pytest.mark.parametrize(
    ("customer", "status", "code"),
    [("lapsed", 402, "no_active_subscription"), ("user_2", 403, "feature_not_in_plan")],
)
def test_commet_refusals_keep_their_code(
    client: TestClient, customer: str, status: int, code: str
) -> None:
    """No subscription is 402 and a feature outside the plan 403, with Commet's code."""
    response = client.post("/tasks", headers={"X-Customer-ID": customer})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_commet_down_fails_open(settings: CommetSettings, is_async: bool, fake: FakeCommet) -> None:
    """With Commet down and no allowance known, the default policy allows; the add lands later."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        fake.faults.fail_next(1, status=503)
        assert client.post("/tasks", headers=USER).status_code == 201
    assert fake.faults.injected == {"fail_next": 1}
    assert fake.quota("user_1", "tasks").current == 1


def test_commet_down_fails_closed(client: TestClient, fake: FakeCommet) -> None:
    """on_unavailable="closed" answers 503 quota_unavailable with Retry-After."""
    fake.faults.fail_next(1, status=503)
    response = client.post("/tasks/closed", headers=USER)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "quota_unavailable"
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize("fail", [1, 500, 409])
def test_failures_release_and_record_nothing(
    settings: CommetSettings, is_async: bool, fake: FakeCommet, fail: int
) -> None:
    """An endpoint that raises or answers an error frees its unit and adds nothing to Commet."""
    app = build_app(settings, is_async=is_async)
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(6):
            assert client.post("/tasks", params={"fail": fail}, headers=USER).status_code in (
                500,
                fail,
            )
        # Every unit came back: five creates still fit.
        assert client.post("/tasks/bulk", params={"n": 5}, headers=USER).status_code == 200
    assert [e.count for e in fake.quota_events("user_1", "tasks")] == [5]


def test_cache_hit_makes_no_request(client: TestClient, fake: FakeCommet) -> None:
    """A second guarded request is decided from the cache: one allowance read in all."""
    client.post("/tasks", headers=USER)
    client.post("/tasks", headers=USER)
    assert quota_reads(fake) == 1


@pytest.mark.anyio
async def test_single_flight_on_cold_misses(
    settings: CommetSettings, is_async: bool, fake: FakeCommet
) -> None:
    """Concurrent first requests for one customer share one allowance read."""
    queue = DeliveryQueue(settings)
    gate = QuotaGate(settings)
    app = build_app(settings, is_async=is_async, sink=queue, quota_gate=gate)
    fake.faults.latency(0.05)  # keep the first read open while the others arrive
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        responses = await asyncio.gather(*(http.post("/seats", headers=USER) for _ in range(10)))
    assert [r.status_code for r in responses] == [201] * 10
    stats = gate.stats.snapshot()
    # Several requests missed the cache at once, and they shared the one read.
    assert stats["fetches"] == quota_reads(fake) == 1
    assert stats["cache_misses"] > 1
    fake.faults.latency(0)
    assert await queue.aclose(5.0)
    await gate.aclose()
    gate.close()


@pytest.mark.anyio
async def test_fifty_concurrent_creates_are_exact(
    settings: CommetSettings, is_async: bool, fake: FakeCommet
) -> None:
    """With 5 remaining, 50 concurrent creates: exactly 5 pass, 45 get 402, Commet gets +5."""
    queue = DeliveryQueue(settings)
    app = build_app(settings, is_async=is_async, sink=queue)
    before = fake.quota("user_1", "tasks").current
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        responses = await asyncio.gather(*(http.post("/tasks", headers=USER) for _ in range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 5 + [402] * 45
    assert await queue.aclose(5.0)
    assert fake.quota("user_1", "tasks").current == before + 5


def test_confirmed_balance_reaches_the_cache(
    settings: CommetSettings, is_async: bool, fake: FakeCommet
) -> None:
    """The delivery listener writes Commet's confirmed balance into the gate's cache."""
    gate = QuotaGate(settings)
    with TestClient(build_app(settings, is_async=is_async, quota_gate=gate)) as client:
        assert client.post("/tasks", headers=USER).status_code == 201
    assert gate.stats.snapshot()["confirmed"] == 1
    cached = gate.cache.last_known("user_1", "tasks")
    assert cached is not None
    assert cached.current == fake.quota("user_1", "tasks").current == 1
    gate.close()


@pytest.mark.usefixtures("allow_commet_errors")
def test_remove_past_the_balance_is_dead_lettered(
    settings: CommetSettings,
    is_async: bool,
    fake: FakeCommet,
    dead_letters: DeadLetters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delete beyond the balance: Commet's 400 insufficient_balance is dead-lettered, logged,
    and never retried."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        assert client.post("/tasks", headers=USER).status_code == 201
        assert client.delete("/tasks", params={"n": 3}, headers=USER).status_code == 200
    [(operation, error)] = dead_letters.items
    assert getattr(error, "code", None) == "insufficient_balance"
    assert (operation.kind, getattr(operation, "action", None)) == ("quota", "remove")
    assert quota_writes(fake, "/quota/remove") == 1
    assert any("giving up" in r.getMessage() for r in caplog.records)
    assert fake.quota("user_1", "tasks").current == 1
