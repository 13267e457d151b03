"""Commet down or slow: fail open from the last known allowance or blind, or fail closed."""

from __future__ import annotations

import logging

import httpx
import pytest

from commet_middleware._client import AsyncCommetClient, CommetClient
from commet_middleware._results import QuotaAllowance
from commet_middleware._settings import CommetSettings
from commet_middleware.quota import QuotaGate, ratelimit_headers, refusal_body, status_for
from commet_middleware.testing import FakeCommet

from .conftest import API_KEY, FakeClock, quota_reads


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio."""
    return "asyncio"


def test_open_without_stale_allows_degraded(gate: QuotaGate, fake: FakeCommet) -> None:
    """Commet down and nothing known: allowed, degraded, and the quota add is still produced."""
    fake.faults.fail_next(1, status=503)
    decision = gate.check("user_1", "tasks", 2)
    assert decision.allowed
    assert decision.degraded
    assert not decision.stale
    assert decision.reservation is not None
    change = gate.commit(decision.reservation, idempotency_key="r-1")
    assert (change.action, change.count) == ("add", 2)
    stats = gate.stats.snapshot()
    assert (stats["degraded_open"], stats["allowed"], stats["stale_served"]) == (1, 1, 0)


def test_open_with_stale_decides_from_last_known(
    gate: QuotaGate, fake: FakeCommet, clock: FakeClock, admin: CommetClient
) -> None:
    """Commet down after the TTL: the last known allowance still decides, marked stale."""
    admin.set_quota("user_1", "tasks", 3)
    gate.check("user_1", "tasks", 0)
    clock.advance(60)
    fake.faults.fail_next(2, status=503)
    allowed = gate.check("user_1", "tasks", 2)
    assert allowed.allowed
    assert allowed.degraded
    assert allowed.stale
    refused = gate.check("user_1", "tasks", 1)
    assert not refused.allowed
    assert refused.code == "quota_exceeded"
    assert refused.stale
    assert gate.stats.snapshot()["stale_served"] == 2


def test_closed_refuses_with_503(gate: QuotaGate, fake: FakeCommet) -> None:
    """The closed policy refuses with quota_unavailable, 503 and Retry-After."""
    fake.faults.fail_next(1, status=503)
    decision = gate.check("user_1", "tasks", on_unavailable="closed")
    assert not decision.allowed
    assert decision.code == "quota_unavailable"
    assert decision.degraded
    assert status_for(decision) == 503
    assert ratelimit_headers(decision) == [("Retry-After", "1")]
    assert refusal_body(decision)["error"]["code"] == "quota_unavailable"
    assert gate.stats.snapshot()["closed_unavailable"] == 1
    assert gate.store.in_flight("user_1", "tasks") == 0


def test_closed_refuses_even_with_stale(
    gate: QuotaGate, fake: FakeCommet, clock: FakeClock
) -> None:
    """Closed means no decision without a fresh answer, even when an old one is known."""
    gate.check("user_1", "tasks", 0)
    clock.advance(60)
    fake.faults.fail_next(1, status=503)
    assert gate.check("user_1", "tasks", on_unavailable="closed").code == "quota_unavailable"


def test_dropped_connection_is_unavailable(gate: QuotaGate, fake: FakeCommet) -> None:
    """A transport failure (dropped connection) is treated as Commet unavailable."""
    fake.faults.drop_next(1)
    decision = gate.check("user_1", "tasks")
    assert decision.allowed
    assert decision.degraded


def test_rate_limited_read_is_unavailable(gate: QuotaGate, fake: FakeCommet) -> None:
    """A 429 on the read is an outage for this check, not a refusal of the customer."""
    fake.faults.rate_limit_next(1)
    assert gate.check("user_1", "tasks", on_unavailable="closed").code == "quota_unavailable"


@pytest.mark.anyio
async def test_async_open_and_closed(agate: QuotaGate, fake: FakeCommet) -> None:
    """The async path fails open and closed the same way."""
    fake.faults.fail_next(2, status=502)
    opened = await agate.acheck("user_1", "tasks")
    assert opened.allowed
    assert opened.degraded
    closed = await agate.acheck("user_1", "tasks", on_unavailable="closed")
    assert closed.code == "quota_unavailable"
    assert quota_reads(fake) == 2


def test_timeout_is_unavailable_and_uses_quota_timeout() -> None:
    """A read timing out fails open; the client is asked with settings.quota_timeout."""
    seen: list[object] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        raise httpx.ReadTimeout("read timed out", request=request)

    settings = CommetSettings(
        api_key=API_KEY,
        base_url="http://commet.test",
        transport=httpx.MockTransport(handler),
        quota_timeout=0.25,
    )
    gate = QuotaGate(settings)
    try:
        decision = gate.check("user_1", "tasks")
    finally:
        gate.close()
    assert decision.allowed
    assert decision.degraded
    # One attempt (the gate's own client does not retry on the request path), 0.25 s bound.
    assert len(seen) == 1
    assert seen[0] == {"connect": 0.25, "read": 0.25, "write": 0.25, "pool": 0.25}


def test_injected_clients_are_used_and_not_closed(
    settings: CommetSettings, fake: FakeCommet
) -> None:
    """Clients passed in are used as they are, and left open by close()."""
    client = CommetClient(settings)
    gate = QuotaGate(settings, client=client, async_client=AsyncCommetClient(settings))
    assert gate.check("user_1", "tasks").allowed
    gate.close()
    assert client.get_quota("user_1", "tasks").included == 5
    client.close()


def test_logs_never_contain_the_api_key(
    gate: QuotaGate, fake: FakeCommet, caplog: pytest.LogCaptureFixture
) -> None:
    """Degraded and refused checks log why, without the API key."""
    caplog.set_level(logging.DEBUG, logger="commet_middleware")
    fake.faults.fail_next(1, status=503)
    gate.check("user_1", "tasks")
    fake.faults.fail_next(1, status=503)
    gate.check("user_1", "seats", on_unavailable="closed")
    gate.check("user_1", "no_such_feature")
    gate.check("lapsed", "tasks")
    assert len(caplog.records) >= 4
    assert API_KEY not in caplog.text


class _BrokenClient(CommetClient):
    """A client whose quota read fails with a bug, not a Commet error."""

    def get_quota(
        self, customer_id: str, feature: str, *, timeout: float | None = None
    ) -> QuotaAllowance:
        raise RuntimeError("bug")


def test_internal_error_fails_open_and_is_logged(
    settings: CommetSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug inside the read never breaks the request: it is logged and treated as an outage."""
    with _BrokenClient(settings) as client:
        gate = QuotaGate(settings, client=client)
        decision = gate.check("user_1", "tasks")
        closed = gate.check("user_1", "tasks", on_unavailable="closed")
    assert decision.allowed
    assert decision.degraded
    assert closed.code == "quota_unavailable"
    assert any(r.exc_info for r in caplog.records)
