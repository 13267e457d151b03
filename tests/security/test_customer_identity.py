"""Threats: an API client names the paying customer itself, or reuses another customer's key."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from unit.support import ListSink

from commet_middleware import CommetMiddleware, metered
from commet_middleware.testing import FakeCommet
from security.asgi import call, ok, status

# Headers a client might hope the middleware trusts for identity.
SPOOFED = [
    (b"x-customer-id", b"victim"),
    (b"x-commet-customer", b"victim"),
    (b"x-customer", b"victim"),
    (b"x-forwarded-user", b"victim"),
    (b"x-user-id", b"victim"),
    (b"authorization", b"Bearer victim"),
    (b"cookie", b"customer=victim"),
]


def test_no_header_names_the_customer_without_a_resolver(sink: ListSink) -> None:
    """With no customer resolver configured, identity headers a client sends bill nobody."""
    app = CommetMiddleware(ok, meter="api_calls", sink=sink)
    assert status(call(app, SPOOFED)) == 200
    assert sink.events == []


def test_reject_mode_refuses_a_spoofed_identity(sink: ListSink) -> None:
    """In reject mode, a request that only claims an identity in headers gets 401, bills nobody."""
    app = CommetMiddleware(ok, meter="api_calls", on_missing_customer="reject", sink=sink)
    assert status(call(app, SPOOFED)) == 401
    assert sink.events == []


def test_another_customers_idempotency_key_cannot_cancel_their_usage(
    fake_commet: FakeCommet,
) -> None:
    """Customer B replaying customer A's Idempotency-Key is billed itself, and A keeps its usage."""

    @metered("api_calls")
    async def create(request: Request) -> Response:
        return PlainTextResponse("created", status_code=201)

    app = Starlette(
        routes=[Route("/items", create, methods=["POST"])],
        middleware=[
            Middleware(
                CommetMiddleware,
                customer=lambda scope: dict(scope["headers"]).get(b"x-customer-id"),
                idempotency_header="Idempotency-Key",
                api_key="ck_test_key",
                transport=fake_commet.transport,
            )
        ],
    )
    key = {"Idempotency-Key": "order-42"}
    with TestClient(app) as client:
        statuses = [
            client.post("/items", headers={**key, "X-Customer-ID": customer}).status_code
            for customer in ("user_123", "user_free", "user_123")  # A, B, then A's repeat
        ]
    # B's request is its own (the key binds the customer); A's repeat of a request that already
    # succeeded is refused, not run again for free (idempotency_key_already_used).
    assert statuses == [201, 201, 409]
    assert fake_commet.usage_total("user_123", "api_calls") == 1  # A's repeat was not billed
    assert fake_commet.usage_total("user_free", "api_calls") == 1
    answers = {r.status for r in fake_commet.requests}
    assert answers <= {200, 201, 409}, answers


def test_emulator_customers_are_separate_under_one_idempotency_key() -> None:
    """At the emulator (as at Commet) one event id under two customers records two events."""
    fake = FakeCommet.from_catalogue()
    headers = {"x-api-key": "ck_test"}
    with httpx.Client(transport=fake.transport, base_url="https://commet.co") as client:
        for customer in ("user_123", "user_free"):
            body = {"customerId": customer, "featureCode": "api_calls", "eventId": "e1"}
            assert client.post("/api/v1/usage/events", json=body, headers=headers).is_success
    assert [e.customer_id for e in fake.events()] == ["user_123", "user_free"]
