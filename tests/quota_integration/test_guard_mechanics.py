"""Decorator mechanics, raw ASGI/WSGI refusal paths, the gate's listener and dead-letter hook."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from commet_middleware import (
    CommetMiddleware,
    CommetSettings,
    CommetWSGIMiddleware,
    QuotaChange,
    QuotaChangeResult,
    quota_guard,
    quota_release,
)
from commet_middleware.customers import from_environ, from_header
from commet_middleware.quota import QuotaGate
from commet_middleware.testing import FakeCommet

from .conftest import USER

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


class ListSink:
    """Keeps the enqueued operations."""

    def __init__(self) -> None:
        self.operations: list[Any] = []

    def enqueue(self, operation: Any, /) -> None:
        self.operations.append(operation)


def test_sync_stays_sync_and_async_stays_async() -> None:
    """Decorated functions keep their kind and their signature."""

    def create(name: str, n: int = 1) -> str:
        return name

    async def acreate(name: str) -> str:
        return name

    guarded = quota_guard("tasks")(create)
    released = quota_release("tasks")(acreate)
    assert not inspect.iscoroutinefunction(guarded)
    assert inspect.iscoroutinefunction(released)
    assert inspect.signature(guarded) == inspect.signature(create)
    assert inspect.signature(released) == inspect.signature(acreate)


def test_openapi_is_unchanged() -> None:
    """FastAPI documents a guarded endpoint's parameters exactly as an unguarded one's."""

    def schema(decorate: bool) -> Any:
        app = FastAPI()

        def create(title: str, n: int = 1) -> dict[str, str]:
            return {"title": title}

        app.post("/tasks")(quota_guard("tasks")(create) if decorate else create)
        return app.openapi()["paths"]

    assert schema(True) == schema(False)


@pytest.mark.parametrize(
    "make",
    [
        lambda: quota_guard("Bad-Code"),
        lambda: quota_guard("tasks", -1),
        lambda: quota_guard("tasks", 1.5),  # type: ignore[arg-type]
        lambda: quota_guard("tasks", True),
        lambda: quota_guard("tasks", on_unavailable="maybe"),  # type: ignore[arg-type]
        lambda: quota_guard("tasks", refusal_status=200),
        lambda: quota_release("tasks", -2),
    ],
)
def test_bad_options_fail_at_decoration(make: Any) -> None:
    """Invalid feature codes, constant counts and options raise ValueError at once."""
    with pytest.raises(ValueError, match=r"feature|count|on_unavailable|refusal_status"):
        make()


def test_outside_the_middleware_is_an_error() -> None:
    """A guarded function called with no middleware raises RuntimeError, never runs unguarded."""
    ran = []
    guarded = quota_guard("tasks")(lambda: ran.append(1))
    with pytest.raises(RuntimeError, match="CommetMiddleware"):
        guarded()
    assert ran == []


def _settings(fake: FakeCommet) -> CommetSettings:
    return CommetSettings(api_key="ck_test_x", base_url="http://c", transport=fake.transport)


@quota_guard("tasks")
async def _guarded() -> None:
    """A guarded unit of work."""


@pytest.mark.parametrize("error_page", [False, True], ids=["propagates", "500-then-raises"])
@pytest.mark.anyio
async def test_raw_asgi_refusal(fake: FakeCommet, error_page: bool) -> None:
    """The refusal is sent whether the app lets the exception out or answers 500 first."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _guarded()
        except Exception:
            if not error_page:
                raise
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"oops"})
            raise
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sink = ListSink()
    mw = CommetMiddleware(
        app, customer=from_header("X-Customer-ID"), sink=sink, settings=_settings(fake)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(mw), base_url="http://a") as http:
        refused = await http.post("/", headers={"X-Customer-ID": "user_2"})
        assert (await http.post("/", headers=USER)).status_code == 201
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "feature_not_in_plan"
    assert [(op.action, op.count) for op in sink.operations] == [("add", 1)]
    await mw.gate.aclose()


@quota_guard("tasks")
def _sync_guarded() -> None:
    """A guarded unit of work."""


@pytest.mark.parametrize("error_page", [False, True], ids=["propagates", "500-first"])
def test_raw_wsgi_refusal(fake: FakeCommet, error_page: bool) -> None:
    """The refusal is sent whether the WSGI app lets the exception out or answers 500."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            _sync_guarded()
        except Exception:
            if not error_page:
                raise
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"oops"]
        start_response("201 Created", [])
        return [b""]

    mw = CommetWSGIMiddleware(
        app, customer=from_environ("HTTP_X_CUSTOMER_ID"), sink=ListSink(), settings=_settings(fake)
    )
    with httpx.Client(transport=httpx.WSGITransport(mw), base_url="http://a") as http:
        refused = http.post("/", headers={"X-Customer-ID": "lapsed"})
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "no_active_subscription"
    mw.close()


def _change(action: str = "add") -> QuotaChange:
    return QuotaChange.create("user_1", "tasks", action, 1, idempotency_key=f"k_{action}")  # type: ignore[arg-type]


def test_confirmed_balance_applies_only_without_overlap(fake: FakeCommet) -> None:
    """A lone confirmed change sets the cached balance; overlapping ones keep our accounting."""
    gate = QuotaGate(_settings(fake))
    decisions = [gate.check("user_1", "tasks") for _ in range(2)]
    for i, decision in enumerate(decisions):
        assert decision.reservation is not None
        gate.commit(decision.reservation, idempotency_key=f"k{i}")
    # Commet confirms the first add (balance 1) while the second is still queued: ignored.
    gate.confirm(_change(), QuotaChangeResult(new_balance=1))
    cached = gate.cache.last_known("user_1", "tasks")
    assert cached is not None
    assert cached.current == 2
    gate.confirm(_change(), QuotaChangeResult(new_balance=2))
    assert gate.stats.snapshot()["confirmed"] == 0
    # A lone change later: Commet's word is taken.
    decision = gate.check("user_1", "tasks")
    assert decision.reservation is not None
    gate.commit(decision.reservation, idempotency_key="k3")
    gate.confirm(_change(), QuotaChangeResult(new_balance=7))
    cached = gate.cache.last_known("user_1", "tasks")
    assert cached is not None
    assert (cached.current, cached.remaining) == (7, 0)
    gate.close()


def test_dead_lettered_change_drops_the_cached_allowance(fake: FakeCommet) -> None:
    """A change Commet will never apply makes the next check ask Commet again."""
    gate = QuotaGate(_settings(fake))
    gate.check("user_1", "tasks")
    gate.record_removal("user_1", "tasks", 1, idempotency_key="k_remove")
    gate.forget(_change("remove"), ValueError("insufficient_balance"))
    assert gate.cache.last_known("user_1", "tasks") is None
    assert gate.stats.snapshot()["abandoned"] == 1
    gate.close()
