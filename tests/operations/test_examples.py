"""The background-job and serverless examples bill through Commet without their services."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from commet_middleware.testing import FakeCommet


def test_celery_job_is_billed_to_its_customer(commet_emulator: FakeCommet) -> None:
    """A Celery task (run in process: no broker) bills its tokens; the shutdown hook flushes."""
    from examples import celery_worker

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
    """The event loop Mangum runs invocations on, ended at the end as a function's process is."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loop = asyncio.get_event_loop_policy().get_event_loop()
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()
    asyncio.set_event_loop(None)


@pytest.mark.usefixtures("lambda_loop")
def test_mangum_handler_delivers_before_it_returns(commet_emulator: FakeCommet) -> None:
    """Each invocation's usage is in Commet when the handler returns: no settle needed."""
    from examples import mangum_handler

    event = _api_gateway_event("/search", "q=a", {"x-customer-id": "user_123"})
    for calls in (1, 2):
        response = mangum_handler.handler(event, None)
        assert response["statusCode"] == 200
        assert commet_emulator.usage_total("user_123", "api_calls") == calls
