"""CommetWSGIMiddleware and @metered on a real Flask app, through Flask's test client."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask, Response, abort, g, request, stream_with_context
from flask.testing import FlaskClient

from commet_middleware import CommetWSGIMiddleware, current_customer, metered, set_customer, track
from commet_middleware.customers import from_header

if TYPE_CHECKING:
    from integration.conftest import ListSink

CUSTOMER = {"X-Customer-ID": "cus_1"}


class ServerLikeClient(FlaskClient):
    """Consumes and closes every response body, as a WSGI server does (unless told otherwise)."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def build(sink: ListSink, **options: Any) -> tuple[Flask, CommetWSGIMiddleware]:
    app = Flask(__name__)
    app.test_client_class = ServerLikeClient
    options.setdefault("customer", from_header("X-Customer-ID"))
    middleware = CommetWSGIMiddleware(app.wsgi_app, sink=sink, **options)
    app.wsgi_app = middleware  # type: ignore[method-assign]

    @app.get("/search")
    @metered("api_calls")
    def search() -> dict[str, Any]:
        return {"q": request.args.get("q"), "customer": current_customer()}

    @app.get("/rows/<int:n>")
    @metered("rows_read", value=lambda rows: len(rows["rows"]))
    def rows(n: int) -> dict[str, Any]:
        return {"rows": list(range(n))}

    @app.get("/status/<int:code>")
    @metered("api_calls")
    def status(code: int) -> Any:
        if code == 404:
            abort(404)
        return {"code": code}, code

    @app.get("/boom")
    @metered("api_calls")
    def boom() -> str:
        raise RuntimeError("view bug")

    @app.get("/stream")
    @metered("streams")
    def stream() -> Response:
        @stream_with_context
        def generate() -> Iterator[str]:
            for i in range(3):
                track("chunks")
                yield str(i)

        return Response(generate())  # type: ignore[call-arg]

    return app, middleware


def test_success_is_billed_once(sink: ListSink) -> None:
    """A successful metered view is billed exactly once to the header's customer."""
    app, _ = build(sink)
    response = app.test_client().get("/search?q=x", headers=CUSTOMER)
    assert response.json == {"q": "x", "customer": "cus_1"}
    assert [(e.customer_id, e.feature) for e in sink.events] == [("cus_1", "api_calls")]


def test_value_computed_from_the_result(sink: ListSink) -> None:
    """value= as a function of the view's return value bills that amount."""
    app, _ = build(sink)
    app.test_client().get("/rows/4", headers=CUSTOMER)
    assert [(e.feature, e.value) for e in sink.events] == [("rows_read", 4)]


@pytest.mark.parametrize("code", [400, 404, 500])
def test_error_statuses_are_not_billed(sink: ListSink, code: int) -> None:
    """abort() and error statuses returned by the view bill nothing."""
    app, _ = build(sink)
    assert app.test_client().get(f"/status/{code}", headers=CUSTOMER).status_code == code
    assert sink.events == []


def test_exception_is_not_billed(sink: ListSink) -> None:
    """A view that raises gives a 500 and bills nothing."""
    app, _ = build(sink)
    assert app.test_client().get("/boom", headers=CUSTOMER).status_code == 500
    assert sink.events == []


def test_streaming_is_billed_at_completion(sink: ListSink) -> None:
    """A stream is billed once its body is consumed, with the usage tracked while streaming."""
    app, _ = build(sink)
    response = app.test_client().get("/stream", headers=CUSTOMER, buffered=False)
    assert sink.events == []
    assert response.get_data() == b"012"
    response.close()
    assert sorted(e.feature for e in sink.events) == ["chunks", "chunks", "chunks", "streams"]


def test_abandoned_stream_is_not_billed(sink: ListSink) -> None:
    """A stream closed before its end (client gone) is not billed."""
    app, middleware = build(sink)
    response = app.test_client().get("/stream", headers=CUSTOMER, buffered=False)
    next(iter(response.response))
    response.close()
    assert sink.events == []
    assert middleware.stats.incomplete_responses == 1


def test_set_customer_from_before_request(sink: ListSink) -> None:
    """set_customer in before_request decides who the view's usage is billed to."""
    app, _ = build(sink, customer=None)

    @app.before_request
    def authenticate() -> None:
        token = request.headers.get("X-Token")
        if token:
            g.user = "cus_" + token
            set_customer(g.user)

    response = app.test_client().get("/search", headers={"X-Token": "77"})
    assert response.json is not None
    assert response.json["customer"] == "cus_77"
    assert [e.customer_id for e in sink.events] == ["cus_77"]


def test_concurrent_requests_never_mix_customers(sink: ListSink) -> None:
    """100 requests on 16 threads: every event is on the customer of its own request."""
    app, _ = build(sink)

    def call(i: int) -> int:
        client = app.test_client()
        return client.get(f"/rows/{i % 7 + 1}", headers={"X-Customer-ID": f"cus_{i}"}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(call, range(100))) == {200}
    assert sorted((e.customer_id, e.value) for e in sink.events) == sorted(
        (f"cus_{i}", i % 7 + 1) for i in range(100)
    )
    assert len({e.idempotency_key for e in sink.events}) == 100


def test_zero_code_and_exclusions(sink: ListSink) -> None:
    """meter= bills every successful request once, except excluded paths and preflights."""
    app, _ = build(sink, meter={"/rows/<int:n>": "row_requests", "GET": "requests"})

    @app.get("/health")
    def health() -> str:
        return "ok"

    client = app.test_client()
    client.get("/rows/2", headers=CUSTOMER)
    client.get("/status/200", headers=CUSTOMER)
    client.get("/health", headers=CUSTOMER)
    client.options("/search", headers={**CUSTOMER, "Access-Control-Request-Method": "GET"})
    client.get("/status/404", headers=CUSTOMER)
    assert sorted(e.feature for e in sink.events) == sorted(
        ["rows_read", "row_requests", "api_calls", "requests"]
    )


def test_missing_customer_serve_and_reject(sink: ListSink) -> None:
    """No customer: served and counted by default; 401 customer_required in reject mode."""
    app, middleware = build(sink)
    assert app.test_client().get("/search").status_code == 200
    assert middleware.stats.unattributed_requests == 1

    strict, _ = build(sink, on_missing_customer="reject")
    for testing in (False, True):  # Flask turns the refusal into a 500, or lets it propagate
        strict.testing = testing
        response = strict.test_client().get("/search")
        assert response.status_code == 401
        assert response.json is not None
        assert response.json["error"]["code"] == "customer_required"
    assert sink.events == []


def test_event_is_enqueued_before_the_last_chunk_is_yielded(sink: ListSink) -> None:
    """A Flask JSON response's event is in the sink when the server pulls its last chunk."""
    from werkzeug.test import EnvironBuilder

    app, _ = build(sink)
    environ = EnvironBuilder("/search", query_string="q=x", headers=CUSTOMER).get_environ()
    result = app.wsgi_app(environ, lambda status, headers, exc_info=None: None)
    seen = [(chunk, len(sink.events)) for chunk in result]
    result.close()  # type: ignore[attr-defined]
    assert [count for _, count in seen] == [1]
    assert [e.feature for e in sink.events] == ["api_calls"]
