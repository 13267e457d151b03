"""@quota_guard and @quota_release on a plain Starlette app, sync and async endpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from commet_middleware import CommetMiddleware, CommetSettings, quota_guard, quota_release
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet

from .conftest import USER, quota_reads


def build_app(settings: CommetSettings, *, is_async: bool) -> Starlette:
    """Guarded creates and a releasing delete, written sync or async."""

    def created(request: Request) -> JSONResponse:
        fail = int(request.query_params.get("fail", 0))
        if fail == 1:
            raise RuntimeError("endpoint bug")
        return JSONResponse({"ok": True}, status_code=fail or 201)

    def deleted(request: Request) -> JSONResponse:
        return JSONResponse({"deleted": int(request.query_params.get("n", 1))})

    def endpoint(body: Callable[[Request], JSONResponse]) -> Callable[[Request], Any]:
        if not is_async:
            return body

        async def run(request: Request) -> JSONResponse:
            return body(request)

        return run

    def removed(response: JSONResponse) -> int:
        return int(response.body.decode().split(":")[1].rstrip("}"))

    routes = [
        Route("/tasks", quota_guard("tasks")(endpoint(created)), methods=["POST"]),
        Route(
            "/tasks/closed",
            quota_guard("tasks", on_unavailable="closed")(endpoint(created)),
            methods=["POST"],
        ),
        Route("/seats", quota_guard("seats")(endpoint(created)), methods=["POST"]),
        Route("/automations", quota_guard("automations")(endpoint(created)), methods=["POST"]),
        Route(
            "/tasks", quota_release("tasks", count=removed)(endpoint(deleted)), methods=["DELETE"]
        ),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(CommetMiddleware, customer=from_header("X-Customer-ID"), settings=settings)
        ],
    )


@pytest.fixture(params=["sync", "async"])
def is_async(request: pytest.FixtureRequest) -> bool:
    """Each test runs against sync (threadpool) and async endpoints."""
    return bool(request.param == "async")


def test_ceiling_release_and_flush(
    settings: CommetSettings, is_async: bool, fake: FakeCommet
) -> None:
    """Five creates pass, the sixth is 402; a delete of two frees two; Commet ends at 3."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        assert all(client.post("/tasks", headers=USER).status_code == 201 for _ in range(5))
        refused = client.post("/tasks", headers=USER)
        assert refused.status_code == 402
        assert refused.headers["RateLimit"] == '"tasks";r=0'
        assert client.delete("/tasks?n=2", headers=USER).status_code == 200
        assert client.post("/tasks", headers=USER).headers["RateLimit"] == '"tasks";r=1'
    assert fake.quota("user_1", "tasks").current == 4
    assert quota_reads(fake) == 1


def test_overage_and_unlimited(settings: CommetSettings, is_async: bool) -> None:
    """Overage and unlimited features are never refused."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        assert all(client.post("/seats", headers=USER).status_code == 201 for _ in range(7))
        assert all(client.post("/automations", headers=USER).status_code == 201 for _ in range(7))


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "customer_required"),
        ({"X-Customer-ID": "lapsed"}, 402, "no_active_subscription"),
        ({"X-Customer-ID": "user_2"}, 403, "feature_not_in_plan"),
    ],
)
def test_refusals(
    settings: CommetSettings, is_async: bool, headers: dict[str, str], status: int, code: str
) -> None:
    """No customer, no subscription, feature not in plan: each with its status and code."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        response = client.post("/tasks", headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_commet_down_both_policies(
    settings: CommetSettings, is_async: bool, fake: FakeCommet
) -> None:
    """Commet down: the closed guard answers 503 with Retry-After, the default one allows."""
    with TestClient(build_app(settings, is_async=is_async)) as client:
        fake.faults.fail_next(1, status=503)
        closed = client.post("/tasks/closed", headers=USER)
        assert (closed.status_code, closed.headers["Retry-After"]) == (503, "1")
        fake.faults.fail_next(1, status=503)
        assert client.post("/tasks", headers=USER).status_code == 201
    assert fake.quota("user_1", "tasks").current == 1


@pytest.mark.parametrize("fail", [1, 500])
def test_failures_release(
    settings: CommetSettings, is_async: bool, fake: FakeCommet, fail: int
) -> None:
    """Raising or answering 500 frees the unit and records nothing."""
    app = build_app(settings, is_async=is_async)
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(6):
            assert client.post(f"/tasks?fail={fail}", headers=USER).status_code == 500
        assert all(client.post("/tasks", headers=USER).status_code == 201 for _ in range(5))
    assert len(fake.quota_events("user_1", "tasks")) == 5
