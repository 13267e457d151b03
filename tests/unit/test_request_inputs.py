"""Request-side input that must never cost a billable event (issue 15, item 3).

Bad properties are cleaned, not fatal; ``Decimal`` and other real numbers are billed exactly;
customer ids in headers, cookies and query strings are read as UTF-8; ``set_customer`` and
``@metered(customer=...)`` normalise ids like the resolvers do.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from commet_middleware import (
    CommetMiddleware,
    CommetWSGIMiddleware,
    UsageEvent,
    commet_context,
    metered,
    set_customer,
    track,
)
from commet_middleware.billing._context import get_current_context
from commet_middleware.customers import (
    CustomerResolver,
    from_cookie,
    from_environ,
    from_header,
    from_query,
)
from commet_middleware.testing import FakeCommet

from .conftest import ListSink

CUSTOMER_HEADER = "X-Customer-ID"


def _starlette(
    endpoint: Callable[[Request], Any],
    *,
    customer: CustomerResolver | None = None,
    **options: Any,
) -> Starlette:
    return Starlette(
        routes=[Route("/", endpoint)],
        middleware=[
            Middleware(
                CommetMiddleware,
                customer=customer or from_header(CUSTOMER_HEADER),
                **options,
            )
        ],
    )


def _flask(
    view: Callable[[], str], *, customer: CustomerResolver | None = None, **options: Any
) -> tuple[Flask, CommetWSGIMiddleware]:
    app = Flask(__name__)
    app.add_url_rule("/", view_func=view)
    middleware = CommetWSGIMiddleware(
        app.wsgi_app, customer=customer or from_header(CUSTOMER_HEADER), **options
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]
    return app, middleware


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.name.startswith("commet_middleware") and r.levelno == logging.WARNING
    ]


# Properties: a bad one is cleaned with one WARNING, and the event is billed.

LONG = "x" * 600
BAD_PROPERTIES: dict[Any, Any] = {"note": LONG, "rows": 5, "k" * 41: "v", "ok": "yes"}
CLEANED = (("note", "x" * 500), ("ok", "yes"))


def test_computed_properties_that_break_the_rules_still_bill_on_starlette(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """@metered(properties=fn): a too-long, a non-str and an over-long key cost one WARNING."""

    @metered("api_calls", properties=lambda result: BAD_PROPERTIES)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    with TestClient(_starlette(endpoint, sink=sink)) as client:
        assert client.get("/", headers={CUSTOMER_HEADER: "cus_1"}).status_code == 200
    assert [(e.customer_id, e.feature, e.properties) for e in sink.events] == [
        ("cus_1", "api_calls", CLEANED)
    ]
    assert len(_warnings(caplog)) == 1


def test_track_with_bad_properties_still_bills_on_flask(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """track(properties=...) in a Flask view: the bad properties go, the usage is billed."""

    def view() -> str:
        track("api_calls", 3, BAD_PROPERTIES)
        return "ok"

    app, _ = _flask(view, sink=sink)
    assert app.test_client().get("/", headers={CUSTOMER_HEADER: "cus_1"}).data == b"ok"
    assert [(e.value, e.properties) for e in sink.events] == [(3, CLEANED)]
    assert len(_warnings(caplog)) == 1


def test_properties_that_are_not_a_mapping_still_bill(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """A properties function returning a list bills the usage without properties."""
    with commet_context("cus_1", sink=sink):
        track("api_calls", properties=["a", "b"])  # type: ignore[arg-type]
    assert [(e.value, e.properties) for e in sink.events] == [(1, ())]
    assert len(_warnings(caplog)) == 1


def test_a_job_recording_raw_properties_is_billed_with_them_cleaned(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """Usage recorded on a context with unchecked properties is cleaned when the event is built."""
    with commet_context("cus_1", sink=sink) as ctx:
        ctx.record("api_calls", 2, BAD_PROPERTIES)
    assert [(e.value, e.properties) for e in sink.events] == [(2, CLEANED)]
    assert len(_warnings(caplog)) == 1


def test_request_usage_recorded_with_raw_properties_is_billed_at_settle(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """A pending usage with unchecked properties is cleaned, not dropped, when the request ends."""

    async def endpoint(request: Request) -> Response:
        ctx = get_current_context()
        assert ctx is not None
        ctx.record("api_calls", 1, BAD_PROPERTIES)
        return PlainTextResponse("ok")

    with TestClient(_starlette(endpoint, sink=sink)) as client:
        client.get("/", headers={CUSTOMER_HEADER: "cus_1"})
    assert [e.properties for e in sink.events] == [CLEANED]
    assert len(_warnings(caplog)) == 1


def test_constant_properties_are_still_checked_at_decoration() -> None:
    """A constant the developer can fix is refused when decorating, naming the property."""
    with pytest.raises(ValueError, match="'note'"):
        metered("api_calls", properties={"note": LONG})


# Decimal and other real numbers.


class Scalar:
    """A numpy-like scalar: a numbers.Real that is neither int nor float."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        return self.value

    def __lt__(self, other: object) -> bool:
        return self.value < other  # type: ignore[operator]


numbers.Real.register(Scalar)


@pytest.mark.parametrize(
    ("given", "billed"),
    [
        (Decimal("2"), 2),
        (Decimal("2.000"), 2),
        (Decimal("1E+3"), 1000),
        (Decimal("1.5"), 1.5),
        (Decimal("0.1"), 0.1),
        (Fraction(1, 2), 0.5),
        (Fraction(1, 10), 0.1),
        (Fraction(6, 3), 2),
        (Scalar(0.25), 0.25),
    ],
)
def test_real_numbers_are_billed_exactly(given: object, billed: int | float) -> None:
    """A Decimal, Fraction or numbers.Real value becomes the int or float of the same value."""
    sink = ListSink()
    with commet_context("cus_1", sink=sink):
        track("api_calls", given)  # type: ignore[arg-type]
        metered("api_calls", value=given)(lambda: None)()  # type: ignore[arg-type]
        metered("api_calls", value=lambda _: given)(lambda: None)()
    values = [e.value for e in sink.events]
    assert values == [billed] * 3
    assert all(type(v) is type(billed) for v in values)


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        (True, "must be a number"),
        ("3", "must be a number"),
        (Decimal("NaN"), "finite"),
        (Decimal("sNaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        (Decimal("1E+999999999"), "finite"),
        (Decimal("-1"), ">= 0"),
        (Fraction(-1, 2), ">= 0"),
        (Fraction(1, 3), "exactly"),
        (Decimal("0.10000000000000000000001"), "exactly"),
    ],
)
def test_values_that_cannot_be_billed_exactly_are_refused_clearly(
    given: object, reason: str
) -> None:
    """bool, non-finite, negative and inexact values are refused at decoration, with why."""
    with pytest.raises(ValueError, match=reason):
        metered("api_calls", value=given)  # type: ignore[arg-type]


@pytest.mark.usefixtures("allow_commet_errors")
def test_a_computed_inexact_decimal_is_counted_and_the_response_served(
    sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    """A computed Fraction(1, 3) is logged and counted as invalid; the response is still 200."""

    @metered("api_calls", value=lambda result: Fraction(1, 3))
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = _starlette(endpoint, sink=sink)
    with TestClient(app) as client:
        assert client.get("/", headers={CUSTOMER_HEADER: "cus_1"}).status_code == 200
    assert sink.events == []
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info and r.exc_info[1]]
    assert [str(e) for e in errors if "exactly" in str(e)]


def test_usage_event_create_converts_a_decimal() -> None:
    """UsageEvent.create (what CommetClient.track builds) turns Decimal('3') into 3."""
    event = UsageEvent.create("cus_1", "api_calls", Decimal("3"), idempotency_key="k")
    assert type(event.value) is int
    assert event.value == 3


def test_decimal_usage_reaches_the_emulator_with_the_right_total(fake_commet: FakeCommet) -> None:
    """Decimal-valued @metered on Starlette arrives in the emulator's ledger as 1.5 + 1.5 + 2."""
    values = iter([Decimal("1.5"), Decimal("1.50"), Decimal("2")])

    @metered("ai_tokens", value=lambda result: next(values))
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = _starlette(endpoint, api_key="ck_test_key", transport=fake_commet.transport)
    with TestClient(app) as client:
        for _ in range(3):
            assert client.get("/", headers={CUSTOMER_HEADER: "user_123"}).status_code == 200
    assert fake_commet.usage_total("user_123", "ai_tokens") == 5
    assert sorted(e.value for e in fake_commet.events("user_123", "ai_tokens")) in (
        [1.5, 1.5, 2],
        [5],  # folded by a sender that fell behind: the exact sum
        [1.5, 3.5],
        [2, 3.0],
    )


def test_decimal_usage_survives_the_spool(fake_commet: FakeCommet, tmp_path: Path) -> None:
    """With a spool, Decimal-valued usage on Flask is written, read back and delivered exactly."""

    @metered("ai_tokens", value=Decimal("0.5"))
    def view() -> str:
        return "ok"

    app, middleware = _flask(
        view,
        api_key="ck_test_key",
        transport=fake_commet.transport,
        spool_path=str(tmp_path / "spool.db"),
    )
    client = app.test_client()
    for _ in range(4):
        assert client.get("/", headers={CUSTOMER_HEADER: "user_123"}).data == b"ok"
    middleware.close()
    assert fake_commet.usage_total("user_123", "ai_tokens") == 2


# Customer ids in UTF-8.

JOSE = "jos\u00e9"


def _jose_ledger(fake_commet: FakeCommet) -> list[str]:
    return [e.customer_id for e in fake_commet.events(feature="api_calls")]


@pytest.mark.parametrize(
    ("resolver", "request_options"),
    [
        (from_header(CUSTOMER_HEADER), {"headers": {CUSTOMER_HEADER: JOSE.encode()}}),
        (from_cookie("customer"), {"headers": {"Cookie": f"customer={JOSE}".encode()}}),
        (from_query("customer"), {"params": {"customer": JOSE}}),
    ],
    ids=["header", "cookie", "query"],
)
def test_utf8_customer_reaches_the_emulator_from_starlette(
    fake_commet: FakeCommet, resolver: CustomerResolver, request_options: dict[str, Any]
) -> None:
    """A UTF-8 josé in a header, cookie or query string is billed as josé, not josÃ©."""
    fake_commet.add_customer(JOSE)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = _starlette(
        endpoint,
        customer=resolver,
        meter="api_calls",
        api_key="ck_test_key",
        transport=fake_commet.transport,
    )
    with TestClient(app) as client:
        assert client.get("/", **request_options).status_code == 200
    assert _jose_ledger(fake_commet) == [JOSE]


# What a PEP 3333 server (gunicorn, werkzeug's own) puts in the environ for UTF-8 bytes.
JOSE_IN_ENVIRON = JOSE.encode().decode("latin-1")


@pytest.mark.parametrize(
    ("resolver", "request_options"),
    [
        (
            from_header(CUSTOMER_HEADER),
            {"environ_overrides": {"HTTP_X_CUSTOMER_ID": JOSE_IN_ENVIRON}},
        ),
        (
            from_environ("HTTP_X_CUSTOMER_ID"),
            {"environ_overrides": {"HTTP_X_CUSTOMER_ID": JOSE_IN_ENVIRON}},
        ),
        (
            from_query("customer"),
            {"environ_overrides": {"QUERY_STRING": "customer=" + JOSE_IN_ENVIRON}},
        ),
        (from_query("customer"), {"query_string": {"customer": JOSE}}),
        # Werkzeug's test client skips the latin-1 step: the already decoded text still works.
        (from_header(CUSTOMER_HEADER), {"headers": {CUSTOMER_HEADER: JOSE}}),
    ],
    ids=["header", "environ", "raw-query", "escaped-query", "decoded-header"],
)
def test_utf8_customer_reaches_the_emulator_from_flask(
    fake_commet: FakeCommet, resolver: CustomerResolver, request_options: dict[str, Any]
) -> None:
    """PEP 3333 hands josé over as latin-1 text; it is still billed as josé."""
    fake_commet.add_customer(JOSE)

    def view() -> str:
        return "ok"

    app, middleware = _flask(
        view,
        customer=resolver,
        meter="api_calls",
        api_key="ck_test_key",
        transport=fake_commet.transport,
    )
    assert app.test_client().get("/", **request_options).data == b"ok"
    middleware.close()
    assert _jose_ledger(fake_commet) == [JOSE]


def test_utf8_cookie_set_by_the_flask_test_client_is_billed_as_josé(
    fake_commet: FakeCommet,
) -> None:
    """Werkzeug quotes josé as "jos\\303\\251" (UTF-8 octal escapes): still billed as josé."""
    fake_commet.add_customer(JOSE)

    def view() -> str:
        return "ok"

    app, middleware = _flask(
        view,
        customer=from_cookie("customer"),
        meter="api_calls",
        api_key="ck_test_key",
        transport=fake_commet.transport,
    )
    client = app.test_client()
    client.set_cookie("customer", JOSE)
    assert client.get("/").data == b"ok"
    middleware.close()
    assert _jose_ledger(fake_commet) == [JOSE]


@pytest.mark.parametrize(
    "header",
    [
        "customer=" + JOSE_IN_ENVIRON,  # raw UTF-8 through a PEP 3333 server
        'customer="jos\\351"',  # Python's SimpleCookie quoting of é
        'theme={"dark": true}; customer=' + JOSE_IN_ENVIRON,  # a pair SimpleCookie chokes on
        "session=" + "s" * 400 + "; customer=" + JOSE_IN_ENVIRON,  # longer than any id
    ],
)
def test_wsgi_cookie_header_variants_name_josé(header: str) -> None:
    """from_cookie finds josé in a WSGI Cookie header whatever else the header holds."""
    assert from_cookie("customer")({"REQUEST_METHOD": "GET", "HTTP_COOKIE": header}) == JOSE


def test_asgi_cookie_after_a_long_or_odd_cookie_is_found(sink: ListSink) -> None:
    """A Cookie header past 255 characters, with a JSON-valued cookie, still yields the id."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    cookie = 'theme={"dark": true}; session=' + "s" * 400 + "; customer=cus_1"
    app = _starlette(endpoint, customer=from_cookie("customer"), meter="api_calls", sink=sink)
    with TestClient(app) as client:
        client.get("/", headers={"Cookie": cookie})
    assert [e.customer_id for e in sink.events] == ["cus_1"]


@pytest.mark.parametrize(
    ("resolver", "scope"),
    [
        (from_header(CUSTOMER_HEADER), {"headers": [(b"x-customer-id", b"jos\xe9")]}),
        (from_cookie("customer"), {"headers": [(b"cookie", b"customer=jos\xe9")]}),
        (from_query("customer"), {"query_string": b"customer=jos\xe9"}),
        (from_query("customer"), {"query_string": b"customer=jos%E9"}),
    ],
    ids=["header", "cookie", "query", "escaped-query"],
)
def test_asgi_bytes_that_are_not_utf8_fall_back_to_latin1(
    resolver: CustomerResolver, scope: dict[str, Any]
) -> None:
    """A lone byte 0xE9 is not UTF-8: read as latin-1 it is still josé (ASGI scope bytes)."""
    # Starlette's TestClient re-encodes header text as UTF-8: the raw bytes are given here.
    assert resolver({"type": "http", "headers": [], **scope}) == JOSE


def test_wsgi_header_that_is_not_utf8_stays_latin1(sink: ListSink) -> None:
    """A WSGI header whose latin-1 bytes are not UTF-8 keeps its latin-1 reading."""

    def view() -> str:
        return "ok"

    app, _ = _flask(view, meter="api_calls", sink=sink)
    app.test_client().get("/", environ_overrides={"HTTP_X_CUSTOMER_ID": "jos\xe9"})
    assert [e.customer_id for e in sink.events] == [JOSE]


# set_customer and @metered(customer=...) normalise like the resolvers.


def test_set_customer_strips_like_the_resolvers(sink: ListSink) -> None:
    """set_customer(' cus_1 ') in a request bills cus_1, as from_header would read it."""

    @metered("api_calls")
    async def endpoint(request: Request) -> Response:
        set_customer(" cus_1 ")
        return PlainTextResponse("ok")

    with TestClient(_starlette(endpoint, sink=sink)) as client:
        client.get("/")
        client.get("/", headers={CUSTOMER_HEADER: " cus_1 "})
    assert [e.customer_id for e in sink.events] == ["cus_1", "cus_1"]


def test_set_customer_in_flask_before_request_strips(sink: ListSink) -> None:
    """set_customer from a Flask before_request hook bills the stripped id."""

    @metered("api_calls")
    def view() -> str:
        return "ok"

    app, _ = _flask(view, sink=sink)

    @app.before_request
    def identify() -> None:
        g.customer = "\tcus_2\n"
        set_customer(g.customer)

    app.test_client().get("/")
    assert [e.customer_id for e in sink.events] == ["cus_2"]


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_set_customer_refuses_a_blank_id_clearly(sink: ListSink, blank: str) -> None:
    """An empty or whitespace-only id is a ValueError that says so and names set_customer."""
    with commet_context(sink=sink), pytest.raises(ValueError, match=r"set_customer\(\).*empty"):
        set_customer(blank)


def test_metered_customer_is_stripped(sink: ListSink) -> None:
    """@metered(customer=' cus_1 ') and a function returning one bill cus_1."""
    with commet_context(sink=sink):
        metered("api_calls", customer=" cus_1 ")(lambda: None)()
        metered("api_calls", customer=lambda: "\tcus_1")(lambda: None)()
    assert [e.customer_id for e in sink.events] == ["cus_1", "cus_1"]


def test_commet_context_strips_its_customer_like_the_resolvers() -> None:
    """``commet_context(customer=" cus_1 ")`` names cus_1 for usage, quotas and current_customer."""
    from commet_middleware import commet_context, current_customer

    with commet_context(customer=" cus_1 ", sink=ListSink()):
        assert current_customer() == "cus_1"
