"""The ASGI examples under a real uvicorn: every successful metered request billed exactly once."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence

import pytest

from commet_middleware.testing import FakeCommet

from ._harness import (
    Call,
    Launch,
    assert_ledger,
    hold_one_delivery,
    python_module,
    send_calls,
)

pytestmark = pytest.mark.server

A, B, OTHER = "user_123", "user_free", "user_other"
SUMMARY_TEXT = "Invoices are due thirty days after issue"  # 7 words: 70 tokens


def uvicorn_argv(target: str) -> Callable[[int], Sequence[str]]:
    """Return a function of the port giving the uvicorn command line for ``target``."""

    def argv(port: int) -> list[str]:
        return python_module(
            "uvicorn",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "on",
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "10",
        )

    return argv


FASTAPI_CALLS = [
    Call("GET", "/health", 200),
    Call("GET", "/health", 200, customer=A),
    Call("GET", "/search?q=policy", 200, customer=A, bills={(A, "api_calls"): 1}),
    Call("GET", "/search/titles?q=refund", 200, customer=B, bills={(B, "api_calls"): 1}),
    Call("GET", "/search", 422, customer=A),
    Call("GET", "/documents/doc-1", 200, customer=B, bills={(B, "api_calls"): 1}),
    Call("GET", "/documents/missing", 404, customer=A),
    Call("GET", "/reports/usage", 500, customer=A),
    Call("GET", "/no-such-path", 404, customer=A),
    # No customer: served, never billed to anyone.
    Call("GET", "/search?q=policy", 200),
    # The auth dependency's set_customer() wins over the header.
    Call(
        "POST",
        "/summarize",
        200,
        customer=OTHER,
        headers={"Authorization": "Bearer sk_demo_acme"},
        json={"text": SUMMARY_TEXT},
        bills={(A, "ai_tokens"): 70},
    ),
    Call(
        "POST",
        "/summarize",
        401,
        customer=A,
        headers={"Authorization": "Bearer sk_wrong"},
        json={"text": SUMMARY_TEXT},
    ),
    Call(
        "POST",
        "/summarize",
        422,
        headers={"Authorization": "Bearer sk_demo_free"},
        json={"text": ""},
    ),
]
FASTAPI_CONCURRENT = (
    [
        Call("GET", f"/search?q=p{i}", 200, customer=A, bills={(A, "api_calls"): 1})
        for i in range(12)
    ]
    + [
        Call("GET", f"/search/titles?q=t{i}", 200, customer=B, bills={(B, "api_calls"): 1})
        for i in range(8)
    ]
    + [
        Call(
            "POST",
            "/summarize",
            200,
            headers={"Authorization": "Bearer sk_demo_free"},
            json={"text": "one two three"},
            bills={(B, "ai_tokens"): 30},
        )
        for _ in range(4)
    ]
    + [Call("GET", "/reports/usage", 500, customer=B) for _ in range(3)]
)

STARLETTE_CALLS = [
    Call("GET", "/health", 200),
    Call("GET", "/search?q=policy", 200, customer=A, bills={(A, "api_calls"): 1}),
    Call("GET", "/search?q=refund", 200, customer=B, bills={(B, "api_calls"): 1}),
    # Returned (not raised) 400: recorded by @metered, not billed by the middleware.
    Call("GET", "/search?q=", 400, customer=A),
    Call(
        "POST",
        "/summarize",
        200,
        customer=A,
        json={"text": SUMMARY_TEXT},
        bills={(A, "ai_tokens"): 70},
    ),
    Call("POST", "/summarize", 422, customer=B, json={"words": 3}),
    Call("GET", "/export.csv", 200, customer=B, bills={(B, "api_calls"): 3}),
    Call("GET", "/reports/usage", 500, customer=A),
    Call("GET", "/search?q=policy", 200),
]
STARLETTE_CONCURRENT = (
    [
        Call("GET", f"/search?q=s{i}", 200, customer=A, bills={(A, "api_calls"): 1})
        for i in range(10)
    ]
    + [Call("GET", "/export.csv", 200, customer=A, bills={(A, "api_calls"): 3}) for _ in range(4)]
    + [
        Call(
            "POST",
            "/summarize",
            200,
            customer=B,
            json={"text": "one two"},
            bills={(B, "ai_tokens"): 20},
        )
        for _ in range(5)
    ]
    + [Call("GET", "/reports/usage", 500, customer=B) for _ in range(3)]
)


@pytest.mark.parametrize(
    ("target", "calls", "concurrent"),
    [
        pytest.param("examples.fastapi_app:app", FASTAPI_CALLS, FASTAPI_CONCURRENT, id="fastapi"),
        pytest.param(
            "examples.starlette_app:app", STARLETTE_CALLS, STARLETTE_CONCURRENT, id="starlette"
        ),
    ],
)
def test_uvicorn_bills_exactly_the_successful_metered_requests(
    commet: FakeCommet, launch: Launch, target: str, calls: list[Call], concurrent: list[Call]
) -> None:
    """After SIGTERM, uvicorn's lifespan shutdown has delivered exactly the billable usage."""
    server = launch(uvicorn_argv(target))
    gate = hold_one_delivery(commet)
    send_calls(server.url, calls)
    send_calls(server.url, concurrent, concurrency=8)
    assert gate.wait_until_held(1, timeout=10), server.output()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
    assert server.terminate(then_release=gate) in (0, -signal.SIGTERM), server.output()
    assert "Application shutdown complete" in server.output()
    assert_ledger(commet, calls + concurrent, server)
