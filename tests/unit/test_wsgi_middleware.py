"""Raw PEP 3333 mechanics of CommetWSGIMiddleware, with a list sink and hand-written apps."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.util import FileWrapper

import pytest

from commet_middleware import CommetWSGIMiddleware, metered, track
from commet_middleware.billing._context import get_current_context
from commet_middleware.customers import from_header

from .conftest import ListSink

StartResponse = Callable[..., Callable[[bytes], object]]


def environ(
    path: str = "/", method: str = "GET", headers: dict[str, str] | None = None
) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
    }
    for key, value in (headers or {}).items():
        env["HTTP_" + key.upper().replace("-", "_")] = value
    return env


class Server:
    """A minimal PEP 3333 server: records start_response calls, consumes and closes the body."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.written: list[bytes] = []

    def start_response(self, *args: Any) -> Callable[[bytes], object]:
        self.calls.append(args)
        return self.written.append

    @property
    def status(self) -> str:
        return str(self.calls[-1][0])

    def run(self, app: Any, env: dict[str, Any], *, consume: bool = True) -> bytes:
        result = app(env, self.start_response)
        try:
            body = b"".join(result) if consume else next(iter(result))
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return body


class ClosingBody:
    """A body iterable that counts close() calls."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self.closed += 1


def app_with(
    status: str = "200 OK",
    chunks: tuple[bytes, ...] = (b"ok",),
    before: Callable[[], None] | None = None,
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(env: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if before is not None:
            before()
        start_response(status, [("Content-Type", "text/plain")])
        return list(chunks)

    return app


def mw_for(app: Any, sink: ListSink, **options: Any) -> CommetWSGIMiddleware:
    return CommetWSGIMiddleware(app, customer=from_header("X-Customer"), sink=sink, **options)


def test_success_is_billed_once(sink: ListSink) -> None:
    """A 200 with @metered usage is billed once, to the header's customer."""

    @metered("api_calls")
    def work() -> None:
        pass

    server = Server()
    assert (
        server.run(mw_for(app_with(before=work), sink), environ(headers={"X-Customer": "cus_1"}))
        == b"ok"
    )
    assert [(e.customer_id, e.feature) for e in sink.events] == [("cus_1", "api_calls")]


@pytest.mark.parametrize(
    "status", ["400 Bad Request", "404 Not Found", "500 Internal Server Error"]
)
def test_error_statuses_are_not_billed(sink: ListSink, status: str) -> None:
    """4xx and 5xx responses bill nothing."""
    app = app_with(status, before=lambda: track("api_calls"))
    Server().run(mw_for(app, sink), environ(headers={"X-Customer": "cus_1"}))
    assert sink.events == []


def test_exception_is_not_billed(sink: ListSink) -> None:
    """An app that raises bills nothing and the exception reaches the server."""

    def boom() -> None:
        track("api_calls")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Server().run(mw_for(app_with(before=boom), sink), environ(headers={"X-Customer": "cus_1"}))
    assert sink.events == []


def test_start_response_passes_exc_info_only_when_given_and_returns_write(sink: ListSink) -> None:
    """The wrapped start_response forwards exc_info only if the app gave it, and returns write."""

    def app(env: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        write = start_response("200 OK", [])
        write(b"legacy-")
        try:
            raise ValueError("x")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"body"]

    server = Server()
    server.run(mw_for(app, sink), environ())
    assert len(server.calls[0]) == 2
    assert len(server.calls[1]) == 3
    assert server.written == [b"legacy-"]


def test_close_closes_the_inner_iterable_exactly_once(sink: ListSink) -> None:
    """close() reaches the app's iterable once, even if the server calls it twice."""
    body = ClosingBody([b"a", b"b"])

    def app(env: dict[str, Any], start_response: StartResponse) -> ClosingBody:
        track("api_calls")
        start_response("200 OK", [])
        return body

    result = mw_for(app, sink)(environ(headers={"X-Customer": "cus_1"}), Server().start_response)
    assert b"".join(result) == b"ab"
    assert len(sink.events) == 1  # billed once the whole body was consumed
    assert body.closed == 0
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert body.closed == 1
    assert len(sink.events) == 1


def test_body_not_fully_consumed_is_not_billed(sink: ListSink) -> None:
    """A server that closes before the body is exhausted (client gone) bills nothing."""
    body = ClosingBody([b"a", b"b", b"c"])

    def app(env: dict[str, Any], start_response: StartResponse) -> ClosingBody:
        track("api_calls")
        start_response("200 OK", [])
        return body

    mw = mw_for(app, sink)
    Server().run(mw, environ(headers={"X-Customer": "cus_1"}), consume=False)
    assert sink.events == []
    assert body.closed == 1
    assert mw.stats.incomplete_responses == 1


class RecordingServer(Server):
    """A server that notes, for each chunk it pulls and for the end, how many events exist."""

    def __init__(self, sink: ListSink) -> None:
        super().__init__()
        self.sink = sink
        self.seen: list[tuple[bytes | None, int]] = []

    def run(self, app: Any, env: dict[str, Any], *, consume: bool = True) -> bytes:
        result = app(env, self.start_response)
        try:
            for chunk in result:
                self.seen.append((chunk, len(self.sink.events)))
            self.seen.append((None, len(self.sink.events)))  # StopIteration, before close()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return b"".join(chunk for chunk, _ in self.seen if chunk is not None)


def generator_app(
    chunks: tuple[bytes, ...], headers: list[tuple[str, str]], status: str = "200 OK"
) -> Callable[[dict[str, Any], StartResponse], Iterator[bytes]]:
    def app(env: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        track("api_calls")
        start_response(status, headers)
        yield from chunks

    return app


def test_list_body_is_billed_before_its_last_chunk_is_yielded(sink: ListSink) -> None:
    """For a list body the sink already has the event when the server gets the last chunk."""
    server = RecordingServer(sink)
    app = app_with(chunks=(b"a", b"b", b"c"), before=lambda: track("api_calls"))
    assert server.run(mw_for(app, sink), environ(headers={"X-Customer": "cus_1"})) == b"abc"
    assert server.seen == [(b"a", 0), (b"b", 0), (b"c", 1), (None, 1)]


def test_generator_with_content_length_is_billed_before_its_last_chunk(sink: ListSink) -> None:
    """A generator body with Content-Length is billed before the chunk that completes it."""
    server = RecordingServer(sink)
    app = generator_app((b"ab", b"cd"), [("Content-Length", "4")])
    assert server.run(mw_for(app, sink), environ(headers={"X-Customer": "cus_1"})) == b"abcd"
    assert server.seen == [(b"ab", 0), (b"cd", 1), (None, 1)]


def test_generator_without_length_is_billed_on_exhaustion_before_close(sink: ListSink) -> None:
    """A chunked generator body is billed when exhausted, before the server ends the body."""
    server = RecordingServer(sink)
    app = generator_app((b"a", b"b"), [])
    assert server.run(mw_for(app, sink), environ(headers={"X-Customer": "cus_1"})) == b"ab"
    assert server.seen == [(b"a", 0), (b"b", 0), (None, 1)]


def test_flask_style_closing_iterator_is_billed_before_its_last_chunk(sink: ListSink) -> None:
    """A werkzeug response (a ClosingIterator with Content-Length) is billed before its chunk."""
    from werkzeug.wrappers import Response

    def app(env: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        track("api_calls")
        return Response(b'{"ok":true}', mimetype="application/json")(env, start_response)

    server = RecordingServer(sink)
    assert server.run(mw_for(app, sink), environ(headers={"X-Customer": "cus_1"})) == b'{"ok":true}'
    assert server.seen == [(b'{"ok":true}', 1), (None, 1)]


def test_head_response_is_billed_before_its_first_chunk(sink: ListSink) -> None:
    """A HEAD response is whole with its headers, which go out with the first chunk."""
    server = RecordingServer(sink)
    app = generator_app((b"a", b"b"), [])
    server.run(mw_for(app, sink), environ(method="HEAD", headers={"X-Customer": "cus_1"}))
    assert server.seen == [(b"a", 1), (b"b", 1), (None, 1)]


def test_last_chunk_that_fails_to_write_is_still_billed(sink: ListSink) -> None:
    """Settled before the last chunk, a response whose last write fails (client gone) is billed."""
    app = app_with(chunks=(b"a", b"b"), before=lambda: track("api_calls"))
    mw = mw_for(app, sink)
    result = mw(environ(headers={"X-Customer": "cus_1"}), Server().start_response)
    chunks = iter(result)
    assert next(chunks) == b"a"
    assert next(chunks) == b"b"  # the server's write of it fails: it closes without going on
    result.close()  # type: ignore[attr-defined]
    assert len(sink.events) == 1
    assert mw.stats.incomplete_responses == 0


def test_error_status_is_not_settled_before_the_last_chunk(sink: ListSink) -> None:
    """A 500 list body bills nothing, and is settled at the end as before."""
    server = RecordingServer(sink)
    app = app_with("500 Internal Server Error", (b"a", b"b"), before=lambda: track("api_calls"))
    mw = mw_for(app, sink)
    server.run(mw, environ(headers={"X-Customer": "cus_1"}))
    assert server.seen == [(b"a", 0), (b"b", 0), (None, 0)]
    assert sink.events == []
    assert mw.stats.incomplete_responses == 0


def test_generator_app_runs_in_the_request_context(sink: ListSink) -> None:
    """A lazy body still sees the request: usage recorded while streaming is billed at the end."""

    def app(env: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        for i in range(3):
            assert get_current_context() is not None
            track("chunks")
            yield str(i).encode()

    body = Server().run(mw_for(app, sink), environ(headers={"X-Customer": "cus_1"}))
    assert body == b"012"
    assert [e.feature for e in sink.events] == ["chunks"] * 3
    assert get_current_context() is None


def test_file_wrapper_is_handed_back_untouched_and_billed_at_close(sink: ListSink) -> None:
    """The server's wsgi.file_wrapper object is returned as is; billing happens when it closes."""
    env = environ(headers={"X-Customer": "cus_1"})
    env["wsgi.file_wrapper"] = FileWrapper

    def app(env: dict[str, Any], start_response: StartResponse) -> Any:
        track("downloads")
        start_response("200 OK", [])
        return env["wsgi.file_wrapper"](io.BytesIO(b"file-bytes"))

    result = mw_for(app, sink)(env, Server().start_response)
    assert type(result) is FileWrapper
    assert b"".join(result) == b"file-bytes"
    result.close()
    assert [e.feature for e in sink.events] == ["downloads"]


def test_zero_code_and_exclusions(sink: ListSink) -> None:
    """meter= bills each successful request except excluded paths and CORS preflights."""
    mw = mw_for(app_with(), sink, meter="api_calls")
    for path, method, extra in [
        ("/search", "GET", {}),
        ("/health", "GET", {}),
        ("/docs", "GET", {}),
        ("/search", "OPTIONS", {"Access-Control-Request-Method": "GET"}),
    ]:
        Server().run(mw, environ(path, method, {"X-Customer": "cus_1", **extra}))
    assert [e.feature for e in sink.events] == ["api_calls"]


def test_missing_customer_default_serves_and_counts(sink: ListSink) -> None:
    """With no customer a billable request is served, billed to nobody and counted."""
    mw = mw_for(app_with(), sink, meter="api_calls")
    server = Server()
    assert server.run(mw, environ("/search")) == b"ok"
    assert server.status == "200 OK"
    assert sink.events == []
    assert mw.stats.unattributed_requests == 1


def test_missing_customer_reject_zero_code(sink: ListSink) -> None:
    """Reject mode replaces the response with a 401 customer_required JSON body."""
    mw = mw_for(app_with(), sink, meter="api_calls", on_missing_customer="reject")
    server = Server()
    body = server.run(mw, environ("/search"))
    assert server.status.startswith("401")
    assert json.loads(body)["error"]["code"] == "customer_required"
    assert sink.events == []


def test_missing_customer_reject_metered_does_not_run(sink: ListSink) -> None:
    """Reject mode: @metered refuses before running and the middleware answers 401."""
    ran: list[int] = []

    @metered("api_calls")
    def work() -> None:
        ran.append(1)

    mw = mw_for(app_with(before=work), sink, on_missing_customer="reject")
    server = Server()
    body = server.run(mw, environ())
    assert server.status.startswith("401")
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert ran == []


def test_installed_twice_bills_once(sink: ListSink) -> None:
    """The commet.applied environ key keeps a nested second instance out of the way."""
    inner = mw_for(app_with(), sink, meter="api_calls")
    Server().run(mw_for(inner, sink, meter="api_calls"), environ(headers={"X-Customer": "cus_1"}))
    assert len(sink.events) == 1
