"""Usage events through httpx, in both dialects, in-process and over a real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from emulator_helpers import Dialect, error_of

from commet_middleware.testing import LEGACY_SUNSET, FakeCommet


def test_records_event_with_usage_event_shape(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """An accepted event answers 201 with the UsageEvent shape and is recorded."""
    body = dialect.event(key="k1", value=2.5, properties={"route": "/x"})
    response = client.post(dialect.events, json=body)
    assert response.status_code == 201
    data = response.json()
    assert data["id"].startswith("evt_")
    assert data["featureCode"] == "api_calls"
    assert data["value"] == 2.5
    assert data["customerId"] == "user_123"
    assert data["eventId"] == "k1"
    assert data["object"] == "usage_event"
    assert data["livemode"] is False
    assert data["properties"] == dialect.properties({"route": "/x"})
    assert data["ts"].endswith("Z")
    assert data["createdAt"].endswith("Z")
    [event] = fake.events()
    assert (event.customer_id, event.feature, event.value) == ("user_123", "api_calls", 2.5)
    assert event.idempotency_key == "k1"
    assert event.properties == {"route": "/x"}
    assert event.dialect == dialect.name
    assert fake.usage_total("user_123", "api_calls") == 2.5


def test_value_defaults_to_one_and_totals_add_up(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """A missing value counts 1, and totals are per customer and per feature."""
    client.post(dialect.events, json=dialect.event())
    client.post(dialect.events, json=dialect.event(value=0.5))
    client.post(dialect.events, json=dialect.event("ai_tokens", value=100))
    client.post(dialect.events, json=dialect.event(customer="user_free"))
    assert fake.usage_total("user_123", "api_calls") == 1.5
    assert fake.usage_total("user_123", "ai_tokens") == 100
    assert fake.usage_total("user_free", "api_calls") == 1
    assert len(fake.events(customer_id="user_123")) == 3
    assert len(fake.events(feature="api_calls")) == 3


def test_timestamp_is_normalised_to_utc(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """An ISO 8601 timestamp with an offset is kept, expressed in UTC."""
    body = dialect.event(timestamp="2026-01-15T12:00:00+02:00")
    assert client.post(dialect.events, json=body).json()["ts"] == "2026-01-15T10:00:00.000Z"
    assert fake.events()[0].timestamp == "2026-01-15T10:00:00.000Z"


BAD_EVENT_FIELDS: list[tuple[str, Any]] = [
    ("customerId", None),
    ("customerId", ""),
    ("customerId", 12),
    ("FEATURE", None),
    ("FEATURE", "Api-Calls"),
    ("FEATURE", "api calls"),
    ("FEATURE", 7),
    ("value", -1),
    ("value", "1"),
    ("value", True),
    ("value", [1]),
    ("timestamp", "yesterday"),
    ("timestamp", "2026-13-01T00:00:00Z"),
    ("timestamp", "2026-01-15"),
    ("timestamp", 1700000000),
    ("KEY", ""),
    ("KEY", 5),
]


@pytest.mark.parametrize(("field", "bad"), BAD_EVENT_FIELDS)
def test_invalid_event_field_is_validation_error(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect, field: str, bad: Any
) -> None:
    """Each invalid field answers 400 validation_error naming it in param and details."""
    name = {"FEATURE": dialect.feature_key, "KEY": dialect.event_key}.get(field, field)
    body = dialect.event(key="k")
    if bad is None:
        del body[name]
    else:
        body[name] = bad
    response = client.post(dialect.events, json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["code"], error["param"]) == (
        "validation_error",
        "validation_error",
        name,
    )
    assert error["details"][0]["field"] == name
    assert fake.events() == []


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_value_is_rejected(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect, token: str
) -> None:
    """NaN and infinite values, which Python's JSON parser accepts, are rejected."""
    raw = f'{{"{dialect.feature_key}": "api_calls", "customerId": "user_123", "value": {token}}}'
    response = client.post(
        dialect.events, content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert error_of(response)["param"] == "value"
    assert fake.events() == []


def test_properties_must_be_strings_in_the_dialect_shape(
    client: httpx.Client, dialect: Dialect
) -> None:
    """Properties in the other dialect's shape, or with non-string values, are rejected."""
    other = Dialect("legacy" if dialect.name == "v1" else "v1")
    bad_shapes: list[Any] = [
        other.properties({"a": "b"}),
        [{"property": "a", "value": 1}] if dialect.name == "v1" else {"a": 1},
        "a=b",
    ]
    if dialect.name == "v1":
        bad_shapes.append([{"property": "a", "value": "b", "extra": "c"}])
    for shape in bad_shapes:
        body = dialect.event()
        body["properties"] = shape
        response = client.post(dialect.events, json=body)
        assert response.status_code == 400, shape
        assert error_of(response)["param"] == "properties"


def test_other_dialects_keys_are_unknown_fields(client: httpx.Client, dialect: Dialect) -> None:
    """A body in the wrong dialect is rejected instead of silently losing its key."""
    other = Dialect("legacy" if dialect.name == "v1" else "v1")
    response = client.post(dialect.events, json=other.event(key="k"))
    assert response.status_code == 400
    fields = {d["field"] for d in error_of(response)["details"]}
    assert {other.feature_key, other.event_key, dialect.feature_key} <= fields


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe"])
def test_body_that_is_not_json_is_invalid_json(
    client: httpx.Client, dialect: Dialect, raw: bytes
) -> None:
    """A body that does not parse answers 400 validation_error/invalid_json."""
    response = client.post(dialect.events, content=raw)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["code"]) == ("validation_error", "invalid_json")


def test_json_that_is_not_an_object_is_validation_error(
    client: httpx.Client, dialect: Dialect
) -> None:
    """A JSON array or string body answers 400 validation_error."""
    response = client.post(dialect.events, json=["api_calls"])
    assert response.status_code == 400
    assert error_of(response)["code"] == "validation_error"


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "sk_live_nope"}, {"x-api-key": "ck_"}])
def test_missing_or_bad_key_is_unauthorized(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect, headers: dict[str, str]
) -> None:
    """Without a ck_/rk_ key the answer is 401 authentication_error/unauthorized."""
    del client.headers["x-api-key"]
    response = client.post(dialect.events, json=dialect.event(), headers=headers)
    assert response.status_code == 401
    error = error_of(response)
    assert (error["type"], error["code"]) == ("authentication_error", "unauthorized")
    assert fake.events() == []


def test_configured_api_keys_are_the_only_ones_accepted() -> None:
    """FakeCommet(api_keys=...) accepts exactly those keys."""
    fake = FakeCommet(api_keys={"ck_good"})
    fake.add_feature("api_calls")
    fake.add_customer("c1")
    with httpx.Client(transport=fake.transport, base_url="https://commet.co") as c:
        body = {"featureCode": "api_calls", "customerId": "c1"}
        bad = c.post("/api/v1/usage/events", json=body, headers={"x-api-key": "ck_other"})
        good = c.post("/api/v1/usage/events", json=body, headers={"x-api-key": "ck_good"})
        restricted = c.post("/api/v1/usage/events", json=body, headers={"x-api-key": "rk_x"})
    assert (bad.status_code, good.status_code, restricted.status_code) == (401, 201, 401)


@pytest.mark.parametrize(
    ("feature", "customer", "status", "type_", "code"),
    [
        ("api_calls", "nobody", 404, "not_found_error", "customer_not_found"),
        ("no_such_feature", "user_123", 404, "not_found_error", "feature_not_found"),
        ("api_calls", "user_unsubscribed", 404, "not_found_error", "no_active_subscription"),
        ("ai_tokens", "user_free", 400, "billing_error", "feature_not_in_plan"),
        ("tasks", "user_123", 400, "validation_error", "validation_error"),
    ],
)
def test_catalogue_errors(
    client: httpx.Client,
    fake: FakeCommet,
    dialect: Dialect,
    feature: str,
    customer: str,
    status: int,
    type_: str,
    code: str,
) -> None:
    """Unknown customer or feature, no subscription, off-plan or quota feature: documented codes."""
    response = client.post(dialect.events, json=dialect.event(feature, customer))
    assert response.status_code == status
    error = error_of(response)
    assert (error["type"], error["code"]) == (type_, code)
    assert fake.events() == []


def test_commet_customer_id_is_accepted(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """A customer can be named by its cus_ id as well as its own id."""
    commet_id = fake.add_customer("ext_42")
    response = client.post(dialect.events, json=dialect.event(customer=commet_id))
    assert response.status_code == 201
    assert fake.usage_total("ext_42", "api_calls") == 1


def test_duplicate_key_for_same_customer_is_conflict(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """A key already recorded for the customer answers 409 conflict_error/duplicate."""
    assert client.post(dialect.events, json=dialect.event(key="dup")).status_code == 201
    response = client.post(dialect.events, json=dialect.event(key="dup", value=5))
    assert response.status_code == 409
    error = error_of(response)
    assert (error["type"], error["code"]) == ("conflict_error", "duplicate")
    assert fake.usage_total("user_123", "api_calls") == 1


def test_same_key_for_another_customer_is_a_new_event(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """Event keys are per customer: the same key for another customer is recorded."""
    assert client.post(dialect.events, json=dialect.event(key="k")).status_code == 201
    other = dialect.event(customer="user_free", key="k")
    assert client.post(dialect.events, json=other).status_code == 201
    assert len(fake.events()) == 2


def test_every_answer_has_a_request_id_and_is_logged(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """Success and error answers all carry x-request-id, and the log matches them."""
    responses = [
        client.post(dialect.events, json=dialect.event()),
        client.post(dialect.events, content=b"{"),
        client.get(dialect.quota, params={"customerId": "nobody", "featureCode": "tasks"}),
        client.get("/api/v1/nothing"),
    ]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(i.startswith("req_") for i in ids)
    assert len(set(ids)) == 4
    assert [(r.request_id, r.status) for r in fake.requests] == [
        (r.headers["x-request-id"], r.status_code) for r in responses
    ]


def test_legacy_answers_announce_deprecation(client: httpx.Client, dialect: Dialect) -> None:
    """Legacy answers (errors too) carry Deprecation, Sunset and a successor Link; v1 do not."""
    ok = client.post(dialect.events, json=dialect.event())
    bad = client.post(dialect.events, content=b"[")
    for response in (ok, bad):
        if dialect.name == "legacy":
            assert response.headers["deprecation"] == "true"
            assert response.headers["sunset"] == LEGACY_SUNSET
            assert response.headers["link"] == '</api/v1/usage/events>; rel="successor-version"'
        else:
            assert "deprecation" not in response.headers
            assert "link" not in response.headers


def test_unknown_route_and_wrong_method(client: httpx.Client) -> None:
    """An unknown path is 404 not_found; a wrong method on a known one is 405 with Allow."""
    missing = client.post("/api/v1/usage/nothing", json={})
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    wrong = client.get("/api/v1/usage/events")
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
