"""The billable operations validate their input and stay fixed once created."""

from __future__ import annotations

import dataclasses
import math

import pytest

from commet_middleware import QuotaChange, UsageEvent
from commet_middleware._models import utc_timestamp


@pytest.mark.parametrize("feature", ["api_calls", "storage_gb", "x", "a1_b2"])
def test_valid_feature_codes_are_accepted(feature: str) -> None:
    """Snake-case codes of a-z, 0-9 and _ make an event."""
    event = UsageEvent.create("cus_1", feature, idempotency_key="k1")
    assert event.feature == feature


@pytest.mark.parametrize("feature", ["", "API_CALLS", "api-calls", "api calls", "émail", 7, None])
def test_invalid_feature_codes_are_refused(feature: object) -> None:
    """Any code outside [a-z0-9_]+ is a ValueError naming the rule."""
    with pytest.raises(ValueError, match="feature code"):
        UsageEvent.create("cus_1", feature, idempotency_key="k1")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, math.inf, -math.inf, "1", None, True])
def test_bad_usage_values_are_refused(value: object) -> None:
    """Negative, non-finite, non-numeric and boolean values are a ValueError."""
    with pytest.raises(ValueError, match="usage value"):
        UsageEvent.create("cus_1", "api_calls", value, idempotency_key="k1")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, 1, 0.5, 10**9])
def test_good_usage_values_are_kept_exactly(value: float) -> None:
    """Zero, fractions and large whole numbers pass through unchanged."""
    assert UsageEvent.create("cus_1", "api_calls", value, idempotency_key="k").value == value


@pytest.mark.parametrize("customer", ["", "   ", None, 12])
def test_missing_customer_is_refused(customer: object) -> None:
    """An event must name a customer."""
    with pytest.raises(ValueError, match="customer id"):
        UsageEvent.create(customer, "api_calls", idempotency_key="k")  # type: ignore[arg-type]


def test_idempotency_key_is_required() -> None:
    """Without a key a retry could bill twice, so creation refuses."""
    with pytest.raises(ValueError, match="idempotency key"):
        UsageEvent.create("cus_1", "api_calls", idempotency_key="")


@pytest.mark.parametrize(
    "properties",
    [
        {"model": 4},
        {1: "x"},
        ["a", "b"],
        {"": "x"},
        {"k" * 41: "x"},
        {"model": "x" * 501},
        {f"k{i}": "v" for i in range(51)},
    ],
)
def test_bad_properties_are_refused(properties: object) -> None:
    """Non-string, empty-key, oversize and too many properties are a ValueError."""
    with pytest.raises(ValueError, match="propert"):
        UsageEvent.create(
            "cus_1",
            "api_calls",
            idempotency_key="k",
            properties=properties,  # type: ignore[arg-type]
        )


def test_properties_are_frozen_in_a_stable_order() -> None:
    """Properties become sorted pairs, so the same input always makes the same event."""
    a = UsageEvent.create(
        "c", "f", idempotency_key="k", timestamp="t", properties={"b": "2", "a": "1"}
    )
    b = UsageEvent.create(
        "c", "f", idempotency_key="k", timestamp="t", properties={"a": "1", "b": "2"}
    )
    assert a.properties == (("a", "1"), ("b", "2"))
    assert a == b


def test_event_is_immutable_and_timestamped_at_creation() -> None:
    """The payload, timestamp included, cannot change after creation."""
    event = UsageEvent.create("cus_1", "api_calls", idempotency_key="k")
    assert event.timestamp.endswith("Z")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.value = 2  # type: ignore[misc]


def test_utc_timestamp_is_iso_8601_with_milliseconds() -> None:
    """Timestamps look like 2026-01-15T10:00:00.000Z."""
    stamp = utc_timestamp()
    assert len(stamp) == len("2026-01-15T10:00:00.000Z")
    assert stamp[10] == "T"


def test_utc_timestamp_of_now_agrees_with_datetime() -> None:
    """The fast path for "now" gives what formatting datetime.now() gives, to the millisecond."""
    from datetime import datetime, timedelta, timezone

    for _ in range(200):
        before = datetime.now(timezone.utc)
        stamp = utc_timestamp()
        after = datetime.now(timezone.utc)
        parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert before - timedelta(milliseconds=1) < parsed <= after
    moment = datetime(2026, 1, 15, 10, 0, 0, 123456, tzinfo=timezone.utc)
    assert utc_timestamp(moment) == "2026-01-15T10:00:00.123Z"


@pytest.mark.parametrize("count", [-1, 1.5, "2", True, None])
def test_bad_quota_counts_are_refused(count: object) -> None:
    """Quota counts are whole numbers >= 0."""
    with pytest.raises(ValueError, match="quota count"):
        QuotaChange.create("cus_1", "tasks", "add", count, idempotency_key="k")  # type: ignore[arg-type]


def test_unknown_quota_action_is_refused() -> None:
    """Only add, remove and set exist."""
    with pytest.raises(ValueError, match="quota action"):
        QuotaChange.create("cus_1", "tasks", "drain", 1, idempotency_key="k")  # type: ignore[arg-type]


def test_quota_change_keeps_its_fields() -> None:
    """A valid change records customer, feature, action, count and key."""
    change = QuotaChange.create("cus_1", "tasks", "remove", 3, idempotency_key="k9")
    assert (change.customer_id, change.feature, change.action, change.count) == (
        "cus_1",
        "tasks",
        "remove",
        3,
    )
    assert change.kind == "quota"
