"""End to end on Starlette: zero-code metering delivered to the Commet emulator."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from commet_middleware import CommetMiddleware
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet


def test_zero_code_events_reach_the_emulator(fake_commet: FakeCommet) -> None:
    """Each successful request becomes one api_calls event in FakeCommet; errors bill nothing."""

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def teapot(request: Request) -> Response:
        return PlainTextResponse("no", status_code=418)

    app = Starlette(
        routes=[Route("/ok", ok), Route("/teapot", teapot)],
        middleware=[
            Middleware(
                CommetMiddleware,
                customer=from_header("X-Customer-ID"),
                meter="api_calls",
                api_key="ck_test_key",
                transport=fake_commet.transport,
            )
        ],
    )
    with TestClient(app) as client:
        for _ in range(2):
            client.get("/ok", headers={"X-Customer-ID": "user_123"})
        client.get("/teapot", headers={"X-Customer-ID": "user_123"})
        client.get("/health", headers={"X-Customer-ID": "user_123"})
    assert [(e.customer_id, e.feature) for e in fake_commet.events()] == [
        ("user_123", "api_calls")
    ] * 2
