"""The result types: frozen, slotted, and tolerant of what Commet leaves out."""

from __future__ import annotations

import dataclasses

import pytest

from commet_middleware import QuotaAllowance, QuotaChangeResult, TrackResult


def test_results_are_frozen_and_slotted() -> None:
    """Results cannot be changed after the fact and carry no __dict__."""
    for result in (TrackResult(), QuotaAllowance(feature_code="x"), QuotaChangeResult()):
        assert not hasattr(result, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.feature_code = "changed"  # type: ignore[misc]


def test_missing_keys_become_defaults() -> None:
    """An empty object parses into each result without raising."""
    assert TrackResult.from_json({}) == TrackResult()
    assert QuotaChangeResult.from_json({}).new_balance is None
    allowance = QuotaAllowance.from_json({"featureCode": "tasks"})
    assert (allowance.current, allowance.included, allowance.remaining) == (0, 0, None)
    assert not allowance.unlimited


def test_unlimited_allowance_has_no_remaining() -> None:
    """An unlimited allowance reports remaining as None whatever the number says."""
    allowance = QuotaAllowance.from_json(
        {"featureCode": "seats", "unlimited": True, "remaining": 5}
    )
    assert allowance.remaining is None


def test_track_result_reads_legacy_keys_and_object_properties() -> None:
    """Legacy answers (feature, idempotencyKey, properties object) fill the same fields."""
    result = TrackResult.from_json(
        {"feature": "api_calls", "idempotencyKey": "k", "properties": {"b": "2", "a": "1"}}
    )
    assert (result.feature_code, result.event_id) == ("api_calls", "k")
    assert result.properties == (("a", "1"), ("b", "2"))


def test_bool_is_not_a_number() -> None:
    """A boolean where a number belongs is ignored rather than read as 0 or 1."""
    assert QuotaAllowance.from_json({"featureCode": "t", "current": True}).current == 0
