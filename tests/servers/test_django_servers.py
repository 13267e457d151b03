"""The Django example under real servers: gunicorn (WSGI, 2 workers) and uvicorn (ASGI, no
lifespan). Every successful metered request is billed exactly once, flushed as workers exit."""

from __future__ import annotations

import signal
import time
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
    tally,
)

pytestmark = pytest.mark.server

A, B, OTHER = "user_123", "user_free", "user_other"
SUMMARY_TEXT = "Invoices are due thirty days after issue"  # 7 words: 70 tokens

CALLS = [
    Call("GET", "/health", 200),
    Call("GET", "/health", 200, customer=A),
    Call("GET", "/search?q=policy", 200, customer=A, bills={(A, "api_calls"): 1}),
    Call("GET", "/search/async?q=refund", 200, customer=B, bills={(B, "api_calls"): 1}),
    # A returned 400 inside the metered view: recorded by @metered, not billed.
    Call("GET", "/search?q=", 400, customer=A),
    Call("GET", "/reports/usage", 500, customer=A),
    Call("GET", "/no-such-path", 404, customer=A),
    # No customer: served, never billed to anyone.
    Call("GET", "/search?q=policy", 200),
    Call("GET", "/export.csv", 200, customer=B, bills={(B, "api_calls"): 3}),
    # A FileResponse: the server sends the file (wsgi.file_wrapper under gunicorn).
    Call("GET", "/documents/doc-2.txt", 200, customer=A, bills={(A, "api_calls"): 1}),
    Call("GET", "/documents/nope.txt", 404, customer=A),
    # The API key's customer (set_customer) wins over the header.
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
    Call("POST", "/summarize", 422, customer=B, json={"text": " "}),
    Call("POST", "/summarize", 200, customer=B, json={"text": "a b"}, bills={(B, "ai_tokens"): 20}),
]
CONCURRENT = (
    [
        Call("GET", f"/search?q=p{i}", 200, customer=A, bills={(A, "api_calls"): 1})
        for i in range(12)
    ]
    + [
        Call("GET", f"/search/async?q=r{i}", 200, customer=B, bills={(B, "api_calls"): 1})
        for i in range(8)
    ]
    + [Call("GET", "/export.csv", 200, customer=A, bills={(A, "api_calls"): 3}) for _ in range(4)]
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


def gunicorn_argv(port: int) -> list[str]:
    return python_module(
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "--worker-class",
        "sync",
        "--graceful-timeout",
        "10",
        "--timeout",
        "30",
        "examples.django_app.wsgi",
    )


def uvicorn_argv(target: str, lifespan: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return python_module(
            "uvicorn",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            lifespan,
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "10",
        )

    return argv


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(gunicorn_argv, id="gunicorn-wsgi"),
        # with_lifespan: uvicorn's lifespan shutdown flushes the queue.
        pytest.param(uvicorn_argv("examples.django_app.asgi:application", "on"), id="uvicorn-asgi"),
    ],
)
def test_django_bills_exactly_the_successful_metered_requests(
    commet: FakeCommet, launch: Launch, argv: Callable[[int], Sequence[str]]
) -> None:
    """After SIGTERM, each exiting process has delivered exactly the billable usage it served,
    one delivery still in flight when the signal came included."""
    server = launch(argv)
    gate = hold_one_delivery(commet)
    send_calls(server.url, CALLS)
    send_calls(server.url, CONCURRENT, concurrency=8)
    assert gate.wait_until_held(1, timeout=10), server.output()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
    assert server.terminate(then_release=gate) in (0, -signal.SIGTERM), server.output()
    assert_ledger(commet, CALLS + CONCURRENT, server)


def test_django_asgi_without_lifespan_still_delivers(commet: FakeCommet, launch: Launch) -> None:
    """Django's bare ASGI app (no lifespan at all): the first request starts the sender, and
    every billable request served reaches Commet while the server runs."""
    server = launch(uvicorn_argv("examples.django_app.asgi:django_application", "off"))
    calls = CALLS + CONCURRENT
    send_calls(server.url, calls)
    want = tally((c, f, v) for call in calls for (c, f), v in call.bills.items())[1]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if tally((e.customer_id, e.feature, e.value) for e in commet.events())[1] == want:
            break
        time.sleep(0.05)
    assert_ledger(commet, calls, server)
