"""One classification and one backoff for the whole toolkit (``_retry``), per the reference's
delivery table, and the one-line fix of each configuration failure."""

from __future__ import annotations

import random

import pytest
from commet_script import ERROR_ROWS, SECRET

from commet_middleware import CommetAPIError, CommetError, CommetTransportError
from commet_middleware._retry import (
    BACKOFF_CAP,
    CONFIG_RETRY_CAP,
    classify,
    configuration_hint,
    is_retryable,
    retry_delay,
)
from commet_middleware._wire import parse_error


def api(status: int, code: str | None = None, **extra: object) -> CommetAPIError:
    return CommetAPIError(status, code=code, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (CommetTransportError("connection refused"), "transient"),
        (api(408, "internal_error"), "transient"),
        (api(429, "rate_limited"), "transient"),
        (api(429, "rate_limited", retry_after=3.0), "transient"),
        (api(409, "idempotency_in_progress"), "transient"),
        (api(500), "transient"),
        (api(502), "transient"),
        (api(503, "internal_error"), "transient"),
        (api(504), "transient"),
        (api(522), "transient"),
        (api(200, "invalid_response"), "transient"),
        (api(201, "invalid_response"), "transient"),
        (api(401, "unauthorized"), "configuration"),
        (api(403, "forbidden"), "configuration"),
        (api(404), "configuration"),
        (api(404, "not_found"), "configuration"),
        (api(404, "endpoint_not_available"), "configuration"),
        (api(404, "something_else"), "configuration"),
        (api(410, "endpoint_deprecated"), "configuration"),
        (api(301), "configuration"),
        (api(407), "configuration"),
        (api(404, "customer_not_found"), "permanent"),
        (api(404, "feature_not_found"), "permanent"),
        (api(404, "no_active_subscription"), "permanent"),
        (api(400, "validation_error"), "permanent"),
        (api(422, "validation_error"), "permanent"),
        (api(400, "invalid_json"), "permanent"),
        (api(400, "insufficient_balance"), "permanent"),
        (api(400, "feature_not_in_plan"), "permanent"),
        (api(400, "included_limit_reached"), "permanent"),
        (api(409, "idempotency_key_mismatch"), "permanent"),
        (api(405, "method_not_allowed"), "permanent"),
        (ValueError("bad feature code"), "permanent"),
        (TypeError("not an operation"), "permanent"),
        (RuntimeError("bug"), "unexpected"),
        (KeyError("bug"), "unexpected"),
        (CommetError("neither"), "unexpected"),
    ],
)
def test_classify_follows_the_reference_table(error: BaseException, expected: str) -> None:
    """Each answer lands in the class the delivery table of COMMET_API.md gives it."""
    assert classify(error) == expected


@pytest.mark.parametrize(("status", "code", "headers", "retryable"), ERROR_ROWS)
def test_retryable_is_transient_except_a_429_without_its_wait(
    status: int, code: str, headers: dict[str, str], retryable: bool
) -> None:
    """CommetAPIError.retryable derives from classify: transient, and a 429 names its wait."""
    error = parse_error(status, headers, b'{"error":{"code":"%s"}}' % code.encode())
    assert error.retryable is retryable
    transient = classify(error) == "transient"
    assert retryable == (transient and not (status == 429 and not headers))
    assert is_retryable(status, code, error.retry_after) is retryable


def test_a_background_429_is_transient_with_or_without_retry_after() -> None:
    """A 429 is never final for the pipeline, even though a direct call does not wait it out."""
    error = parse_error(429, {}, b'{"error":{"code":"rate_limited"}}')
    assert not error.retryable
    assert classify(error) == "transient"


def test_retry_delay_is_equal_jitter_capped_and_at_least_retry_after() -> None:
    """retry_delay: step = base * 2**(attempt-1) up to cap, waited in its upper half, and
    never less than Retry-After (itself capped)."""
    rng = random.Random(7)
    for attempt in range(1, 12):
        step = min(BACKOFF_CAP, 0.5 * 2 ** (attempt - 1))
        delay = retry_delay(attempt, base=0.5, rng=rng)
        assert step / 2 <= delay <= step
    assert retry_delay(10_000, base=0.5) <= BACKOFF_CAP
    assert retry_delay(1, base=0.5, retry_after=3.0) >= 3.0
    assert retry_delay(1, base=0.5, retry_after=500.0, retry_after_cap=30.0) == 30.0


def test_the_configuration_schedule_reaches_minutes() -> None:
    """With CONFIG_RETRY_CAP the waits grow to a few minutes and stop there."""
    waits = [retry_delay(n, base=0.5, cap=CONFIG_RETRY_CAP) for n in range(1, 30)]
    assert max(waits) <= CONFIG_RETRY_CAP
    assert waits[-1] >= CONFIG_RETRY_CAP / 2
    assert CONFIG_RETRY_CAP <= 600


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            api(401, "unauthorized"),
            "Commet refused the API key (401 unauthorized): check COMMET_API_KEY",
        ),
        (api(403, "forbidden"), "403 forbidden: the API key may not do this: use a secret ck_ key"),
        (
            api(404, method="POST", path="/api/v1/usage/events", base_url="https://x.test/api"),
            "404 without a Commet error code at POST /api/v1/usage/events: "
            "check COMMET_BASE_URL (now https://x.test/api)",
        ),
        (api(404, "not_found", path="/api/v1/usage/events"), "check COMMET_BASE_URL"),
        (api(410, "endpoint_deprecated", path="/api/usage/events"), "dialect='v1'"),
        (api(302), "redirect (302): check COMMET_BASE_URL"),
    ],
)
def test_configuration_hints_name_the_fix(error: CommetAPIError, expected: str) -> None:
    """Each configuration failure has a one-line fix naming the setting to check."""
    hint = configuration_hint(error)
    assert expected in hint
    assert "\n" not in hint


def test_hints_never_show_credentials() -> None:
    """Neither the key nor a password in the base URL appears in a hint."""
    error = api(404, path="/api/v1/usage/events", base_url=f"https://u:{SECRET}@proxy.test:8443/c")
    hint = configuration_hint(error)
    assert SECRET not in hint
    assert "https://proxy.test:8443/c" in hint
    assert SECRET not in configuration_hint(api(401, "unauthorized", message=f"bad {SECRET}"))


def test_hint_uses_the_given_base_url_and_is_empty_for_other_failures() -> None:
    """An error that does not say where it went takes base_url; other classes get no hint."""
    assert "(now https://b.test)" in configuration_hint(api(404), base_url="https://b.test")
    for error in (api(503), api(400, "validation_error"), CommetTransportError("x"), ValueError()):
        assert configuration_hint(error) == ""
