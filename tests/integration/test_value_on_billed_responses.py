"""``@metered(value=...)`` functions of the result run only for responses that are billed.

A view that returns its own error response (a 422 JSONResponse, Flask's ``(body, 422)``) is not
billed, so a value function written for the success shape is never fed the error's: no ERROR
line, no invalid value counted. A billed response still runs it, and a failure there is still
loud and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from commet_middleware import CommetMiddleware, CommetWSGIMiddleware, metered
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet

HEADERS = {"X-Customer-ID": "user_123"}
NOT_BILLED = "could not compute the usage"


def _starlette(fake: FakeCommet, bill_status: Callable[[int], bool] | None = None) -> Starlette:
    @metered("api_calls", value=lambda response: int(response.headers["x-tokens"]))
    async def generate(request: Request) -> Response:
        if request.query_params.get("prompt"):
            return JSONResponse({"text": "..."}, headers={"x-tokens": "7"})
        return JSONResponse({"error": "prompt is required"}, status_code=422)

    return Starlette(
        routes=[Route("/generate", generate)],
        middleware=[
            Middleware(
                CommetMiddleware,
                customer=from_header("X-Customer-ID"),
                bill_status=bill_status,
                api_key="ck_test_value",
                transport=fake.transport,
            )
        ],
    )


def _commet_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("commet_middleware") and r.levelno >= logging.ERROR
    ]


def test_starlette_error_response_runs_no_value_function(
    fake_commet: FakeCommet, caplog: pytest.LogCaptureFixture
) -> None:
    """A 422 the endpoint returns is not billed and its value function is not called (it would
    raise KeyError on the missing header); the 200 next to it bills its 7 tokens."""
    with TestClient(_starlette(fake_commet)) as client:
        assert client.get("/generate", headers=HEADERS).status_code == 422
        assert client.get("/generate?prompt=hi", headers=HEADERS).status_code == 200
    assert fake_commet.settle()
    assert fake_commet.usage_total("user_123", "api_calls") == 7
    assert _commet_errors(caplog) == []


@pytest.mark.usefixtures("allow_commet_errors")
def test_a_billed_response_still_runs_it_and_a_failure_is_loud(
    fake_commet: FakeCommet, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``bill_status`` billing 4xx, the 422 is billed: its value function runs, fails on
    the missing header, and that is one ERROR saying NOT billed; the 200 still bills 7."""
    app = _starlette(fake_commet, bill_status=lambda status: status < 500)
    with caplog.at_level(logging.ERROR, logger="commet_middleware"), TestClient(app) as client:
        assert client.get("/generate", headers=HEADERS).status_code == 422
        assert client.get("/generate?prompt=hi", headers=HEADERS).status_code == 200
    assert fake_commet.settle()
    assert fake_commet.usage_total("user_123", "api_calls") == 7
    errors = _commet_errors(caplog)
    assert len(errors) == 1
    assert NOT_BILLED in errors[0]


def test_flask_error_tuple_runs_no_value_function(
    fake_commet: FakeCommet, caplog: pytest.LogCaptureFixture
) -> None:
    """A Flask view returning ``(body, 422)`` is not billed and ``value=lambda r: r["tokens"]``
    never sees the tuple; the success next to it bills 5."""
    app = Flask(__name__)

    @app.post("/generate")
    @metered("api_calls", value=lambda result: result["tokens"])
    def generate() -> Any:
        if not (request.get_json(silent=True) or {}).get("prompt"):
            return {"error": "prompt is required"}, 422
        return {"text": "...", "tokens": 5}

    app.wsgi_app = CommetWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        customer=from_header("X-Customer-ID"),
        api_key="ck_test_value",
        transport=fake_commet.transport,
    )
    client = app.test_client()
    assert client.post("/generate", json={}, headers=HEADERS).status_code == 422
    assert client.post("/generate", json={"prompt": "hi"}, headers=HEADERS).status_code == 200
    assert fake_commet.settle()
    assert fake_commet.usage_total("user_123", "api_calls") == 5
    assert _commet_errors(caplog) == []
