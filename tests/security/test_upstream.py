"""Threat: a compromised Commet, or an impostor at its address, turns its answers against us.

It already holds the key it is sent; what it must not do is carry the key somewhere else, put
it into our logs and errors, or stall delivery for as long as it likes.
"""

from __future__ import annotations

import traceback

import httpx
import pytest

from commet_middleware import CommetClient, CommetError

SECRET = "ck_test_secret_5e3f9a2c7b1d4e6f"


def _failure_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error)) + repr(error) + str(error)


def _client(answer: httpx.MockTransport, **settings: object) -> CommetClient:
    return CommetClient(api_key=SECRET, transport=answer, max_retries=0, **settings)


def test_key_echoed_in_the_error_message_is_scrubbed() -> None:
    """An upstream echoing the key in its error message and param does not put it in our error."""

    def echo(request: httpx.Request) -> httpx.Response:
        key = request.headers["x-api-key"]
        error = {"type": "validation_error", "code": "bad", "message": f"key {key}", "param": key}
        return httpx.Response(400, json={"error": error})

    with _client(httpx.MockTransport(echo)) as client, pytest.raises(CommetError) as caught:
        client.track("user_123", "api_calls")
    assert SECRET not in _failure_text(caught.value)
    assert "[redacted]" in str(caught.value)


def test_key_echoed_in_any_error_field_is_scrubbed() -> None:
    """An upstream echoing the key in type, code, details or x-request-id does not leak it."""

    def echo(request: httpx.Request) -> httpx.Response:
        key = request.headers["x-api-key"]
        error = {"type": key, "code": key, "message": "no", "details": [key]}
        return httpx.Response(400, json={"error": error}, headers={"x-request-id": key})

    with _client(httpx.MockTransport(echo)) as client, pytest.raises(CommetError) as caught:
        client.track("user_123", "api_calls")
    assert SECRET not in _failure_text(caught.value) + repr(caught.value.__dict__)


def test_a_redirect_does_not_carry_the_key_to_another_host() -> None:
    """An upstream answering 307 to another host gets no second request: the key stays home."""
    seen: list[str] = []

    def redirect(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(307, headers={"location": "http://collector.example/steal"})

    with _client(httpx.MockTransport(redirect)) as client, pytest.raises(CommetError):
        client.track("user_123", "api_calls")
    assert seen == ["commet.co"]


def test_retry_after_cannot_stall_delivery_beyond_the_cap() -> None:
    """A 429 asking for a day's wait is waited retry_after_cap seconds at most, then retried."""
    waits: list[float] = []
    answers = iter([httpx.Response(429, headers={"retry-after": "86400"})] * 3)

    def limited(request: httpx.Request) -> httpx.Response:
        return next(answers)

    client = CommetClient(
        api_key=SECRET,
        transport=httpx.MockTransport(limited),
        max_retries=2,
        retry_after_cap=30.0,
        sleep=waits.append,
    )
    with client, pytest.raises(CommetError):
        client.track("user_123", "api_calls")
    assert waits == [30.0, 30.0]
