"""Many threads and tasks at once: no lost or doubled writes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest
from emulator_helpers import HEADERS

from commet_middleware.testing import FakeCommet

EVENTS = "/api/v1/usage/events"


def test_sixteen_threads_lose_no_usage_event(fake: FakeCommet) -> None:
    """16 threads x 200 events on the transport give exact totals and unique event ids."""

    def send(worker: int) -> list[int]:
        with httpx.Client(transport=fake.transport, base_url="https://c", headers=HEADERS) as c:
            return [
                c.post(
                    EVENTS,
                    json={
                        "featureCode": "api_calls",
                        "customerId": "user_123" if i % 2 else "user_free",
                        "value": 1,
                        "eventId": f"w{worker}-{i}",
                    },
                ).status_code
                for i in range(200)
            ]

    with ThreadPoolExecutor(16) as pool:
        statuses = [s for batch in pool.map(send, range(16)) for s in batch]
    assert statuses == [201] * 3200
    assert fake.usage_total("user_123", "api_calls") == 1600
    assert fake.usage_total("user_free", "api_calls") == 1600
    assert len({e.id for e in fake.events()}) == 3200
    assert len(fake.requests) == 3200


def test_racing_duplicates_record_one_event(fake: FakeCommet) -> None:
    """The same eventId sent by 16 threads at once is recorded exactly once."""

    def send(_: int) -> int:
        with httpx.Client(transport=fake.transport, base_url="https://c", headers=HEADERS) as c:
            body = {"featureCode": "api_calls", "customerId": "user_123", "eventId": "same"}
            return c.post(EVENTS, json=body).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = sorted(pool.map(send, range(64)))
    assert statuses == [201] + [409] * 63
    assert len(fake.events()) == 1


def test_concurrent_quota_changes_keep_an_exact_balance(fake: FakeCommet) -> None:
    """Adds and removes from 8 threads leave the balance their sum says."""

    def churn(_: int) -> None:
        with httpx.Client(transport=fake.transport, base_url="https://c", headers=HEADERS) as c:
            body = {"featureCode": "automations", "customerId": "user_123", "count": 3}
            for _ in range(100):
                c.post("/api/v1/usage/quota", json=body)
                c.post("/api/v1/usage/quota/remove", json={**body, "count": 1})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(churn, range(8)))
    assert fake.quota("user_123", "automations").current == 8 * 100 * 2
    assert len(fake.quota_events()) == 1600


@pytest.mark.server
def test_threads_against_the_real_server_lose_nothing(fake: FakeCommet) -> None:
    """8 threads x 50 events over real HTTP give exact totals."""
    with fake.serve() as url:

        def send(worker: int) -> None:
            with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as c:
                for i in range(50):
                    body = {
                        "featureCode": "api_calls",
                        "customerId": "user_123",
                        "eventId": f"{worker}-{i}",
                    }
                    assert c.post(EVENTS, json=body).status_code == 201

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, range(8)))
    assert fake.usage_total("user_123", "api_calls") == 400


@pytest.mark.anyio
async def test_many_tasks_on_the_async_transport(fake: FakeCommet) -> None:
    """500 concurrent asyncio tasks on the async transport are all recorded once."""
    async with httpx.AsyncClient(
        transport=fake.transport, base_url="https://c", headers=HEADERS
    ) as c:

        async def send(i: int) -> None:
            body = {
                "featureCode": "api_calls",
                "customerId": "user_123",
                "value": 2,
                "eventId": str(i),
            }
            assert (await c.post(EVENTS, json=body)).status_code == 201

        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(send, i)
    assert fake.usage_total("user_123", "api_calls") == 1000


@pytest.mark.anyio
async def test_async_and_threads_share_one_ledger(fake: FakeCommet) -> None:
    """Sync clients in worker threads and async tasks write to the same totals."""

    def sync_batch() -> None:
        with httpx.Client(transport=fake.transport, base_url="https://c", headers=HEADERS) as c:
            for _ in range(100):
                c.post(EVENTS, json={"featureCode": "api_calls", "customerId": "user_123"})

    async with httpx.AsyncClient(
        transport=fake.transport, base_url="https://c", headers=HEADERS
    ) as c:

        async def post_one() -> None:
            body = {"featureCode": "api_calls", "customerId": "user_123"}
            assert (await c.post(EVENTS, json=body)).status_code == 201

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(anyio.to_thread.run_sync, sync_batch)
            for _ in range(100):
                tg.start_soon(post_one)
    assert fake.usage_total("user_123", "api_calls") == 500
