"""The emulator through httpx.AsyncClient: in-process transport and real server."""

from __future__ import annotations

import anyio
import httpx
import pytest
from emulator_helpers import error_of

from commet_middleware.testing import FakeCommet

pytestmark = pytest.mark.anyio

EVENTS = "/api/v1/usage/events"
BODY = {"featureCode": "api_calls", "customerId": "user_123", "eventId": "a1"}


async def test_async_event_and_duplicate(aclient: httpx.AsyncClient, fake: FakeCommet) -> None:
    """An async client records an event and gets 409 duplicate for its replay."""
    assert (await aclient.post(EVENTS, json=BODY)).status_code == 201
    duplicate = await aclient.post(EVENTS, json=BODY)
    assert duplicate.status_code == 409
    assert error_of(duplicate)["code"] == "duplicate"
    assert len(fake.events()) == 1


async def test_async_legacy_quota_round_trip(aclient: httpx.AsyncClient, fake: FakeCommet) -> None:
    """Legacy add, remove and read work from an async client."""
    body = {"customerId": "user_123", "featureCode": "tasks", "count": 3}
    await aclient.post("/api/usage/quota", json=body)
    await aclient.request("DELETE", "/api/usage/quota", json={**body, "count": 1})
    read = await aclient.get(
        "/api/usage/quota", params={"customerId": "user_123", "featureCode": "tasks"}
    )
    assert read.json()["current"] == 2
    assert read.headers["deprecation"] == "true"


async def test_async_drop_is_a_transport_error(
    aclient: httpx.AsyncClient, fake: FakeCommet
) -> None:
    """drop_next raises a transport error in an async client, with nothing written."""
    fake.faults.drop_next(1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await aclient.post(EVENTS, json=BODY)
    assert fake.events() == []


async def test_async_in_progress_does_not_block_the_loop(
    aclient: httpx.AsyncClient, fake: FakeCommet
) -> None:
    """A held request parks without blocking the loop; its replay is idempotency_in_progress."""
    hold = fake.faults.hold_next(1)
    headers = {"idempotency-key": "async-1"}
    results: list[httpx.Response] = []

    async def first() -> None:
        results.append(await aclient.post(EVENTS, json=BODY, headers=headers))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        assert await anyio.to_thread.run_sync(hold.wait_until_held)
        second = await aclient.post(EVENTS, json=BODY, headers=headers)
        assert error_of(second)["code"] == "idempotency_in_progress"
        hold.release()
    assert results[0].status_code == 201
    assert len(fake.events()) == 1


async def test_async_latency(aclient: httpx.AsyncClient, fake: FakeCommet) -> None:
    """latency applies on the async path too, and is counted."""
    fake.faults.latency(0.02)
    assert (await aclient.post(EVENTS, json=BODY)).status_code == 201
    assert fake.faults.injected == {"latency": 1}
