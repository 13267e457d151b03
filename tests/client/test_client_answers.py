"""Only Commet's documented answer counts: a 2xx of any other shape is a transient failure."""

from __future__ import annotations

import json

import httpx
import pytest
from commet_script import QUOTA_EVENT, SECRET, USAGE_EVENT, Sleeps

from commet_middleware import (
    CommetAPIError,
    CommetClient,
    CommetSettings,
    QuotaChange,
    QuotaChangeResult,
    TrackResult,
    UsageEvent,
)
from commet_middleware._retry import classify, configuration_hint
from commet_middleware._wire import build_request, parse_operation, parse_quota_change, parse_track
from commet_middleware.testing import FakeCommet

HTML = b"<!DOCTYPE html><html><body>Sign in</body></html>"
EVENT = UsageEvent.create("cus_1", "api_calls", idempotency_key="key_1")


def body(payload: object) -> bytes:
    return json.dumps(payload).encode()


NOT_AN_EVENT = [
    pytest.param(200, {"content-type": "text/html"}, HTML, id="html-200"),
    pytest.param(201, {}, body(USAGE_EVENT)[:40], id="truncated-201"),
    pytest.param(201, {}, b"", id="empty-201"),
    pytest.param(200, {}, body({}), id="empty-object"),
    pytest.param(200, {}, body([USAGE_EVENT]), id="a-list"),
    pytest.param(200, {}, body({"status": "ok"}), id="other-json"),
    pytest.param(200, {}, body({**USAGE_EVENT, "object": "usage_quota_event"}), id="wrong-object"),
    pytest.param(200, {}, body({"success": True, "data": None}), id="empty-envelope"),
    pytest.param(200, {}, body({"success": True, "data": {"ok": 1}}), id="envelope-other"),
]


@pytest.mark.parametrize(("status", "headers", "payload"), NOT_AN_EVENT)
def test_track_refuses_a_2xx_that_is_not_a_usage_event(
    status: int, headers: dict[str, str], payload: bytes
) -> None:
    """parse_track raises a retryable invalid_response for a 2xx that is not a UsageEvent."""
    with pytest.raises(CommetAPIError) as caught:
        parse_track(status, {"x-request-id": "req_x", **headers}, payload, event=EVENT)
    error = caught.value
    assert (error.status, error.code, error.request_id) == (status, "invalid_response", "req_x")
    assert error.retryable
    assert classify(error) == "transient"
    assert configuration_hint(error) == ""


@pytest.mark.parametrize(
    ("status", "headers", "payload"), [p for p in NOT_AN_EVENT if p.id != "wrong-object"]
)
def test_quota_change_refuses_a_2xx_that_is_not_a_quota_event(
    status: int, headers: dict[str, str], payload: bytes
) -> None:
    """parse_quota_change raises the same transient error for a 2xx that is not a
    UsageQuotaEvent (a UsageEvent is not one either)."""
    with pytest.raises(CommetAPIError) as caught:
        parse_quota_change(status, headers, payload)
    assert (caught.value.code, caught.value.retryable) == ("invalid_response", True)
    with pytest.raises(CommetAPIError):
        parse_quota_change(200, {}, body(USAGE_EVENT))


def test_the_error_says_what_came_back_without_the_key() -> None:
    """The message names the content type and the start of the body, with the key scrubbed."""
    page = b"<html>key " + SECRET.encode() + b" rejected</html>"
    with pytest.raises(CommetAPIError) as caught:
        parse_track(200, {"Content-Type": "text/html"}, page, secret=SECRET)
    text = str(caught.value)
    assert "text/html" in text
    assert "<html>key [redacted]" in text
    assert SECRET not in text
    assert SECRET not in repr(caught.value)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(USAGE_EVENT, id="bare"),
        pytest.param({"success": True, "data": USAGE_EVENT}, id="envelope"),
        pytest.param({k: v for k, v in USAGE_EVENT.items() if k != "object"}, id="no-object"),
        pytest.param(
            {"id": "e1", "feature": "api_calls", "customerId": "cus_1", "value": 1},
            id="legacy-keys",
        ),
    ],
)
def test_documented_usage_events_are_delivered(payload: object) -> None:
    """A UsageEvent counts, bare, in the envelope, or without ``object`` if it names the event."""
    result = parse_track(201, {}, body(payload), event=EVENT)
    assert isinstance(result, TrackResult)
    assert result.id in ("evt_1", "e1")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(QUOTA_EVENT, id="bare"),
        pytest.param({"success": True, "data": QUOTA_EVENT}, id="envelope"),
        pytest.param({k: v for k, v in QUOTA_EVENT.items() if k != "object"}, id="no-object"),
    ],
)
def test_documented_quota_events_are_delivered(payload: object) -> None:
    """A UsageQuotaEvent counts, bare, in the envelope, or without ``object``."""
    result = parse_quota_change(200, {}, body(payload))
    assert (result.id, result.new_balance) == ("uqe_1", 8)


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_the_emulators_answers_are_documented_answers(dialect: str) -> None:
    """What the emulator answers to a track and to each quota change parses as delivered, in
    both dialects (its raw answers, fed to the wire parser)."""
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_feature("tasks", quota=True, included=5, overage=True)
    fake.add_customer("cus_1")
    settings = CommetSettings(api_key=SECRET, dialect=dialect)  # type: ignore[arg-type]
    operations = [
        UsageEvent.create("cus_1", "api_calls", 2, idempotency_key="k", properties={"a": "b"}),
        QuotaChange.create("cus_1", "tasks", "add", 3, idempotency_key="q1"),
        QuotaChange.create("cus_1", "tasks", "remove", 1, idempotency_key="q2"),
        QuotaChange.create("cus_1", "tasks", "set", 4, idempotency_key="q3"),
    ]
    with httpx.Client(transport=fake.transport, base_url="https://c.test") as http:
        for operation in operations:
            request = build_request(operation, settings)
            reply = http.request(
                request.method, request.path, headers=request.headers, content=request.body
            )
            assert reply.status_code in (200, 201)
            result = parse_operation(operation, reply.status_code, reply.headers, reply.content)
            assert isinstance(result, (TrackResult, QuotaChangeResult))
            assert result.id
    assert fake.quota("cus_1", "tasks").current == 4


# --- end to end, through the emulator's canned-answer faults -----------------------------------


@pytest.fixture
def fake() -> FakeCommet:
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_feature("tasks", quota=True, included=5)
    fake.add_customer("cus_1")
    return fake


def client_for(fake: FakeCommet, sleeps: Sleeps, **changes: object) -> CommetClient:
    settings = CommetSettings(api_key=SECRET, transport=fake.transport, base_url="https://c.test")
    return CommetClient(settings.replace(**changes), sleep=sleeps, random=lambda: 1.0)


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_html_and_truncated_answers_are_retried_until_commet_records(
    fake: FakeCommet, sleeps: Sleeps, dialect: str
) -> None:
    """An HTML 200 then a truncated 201 are retried with the same bytes; the event is recorded
    exactly once, by the third attempt."""
    fake.faults.html_next(1)
    fake.faults.truncated_next(1)
    with client_for(fake, sleeps, dialect=dialect) as client:
        result = client.track("cus_1", "api_calls", 3, idempotency_key="ev_1")
    assert result.id is not None
    assert sleeps.waits == [0.5, 1.0]
    assert [e.idempotency_key for e in fake.events()] == ["ev_1"]
    assert fake.usage_total("cus_1", "api_calls") == 3


def test_send_once_raises_on_an_html_answer_and_nothing_is_recorded(
    fake: FakeCommet, sleeps: Sleeps
) -> None:
    """send_once never reports delivered on an HTML 200: it raises a transient error."""
    fake.faults.html_next(1)
    with client_for(fake, sleeps) as client, pytest.raises(CommetAPIError) as caught:
        client.send_once(EVENT)
    assert classify(caught.value) == "transient"
    assert fake.events() == []


@pytest.mark.parametrize(
    ("fault", "status", "fix"),
    [
        ("unauthorized_next", 401, "check COMMET_API_KEY"),
        ("forbidden_next", 403, "use a secret ck_ key"),
        (
            "bare_not_found_next",
            404,
            "404 without a Commet error code at POST /api/v1/usage/events: "
            "check COMMET_BASE_URL (now https://c.test)",
        ),
    ],
)
def test_configuration_failures_are_raised_at_once_with_their_fix(
    fake: FakeCommet, sleeps: Sleeps, fault: str, status: int, fix: str
) -> None:
    """401, 403 and a bare 404 are configuration failures: not retried in a call, and the hint
    names the fix and never the key."""
    getattr(fake.faults, fault)(1)
    with client_for(fake, sleeps) as client, pytest.raises(CommetAPIError) as caught:
        client.track("cus_1", "api_calls", idempotency_key="ev_1")
    assert caught.value.status == status
    assert classify(caught.value) == "configuration"
    hint = configuration_hint(caught.value)
    assert fix in hint
    assert SECRET not in hint
    assert sleeps.waits == []
    assert fake.events() == []
