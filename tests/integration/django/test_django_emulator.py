"""Exact ledgers against the Commet emulator: Django users, DRF, quotas, both middleware stacks."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from commet_middleware import CommetMiddleware, quota_guard
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet

from . import views
from .conftest import CUSTOMER, django_error_records
from .support import Stack, body

Configure = Callable[..., Any]
FREE = {"X-Customer-ID": "user_free"}


def keys_are_unique(fake: FakeCommet) -> bool:
    keys = [event.idempotency_key for event in fake.events()]
    return len(keys) == len(set(keys))


@pytest.mark.django_db
def test_logged_in_user_is_billed_and_anonymous_is_not(
    client: Client, commet_emulator: FakeCommet, commet_config: Configure
) -> None:
    """By default the customer is the logged-in user's pk; an anonymous request is served
    and billed to nobody (pytest-django's client and database)."""
    commet_config()
    user = User.objects.create_user("ada")
    customer = str(user.pk)
    commet_emulator.add_customer(customer)
    assert client.get("/search/").status_code == 200  # anonymous
    client.force_login(user)
    for _ in range(3):
        assert json.loads(client.get("/search/").content)["customer"] == customer
    client.post("/summarize/", data="a b c d", content_type="text/plain")
    assert commet_emulator.settle()
    assert commet_emulator.usage_total(customer, "api_calls") == 3
    assert commet_emulator.usage_total(customer, "ai_tokens") == 40
    assert {event.customer_id for event in commet_emulator.events()} == {customer}
    assert keys_are_unique(commet_emulator)


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_async_stack_bills_the_logged_in_user(
    async_client: AsyncClient, commet_emulator: FakeCommet, commet_config: Configure
) -> None:
    """Under an async middleware stack the user is read with ``auser()`` (never a sync query
    on the loop): sync and async views bill the logged-in user, anonymous ones nobody."""
    commet_config()
    user = await sync_to_async(User.objects.create_user)("grace")
    customer = str(user.pk)
    commet_emulator.add_customer(customer)
    assert (await AsyncClient().get("/asearch/")).status_code == 200  # anonymous
    await async_client.aforce_login(user)
    for path in ("/asearch/", "/search/", "/asearch/"):
        assert json.loads((await async_client.get(path)).content)["customer"] == customer
    response = await async_client.post("/asummarize/", data="a b", content_type="text/plain")
    assert response.status_code == 200
    assert await commet_emulator.asettle()
    assert commet_emulator.usage_total(customer, "api_calls") == 3
    assert commet_emulator.usage_total(customer, "ai_tokens") == 20
    assert {event.customer_id for event in commet_emulator.events()} == {customer}


@pytest.mark.parametrize("path", ["/numbers/", "/anumbers/"])
def test_quota_refusal_is_a_402_and_no_django_error(
    stack: Stack,
    commet_emulator: FakeCommet,
    commet_config: Configure,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """Past a hard quota, @quota_guard answers 402 ``quota_exceeded`` with RateLimit headers,
    the view does not run, Django logs no server error, and Commet holds exactly the units
    of the requests that were served."""
    commet_config(customer_header="X-Customer-ID")
    caplog.set_level(logging.INFO)
    responses = [stack.post(path, headers=FREE) for _ in range(5)]
    assert [r.status_code for r in responses] == [201, 201, 201, 402, 402]
    refused = responses[-1]
    assert json.loads(refused.content)["error"]["code"] == "quota_exceeded"
    assert refused["Content-Type"] == "application/json"
    assert refused["RateLimit"] == '"whatsapp_numbers";r=0'
    assert len(views.RAN) == 3
    assert django_error_records(caplog.records) == []
    assert commet_emulator.settle()
    assert commet_emulator.quota("user_free", "whatsapp_numbers").current == 3


def test_drf_views_bill_the_user_drf_authenticated(
    commet_emulator: FakeCommet, commet_config: Configure, caplog: pytest.LogCaptureFixture
) -> None:
    """DRF authenticates inside the view: its user is the customer (asked again after the
    session's anonymous user), its Response's data feeds ``value=``, and a @quota_guard
    refusal in a DRF view is a 402 with no Django error."""
    commet_config()
    commet_emulator.add_customer("7")
    commet_emulator.add_customer("8", ["whatsapp_numbers"])
    client = Client(raise_request_exception=False)
    acme = {"Authorization": "Token tok_acme"}
    text = {"text": "one two three"}
    for _ in range(2):
        response = client.post("/drf/summary/", text, content_type="application/json", headers=acme)
        assert response.status_code == 200
    assert client.post("/drf/summary/", text, content_type="application/json").status_code == 200
    caplog.set_level(logging.INFO)
    free = {"Authorization": "Token tok_free"}
    statuses = [client.post("/drf/numbers/", headers=free).status_code for _ in range(4)]
    assert statuses == [201, 201, 201, 402]
    assert django_error_records(caplog.records) == []
    assert commet_emulator.settle()
    assert commet_emulator.usage_total("7", "ai_tokens") == 60
    assert {event.customer_id for event in commet_emulator.events()} == {"7"}
    assert commet_emulator.quota("8", "whatsapp_numbers").current == 3


def test_mixed_traffic_on_both_stacks_gives_an_exact_ledger(
    commet_emulator: FakeCommet, commet_config: Configure
) -> None:
    """Successes bill exactly, failures and unread streams nothing, on sync and async stacks:
    the emulator's ledger equals what was served."""
    commet_config(customer_header="X-Customer-ID")
    commet_emulator.add_feature("downloads")
    for kind in ("sync", "async"):
        stack = Stack(kind, raise_request_exception=False)
        for path in ("/search/", "/asearch/", "/status/201/", "/astatus/204/"):
            assert stack.get(path, headers=CUSTOMER).status_code < 400
        for path in ("/status/404/", "/astatus/500/", "/boom/", "/aboom/"):
            assert stack.get(path, headers=CUSTOMER).status_code >= 400
        for path in ("/summarize/", "/asummarize/"):
            stack.post(path, data="a b c", content_type="text/plain", headers=CUSTOMER)
        for path in ("/stream/", "/astream/"):
            assert body(stack.get(path, headers=CUSTOMER)) == b"0\n1\n2\n"
        assert body(stack.get("/download/", headers=CUSTOMER)) == b"x" * 10_000
        stack.get("/search/")  # no customer: served, billed to nobody
    assert commet_emulator.settle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 2 * (4 + 3 + 3)
    assert commet_emulator.usage_total("user_123", "ai_tokens") == 2 * (30 + 30)
    assert commet_emulator.usage_total("user_123", "downloads") == 2
    assert {event.customer_id for event in commet_emulator.events()} == {"user_123"}
    assert keys_are_unique(commet_emulator)


def test_quota_guard_and_release_keep_the_balance(
    stack: Stack, commet_emulator: FakeCommet, commet_config: Configure
) -> None:
    """@quota_guard adds a unit per created task and @quota_release removes one per delete."""
    commet_config(customer_header="X-Customer-ID")
    for path in ("/tasks/", "/atasks/", "/tasks/"):
        assert stack.post(path, headers=CUSTOMER).status_code == 201
    assert stack.request("DELETE", "/tasks/1/", headers=CUSTOMER).status_code == 200
    assert commet_emulator.settle()
    assert commet_emulator.quota("user_123", "tasks").current == 2
    actions = [event.action for event in commet_emulator.quota_events("user_123", "tasks")]
    # Three adds (folded into fewer when the sender is behind), then one remove.
    assert actions[-1] == "remove"
    assert sum(e.count for e in commet_emulator.quota_events("user_123", "tasks")[:-1]) == 3


def test_refusals_are_the_same_bytes_as_the_asgi_middleware(
    commet_emulator: FakeCommet, commet_config: Configure
) -> None:
    """Django's 402 has the status, body and headers CommetMiddleware sends for it."""
    commet_config(customer_header="X-Customer-ID")
    django_client = Client()
    for _ in range(3):
        django_client.post("/numbers/", headers=FREE)
    from_django = django_client.post("/numbers/", headers=FREE)
    assert commet_emulator.settle()

    @quota_guard("whatsapp_numbers")
    async def add_number(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True}, status_code=201)

    app = Starlette(
        routes=[Route("/numbers/", add_number, methods=["POST"])],
        middleware=[Middleware(CommetMiddleware, customer=from_header("X-Customer-ID"))],
    )

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/numbers/", headers=FREE)

    from_starlette = asyncio.run(post())
    assert from_django.status_code == from_starlette.status_code == 402
    assert from_django.content == from_starlette.content
    names = ("content-type", "content-length", "ratelimit-policy", "ratelimit")
    assert {n: from_django.headers.get(n) for n in names} == {
        n: from_starlette.headers.get(n) for n in names
    }
