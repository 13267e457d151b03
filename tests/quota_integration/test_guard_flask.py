"""@quota_guard and @quota_release on Flask against the Commet emulator."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from commet_middleware import CommetSettings, CommetWSGIMiddleware, quota_guard, quota_release
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet

from .conftest import USER, quota_reads


class ServerLikeClient(FlaskClient):
    """Consumes and closes every response body, as a WSGI server does."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def build(settings: CommetSettings, *, testing: bool = True) -> tuple[Flask, CommetWSGIMiddleware]:
    """A Flask app with guarded creates and a releasing delete, behind the WSGI middleware."""
    app = Flask(__name__)
    app.testing = testing
    app.test_client_class = ServerLikeClient
    middleware = CommetWSGIMiddleware(
        app.wsgi_app, customer=from_header("X-Customer-ID"), settings=settings
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]

    @app.post("/tasks")
    @quota_guard("tasks")
    def create() -> Any:
        fail = request.args.get("fail", type=int)
        if fail == 1:
            raise RuntimeError("view bug")
        return {"ok": True}, fail or 201

    @app.post("/tasks/closed")
    @quota_guard("tasks", on_unavailable="closed")
    def create_closed() -> Any:
        return {"ok": True}, 201

    @app.post("/seats")
    @quota_guard("seats")
    def add_seat() -> Any:
        return {"ok": True}, 201

    @app.post("/seats/hard")
    @quota_guard("seats", hard_limit=True)
    def add_seat_hard() -> Any:
        return {"ok": True}, 201

    @app.post("/automations")
    @quota_guard("automations")
    def add_automation() -> Any:
        return {"ok": True}, 201

    @app.delete("/tasks")
    @quota_release("tasks", count=lambda result: result["deleted"])
    def delete() -> dict[str, int]:
        return {"deleted": request.args.get("n", 1, type=int)}

    return app, middleware


@pytest.fixture(params=[True, False], ids=["testing", "production"])
def testing(request: pytest.FixtureRequest) -> bool:
    """Flask in testing mode (exceptions propagate) and in production mode."""
    return bool(request.param)


@pytest.fixture
def flask_app(
    settings: CommetSettings, testing: bool
) -> Iterator[tuple[Flask, CommetWSGIMiddleware]]:
    """The app and its middleware; the middleware is closed (queue flushed) afterwards."""
    app, middleware = build(settings, testing=testing)
    yield app, middleware
    middleware.close()


def test_refuses_at_the_ceiling(
    flask_app: tuple[Flask, CommetWSGIMiddleware], fake: FakeCommet
) -> None:
    """Five creates pass with RateLimit headers; the sixth gets 402 with the stable body."""
    app, middleware = flask_app
    client = app.test_client()
    for left in (4, 3, 2, 1, 0):
        response = client.post("/tasks", headers=USER)
        assert response.status_code == 201
        assert response.headers["RateLimit"] == f'"tasks";r={left}'
    refused = client.post("/tasks", headers=USER)
    assert refused.status_code == 402
    assert refused.json is not None
    assert refused.json["error"]["code"] == "quota_exceeded"
    assert refused.headers["RateLimit-Policy"] == '"tasks";q=5'
    middleware.close()
    assert fake.quota("user_1", "tasks").current == 5


def test_overage_hard_limit_and_unlimited(flask_app: tuple[Flask, CommetWSGIMiddleware]) -> None:
    """Overage passes the included amount, hard_limit stops there, unlimited never stops."""
    app, _ = flask_app
    client = app.test_client()
    assert all(client.post("/seats/hard", headers=USER).status_code == 201 for _ in range(5))
    assert client.post("/seats/hard", headers=USER).status_code == 402
    assert client.post("/seats", headers=USER).status_code == 201
    assert all(client.post("/automations", headers=USER).status_code == 201 for _ in range(8))


def test_release_lowers_the_balance(
    flask_app: tuple[Flask, CommetWSGIMiddleware], fake: FakeCommet
) -> None:
    """Three creates and a delete of two leave Commet's balance at 1 after the flush."""
    app, middleware = flask_app
    client = app.test_client()
    for _ in range(3):
        assert client.post("/tasks", headers=USER).status_code == 201
    assert client.delete("/tasks?n=2", headers=USER).status_code == 200
    middleware.close()
    assert fake.quota("user_1", "tasks").current == 1


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_missing_customer_is_401(
    flask_app: tuple[Flask, CommetWSGIMiddleware], method: str
) -> None:
    """No customer: 401 customer_required, the view never runs."""
    app, _ = flask_app
    response = app.test_client().open("/tasks", method=method)
    assert response.status_code == 401
    assert response.json is not None
    assert response.json["error"]["code"] == "customer_required"


@pytest.mark.parametrize(
    ("customer", "status", "code"),
    [("lapsed", 402, "no_active_subscription"), ("user_2", 403, "feature_not_in_plan")],
)
def test_commet_refusals_keep_their_code(
    flask_app: tuple[Flask, CommetWSGIMiddleware], customer: str, status: int, code: str
) -> None:
    """No subscription is 402 and a feature outside the plan 403, with Commet's code."""
    app, _ = flask_app
    response = app.test_client().post("/tasks", headers={"X-Customer-ID": customer})
    assert response.status_code == status
    assert response.json is not None
    assert response.json["error"]["code"] == code


def test_commet_down_both_policies(
    flask_app: tuple[Flask, CommetWSGIMiddleware], fake: FakeCommet
) -> None:
    """Commet down: the default guard allows, the closed one answers 503 with Retry-After."""
    app, _ = flask_app
    client = app.test_client()
    fake.faults.fail_next(1, status=503)
    closed = client.post("/tasks/closed", headers=USER)
    assert closed.status_code == 503
    assert closed.headers["Retry-After"] == "1"
    fake.faults.fail_next(1, status=503)
    assert client.post("/tasks", headers=USER).status_code == 201


@pytest.mark.parametrize("fail", [500, 409])
def test_error_responses_release(
    flask_app: tuple[Flask, CommetWSGIMiddleware], fake: FakeCommet, fail: int
) -> None:
    """A view answering an error frees its unit and adds nothing to Commet."""
    app, middleware = flask_app
    client = app.test_client()
    for _ in range(6):
        assert client.post(f"/tasks?fail={fail}", headers=USER).status_code == fail
    assert all(client.post("/tasks", headers=USER).status_code == 201 for _ in range(5))
    middleware.close()
    # Five units added (a sender behind may fold some adds into one: the total is what counts).
    assert sum(e.count for e in fake.quota_events("user_1", "tasks")) == 5


def test_raising_view_releases(settings: CommetSettings, fake: FakeCommet) -> None:
    """A view that raises (Flask answers 500) frees its unit and adds nothing to Commet."""
    app, middleware = build(settings, testing=False)
    client = app.test_client()
    for _ in range(6):
        assert client.post("/tasks?fail=1", headers=USER).status_code == 500
    assert client.post("/tasks", headers=USER).status_code == 201
    middleware.close()
    assert len(fake.quota_events("user_1", "tasks")) == 1


def test_cache_hit_makes_no_request(
    flask_app: tuple[Flask, CommetWSGIMiddleware], fake: FakeCommet
) -> None:
    """The second guarded request is decided from the cache: one allowance read in all."""
    app, _ = flask_app
    client = app.test_client()
    client.post("/tasks", headers=USER)
    client.post("/tasks", headers=USER)
    assert quota_reads(fake) == 1


def test_fifty_concurrent_creates_under_a_threaded_server(
    settings: CommetSettings, fake: FakeCommet
) -> None:
    """A threaded werkzeug server, 50 creates at once with 5 remaining: exactly 5 pass, +5."""
    app, middleware = build(settings, testing=False)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    barrier = threading.Barrier(50)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}") as http:

            def create(_: int) -> int:
                barrier.wait()
                return http.post("/tasks", headers=USER).status_code

            with ThreadPoolExecutor(50) as pool:
                statuses = sorted(pool.map(create, range(50)))
    finally:
        server.shutdown()
        thread.join()
    assert statuses == [201] * 5 + [402] * 45
    middleware.close()
    assert fake.quota("user_1", "tasks").current == 5
    assert quota_reads(fake) == 1
