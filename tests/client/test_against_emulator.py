"""The clients against FakeCommet: what the emulator records is what the client meant."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
from commet_script import SECRET, Sleeps

from commet_middleware import (
    AsyncCommetClient,
    CommetAPIError,
    CommetClient,
    CommetSettings,
    QuotaAllowance,
)

# The emulator is written alongside this client; until it exists this module is skipped.
testing = pytest.importorskip("commet_middleware.testing")
if TYPE_CHECKING:
    from commet_middleware.testing import FakeCommet
else:
    FakeCommet = testing.FakeCommet


@pytest.fixture
def fake() -> FakeCommet:
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_feature("tasks", quota=True, included=5, overage=True)
    fake.add_customer("cus_1")
    return fake


def client_for(fake: FakeCommet, sleeps: Sleeps, **changes: Any) -> CommetClient:
    settings = CommetSettings(api_key=SECRET, transport=fake.transport).replace(**changes)
    return CommetClient(settings, sleep=sleeps, random=lambda: 1.0)


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_track_is_recorded_once(fake: FakeCommet, sleeps: Sleeps, dialect: str) -> None:
    """A tracked event lands in the emulator once, with its value, in either dialect."""
    with client_for(fake, sleeps, dialect=dialect) as client:
        result = client.track("cus_1", "api_calls", 2.5, idempotency_key="ev_1")
    assert not result.duplicate
    assert len(fake.events("cus_1", "api_calls")) == 1
    assert fake.usage_total("cus_1", "api_calls") == 2.5


def test_retries_through_503s_record_one_event(fake: FakeCommet, sleeps: Sleeps) -> None:
    """Two injected 503s are retried and the event is recorded exactly once."""
    fake.faults.fail_next(2, status=503)
    with client_for(fake, sleeps) as client:
        client.track("cus_1", "api_calls", idempotency_key="ev_2")
    assert sleeps.waits == [0.5, 1.0]
    assert fake.usage_total("cus_1", "api_calls") == 1


def test_dropped_connection_is_retried(fake: FakeCommet, sleeps: Sleeps) -> None:
    """A dropped connection becomes a transport error, is retried, and bills once."""
    fake.faults.drop_next(1)
    with client_for(fake, sleeps) as client:
        client.track("cus_1", "api_calls", idempotency_key="ev_3")
    assert len(sleeps.waits) == 1
    assert fake.usage_total("cus_1", "api_calls") == 1


def test_drop_after_write_does_not_double_bill(fake: FakeCommet, sleeps: Sleeps) -> None:
    """When the answer is lost after Commet recorded the event, the retry bills nothing more."""
    fake.faults.drop_after_write_next(1)
    with client_for(fake, sleeps) as client:
        result = client.track("cus_1", "api_calls", idempotency_key="ev_4")
    assert result.duplicate or result.replayed
    assert fake.usage_total("cus_1", "api_calls") == 1


def test_same_event_twice_is_delivered_once(fake: FakeCommet, sleeps: Sleeps) -> None:
    """Tracking the same key twice gives a delivered result and one recorded event."""
    with client_for(fake, sleeps) as client:
        client.track("cus_1", "api_calls", idempotency_key="ev_5", timestamp="2026-01-01T00:00:00Z")
        again = client.track(
            "cus_1", "api_calls", idempotency_key="ev_5", timestamp="2026-01-01T00:00:00Z"
        )
    assert again.duplicate or again.replayed
    assert fake.usage_total("cus_1", "api_calls") == 1


def test_rate_limit_waits_retry_after(fake: FakeCommet, sleeps: Sleeps) -> None:
    """An injected 429 with Retry-After is waited out exactly."""
    fake.faults.rate_limit_next(1, retry_after=2)
    with client_for(fake, sleeps) as client:
        client.track("cus_1", "api_calls", idempotency_key="ev_6")
    assert sleeps.waits == [2.0]


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_quota_round_trip(fake: FakeCommet, sleeps: Sleeps, dialect: str) -> None:
    """add, remove and set move the balance; reads report it; below zero is insufficient_balance."""
    with client_for(fake, sleeps, dialect=dialect) as client:
        added = client.add_quota("cus_1", "tasks", 4)
        assert (added.previous_balance, added.new_balance) == (0, 4)
        client.remove_quota("cus_1", "tasks")
        client.set_quota("cus_1", "tasks", 7)
        allowance = client.get_quota("cus_1", "tasks")
        assert isinstance(allowance, QuotaAllowance)
        assert (allowance.current, allowance.included) == (7, 5)
        assert [a.feature_code for a in client.get_all_quotas("cus_1")] == ["tasks"]
        with pytest.raises(CommetAPIError) as caught:
            client.remove_quota("cus_1", "tasks", 100)
    assert caught.value.code == "insufficient_balance"
    assert not caught.value.retryable
    assert fake.quota("cus_1", "tasks").current == 7


def test_legacy_paths_warn_once(
    fake: FakeCommet, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    """The emulator's Deprecation header on legacy paths yields one warning."""
    with (
        caplog.at_level(logging.WARNING, logger="commet_middleware"),
        client_for(fake, sleeps, dialect="legacy") as client,
    ):
        client.track("cus_1", "api_calls")
        client.track("cus_1", "api_calls")
    assert len([r for r in caplog.records if "deprecated" in r.getMessage()]) == 1


def test_unknown_feature_is_not_found(fake: FakeCommet, sleeps: Sleeps) -> None:
    """A feature the emulator does not know gives a non-retryable 404 error."""
    with client_for(fake, sleeps) as client, pytest.raises(CommetAPIError) as caught:
        client.track("cus_1", "no_such_feature")
    assert caught.value.status == 404
    assert not caught.value.retryable
    assert sleeps.waits == []


@pytest.mark.anyio
async def test_async_client_against_the_emulator(fake: FakeCommet, sleeps: Sleeps) -> None:
    """The async client retries through faults and bills once too."""
    fake.faults.fail_next(1, status=502)
    settings = CommetSettings(api_key=SECRET, transport=fake.transport)
    async with AsyncCommetClient(settings, sleep=sleeps.asleep, random=lambda: 1.0) as client:
        await client.track("cus_1", "api_calls", 3, idempotency_key="ev_a")
        await client.add_quota("cus_1", "tasks", 2)
        allowance = await client.get_quota("cus_1", "tasks")
    assert allowance.current == 2
    assert fake.usage_total("cus_1", "api_calls") == 3
