"""Fault injection: errors, rate limits, latency, dropped connections, lost answers."""

from __future__ import annotations

import time

import httpx
import pytest
from emulator_helpers import HEADERS, error_of

from commet_middleware.testing import FakeCommet

EVENT = {"featureCode": "api_calls", "customerId": "user_123"}
EVENTS = "/api/v1/usage/events"


def test_fail_next_answers_the_status_without_writing(
    client: httpx.Client, fake: FakeCommet
) -> None:
    """fail_next(n, status) answers n internal_error responses and records nothing."""
    fake.faults.fail_next(2, status=502)
    statuses = [client.post(EVENTS, json=EVENT).status_code for _ in range(3)]
    assert statuses == [502, 502, 201]
    assert len(fake.events()) == 1
    assert fake.faults.injected == {"fail_next": 2}
    assert [r.fault for r in fake.requests] == ["fail_next", "fail_next", None]


def test_fail_body_is_internal_error(client: httpx.Client, fake: FakeCommet) -> None:
    """An injected 5xx has the internal_error body and a request id."""
    fake.faults.fail_next(1)
    response = client.post(EVENTS, json=EVENT)
    assert response.status_code == 503
    error = error_of(response)
    assert (error["type"], error["code"]) == ("internal_error", "internal_error")


def test_rate_limit_has_retry_after_and_ratelimit_headers(
    client: httpx.Client, fake: FakeCommet
) -> None:
    """rate_limit_next answers 429 rate_limited with Retry-After and RateLimit-* headers."""
    fake.faults.rate_limit_next(1, retry_after=7)
    response = client.get("/api/v1/usage/quota/all", params={"customerId": "user_123"})
    assert response.status_code == 429
    error = error_of(response)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limited")
    assert response.headers["retry-after"] == "7"
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.headers["ratelimit-reset"] == "7"
    assert "ratelimit-limit" in response.headers
    assert fake.faults.injected == {"rate_limit_next": 1}


def test_error_rate_is_seeded_and_repeatable() -> None:
    """error_rate draws from a seeded generator: the same seed fails the same requests."""

    def pattern() -> list[int]:
        fake = FakeCommet.from_catalogue()
        fake.faults.error_rate(0.3, status=500, seed=42)
        with httpx.Client(transport=fake.transport, base_url="https://c", headers=HEADERS) as c:
            return [c.post(EVENTS, json=EVENT).status_code for _ in range(60)]

    first, second = pattern(), pattern()
    assert first == second
    assert 0 < first.count(500) < 60
    assert set(first) == {201, 500}


def test_error_rate_extremes() -> None:
    """error_rate(1) fails everything, error_rate(0) nothing; rates outside 0..1 are refused."""
    fake = FakeCommet.from_catalogue()
    with httpx.Client(transport=fake.transport, base_url="https://c", headers=HEADERS) as c:
        fake.faults.error_rate(1.0)
        assert c.post(EVENTS, json=EVENT).status_code == 500
        fake.faults.error_rate(0.0)
        assert c.post(EVENTS, json=EVENT).status_code == 201
    with pytest.raises(ValueError, match="rate"):
        fake.faults.error_rate(1.5)


def test_latency_delays_each_request(client: httpx.Client, fake: FakeCommet) -> None:
    """latency(s) makes each answer take at least s seconds, and is counted."""
    fake.faults.latency(0.05)
    started = time.monotonic()
    assert client.post(EVENTS, json=EVENT).status_code == 201
    assert time.monotonic() - started >= 0.05
    assert fake.faults.injected == {"latency": 1}
    fake.faults.latency(0)
    client.post(EVENTS, json=EVENT)
    assert fake.faults.injected == {"latency": 1}


def test_drop_next_closes_the_connection_without_an_answer(
    client: httpx.Client, fake: FakeCommet
) -> None:
    """drop_next raises a transport error in the client (a closed socket when served)."""
    fake.faults.drop_next(1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post(EVENTS, json=EVENT)
    assert fake.events() == []
    assert client.post(EVENTS, json=EVENT).status_code == 201
    assert [(r.status, r.fault) for r in fake.requests] == [(None, "drop_next"), (201, None)]
    assert fake.faults.injected == {"drop_next": 1}


def test_fail_after_write_commits_then_fails(client: httpx.Client, fake: FakeCommet) -> None:
    """fail_after_write_next records the mutation, then answers the error anyway."""
    fake.faults.fail_after_write_next(1, status=500)
    response = client.post("/api/v1/usage/quota", json={**EVENT, "featureCode": "tasks"})
    assert response.status_code == 500
    assert fake.quota("user_123", "tasks").current == 1
    assert fake.faults.injected == {"fail_after_write_next": 1}


def test_after_write_faults_skip_reads_and_rejections(
    client: httpx.Client, fake: FakeCommet
) -> None:
    """After-write faults wait for a committed mutation: reads and errors pass through."""
    fake.faults.fail_after_write_next(1)
    assert (
        client.get("/api/v1/usage/quota/all", params={"customerId": "user_123"}).status_code == 200
    )
    assert client.post(EVENTS, json={**EVENT, "customerId": "nobody"}).status_code == 404
    assert client.post(EVENTS, json=EVENT).status_code == 503
    assert client.post(EVENTS, json=EVENT).status_code == 201


def test_drop_after_write_commits_then_drops(client: httpx.Client, fake: FakeCommet) -> None:
    """drop_after_write_next records the event, then drops the connection."""
    fake.faults.drop_after_write_next(1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post(EVENTS, json=EVENT)
    assert len(fake.events()) == 1
    assert fake.requests[0].fault == "drop_after_write_next"


def test_clear_removes_faults_and_counters(client: httpx.Client, fake: FakeCommet) -> None:
    """clear() removes pending faults and zeroes the counters."""
    fake.faults.fail_next(1)
    client.post(EVENTS, json=EVENT)
    fake.faults.fail_next(5)
    fake.faults.rate_limit_next(5)
    fake.faults.drop_next(5)
    fake.faults.clear()
    assert fake.faults.injected == {}
    assert client.post(EVENTS, json=EVENT).status_code == 201


def test_reset_keeps_the_catalogue(client: httpx.Client, fake: FakeCommet) -> None:
    """reset() forgets events, balances, keys, requests and faults, not customers."""
    client.post(EVENTS, json={**EVENT, "eventId": "x"})
    client.post("/api/v1/usage/quota", json={**EVENT, "featureCode": "tasks"})
    fake.faults.fail_next(3)
    fake.reset()
    assert (fake.events(), fake.quota_events(), fake.requests) == ([], [], [])
    assert fake.quota("user_123", "tasks").current == 0
    assert client.post(EVENTS, json={**EVENT, "eventId": "x"}).status_code == 201


# --- answers that are not Commet's: nothing reaches the ledger --------------------------------

CANNED = [
    ("html_next", 200, "text/html"),
    ("truncated_next", 201, "application/json"),
    ("unauthorized_next", 401, "application/json"),
    ("forbidden_next", 403, "application/json"),
    ("bare_not_found_next", 404, "text/plain"),
]


@pytest.mark.parametrize(("kind", "status", "content_type"), CANNED)
def test_canned_answers_replace_the_answer_and_record_nothing(
    client: httpx.Client, fake: FakeCommet, kind: str, status: int, content_type: str
) -> None:
    """Each canned fault answers its status and content type n times, then Commet answers again;
    the faulted events are not recorded (they never reached Commet)."""
    getattr(fake.faults, kind)(2)
    faulted = [client.post(EVENTS, json={**EVENT, "eventId": f"e{i}"}) for i in range(2)]
    assert [r.status_code for r in faulted] == [status, status]
    assert all(r.headers["content-type"].startswith(content_type) for r in faulted)
    assert fake.events() == []
    assert client.post(EVENTS, json={**EVENT, "eventId": "e0"}).status_code == 201
    assert [e.idempotency_key for e in fake.events()] == ["e0"]
    assert fake.faults.injected == {kind: 2}
    assert [r.fault for r in fake.requests] == [kind, kind, None]


def test_canned_answers_are_not_commets_answers(client: httpx.Client, fake: FakeCommet) -> None:
    """HTML 200 is a page, truncated 201 is not JSON, 401/403 carry Commet's codes, the bare 404
    carries no error code at all."""
    for kind, _, _ in CANNED:
        getattr(fake.faults, kind)()
    html, truncated, unauthorized, forbidden, bare = (
        client.post(EVENTS, json=EVENT) for _ in CANNED
    )
    assert html.text.lstrip().lower().startswith("<!doctype html>")
    with pytest.raises(ValueError):  # noqa: PT011 - json's own error
        truncated.json()
    assert truncated.content.startswith(b'{"id":')
    assert error_of(unauthorized)["code"] == "unauthorized"
    assert error_of(forbidden)["code"] == "forbidden"
    assert b"error" not in bare.content
    assert fake.events() == []


def test_canned_answers_apply_to_quota_changes_and_keep_their_order(
    client: httpx.Client, fake: FakeCommet
) -> None:
    """Canned faults are used up in the order they were armed, on any request, writing nothing."""
    fake.faults.truncated_next(1)
    fake.faults.unauthorized_next(1)
    quota = {**EVENT, "featureCode": "tasks"}
    statuses = [client.post("/api/v1/usage/quota", json=quota).status_code for _ in range(3)]
    assert statuses == [201, 401, 200]
    assert fake.quota("user_123", "tasks").current == 1


def test_clear_disarms_canned_answers(client: httpx.Client, fake: FakeCommet) -> None:
    """clear() removes armed canned answers too."""
    fake.faults.html_next(3)
    assert fake.faults.pending()["html_next"] == 3
    fake.faults.clear()
    assert fake.faults.pending()["html_next"] == 0
    assert client.post(EVENTS, json=EVENT).status_code == 201


@pytest.mark.server
def test_canned_answers_are_armed_from_the_dashboard(fake: FakeCommet) -> None:
    """POST /_emulator/faults/<kind> arms each canned answer over HTTP, like the other faults."""
    with fake.serve() as url, httpx.Client(base_url=url, timeout=5) as dashboard:
        for kind, status, _ in CANNED:
            control = kind.replace("_", "-")
            armed = dashboard.post(f"/_emulator/faults/{control}", json={"n": 1})
            assert armed.json()["faults"][kind] == 1
            answer = dashboard.post(EVENTS, json=EVENT, headers=HEADERS)
            assert answer.status_code == status
        refused = dashboard.post("/_emulator/faults/html-next", json={"n": 0})
        assert refused.status_code == 400
    assert fake.events() == []
