"""The retry schedule: what is retried, how long it waits, and when it gives up."""

from __future__ import annotations

import pytest

from commet_middleware import CommetAPIError, CommetSettings, CommetTransportError
from commet_middleware._retry import RetryPolicy


def test_schedule_is_exponential_and_capped() -> None:
    """With the top of the jitter range, waits double from base and stop at the cap."""
    policy = RetryPolicy(max_retries=6, base=0.5, cap=8.0, random=lambda: 1.0)
    assert list(policy.schedule()) == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_jitter_is_equal_jitter() -> None:
    """At the bottom of the jitter range a wait is half the step: never zero."""
    policy = RetryPolicy(max_retries=4, base=0.5, cap=8.0, random=lambda: 0.0)
    assert list(policy.schedule()) == [0.25, 0.5, 1.0, 2.0]


def test_policy_follows_settings() -> None:
    """from_settings takes max_retries, backoff_base, backoff_cap and retry_after_cap."""
    settings = CommetSettings(max_retries=2, backoff_base=1.0, backoff_cap=3.0, retry_after_cap=5)
    policy = RetryPolicy.from_settings(settings, random=lambda: 1.0)
    assert list(policy.schedule()) == [1.0, 2.0]
    assert policy.retry_after_cap == 5


def test_retryable_errors_get_a_delay_until_retries_run_out() -> None:
    """A retryable error is retried max_retries times, then the policy gives up."""
    policy = RetryPolicy(max_retries=2, random=lambda: 1.0)
    error = CommetAPIError(503, retryable=True)
    assert policy.delay(error, 0) == 0.5
    assert policy.delay(error, 1) == 1.0
    assert policy.delay(error, 2) is None


def test_transport_errors_are_retried() -> None:
    """A CommetTransportError is always worth another try."""
    assert RetryPolicy(random=lambda: 1.0).delay(CommetTransportError("down"), 0) == 0.5


@pytest.mark.parametrize(
    "error",
    [CommetAPIError(400), CommetAPIError(409, code="idempotency_key_mismatch"), ValueError("x")],
)
def test_non_retryable_errors_are_not_retried(error: Exception) -> None:
    """Errors not marked retryable, and anything that is not a CommetError, get no retry."""
    assert RetryPolicy().delay(error, 0) is None


def test_retry_after_replaces_backoff_and_is_capped() -> None:
    """A Retry-After longer than the backoff is waited as given, never beyond retry_after_cap."""
    policy = RetryPolicy(retry_after_cap=30.0, random=lambda: 1.0)
    assert policy.delay(CommetAPIError(429, retryable=True, retry_after=7), 0) == 7
    assert policy.delay(CommetAPIError(429, retryable=True, retry_after=600), 0) == 30.0


def test_a_short_retry_after_is_a_floor_not_a_replacement() -> None:
    """One rule with the pipeline: the wait is the backoff, or Retry-After if that is longer."""
    policy = RetryPolicy(random=lambda: 1.0)
    assert policy.delay(CommetAPIError(503, retry_after=0.1), 0) == 0.5
    assert policy.delay(CommetAPIError(503, retry_after=0.1), 2) == 2.0


def test_a_429_without_retry_after_is_raised_by_a_direct_call() -> None:
    """The direct client's one exception to the transient rule: a 429 naming no wait."""
    assert RetryPolicy().delay(CommetAPIError(429, code="rate_limited"), 0) is None
    assert RetryPolicy(random=lambda: 1.0).delay(CommetAPIError(429, retry_after=2), 0) == 2


def test_the_policy_follows_classify_not_the_flag() -> None:
    """A 503 is retried and a 401 is not, whatever retryable an error was built with."""
    policy = RetryPolicy(random=lambda: 1.0)
    assert policy.delay(CommetAPIError(503, code="internal_error"), 0) == 0.5
    assert policy.delay(CommetAPIError(401, code="unauthorized", retryable=True), 0) is None
