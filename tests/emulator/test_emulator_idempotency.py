"""The v1 Idempotency-Key header: replays, mismatches, in-flight requests, lost answers."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from emulator_helpers import error_of

from commet_middleware.testing import FakeCommet

EVENTS = "/api/v1/usage/events"
QUOTA = "/api/v1/usage/quota"


def event_bytes(value: int = 1, key: str | None = None) -> bytes:
    """Return a v1 event body as the exact bytes a retrying client would resend."""
    body: dict[str, object] = {"featureCode": "api_calls", "customerId": "user_123", "value": value}
    if key:
        body["eventId"] = key
    return json.dumps(body).encode()


def post(client: httpx.Client, body: bytes, key: str, path: str = EVENTS) -> httpx.Response:
    """POST raw JSON bytes with an Idempotency-Key."""
    return client.post(
        path, content=body, headers={"idempotency-key": key, "content-type": "application/json"}
    )


def test_replay_returns_the_original_answer(client: httpx.Client, fake: FakeCommet) -> None:
    """The same key and bytes get the original status and body back, marked as replayed."""
    first = post(client, event_bytes(), "idem-1")
    second = post(client, event_bytes(), "idem-1")
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert len(fake.events()) == 1
    assert [r.replayed for r in fake.requests] == [False, True]


def test_different_body_is_key_mismatch(client: httpx.Client, fake: FakeCommet) -> None:
    """The same key with other bytes answers 409 conflict_error/idempotency_key_mismatch."""
    post(client, event_bytes(1), "idem-2")
    response = post(client, event_bytes(2), "idem-2")
    assert response.status_code == 409
    error = error_of(response)
    assert (error["type"], error["code"]) == ("conflict_error", "idempotency_key_mismatch")
    other_path = post(
        client, b'{"customerId": "user_123", "featureCode": "tasks"}', "idem-2", QUOTA
    )
    assert error_of(other_path)["code"] == "idempotency_key_mismatch"
    assert fake.usage_total("user_123", "api_calls") == 1


def test_replay_while_in_flight_is_in_progress(client: httpx.Client, fake: FakeCommet) -> None:
    """A replay while the first request is still processing answers idempotency_in_progress."""
    hold = fake.faults.hold_next(1)
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(post(client, event_bytes(), "idem-3")))
    first.start()
    try:
        assert hold.wait_until_held(1)
        response = post(client, event_bytes(), "idem-3")
        assert response.status_code == 409
        assert error_of(response)["code"] == "idempotency_in_progress"
    finally:
        hold.release()
        first.join(10)
    assert results[0].status_code == 201
    assert post(client, event_bytes(), "idem-3").headers["idempotent-replayed"] == "true"
    assert len(fake.events()) == 1


def test_keys_are_scoped_per_api_key(client: httpx.Client, fake: FakeCommet) -> None:
    """The same Idempotency-Key under another API key is a separate request."""
    post(client, event_bytes(), "idem-4")
    client.headers["x-api-key"] = "ck_other_key"
    response = post(client, event_bytes(), "idem-4")
    assert response.status_code == 201
    assert "idempotent-replayed" not in response.headers
    assert len(fake.events()) == 2


def test_quota_mutations_are_protected(client: httpx.Client, fake: FakeCommet) -> None:
    """add, remove and set replay their original answer instead of applying twice."""
    add = b'{"customerId": "user_123", "featureCode": "tasks", "count": 4}'
    remove = b'{"customerId": "user_123", "featureCode": "tasks", "count": 1}'
    for _ in range(2):
        post(client, add, "q-add", QUOTA)
        post(client, remove, "q-remove", f"{QUOTA}/remove")
    assert fake.quota("user_123", "tasks").current == 3
    set_body = b'{"customerId": "user_123", "featureCode": "tasks", "count": 9}'
    headers = {"idempotency-key": "q-set", "content-type": "application/json"}
    client.put(QUOTA, content=set_body, headers=headers)
    client.post(QUOTA, json={"customerId": "user_123", "featureCode": "tasks", "count": 1})
    replay = client.put(QUOTA, content=set_body, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["newBalance"] == 9
    assert fake.quota("user_123", "tasks").current == 10
    assert len(fake.quota_events()) == 4


def test_business_errors_are_replayed_too(client: httpx.Client, fake: FakeCommet) -> None:
    """An answered error (insufficient_balance) is the stored answer for its key."""
    body = b'{"customerId": "user_123", "featureCode": "tasks", "count": 5}'
    first = post(client, body, "q-err", f"{QUOTA}/remove")
    client.post(QUOTA, json={"customerId": "user_123", "featureCode": "tasks", "count": 10})
    second = post(client, body, "q-err", f"{QUOTA}/remove")
    assert first.status_code == second.status_code == 400
    assert error_of(second)["code"] == "insufficient_balance"
    assert second.headers["idempotent-replayed"] == "true"
    assert fake.quota("user_123", "tasks").current == 10


def test_validation_errors_are_not_stored(client: httpx.Client, fake: FakeCommet) -> None:
    """A rejected body does not use up the key: the corrected request is then accepted."""
    bad = post(client, b'{"featureCode": "api_calls"}', "idem-5")
    assert bad.status_code == 400
    assert post(client, event_bytes(), "idem-5").status_code == 201


def test_lost_answer_retry_lands_exactly_once(client: httpx.Client, fake: FakeCommet) -> None:
    """After a write whose answer was lost (503), the retry with the same key is a replay."""
    fake.faults.fail_after_write_next(1, status=503)
    lost = post(client, event_bytes(key="biz-1"), "idem-6")
    assert lost.status_code == 503
    assert len(fake.events()) == 1
    retry = post(client, event_bytes(key="biz-1"), "idem-6")
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(fake.events()) == 1


def test_dropped_answer_retry_without_header_is_duplicate(
    client: httpx.Client, fake: FakeCommet
) -> None:
    """After a dropped answer, a retry keyed only by eventId is 409 duplicate: delivered once."""
    fake.faults.drop_after_write_next(1)
    with pytest.raises(httpx.TransportError):
        client.post(EVENTS, content=event_bytes(key="biz-2"))
    retry = client.post(EVENTS, content=event_bytes(key="biz-2"))
    assert retry.status_code == 409
    assert error_of(retry)["code"] == "duplicate"
    assert len(fake.events()) == 1


def test_legacy_dialect_ignores_the_header(client: httpx.Client, fake: FakeCommet) -> None:
    """The legacy paths dedupe by idempotencyKey in the body only; the header is ignored."""
    body = b'{"feature": "api_calls", "customerId": "user_123"}'
    post(client, body, "idem-7", "/api/usage/events")
    second = post(client, body, "idem-7", "/api/usage/events")
    assert second.status_code == 201
    assert "idempotent-replayed" not in second.headers
    assert len(fake.events()) == 2


def test_overlong_key_is_rejected(client: httpx.Client) -> None:
    """An Idempotency-Key longer than 255 characters is a validation error."""
    response = post(client, event_bytes(), "k" * 256)
    assert response.status_code == 400
    assert error_of(response)["param"] == "Idempotency-Key"


def test_keys_expire_after_24_hours(client: httpx.Client, fake: FakeCommet) -> None:
    """After 24 h an Idempotency-Key is forgotten: the same request is processed again."""
    now = [1000.0]
    fake._ledger.clock = lambda: now[0]
    post(client, event_bytes(), "idem-8")
    now[0] += 24 * 60 * 60 - 1
    assert post(client, event_bytes(), "idem-8").headers.get("idempotent-replayed") == "true"
    now[0] += 2
    again = post(client, event_bytes(2), "idem-8")
    assert again.status_code == 201
    assert "idempotent-replayed" not in again.headers
    assert fake.usage_total("user_123", "api_calls") == 3
