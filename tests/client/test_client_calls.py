"""CommetClient and AsyncCommetClient over a scripted MockTransport: every test runs on both."""

from __future__ import annotations

import inspect
import json
import logging
import uuid
from typing import Any

import httpx
import pytest
from commet_script import (
    ERROR_ROWS,
    QUOTA_EVENT,
    SECRET,
    USAGE_EVENT,
    USAGE_QUOTA,
    Script,
    Sleeps,
    answer,
    error,
    make_settings,
)

from commet_middleware import (
    AsyncCommetClient,
    CommetAPIError,
    CommetClient,
    CommetError,
    CommetTransportError,
    QuotaAllowance,
    QuotaChange,
    QuotaChangeResult,
    TrackResult,
    UsageEvent,
)
from commet_middleware._wire import request_idempotency_key

pytestmark = pytest.mark.anyio

AnyClient = CommetClient | AsyncCommetClient


class Harness:
    """Builds a sync or async client on a script and calls it the same way for both."""

    def __init__(self, flavour: str, sleeps: Sleeps) -> None:
        self.flavour = flavour
        self.sleeps = sleeps

    def client(self, script: Script, **changes: Any) -> AnyClient:
        settings = make_settings(script, **changes)
        # random=1.0 pins the jitter to the top of its range, so waits are exact.
        if self.flavour == "sync":
            return CommetClient(settings, sleep=self.sleeps, random=lambda: 1.0)
        return AsyncCommetClient(settings, sleep=self.sleeps.asleep, random=lambda: 1.0)

    async def call(self, client: AnyClient, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(client, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def close(self, client: AnyClient) -> None:
        if isinstance(client, AsyncCommetClient):
            await client.aclose()
        else:
            client.close()


@pytest.fixture(params=["sync", "async"])
def harness(request: pytest.FixtureRequest, sleeps: Sleeps) -> Harness:
    return Harness(request.param, sleeps)


def sent(request: httpx.Request) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(request.content)
    return parsed


async def test_track_sends_the_v1_request(harness: Harness) -> None:
    """track() posts the v1 body with Commet-Version, x-api-key and Idempotency-Key = eventId."""
    script = Script(answer(201, USAGE_EVENT, request_id="req_t"))
    client = harness.client(script)
    result = await harness.call(
        client,
        "track",
        "cus_1",
        "api_calls",
        3,
        idempotency_key="key_1",
        timestamp="2026-01-15T10:00:00.000Z",
        properties={"path": "/x"},
    )
    (request,) = script.requests
    assert (request.method, request.url.path) == ("POST", "/api/v1/usage/events")
    assert request.url.host == "commet.co"
    assert request.headers["commet-version"] == "2026-08-27"
    assert request.headers["x-api-key"] == SECRET
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert body["eventId"] == "key_1"
    assert request.headers["idempotency-key"] == request_idempotency_key(
        UsageEvent.create("cus_1", "api_calls", idempotency_key="key_1")
    )
    assert request.content == (
        b'{"featureCode":"api_calls","customerId":"cus_1","value":3,"eventId":"key_1",'
        b'"timestamp":"2026-01-15T10:00:00.000Z","properties":[{"property":"path","value":"/x"}]}'
    )
    assert isinstance(result, TrackResult)
    assert (result.id, result.request_id, result.duplicate) == ("evt_1", "req_t", False)
    await harness.close(client)


async def test_track_makes_a_key_and_keeps_it_and_the_bytes_across_retries(
    harness: Harness,
) -> None:
    """Without a key, track() makes a uuid4 one; every retry repeats the key and the body bytes."""
    script = Script(
        error(503, "internal_error"), error(500, "internal_error"), answer(201, USAGE_EVENT)
    )
    client = harness.client(script)
    await harness.call(client, "track", "cus_1", "api_calls")
    assert len(script.requests) == 3
    assert len(set(script.bodies)) == 1
    keys = {request.headers["idempotency-key"] for request in script.requests}
    assert len(keys) == 1
    event_id = sent(script.requests[0])["eventId"]
    assert uuid.UUID(event_id).version == 4
    assert keys == {
        request_idempotency_key(UsageEvent.create("cus_1", "api_calls", idempotency_key=event_id))
    }
    assert harness.sleeps.waits == [0.5, 1.0]
    await harness.close(client)


async def test_two_track_calls_get_two_keys(harness: Harness) -> None:
    """A generated key belongs to one call: a second call is a second event."""
    script = Script(answer(201, USAGE_EVENT))
    client = harness.client(script)
    await harness.call(client, "track", "cus_1", "api_calls")
    await harness.call(client, "track", "cus_1", "api_calls")
    assert (
        script.requests[0].headers["idempotency-key"]
        != script.requests[1].headers["idempotency-key"]
    )
    await harness.close(client)


@pytest.mark.parametrize(("status", "code", "headers", "retryable"), ERROR_ROWS)
async def test_error_table_end_to_end(
    harness: Harness, status: int, code: str, headers: dict[str, str], retryable: bool
) -> None:
    """Each error row is retried (then succeeds) or raised at once, as the table says."""
    failure = answer(
        status, {"error": {"type": "t", "code": code, "message": "m"}}, headers=headers
    )
    script = Script(failure, answer(201, USAGE_QUOTA))
    client = harness.client(script)
    if retryable:
        allowance = await harness.call(client, "get_quota", "cus_1", "tasks")
        assert isinstance(allowance, QuotaAllowance)
        assert len(script.requests) == 2
    else:
        with pytest.raises(CommetAPIError) as caught:
            await harness.call(client, "get_quota", "cus_1", "tasks")
        assert (caught.value.status, caught.value.code) == (status, code)
        assert len(script.requests) == 1
        assert harness.sleeps.waits == []
    await harness.close(client)


async def test_retries_run_out(harness: Harness) -> None:
    """An error that stays retryable is tried 1 + max_retries times, then raised."""
    script = Script(error(503, "internal_error"))
    client = harness.client(script, max_retries=3)
    with pytest.raises(CommetAPIError) as caught:
        await harness.call(client, "add_quota", "cus_1", "tasks", 2)
    assert caught.value.status == 503
    assert caught.value.retryable
    assert len(script.requests) == 4
    assert len(set(script.bodies)) == 1
    assert harness.sleeps.waits == [0.5, 1.0, 2.0]
    await harness.close(client)


async def test_retry_after_is_honoured_and_capped(harness: Harness) -> None:
    """A 429 waits its Retry-After (capped at retry_after_cap) instead of the backoff."""
    script = Script(
        error(429, "rate_limited", "rate_limit_error", Retry_After="3"),
        error(429, "rate_limited", "rate_limit_error", Retry_After="120"),
        answer(201, USAGE_EVENT),
    )
    client = harness.client(script, retry_after_cap=30.0)
    await harness.call(client, "track", "cus_1", "api_calls", idempotency_key="k")
    assert harness.sleeps.waits == [3.0, 30.0]
    await harness.close(client)


async def test_retry_after_on_a_server_error_is_honoured(harness: Harness) -> None:
    """A 503 that names its wait in Retry-After is retried after that wait, not the backoff."""
    script = Script(
        error(503, "internal_error", "internal_error", Retry_After="4"), answer(201, USAGE_EVENT)
    )
    client = harness.client(script)
    await harness.call(client, "track", "cus_1", "api_calls")
    assert harness.sleeps.waits == [4.0]
    await harness.close(client)


async def test_duplicate_counts_as_delivered(harness: Harness) -> None:
    """A 409 duplicate returns a TrackResult(duplicate=True) with no retry and no error."""
    script = Script(error(409, "duplicate", "conflict_error"))
    client = harness.client(script)
    result = await harness.call(client, "track", "cus_1", "api_calls", idempotency_key="k9")
    assert isinstance(result, TrackResult)
    assert result.duplicate
    assert (result.event_id, result.customer_id, result.feature_code) == (
        "k9",
        "cus_1",
        "api_calls",
    )
    assert len(script.requests) == 1
    await harness.close(client)


async def test_replay_counts_as_delivered(harness: Harness) -> None:
    """An Idempotent-Replayed answer is a normal result flagged replayed."""
    script = Script(answer(201, QUOTA_EVENT, headers={"Idempotent-Replayed": "true"}))
    client = harness.client(script)
    result = await harness.call(client, "set_quota", "cus_1", "tasks", 8, idempotency_key="q")
    assert isinstance(result, QuotaChangeResult)
    assert result.replayed
    assert result.new_balance == 8
    await harness.close(client)


async def test_deprecation_warns_once(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Deprecation: true answers give one warning on the commet_middleware logger, not one each."""
    deprecated = {"Deprecation": "true", "Sunset": "Sat, 01 Aug 2027 00:00:00 GMT"}
    script = Script(answer(201, USAGE_EVENT, headers=deprecated))
    client = harness.client(script, dialect="legacy")
    with caplog.at_level(logging.WARNING, logger="commet_middleware"):
        for _ in range(3):
            await harness.call(client, "track", "cus_1", "api_calls")
    warnings = [r for r in caplog.records if r.name == "commet_middleware"]
    assert len(warnings) == 1
    assert "deprecated" in warnings[0].getMessage()
    await harness.close(client)


@pytest.mark.parametrize(
    ("method", "args", "kwargs"),
    [
        ("track", ("cus_1", "API-Calls"), {}),
        ("track", ("", "api_calls"), {}),
        ("track", ("cus_1", "api_calls", -1), {}),
        ("track", ("cus_1", "api_calls", float("nan")), {}),
        ("track", ("cus_1", "api_calls"), {"properties": {"k": 1}}),
        ("add_quota", ("cus_1", "tasks", 1.5), {}),
        ("remove_quota", ("cus_1", "tasks", -2), {}),
        ("set_quota", ("cus_1", "bad code", 3), {}),
        ("get_quota", ("cus_1", "Tasks"), {}),
        ("get_quota", ("  ", "tasks"), {}),
        ("get_all_quotas", ("",), {}),
        ("send", (UsageEvent("cus_1", "api_calls", -5, "k", "2026-01-01T00:00:00Z"),), {}),
        ("send", (UsageEvent("cus_1", "api_calls", 1, "", "2026-01-01T00:00:00Z"),), {}),
        ("send_once", (QuotaChange("cus_1", "BAD", "add", 1, "k"),), {}),
        ("send_once", (QuotaChange("cus_1", "tasks", "grow", 1, "k"),), {}),  # type: ignore[arg-type]
    ],
)
async def test_invalid_input_sends_nothing(
    harness: Harness, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Bad input raises ValueError before any request is made."""
    script = Script()
    client = harness.client(script)
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        await harness.call(client, method, *args, **kwargs)
    assert script.requests == []
    await harness.close(client)


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.ReadError("connection reset"),
    ],
)
async def test_transport_errors_are_mapped_and_retried(
    harness: Harness, failure: Exception
) -> None:
    """httpx transport failures become a retryable CommetTransportError and are retried."""
    script = Script(failure, answer(201, USAGE_EVENT))
    client = harness.client(script)
    result = await harness.call(client, "track", "cus_1", "api_calls", idempotency_key="k")
    assert isinstance(result, TrackResult)
    assert len(script.requests) == 2
    assert script.bodies[0] == script.bodies[1]

    stuck = Script(failure)
    client2 = harness.client(stuck, max_retries=1)
    with pytest.raises(CommetTransportError) as caught:
        await harness.call(client2, "track", "cus_1", "api_calls")
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, httpx.TransportError)
    assert len(stuck.requests) == 2
    await harness.close(client)
    await harness.close(client2)


async def test_send_once_makes_exactly_one_attempt(harness: Harness) -> None:
    """send_once() raises the retryable error itself instead of retrying."""
    script = Script(error(503, "internal_error"))
    client = harness.client(script)
    event = UsageEvent.create("cus_1", "api_calls", idempotency_key="k")
    with pytest.raises(CommetAPIError) as caught:
        await harness.call(client, "send_once", event)
    assert caught.value.retryable
    assert len(script.requests) == 1
    assert harness.sleeps.waits == []
    await harness.close(client)


async def test_send_once_sends_the_given_bytes(harness: Harness) -> None:
    """send_once(request_body=...) puts exactly those bytes on the wire, headers from the op."""
    script = Script(answer(201, USAGE_EVENT))
    client = harness.client(script)
    event = UsageEvent.create("cus_1", "api_calls", idempotency_key="k")
    cached = b'{"featureCode":"api_calls","customerId":"cus_1","value":1,"eventId":"k"}'
    await harness.call(client, "send_once", event, request_body=cached)
    assert script.requests[0].content == cached
    assert script.requests[0].headers["idempotency-key"] == request_idempotency_key(event)
    await harness.close(client)


async def test_send_dispatches_on_the_operation(harness: Harness) -> None:
    """send() returns a TrackResult for a UsageEvent and a QuotaChangeResult for a QuotaChange."""
    script = Script(answer(201, USAGE_EVENT), answer(200, QUOTA_EVENT))
    client = harness.client(script)
    event = UsageEvent.create("cus_1", "api_calls", idempotency_key="k")
    change = QuotaChange.create("cus_1", "tasks", "remove", 2, idempotency_key="q")
    assert isinstance(await harness.call(client, "send", event), TrackResult)
    assert isinstance(await harness.call(client, "send", change), QuotaChangeResult)
    assert script.requests[1].url.path == "/api/v1/usage/quota/remove"
    assert sent(script.requests[1]) == {"featureCode": "tasks", "count": 2, "customerId": "cus_1"}
    await harness.close(client)


@pytest.mark.parametrize(
    ("dialect", "expected"),
    [
        (
            "v1",
            [
                ("POST", "/api/v1/usage/quota"),
                ("POST", "/api/v1/usage/quota/remove"),
                ("PUT", "/api/v1/usage/quota"),
            ],
        ),
        (
            "legacy",
            [
                ("POST", "/api/usage/quota"),
                ("DELETE", "/api/usage/quota"),
                ("PUT", "/api/usage/quota"),
            ],
        ),
    ],
)
async def test_quota_changes_in_both_dialects(
    harness: Harness, dialect: str, expected: list[tuple[str, str]]
) -> None:
    """add/remove/set_quota use each dialect's method and path, count 1 by default."""
    script = Script(answer(200, QUOTA_EVENT))
    client = harness.client(script, dialect=dialect)
    await harness.call(client, "add_quota", "cus_1", "tasks")
    await harness.call(client, "remove_quota", "cus_1", "tasks", 2)
    await harness.call(client, "set_quota", "cus_1", "tasks", 10)
    assert [(r.method, r.url.path) for r in script.requests] == expected
    assert [sent(r)["count"] for r in script.requests] == [1, 2, 10]
    has_version = ["commet-version" in r.headers for r in script.requests]
    assert has_version == [dialect == "v1"] * 3
    await harness.close(client)


async def test_legacy_track(harness: Harness) -> None:
    """Legacy track posts feature and idempotencyKey to /api/usage/events."""
    script = Script(answer(200, {"success": True, "data": USAGE_EVENT}))
    client = harness.client(script, dialect="legacy")
    result = await harness.call(client, "track", "cus_1", "api_calls", 2, idempotency_key="lk")
    request = script.requests[0]
    assert request.url.path == "/api/usage/events"
    body = sent(request)
    assert (body["feature"], body["idempotencyKey"], body["value"]) == ("api_calls", "lk", 2)
    assert result.id == "evt_1"
    await harness.close(client)


async def test_get_quota_and_its_timeout(harness: Harness) -> None:
    """get_quota() sends the query and bounds each attempt by quota_timeout or the given one."""
    script = Script(answer(200, USAGE_QUOTA))
    client = harness.client(script, quota_timeout=0.75)
    allowance = await harness.call(client, "get_quota", "cus_1", "tasks")
    await harness.call(client, "get_quota", "cus_1", "tasks", timeout=0.2)
    first, second = script.requests
    assert first.url.path == "/api/v1/usage/quota"
    assert dict(first.url.params) == {"customerId": "cus_1", "featureCode": "tasks"}
    assert first.extensions["timeout"]["read"] == 0.75
    assert second.extensions["timeout"]["read"] == 0.2
    assert allowance == QuotaAllowance.from_json(USAGE_QUOTA)
    await harness.close(client)


async def test_other_calls_use_the_settings_timeouts(harness: Harness) -> None:
    """Mutations use settings.timeout for reads and settings.connect_timeout to connect."""
    script = Script(answer(201, USAGE_EVENT))
    client = harness.client(script, timeout=4.0, connect_timeout=2.0)
    await harness.call(client, "track", "cus_1", "api_calls")
    timeout = script.requests[0].extensions["timeout"]
    assert (timeout["read"], timeout["connect"]) == (4.0, 2.0)
    await harness.close(client)


async def test_get_all_quotas(harness: Harness) -> None:
    """get_all_quotas() reads the v1 list object into allowances."""
    listing = {"object": "list", "data": [USAGE_QUOTA], "hasMore": False}
    script = Script(answer(200, listing))
    client = harness.client(script)
    allowances = await harness.call(client, "get_all_quotas", "cus_1")
    assert script.requests[0].url.path == "/api/v1/usage/quota/all"
    assert dict(script.requests[0].url.params) == {"customerId": "cus_1"}
    assert [a.feature_code for a in allowances] == ["tasks"]
    await harness.close(client)


async def test_api_key_never_leaks(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Through failing calls logged at DEBUG, the key is in no log line, repr or error text."""
    echoed = {"error": {"code": "unauthorized", "message": f"key {SECRET} is not valid"}}
    script = Script(
        error(503, "internal_error"),
        httpx.ConnectError(f"could not connect with {SECRET}"),
        answer(401, echoed),
    )
    client = harness.client(script, max_retries=2)
    errors: list[CommetError] = []
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(CommetAPIError) as caught:
            await harness.call(client, "track", "cus_1", "api_calls")
        errors.append(caught.value)
        stuck = harness.client(Script(httpx.ConnectError(f"refused {SECRET}")), max_retries=0)
        with pytest.raises(CommetTransportError) as caught_transport:
            await harness.call(stuck, "get_quota", "cus_1", "tasks")
        errors.append(caught_transport.value)
    assert len(script.requests) == 3
    assert caplog.records, "the retries should have been logged"
    assert SECRET not in caplog.text
    for record in caplog.records:
        assert SECRET not in record.getMessage()
    for err in errors:
        assert SECRET not in str(err)
        assert SECRET not in repr(err)
    assert SECRET not in repr(client)
    assert SECRET not in repr(client.settings)
    await harness.close(client)
    await harness.close(stuck)


async def test_keyword_overrides_apply_to_the_environment(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no settings object, keywords override CommetSettings.from_env()."""
    monkeypatch.setenv("COMMET_API_KEY", SECRET)
    monkeypatch.setenv("COMMET_BASE_URL", "http://commet.test:8080")
    script = Script(answer(201, USAGE_EVENT))
    if harness.flavour == "sync":
        client: AnyClient = CommetClient(transport=script.transport, dialect="legacy")
    else:
        client = AsyncCommetClient(transport=script.transport, dialect="legacy")
    await harness.call(client, "track", "cus_1", "api_calls")
    request = script.requests[0]
    assert str(request.url) == "http://commet.test:8080/api/usage/events"
    assert request.headers["x-api-key"] == SECRET
    await harness.close(client)


def test_sync_client_is_a_context_manager() -> None:
    """Leaving the with block closes the sync client's connection pool."""
    script = Script(answer(201, USAGE_EVENT))
    with CommetClient(make_settings(script)) as client:
        client.track("cus_1", "api_calls")
    assert client._http.is_closed


async def test_async_client_is_an_async_context_manager() -> None:
    """Leaving the async with block closes the async client's connection pool."""
    script = Script(answer(201, USAGE_EVENT))
    async with AsyncCommetClient(make_settings(script)) as client:
        await client.track("cus_1", "api_calls")
    assert client._http.is_closed


def test_package_exports_the_client_api() -> None:
    """The client, its results and QuotaAllowance are public, and __all__ stays sorted."""
    import commet_middleware

    for name in (
        "AsyncCommetClient",
        "CommetClient",
        "QuotaAllowance",
        "QuotaChangeResult",
        "TrackResult",
    ):
        assert name in commet_middleware.__all__
    assert commet_middleware.__all__ == sorted(commet_middleware.__all__)


def test_decimal_value_through_the_client_and_a_raw_event() -> None:
    """``track(value=Decimal)`` sends the exact number; a raw event holding one is refused
    with the fix, before anything is sent."""
    from decimal import Decimal

    from commet_middleware import CommetClient, UsageEvent
    from commet_middleware.testing import FakeCommet

    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_customer("cus_1")
    with CommetClient(api_key="ck_test_x", transport=fake.transport) as client:
        client.track("cus_1", "api_calls", Decimal("2.50"), idempotency_key="k1")
        raw = UsageEvent("cus_1", "api_calls", Decimal("1.5"), "k2", "2026-01-01T00:00:00Z")
        with pytest.raises(ValueError, match=r"UsageEvent\.create"):
            client.send(raw)
    assert fake.usage_total("cus_1", "api_calls") == 2.5
