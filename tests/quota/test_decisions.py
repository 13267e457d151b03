"""The quota rule and what a decision says: refusals, overage, hard limits, Commet's codes."""

from __future__ import annotations

import pytest

from commet_middleware._client import CommetClient
from commet_middleware.quota import (
    QuotaDecision,
    QuotaGate,
    ratelimit_headers,
    refusal_body,
    status_for,
)
from commet_middleware.testing import FakeCommet

from .conftest import FakeClock, quota_reads


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio."""
    return "asyncio"


def test_refuses_at_the_ceiling(gate: QuotaGate, admin: CommetClient) -> None:
    """A plan without overage at its included amount refuses with quota_exceeded and 402."""
    admin.set_quota("user_1", "tasks", 5)
    decision = gate.check("user_1", "tasks")
    assert not decision.allowed
    assert decision.code == "quota_exceeded"
    assert decision.reservation is None
    assert (decision.current, decision.included, decision.remaining) == (5, 5, 0)
    assert status_for(decision) == 402


def test_allows_below_the_ceiling(gate: QuotaGate, admin: CommetClient) -> None:
    """One unit left allows one unit and refuses two."""
    admin.set_quota("user_1", "tasks", 4)
    assert not gate.check("user_1", "tasks", 2).allowed
    decision = gate.check("user_1", "tasks", 1)
    assert decision.allowed
    assert decision.reservation is not None
    assert decision.remaining == 0
    assert status_for(decision) == 200


def test_overage_plan_is_allowed_past_included(gate: QuotaGate, admin: CommetClient) -> None:
    """With overage enabled the customer goes past included and is billed, not blocked."""
    admin.set_quota("user_1", "seats", 5)
    decision = gate.check("user_1", "seats", 3)
    assert decision.allowed
    assert decision.overage_enabled
    assert not decision.enforced
    assert ratelimit_headers(decision) == []


def test_hard_limit_refuses_even_with_overage(gate: QuotaGate, admin: CommetClient) -> None:
    """hard_limit=True makes included a ceiling even on a plan with overage."""
    admin.set_quota("user_1", "seats", 5)
    decision = gate.check("user_1", "seats", hard_limit=True)
    assert not decision.allowed
    assert decision.code == "quota_exceeded"
    assert decision.enforced


def test_unlimited_is_always_allowed(gate: QuotaGate, admin: CommetClient) -> None:
    """An unlimited feature allows any count, hard limit or not, and reports no remaining."""
    admin.set_quota("user_1", "automations", 10_000)
    decision = gate.check("user_1", "automations", 1_000_000, hard_limit=True)
    assert decision.allowed
    assert decision.unlimited
    assert decision.remaining is None
    assert ratelimit_headers(decision) == []


def test_customer_required_without_network(gate: QuotaGate, fake: FakeCommet) -> None:
    """No customer id refuses with customer_required (401) and asks Commet nothing."""
    for missing in (None, "", "  "):
        decision = gate.check(missing, "tasks")
        assert decision.code == "customer_required"
        assert status_for(decision) == 401
    assert fake.requests == []


@pytest.mark.parametrize(
    ("customer", "feature", "code", "status"),
    [
        ("lapsed", "tasks", "no_active_subscription", 402),
        ("nobody", "tasks", "customer_not_found", 402),
        ("user_2", "seats", "feature_not_in_plan", 403),
        ("user_1", "no_such_feature", "feature_not_found", 500),
    ],
)
def test_commet_refusal_codes(
    gate: QuotaGate, customer: str, feature: str, code: str, status: int
) -> None:
    """Commet's customer and plan errors become refusals carrying its code, never outages."""
    decision = gate.check(customer, feature)
    assert not decision.allowed
    assert decision.code == code
    assert not decision.degraded
    assert decision.request_id is not None
    assert status_for(decision) == status
    assert refusal_body(decision)["error"]["code"] == code


@pytest.mark.anyio
async def test_commet_refusal_codes_async(agate: QuotaGate) -> None:
    """The async path maps Commet's codes the same way."""
    assert (await agate.acheck("lapsed", "tasks")).code == "no_active_subscription"
    assert (await agate.acheck("nobody", "tasks")).code == "customer_not_found"
    assert (await agate.acheck("user_2", "seats")).code == "feature_not_in_plan"


def test_commet_refusals_are_not_cached(gate: QuotaGate, fake: FakeCommet) -> None:
    """A refused lookup asks Commet again next time: a customer who subscribes gets in."""
    gate.check("lapsed", "tasks")
    gate.check("lapsed", "tasks")
    assert quota_reads(fake) == 2


def test_refusal_body_is_stable(gate: QuotaGate, admin: CommetClient) -> None:
    """The 402 body has the documented keys and the allowance numbers."""
    admin.set_quota("user_1", "tasks", 5)
    body = refusal_body(gate.check("user_1", "tasks"))
    error = body["error"]
    assert set(error) == {
        "type",
        "code",
        "message",
        "feature",
        "current",
        "included",
        "remaining",
    }
    assert error["type"] == "quota_error"
    assert error["code"] == "quota_exceeded"
    assert (error["feature"], error["current"], error["included"], error["remaining"]) == (
        "tasks",
        5,
        5,
        0,
    )
    assert "tasks" in str(error["message"])


def test_ratelimit_headers_follow_the_draft(gate: QuotaGate, admin: CommetClient) -> None:
    """An enforced ceiling is advertised as RateLimit-Policy q and RateLimit r, per feature."""
    admin.set_quota("user_1", "tasks", 2)
    decision = gate.check("user_1", "tasks")
    assert ratelimit_headers(decision) == [
        ("RateLimit-Policy", '"tasks";q=5'),
        ("RateLimit", '"tasks";r=2'),
    ]


def test_status_for_unknown_refusal_code() -> None:
    """A refusal with a code this module does not know is a plain 403."""
    decision = QuotaDecision(allowed=False, feature="tasks", count=1, code="something_new")
    assert status_for(decision) == 403
    assert refusal_body(decision)["error"]["code"] == "something_new"


def test_invalid_arguments_raise(gate: QuotaGate) -> None:
    """A bad feature code, count or policy is a programming error, raised at once."""
    with pytest.raises(ValueError, match="feature code"):
        gate.check("user_1", "Tasks")
    with pytest.raises(ValueError, match="count"):
        gate.check("user_1", "tasks", -1)
    with pytest.raises(ValueError, match="on_unavailable"):
        gate.check("user_1", "tasks", on_unavailable="maybe")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_check_cached_decides_only_from_a_fresh_allowance(
    agate: QuotaGate, fake: FakeCommet, admin: CommetClient, clock: FakeClock
) -> None:
    """Cold or expired: None, nothing asked; warm: acheck's decision, with no request to Commet."""
    admin.set_quota("user_1", "tasks", 3)
    reads = quota_reads(fake)
    assert agate.check_cached("user_1", "tasks") is None
    assert quota_reads(fake) == reads  # a cold cache is not filled from here
    first = await agate.acheck("user_1", "tasks")  # fetches: the cache is warm now
    assert first.allowed
    assert first.remaining == 1
    reads = quota_reads(fake)
    second = agate.check_cached("user_1", "tasks")
    assert second is not None
    assert second.allowed
    assert second.remaining == 0  # the first request's unit is still held
    assert agate.check_cached("user_1", "tasks") == QuotaDecision(
        allowed=False,
        feature="tasks",
        count=1,
        customer_id="user_1",
        code="quota_exceeded",
        current=3,
        included=5,
        remaining=0,
        unlimited=False,
        overage_enabled=False,
        enforced=True,
    )
    assert quota_reads(fake) == reads
    assert agate.check_cached(None, "tasks") == QuotaDecision(
        False, "tasks", 1, code="customer_required"
    )
    clock.advance(5.0)
    assert agate.check_cached("user_1", "tasks") is None  # expired: acheck must refetch
    stats = agate.stats.snapshot()
    assert (stats["checks"], stats["cache_hits"], stats["refused"]) == (4, 2, 2)
