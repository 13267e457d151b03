"""The background-job and serverless examples bill through Commet without their services."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from commet_middleware.testing import FakeCommet
from examples import celery_worker, mangum_handler

# Celery's import is heavy: it happens at collection, not inside a test.


def test_celery_job_is_billed_to_its_customer(commet_emulator: FakeCommet) -> None:
    """A Celery task (run in process: no broker) bills its tokens; the shutdown hook flushes."""
    job = celery_worker.summarize.apply(args=("user_123", "Invoices are due in thirty days"))
    result = job.get()
    celery_worker.flush_usage()  # what worker_process_shutdown runs
    assert commet_emulator.usage_total("user_123", "ai_tokens") == result["tokens"]


def _api_gateway_event(path: str, query: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "http": {
                "method": "GET",
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "test",
            },
            "stage": "$default",
        },
        "isBase64Encoded": False,
    }


@pytest.fixture
def lambda_loop() -> Iterator[None]:
    """A fresh event loop for Mangum's invocations, ended at the end as a function's process is.

    Mangum runs on the thread's current loop; one left set by an earlier test would carry that
    test's leftovers into this one.
    """
    policy = asyncio.get_event_loop_policy()
    # Kept, and set again after: dropping an earlier test's loop here would collect its
    # leftovers (and their warnings) inside this test.
    previous = getattr(getattr(policy, "_local", None), "_loop", None)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()
    asyncio.set_event_loop(previous)


@pytest.mark.usefixtures("lambda_loop")
def test_mangum_handler_delivers_before_it_returns(commet_emulator: FakeCommet) -> None:
    """Each invocation's usage is in Commet when the handler returns: no settle needed."""
    event = _api_gateway_event("/search", "q=a", {"x-customer-id": "user_123"})
    for calls in (1, 2):
        response = mangum_handler.handler(event, None)
        assert response["statusCode"] == 200
        assert commet_emulator.usage_total("user_123", "api_calls") == calls
