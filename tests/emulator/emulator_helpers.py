"""Helpers of the emulator tests: dialect-neutral request bodies and error checks."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["API_KEY", "HEADERS", "Dialect", "error_of"]

API_KEY = "ck_sandbox_test"
HEADERS = {"x-api-key": API_KEY}


class Dialect:
    """Paths and body shapes of one API dialect, so a test body reads the same in both."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = "/api/v1/usage" if name == "v1" else "/api/usage"
        self.feature_key = "featureCode" if name == "v1" else "feature"
        self.event_key = "eventId" if name == "v1" else "idempotencyKey"
        self.events = f"{self.prefix}/events"
        self.quota = f"{self.prefix}/quota"
        self.quota_all = f"{self.prefix}/quota/all"

    def event(
        self,
        feature: str = "api_calls",
        customer: str = "user_123",
        *,
        key: str | None = None,
        properties: dict[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Return a usage event body in this dialect."""
        body: dict[str, Any] = {self.feature_key: feature, "customerId": customer}
        if key is not None:
            body[self.event_key] = key
        if properties is not None:
            body["properties"] = self.properties(properties)
        body.update(extra)
        return body

    def properties(self, properties: dict[str, str]) -> Any:
        """Return ``properties`` in this dialect's wire shape."""
        if self.name == "v1":
            return [{"property": k, "value": v} for k, v in properties.items()]
        return dict(properties)

    def remove(self, client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
        """Remove from quota the way this dialect documents it."""
        if self.name == "v1":
            return client.post(f"{self.quota}/remove", json=body)
        return client.request("DELETE", self.quota, json=body)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """Return the ``error`` object of an error answer, checking its documented keys."""
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param", "details", "doc_url"}
    assert response.headers["x-request-id"].startswith("req_")
    return error
