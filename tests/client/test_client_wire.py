"""The sans-I/O wire module: exact requests for both dialects and every answer parsed right."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from commet_script import ERROR_ROWS, QUOTA_EVENT, SECRET, USAGE_EVENT, USAGE_QUOTA

from commet_middleware import CommetAPIError, CommetSettings, QuotaChange, UsageEvent
from commet_middleware._wire import (
    build_get_all_quotas,
    build_get_quota,
    build_request,
    encode_body,
    is_deprecated,
    parse_all_quotas,
    parse_error,
    parse_quota,
    parse_quota_change,
    parse_track,
    request_idempotency_key,
)

V1 = CommetSettings(api_key=SECRET)
LEGACY = CommetSettings(api_key=SECRET, dialect="legacy")
EVENT = UsageEvent.create(
    "cus_1",
    "api_calls",
    2.5,
    idempotency_key="key_1",
    timestamp="2026-01-15T10:00:00.000Z",
    properties={"route": "/x", "method": "GET"},
)
PLAIN_EVENT = UsageEvent.create(
    "cus_1", "api_calls", idempotency_key="key_2", timestamp="2026-01-15T10:00:00.000Z"
)


def change(action: str, count: int = 5) -> QuotaChange:
    return QuotaChange.create("cus_1", "tasks", action, count, idempotency_key="qkey")  # type: ignore[arg-type]


def body(payload: object) -> bytes:
    return json.dumps(payload).encode()


def test_v1_track_request_matches_the_reference() -> None:
    """v1 track: POST /api/v1/usage/events, the four headers, eventId = key, list properties."""
    request = build_request(EVENT, V1)
    assert (request.method, request.path, request.params) == ("POST", "/api/v1/usage/events", ())
    headers = dict(request.headers)
    assert headers["Commet-Version"] == "2026-08-27"
    assert headers["x-api-key"] == SECRET
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == request_idempotency_key(EVENT)
    assert request.body == (
        b'{"featureCode":"api_calls","customerId":"cus_1","value":2.5,"eventId":"key_1",'
        b'"timestamp":"2026-01-15T10:00:00.000Z","properties":[{"property":"method","value":"GET"},'
        b'{"property":"route","value":"/x"}]}'
    )


def test_v1_track_omits_empty_properties() -> None:
    """An event without properties sends no properties key at all."""
    assert b"properties" not in encode_body(PLAIN_EVENT, "v1")


def test_legacy_track_request_matches_the_seed() -> None:
    """Legacy track: /api/usage/events with feature, idempotencyKey and an object of properties."""
    request = build_request(EVENT, LEGACY)
    assert (request.method, request.path) == ("POST", "/api/usage/events")
    assert "Commet-Version" not in dict(request.headers)
    assert dict(request.headers)["x-api-key"] == SECRET
    assert request.body == (
        b'{"feature":"api_calls","customerId":"cus_1","value":2.5,"idempotencyKey":"key_1",'
        b'"timestamp":"2026-01-15T10:00:00.000Z","properties":{"method":"GET","route":"/x"}}'
    )


@pytest.mark.parametrize(
    ("action", "method", "path"),
    [
        ("add", "POST", "/api/v1/usage/quota"),
        ("remove", "POST", "/api/v1/usage/quota/remove"),
        ("set", "PUT", "/api/v1/usage/quota"),
    ],
)
def test_v1_quota_changes(action: str, method: str, path: str) -> None:
    """v1 quota add/remove/set use the documented method and path, key in Idempotency-Key."""
    request = build_request(change(action), V1)
    assert (request.method, request.path) == (method, path)
    assert dict(request.headers)["Idempotency-Key"] == request_idempotency_key(change(action))
    assert request.body == b'{"featureCode":"tasks","count":5,"customerId":"cus_1"}'


@pytest.mark.parametrize(
    ("action", "method"), [("add", "POST"), ("remove", "DELETE"), ("set", "PUT")]
)
def test_legacy_quota_changes(action: str, method: str) -> None:
    """Legacy quota add/remove/set are POST/DELETE/PUT /api/usage/quota with count."""
    request = build_request(change(action), LEGACY)
    assert (request.method, request.path) == (method, "/api/usage/quota")
    assert request.body == b'{"customerId":"cus_1","featureCode":"tasks","count":5}'


@pytest.mark.parametrize(
    ("settings", "one", "every"),
    [
        (V1, "/api/v1/usage/quota", "/api/v1/usage/quota/all"),
        (LEGACY, "/api/usage/quota", "/api/usage/quota/all"),
    ],
)
def test_quota_reads(settings: CommetSettings, one: str, every: str) -> None:
    """Quota reads are GETs with customerId (and featureCode) in the query and no body."""
    single = build_get_quota("cus_1", "tasks", settings)
    assert (single.method, single.path, single.body) == ("GET", one, None)
    assert single.params == (("customerId", "cus_1"), ("featureCode", "tasks"))
    assert "Idempotency-Key" not in dict(single.headers)
    listing = build_get_all_quotas("cus_1", settings)
    assert (listing.method, listing.path, listing.params) == (
        "GET",
        every,
        (("customerId", "cus_1"),),
    )


def test_encoding_is_deterministic() -> None:
    """The same operation always encodes to the same bytes, and build_request reuses given bytes."""
    assert encode_body(EVENT) == encode_body(EVENT) == build_request(EVENT, V1).body
    cached = b'{"cached":true}'
    assert build_request(EVENT, V1, body=cached).body == cached


def test_wire_request_repr_hides_the_key() -> None:
    """A WireRequest repr leaves the headers, and so the key, out."""
    assert SECRET not in repr(build_request(EVENT, V1))


def test_track_success_parses_the_usage_event() -> None:
    """A 201 UsageEvent becomes a TrackResult with every field and the request id."""
    result = parse_track(201, {"x-request-id": "req_9"}, body(USAGE_EVENT))
    assert result.id == "evt_1"
    assert (result.feature_code, result.value, result.customer_id) == ("api_calls", 1, "cus_1")
    assert (result.event_id, result.ts) == ("key_1", "2026-01-15T10:00:00.000Z")
    assert result.created_at == "2026-01-15T10:00:00.100Z"
    assert result.properties == (("path", "/x"),)
    assert (result.duplicate, result.replayed, result.request_id) == (False, False, "req_9")


def test_track_envelope_is_unwrapped() -> None:
    """A {"success": true, "data": {...}} answer is read from inside the envelope."""
    result = parse_track(200, {}, body({"success": True, "data": USAGE_EVENT}))
    assert result.id == "evt_1"


def test_duplicate_is_delivered() -> None:
    """A 409 duplicate on a usage event is a TrackResult with duplicate=True, not an error."""
    answer = body({"error": {"type": "conflict_error", "code": "duplicate", "message": "dup"}})
    result = parse_track(409, {"x-request-id": "req_d"}, answer, event=EVENT)
    assert result.duplicate
    assert (result.request_id, result.event_id, result.customer_id) == ("req_d", "key_1", "cus_1")


def test_replayed_answer_is_flagged() -> None:
    """Idempotent-Replayed: true marks track and quota results as replayed."""
    headers = {"Idempotent-Replayed": "true"}
    assert parse_track(200, headers, body(USAGE_EVENT)).replayed
    assert parse_quota_change(200, headers, body(QUOTA_EVENT)).replayed


def test_quota_change_parses_the_usage_quota_event() -> None:
    """A UsageQuotaEvent becomes a QuotaChangeResult with the balances."""
    result = parse_quota_change(200, {"x-request-id": "r"}, body(QUOTA_EVENT))
    assert (result.id, result.customer_id, result.feature_code) == ("uqe_1", "cus_1", "tasks")
    assert (result.previous_balance, result.new_balance) == (3, 8)
    assert result.created_at == "2026-01-15T10:00:00.100Z"


def test_quota_read_parses_the_usage_quota() -> None:
    """A UsageQuota becomes a QuotaAllowance."""
    allowance = parse_quota(200, {}, body(USAGE_QUOTA))
    assert allowance.feature_code == "tasks"
    assert (allowance.current, allowance.included, allowance.remaining) == (30, 50, 20)
    assert (allowance.billed_quantity, allowance.unlimited, allowance.overage_enabled) == (
        0,
        False,
        True,
    )
    assert allowance.as_of == "2026-01-15T10:00:00.000Z"


def test_all_quotas_reads_the_list_object() -> None:
    """The v1 list object, a bare list and an envelope all give the allowances."""
    unlimited = {**USAGE_QUOTA, "featureCode": "seats", "unlimited": True, "remaining": None}
    listing = {"object": "list", "data": [USAGE_QUOTA, unlimited], "hasMore": False}
    for payload in (listing, [USAGE_QUOTA, unlimited], {"success": True, "data": listing}):
        allowances = parse_all_quotas(200, {}, body(payload))
        assert [a.feature_code for a in allowances] == ["tasks", "seats"]
        assert allowances[1].remaining is None


def test_quota_read_rejects_a_body_that_is_not_a_quota() -> None:
    """A 200 that is not JSON is a transient invalid_response error, not a made-up allowance."""
    with pytest.raises(CommetAPIError) as caught:
        parse_quota(200, {}, b"<html>")
    assert caught.value.code == "invalid_response"
    # One rule for every 2xx that is not Commet's answer: worth another try (see _retry).
    assert caught.value.retryable


@pytest.mark.parametrize(("status", "code", "headers", "retryable"), ERROR_ROWS)
def test_error_table_classification(
    status: int, code: str, headers: dict[str, str], retryable: bool
) -> None:
    """Each error of the reference table parses with its code and the documented retry rule."""
    payload = {
        "error": {
            "type": "some_error",
            "code": code,
            "message": "it went wrong",
            "param": "featureCode",
            "details": [{"field": "featureCode", "message": "bad"}],
            "doc_url": "https://commet.co/docs/errors",
        }
    }
    error = parse_error(status, {"x-request-id": "req_e", **headers}, body(payload))
    assert (error.status, error.code, error.type) == (status, code, "some_error")
    assert (error.message, error.param, error.request_id) == (
        "it went wrong",
        "featureCode",
        "req_e",
    )
    assert error.details == [{"field": "featureCode", "message": "bad"}]
    assert error.retryable is retryable
    assert error.retry_after == (2.0 if headers else None)


def test_error_keys_at_top_level_are_read() -> None:
    """An error body with type/code/message at the top level parses like the nested one."""
    payload = {"type": "conflict_error", "code": "idempotency_in_progress", "message": "busy"}
    error = parse_error(409, {}, body(payload))
    assert (error.type, error.code, error.message, error.retryable) == (
        "conflict_error",
        "idempotency_in_progress",
        "busy",
        True,
    )


def test_error_with_a_string_error_and_a_non_json_body() -> None:
    """{"error": "text"} and an HTML gateway page still give a useful, classified error."""
    assert parse_error(401, {}, body({"error": "Unauthorized"})).message == "Unauthorized"
    gateway = parse_error(502, {}, b"<html>Bad Gateway</html>")
    assert gateway.retryable
    assert gateway.code is None


def test_retry_after_as_http_date() -> None:
    """A Retry-After given as an HTTP date becomes the seconds until then."""
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=120), usegmt=True)
    error = parse_error(429, {"Retry-After": later}, b"")
    assert error.retryable
    assert error.retry_after is not None
    assert 100 < error.retry_after <= 120


def test_retry_after_on_a_503_is_kept() -> None:
    """A retryable 503 that names its wait keeps it; a non-retryable 400 does not."""
    assert parse_error(503, {"Retry-After": "4"}, b"").retry_after == 4.0
    assert parse_error(400, {"Retry-After": "4"}, b"").retry_after is None


def test_echoed_key_is_scrubbed() -> None:
    """If Commet echoes the key in a message, the parsed error shows [redacted] instead."""
    payload = {"error": {"code": "unauthorized", "message": f"bad key {SECRET}"}}
    error = parse_error(401, {}, body(payload), secret=SECRET)
    assert SECRET not in str(error)
    assert SECRET not in repr(error)
    assert "[redacted]" in str(error)


def test_deprecation_header() -> None:
    """Deprecation: true (any case) is recognised; its absence is not deprecation."""
    assert is_deprecated({"deprecation": "true"})
    assert is_deprecated({"Deprecation": "True"})
    assert not is_deprecated({})


def test_request_key_is_scoped_by_customer() -> None:
    """One event key for two customers makes two request keys; the same pair makes the same one."""
    a = UsageEvent.create("cus_a", "api_calls", idempotency_key="k", timestamp="t")
    b = UsageEvent.create("cus_b", "api_calls", idempotency_key="k", timestamp="t")
    again = UsageEvent.create("cus_a", "api_calls", 2, idempotency_key="k", timestamp="u")
    assert request_idempotency_key(a) != request_idempotency_key(b)
    assert request_idempotency_key(a) == request_idempotency_key(again)
    assert request_idempotency_key(a).startswith("cm_")
    assert len(request_idempotency_key(a)) == 35


def test_a_key_mismatch_on_a_usage_event_means_already_recorded() -> None:
    """409 idempotency_key_mismatch on track: this customer's event key was already sent."""
    body = b'{"error":{"type":"conflict_error","code":"idempotency_key_mismatch"}}'
    result = parse_track(409, {"x-request-id": "req_1"}, body)
    assert result.duplicate
