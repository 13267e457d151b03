"""The Flask example under a real gunicorn: billed exactly once, flushed when workers exit."""

from __future__ import annotations

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
FLASK_APP = "examples.flask_app:app"


def gunicorn_argv(*options: str, target: str = FLASK_APP) -> Callable[[int], Sequence[str]]:
    """Return a function of the port giving the gunicorn command line with ``options``."""

    def argv(port: int) -> list[str]:
        return python_module(
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "10",
            "--timeout",
            "30",
            *options,
            target,
        )

    return argv


CALLS = [
    Call("GET", "/health", 200),
    Call("GET", "/health", 200, customer=A),
    Call("GET", "/search?q=policy", 200, customer=A, bills={(A, "api_calls"): 1}),
    Call("GET", "/search?q=refund", 200, customer=B, bills={(B, "api_calls"): 1}),
    # abort(400) inside the metered view: nothing recorded, nothing billed.
    Call("GET", "/search?q=", 400, customer=A),
    Call("GET", "/reports/usage", 500, customer=A),
    Call("GET", "/no-such-path", 404, customer=A),
    # No customer: served, never billed to anyone.
    Call("GET", "/search?q=policy", 200),
    Call("GET", "/export.csv", 200, customer=B, bills={(B, "api_calls"): 3}),
    # before_request's set_customer() wins over the header.
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
        Call("GET", f"/search?q=r{i}", 200, customer=B, bills={(B, "api_calls"): 1})
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


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(("--workers", "2", "--worker-class", "sync"), id="sync"),
        pytest.param(
            ("--workers", "1", "--worker-class", "gthread", "--threads", "4"), id="gthread"
        ),
        pytest.param(("--workers", "2", "--preload"), id="preload"),
    ],
)
def test_gunicorn_bills_exactly_the_successful_metered_requests(
    commet: FakeCommet, launch: Launch, options: tuple[str, ...]
) -> None:
    """After SIGTERM, each exiting worker has delivered exactly the billable usage it served."""
    server = launch(gunicorn_argv(*options))
    gate = hold_one_delivery(commet)
    send_calls(server.url, CALLS)
    send_calls(server.url, CONCURRENT, concurrency=8)
    assert gate.wait_until_held(1, timeout=10), server.output()
    assert server.terminate(then_release=gate) == 0, server.output()
    assert_ledger(commet, CALLS + CONCURRENT, server)


def test_gunicorn_preload_workers_bill_when_forked_during_the_senders_imports(
    commet: FakeCommet, launch: Launch
) -> None:
    """Workers forked while the master's sender is importing httpcore still deliver usage."""
    server = launch(
        gunicorn_argv(
            "--workers",
            "2",
            "--preload",
            "--graceful-timeout",
            "3",
            target="tests.servers._fork_mid_import_app:app",
        )
    )
    send_calls(server.url, CALLS)
    assert server.terminate() == 0, server.output()
    assert_ledger(commet, CALLS, server)
