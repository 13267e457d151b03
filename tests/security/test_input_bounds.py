"""Threat: oversize or control-character input, sent on to Commet and into the logs.

Each bound gives a clear error where the input enters, and loses nothing else: a bad customer id
is "no customer", a bad value is refused loudly, a bad property is dropped or cut and the event
is still billed.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from unit.support import ListSink

from commet_middleware import (
    CommetMiddleware,
    CommetWSGIMiddleware,
    UsageEvent,
    commet_context,
    customers,
    metered,
    set_customer,
    track,
)
from commet_middleware._models import (
    MAX_CUSTOMER_ID_LENGTH,
    MAX_FEATURE_CODE_LENGTH,
    MAX_PROPERTIES,
    MAX_PROPERTY_VALUE_LENGTH,
    MAX_USAGE_VALUE,
)
from commet_middleware.customers import from_header
from security.asgi import call, ok, status

HOSTILE_IDS = [
    pytest.param("c" * 10_000, id="10k-characters"),
    pytest.param("c" * (MAX_CUSTOMER_ID_LENGTH + 1), id="one-too-long"),
    pytest.param("cus_1\nINFO commet: forged line", id="newline"),
    pytest.param("cus_1\x00", id="nul"),
    pytest.param("cus_\u202e1", id="right-to-left-override"),
    pytest.param("cus_\u200b1", id="zero-width-space"),
]


@pytest.mark.parametrize("customer", HOSTILE_IDS)
def test_hostile_customer_header_is_no_customer_asgi(
    sink: ListSink, customer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An oversize or control-character customer header bills nobody: 401 in reject mode."""
    app = CommetMiddleware(
        ok,
        customer=from_header("X-Customer-ID"),
        meter="api_calls",
        on_missing_customer="reject",
        sink=sink,
    )
    sent = call(app, [(b"x-customer-id", customer.encode("utf-8"))])
    assert status(sent) == 401
    assert sink.events == []
    assert all("\n" not in r.getMessage() for r in caplog.records)  # no forged log line


@pytest.mark.parametrize("customer", HOSTILE_IDS)
def test_hostile_customer_header_is_no_customer_wsgi(sink: ListSink, customer: str) -> None:
    """The same header under WSGI bills nobody and gets 401 in reject mode."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    middleware = CommetWSGIMiddleware(
        app,
        customer=from_header("X-Customer-ID"),
        meter="api_calls",
        on_missing_customer="reject",
        sink=sink,
    )
    statuses: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "HTTP_X_CUSTOMER_ID": customer.encode("utf-8").decode("latin-1"),
    }
    body = middleware(environ, lambda s, h, e=None: statuses.append(s))
    b"".join(body)
    getattr(body, "close", lambda: None)()
    assert statuses[0].startswith("401")
    assert sink.events == []


def test_refused_customer_ids_are_logged_once_a_minute(
    sink: ListSink, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of hostile headers gives one escaped WARNING a minute, naming the bad character."""
    monkeypatch.setattr(customers, "_refusals", [-math.inf, 0])  # as if none was refused yet
    app = CommetMiddleware(ok, customer=from_header("X-Customer-ID"), sink=sink)
    with caplog.at_level(logging.WARNING, logger="commet_middleware"):
        for _ in range(50):
            call(app, [(b"x-customer-id", b"cus_1\nINFO forged " + b"x" * 200)])
    refusals = [r.getMessage() for r in caplog.records if "unusable customer id" in r.getMessage()]
    assert len(refusals) == 1
    assert "U+000A" in refusals[0]
    assert "\n" not in refusals[0]
    assert len(refusals[0]) < 400


def test_customer_id_at_the_limit_is_billed(sink: ListSink) -> None:
    """A printable id of exactly MAX_CUSTOMER_ID_LENGTH characters, accents included, is billed."""
    customer = "é" + "c" * (MAX_CUSTOMER_ID_LENGTH - 1)
    app = CommetMiddleware(ok, customer=lambda scope: customer, meter="api_calls", sink=sink)
    assert status(call(app, [])) == 200
    assert [e.customer_id for e in sink.events] == [customer]


@pytest.mark.parametrize("customer", HOSTILE_IDS)
def test_set_customer_refuses_a_hostile_id_with_a_clear_error(customer: str) -> None:
    """set_customer() and UsageEvent.create() raise ValueError saying which rule was broken."""
    with commet_context(sink=ListSink()), pytest.raises(ValueError, match="customer id must"):
        set_customer(customer)
    with pytest.raises(ValueError, match="customer id must"):
        UsageEvent.create(customer, "api_calls", idempotency_key="k")


def test_overlong_feature_code_is_refused_at_decoration() -> None:
    """A feature code longer than MAX_FEATURE_CODE_LENGTH is a ValueError when decorating."""
    with pytest.raises(ValueError, match=f"at most {MAX_FEATURE_CODE_LENGTH} characters"):
        metered("a" * (MAX_FEATURE_CODE_LENGTH + 1))
    metered("a" * MAX_FEATURE_CODE_LENGTH)  # the limit itself is fine


@pytest.mark.parametrize("value", [10**30, MAX_USAGE_VALUE + 1, 1e300])
def test_oversize_value_is_refused(value: float) -> None:
    """A value above MAX_USAGE_VALUE is a ValueError for a constant and for an event."""
    with pytest.raises(ValueError, match="at most"):
        metered("api_calls", value)
    with pytest.raises(ValueError, match="at most"):
        UsageEvent.create("cus_1", "api_calls", value, idempotency_key="k")


@pytest.mark.usefixtures("allow_commet_errors")
def test_oversize_computed_value_is_logged_and_counted_not_sent(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """A computed value of 10**30 is not billed, and says so at ERROR; the call still returns."""

    @metered("api_calls", value=lambda result: result)
    def work() -> int:
        return 10**30

    with commet_context(customer="cus_1", sink=sink):
        assert work() == 10**30
    assert sink.events == []
    assert "NOT billed" in caplog.text


def test_value_at_the_limit_is_billed_exactly(sink: ListSink) -> None:
    """MAX_USAGE_VALUE itself is billed as it is."""
    with commet_context(customer="cus_1", sink=sink):
        track("api_calls", MAX_USAGE_VALUE)
    assert [e.value for e in sink.events] == [MAX_USAGE_VALUE]


def test_bad_properties_are_dropped_or_cut_and_the_event_billed(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """Oversize, non-string and surplus properties cost the event nothing but themselves."""
    properties: dict[Any, Any] = {f"k{i:02d}": "v" for i in range(MAX_PROPERTIES + 5)}
    properties.update({"a_long": "x" * 10_000, "n": 4, 7: "x", "": "x", "k" * 41: "x"})
    with (
        caplog.at_level(logging.WARNING, logger="commet_middleware"),
        commet_context(customer="cus_1", sink=sink),
    ):
        track("api_calls", 2, properties)
    [event] = sink.events
    kept = dict(event.properties)
    assert (event.customer_id, event.value) == ("cus_1", 2)
    assert len(kept) == MAX_PROPERTIES
    assert kept["a_long"] == "x" * MAX_PROPERTY_VALUE_LENGTH
    assert not {"n", "", "k" * 41} & set(kept)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "billed all the same" in warnings[0].getMessage()


def test_failing_properties_function_still_bills(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """A properties function that raises costs the properties, not the event (one WARNING)."""

    @metered("api_calls", properties=lambda result: {"a": result["missing"]})
    def work() -> dict[str, str]:
        return {}

    with (
        caplog.at_level(logging.WARNING, logger="commet_middleware"),
        commet_context(customer="cus_1", sink=sink),
    ):
        work()
    assert [(e.customer_id, e.properties) for e in sink.events] == [("cus_1", ())]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
