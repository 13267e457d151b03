"""A scripted fake Commet behind httpx.MockTransport, for the client tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from commet_middleware import CommetSettings

SECRET = "ck_sandbox_3f9a1c0d5e7b2a4c6e8f"

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def answer(
    status: int = 200,
    payload: Any = None,
    *,
    headers: dict[str, str] | None = None,
    request_id: str = "req_test_1",
) -> httpx.Response:
    """Return a response as Commet would send it: JSON body and an x-request-id."""
    content = b"" if payload is None else json.dumps(payload).encode()
    return httpx.Response(
        status,
        content=content,
        headers={"x-request-id": request_id, "content-type": "application/json", **(headers or {})},
    )


def error(
    status: int, code: str, type_: str = "validation_error", **headers: str
) -> httpx.Response:
    """Return a Commet error answer with the {"error": {...}} body."""
    body = {"error": {"type": type_, "code": code, "message": f"{code} happened"}}
    return answer(status, body, headers={k.replace("_", "-"): v for k, v in headers.items()})


USAGE_EVENT = {
    "id": "evt_1",
    "featureCode": "api_calls",
    "value": 1,
    "customerId": "cus_1",
    "eventId": "key_1",
    "ts": "2026-01-15T10:00:00.000Z",
    "createdAt": "2026-01-15T10:00:00.100Z",
    "properties": [{"property": "path", "value": "/x"}],
    "object": "usage_event",
    "livemode": False,
}
QUOTA_EVENT = {
    "id": "uqe_1",
    "customerId": "cus_1",
    "featureCode": "tasks",
    "previousBalance": 3,
    "newBalance": 8,
    "ts": "2026-01-15T10:00:00.000Z",
    "createdAt": "2026-01-15T10:00:00.100Z",
    "object": "usage_quota_event",
    "livemode": False,
}
USAGE_QUOTA = {
    "featureCode": "tasks",
    "current": 30,
    "included": 50,
    "remaining": 20,
    "billedQuantity": 0,
    "unlimited": False,
    "overageEnabled": True,
    "asOf": "2026-01-15T10:00:00.000Z",
    "object": "usage_quota",
    "livemode": False,
}


# Every row of the error table in COMMET_API.md: (status, code, extra headers, retryable).
ERROR_ROWS = [
    (400, "validation_error", {}, False),
    (422, "validation_error", {}, False),
    (400, "invalid_json", {}, False),
    (401, "unauthorized", {}, False),
    (403, "forbidden", {}, False),
    (404, "customer_not_found", {}, False),
    (404, "feature_not_found", {}, False),
    (404, "no_active_subscription", {}, False),
    (400, "insufficient_balance", {}, False),
    (400, "feature_not_in_plan", {}, False),
    (400, "included_limit_reached", {}, False),
    (409, "idempotency_in_progress", {}, True),
    (409, "idempotency_key_mismatch", {}, False),
    (429, "rate_limited", {"Retry-After": "2"}, True),
    (429, "rate_limited", {}, False),
    (408, "internal_error", {}, True),
    (500, "internal_error", {}, True),
    (502, "internal_error", {}, True),
    (503, "internal_error", {}, True),
    (504, "internal_error", {}, True),
]


class Script:
    """A MockTransport handler that records every request and plays replies in order.

    The last reply repeats once the script runs out. An exception reply is raised as the
    transport failure it is.
    """

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies) or [answer(200, USAGE_EVENT)]
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, httpx.Response):
            return reply
        return reply(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    @property
    def bodies(self) -> list[bytes]:
        return [request.content for request in self.requests]


class Sleeps:
    """A sleep stand-in that records the waits instead of waiting (sync and async)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def make_settings(script: Script, **changes: Any) -> CommetSettings:
    """Return settings that talk to ``script`` with the test key."""
    return CommetSettings(api_key=SECRET, transport=script.transport).replace(**changes)
