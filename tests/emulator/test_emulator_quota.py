"""Quota add, remove, set and reads through httpx, in both dialects, in-process and served."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from emulator_helpers import Dialect, error_of

from commet_middleware.testing import FakeCommet


def quota_body(
    feature: str = "tasks", count: Any = 1, customer: str = "user_123"
) -> dict[str, Any]:
    """Return a quota mutation body (the same keys in both dialects)."""
    return {"customerId": customer, "featureCode": feature, "count": count}


def test_add_answers_usage_quota_event(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """Adding answers 200 with the UsageQuotaEvent shape and moves the balance."""
    response = client.post(dialect.quota, json=quota_body(count=5))
    assert response.status_code == 200
    data = response.json()
    assert data["id"].startswith("uqe_")
    assert data["object"] == "usage_quota_event"
    assert (data["customerId"], data["featureCode"]) == ("user_123", "tasks")
    assert (data["previousBalance"], data["newBalance"]) == (0, 5)
    assert data["livemode"] is False
    assert data["ts"].endswith("Z")
    assert data["createdAt"].endswith("Z")
    assert fake.quota("user_123", "tasks").current == 5
    [event] = fake.quota_events()
    assert (event.action, event.count, event.new_balance) == ("add", 5, 5)


def test_add_and_remove_default_to_one(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """A missing count means 1 for add and for remove."""
    body = {"customerId": "user_123", "featureCode": "tasks"}
    client.post(dialect.quota, json=body)
    client.post(dialect.quota, json=body)
    assert dialect.remove(client, body).status_code == 200
    assert fake.quota("user_123", "tasks").current == 1


def test_v1_remove_has_two_spellings(client: httpx.Client, fake: FakeCommet) -> None:
    """v1 removes with POST /quota/remove and with DELETE /quota."""
    client.post("/api/v1/usage/quota", json=quota_body(count=5))
    assert client.post("/api/v1/usage/quota/remove", json=quota_body(count=2)).status_code == 200
    assert (
        client.request("DELETE", "/api/v1/usage/quota", json=quota_body(count=1)).status_code == 200
    )
    assert fake.quota("user_123", "tasks").current == 2


def test_set_replaces_the_balance_and_requires_count(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """PUT sets the exact balance; without count it is a validation error."""
    response = client.put(dialect.quota, json=quota_body(count=7))
    assert response.json()["newBalance"] == 7
    assert client.put(dialect.quota, json=quota_body(count=3)).json()["previousBalance"] == 7
    missing = client.put(dialect.quota, json={"customerId": "user_123", "featureCode": "tasks"})
    assert missing.status_code == 400
    assert error_of(missing)["param"] == "count"
    assert fake.quota("user_123", "tasks").current == 3


def test_get_answers_usage_quota(client: httpx.Client, dialect: Dialect) -> None:
    """GET answers the UsageQuota shape with remaining and billedQuantity."""
    client.post(dialect.quota, json=quota_body(count=4))
    response = client.get(dialect.quota, params={"customerId": "user_123", "featureCode": "tasks"})
    assert response.status_code == 200
    data = response.json()
    assert data["asOf"].endswith("Z")
    del data["asOf"]
    assert data == {
        "featureCode": "tasks",
        "current": 4,
        "included": 10,
        "remaining": 6,
        "billedQuantity": 0,
        "unlimited": False,
        "overageEnabled": True,
        "object": "usage_quota",
        "livemode": False,
    }


def test_get_all_lists_the_plans_quota_features(client: httpx.Client, dialect: Dialect) -> None:
    """GET /quota/all answers a list of every quota feature in the customer's plan."""
    data = client.get(dialect.quota_all, params={"customerId": "user_123"}).json()
    assert data["object"] == "list"
    assert data["hasMore"] is False
    assert {a["featureCode"] for a in data["data"]} == {"tasks", "whatsapp_numbers", "automations"}
    free = client.get(dialect.quota_all, params={"customerId": "user_free"}).json()
    assert [a["featureCode"] for a in free["data"]] == ["whatsapp_numbers"]


def test_get_all_errors(client: httpx.Client, dialect: Dialect) -> None:
    """GET /quota/all needs customerId, a known customer and a subscription."""
    assert error_of(client.get(dialect.quota_all))["param"] == "customerId"
    unknown = client.get(dialect.quota_all, params={"customerId": "nobody"})
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "customer_not_found")
    unsub = client.get(dialect.quota_all, params={"customerId": "user_unsubscribed"})
    assert (unsub.status_code, error_of(unsub)["code"]) == (404, "no_active_subscription")


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"featureCode": "tasks"}, "customerId"),
        ({"customerId": "user_123"}, "featureCode"),
        ({"customerId": "user_123", "featureCode": "Tasks!"}, "featureCode"),
        ({"customerId": "user_123", "featureCode": "tasks", "extra": "1"}, "extra"),
    ],
)
def test_get_validates_its_query(
    client: httpx.Client, dialect: Dialect, params: dict[str, str], param: str
) -> None:
    """GET without customerId or featureCode, or with a bad one, is a validation error."""
    response = client.get(dialect.quota, params=params)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"]) == ("validation_error", param)


def test_remove_below_zero_is_insufficient_balance(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """Removing more than the balance answers 400 billing_error/insufficient_balance."""
    client.post(dialect.quota, json=quota_body(count=2))
    response = dialect.remove(client, quota_body(count=3))
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["code"]) == ("billing_error", "insufficient_balance")
    assert fake.quota("user_123", "tasks").current == 2


def test_included_is_a_hard_ceiling_without_overage(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """Without overage, going past included answers 400 billing_error/included_limit_reached."""
    assert client.post(dialect.quota, json=quota_body("whatsapp_numbers", 3)).status_code == 200
    over = client.post(dialect.quota, json=quota_body("whatsapp_numbers", 1))
    assert over.status_code == 400
    error = error_of(over)
    assert (error["type"], error["code"]) == ("billing_error", "included_limit_reached")
    set_over = client.put(dialect.quota, json=quota_body("whatsapp_numbers", 4))
    assert error_of(set_over)["code"] == "included_limit_reached"
    allowance = fake.quota("user_123", "whatsapp_numbers")
    assert (allowance.current, allowance.remaining, allowance.billed_quantity) == (3, 0, 0)


def test_overage_is_billed_at_the_high_water_mark(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect
) -> None:
    """With overage the balance passes included; removing never lowers billedQuantity."""
    client.post(dialect.quota, json=quota_body(count=13))
    dialect.remove(client, quota_body(count=8))
    allowance = fake.quota("user_123", "tasks")
    assert (allowance.current, allowance.remaining, allowance.billed_quantity) == (5, 5, 3)
    client.put(dialect.quota, json=quota_body(count=12))
    assert fake.quota("user_123", "tasks").billed_quantity == 3
    fake.start_new_period()
    assert fake.quota("user_123", "tasks").billed_quantity == 2


def test_unlimited_feature_has_no_remaining(client: httpx.Client, dialect: Dialect) -> None:
    """An unlimited quota accepts any count; remaining is null and nothing is billed."""
    client.post(dialect.quota, json=quota_body("automations", 1000))
    data = client.get(
        dialect.quota, params={"customerId": "user_123", "featureCode": "automations"}
    ).json()
    assert (data["current"], data["remaining"], data["billedQuantity"]) == (1000, None, 0)
    assert data["unlimited"] is True


@pytest.mark.parametrize("count", [-1, 1.5, "2", True, None, [1]])
def test_count_must_be_a_whole_number(
    client: httpx.Client, fake: FakeCommet, dialect: Dialect, count: Any
) -> None:
    """A negative, fractional, string, boolean or null-for-set count is a validation error."""
    if count is None:
        response = client.put(
            dialect.quota, json={"customerId": "user_123", "featureCode": "tasks", "count": None}
        )
    else:
        response = client.post(dialect.quota, json=quota_body(count=count))
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"]) == ("validation_error", "count")
    assert fake.quota_events() == []


def test_integral_float_count_is_accepted(client: httpx.Client, fake: FakeCommet) -> None:
    """2.0 is the whole number 2, as a JavaScript server would read it."""
    assert client.post("/api/v1/usage/quota", json=quota_body(count=2.0)).status_code == 200
    assert fake.quota("user_123", "tasks").current == 2


def test_zero_count_is_allowed(client: httpx.Client, fake: FakeCommet, dialect: Dialect) -> None:
    """count 0 is a valid no-op change."""
    assert client.post(dialect.quota, json=quota_body(count=0)).status_code == 200
    assert fake.quota("user_123", "tasks").current == 0


@pytest.mark.parametrize(
    ("feature", "customer", "status", "code"),
    [
        ("tasks", "nobody", 404, "customer_not_found"),
        ("nothing", "user_123", 404, "feature_not_found"),
        ("tasks", "user_unsubscribed", 404, "no_active_subscription"),
        ("tasks", "user_free", 400, "feature_not_in_plan"),
        ("api_calls", "user_123", 400, "validation_error"),
    ],
)
def test_quota_catalogue_errors(
    client: httpx.Client,
    dialect: Dialect,
    feature: str,
    customer: str,
    status: int,
    code: str,
) -> None:
    """Mutations and reads give the documented code for each catalogue problem."""
    for response in (
        client.post(dialect.quota, json=quota_body(feature, 1, customer)),
        client.put(dialect.quota, json=quota_body(feature, 1, customer)),
        dialect.remove(client, quota_body(feature, 0, customer)),
        client.get(dialect.quota, params={"customerId": customer, "featureCode": feature}),
    ):
        assert response.status_code == status
        assert error_of(response)["code"] == code


def test_quota_body_validation(client: httpx.Client, dialect: Dialect) -> None:
    """Missing customerId or featureCode, bad codes and bad JSON are rejected."""
    no_customer = client.post(dialect.quota, json={"featureCode": "tasks"})
    assert error_of(no_customer)["param"] == "customerId"
    no_feature = client.post(dialect.quota, json={"customerId": "user_123"})
    assert error_of(no_feature)["param"] == "featureCode"
    bad_code = client.post(dialect.quota, json=quota_body("TASKS"))
    assert error_of(bad_code)["param"] == "featureCode"
    bad_json = client.put(dialect.quota, content=b"nope")
    assert error_of(bad_json)["code"] == "invalid_json"
    assert (
        error_of(client.post(dialect.quota, json=quota_body(), headers={"x-api-key": "x"}))["code"]
        == "unauthorized"
    )


def test_legacy_quota_answers_announce_deprecation(client: httpx.Client) -> None:
    """Legacy quota answers link to the /api/v1 successor."""
    response = client.get("/api/usage/quota/all", params={"customerId": "user_123"})
    assert response.headers["deprecation"] == "true"
    assert response.headers["link"] == '</api/v1/usage/quota/all>; rel="successor-version"'
