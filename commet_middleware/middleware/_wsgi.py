"""``CommetWSGIMiddleware``: the PEP 3333 adapter of the billing core (Flask, any WSGI app)."""

from __future__ import annotations

import contextvars
import io
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, cast

from commet_middleware._settings import (
    SETTING_FIELDS,
    CommetSettings,
    DeadLetterHook,
    Dialect,
    OverflowPolicy,
    StartupCheck,
)
from commet_middleware.billing._context import EventSink, _current
from commet_middleware.billing._core import SETTLED, BillingCall, Phase
from commet_middleware.billing._refusals import (
    CUSTOMER_REQUIRED,
    CustomerRequiredError,
    Refusal,
    RequestRefusedError,
    status_line,
)
from commet_middleware.billing._rules import DEFAULT_EXCLUDE, MeteringRules, MeterSpec
from commet_middleware.billing._setup import MiddlewareSetup, build_settings
from commet_middleware.customers import CustomerResolver, resolve_now
from commet_middleware.quota import QuotaGate
from commet_middleware.quota._idempotency import MAX_BODY_BYTES, IdempotencyAnswer, ResponseCapture

__all__ = ["CommetWSGIMiddleware"]

logger = logging.getLogger("commet_middleware")

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

Write = Callable[[bytes], object]


class CommetWSGIMiddleware(MiddlewareSetup):
    """Bill each successful WSGI request's usage to its customer through Commet.

    Same options and rules as :class:`commet_middleware.CommetMiddleware`. Install it around
    Flask's ``wsgi_app`` (``app.wsgi_app = CommetWSGIMiddleware(app.wsgi_app, ...)``). A
    response is complete, and billed, when the server has consumed the whole body iterable;
    one closed before that (client gone) is not billed. A billable response is settled
    (usage spooled) before the client can have all of it: before its last chunk is handed to
    the server when that chunk is known (a list body, or a declared ``Content-Length``), else
    when the iterable is exhausted, which is before the server writes the end of a chunked
    body; once settled, a failing write of the last chunk still bills. A
    ``wsgi.file_wrapper`` response is handed back untouched (the server's sendfile path) and
    billed when the server closes it, that is after the file was sent: on that path a crash
    right after the send can lose the event. Resolvers must be
    sync here. There is no lifespan in WSGI: the queue starts on the first request and is
    flushed by :meth:`close` (call it at shutdown) or by the queue's own exit hook.
    ``@quota_guard`` refusals are answered here whether Flask propagates the guard's exception
    or turns it into a 500 first.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        customer: CustomerResolver | None = None,
        meter: MeterSpec = None,
        exclude: Iterable[str] = DEFAULT_EXCLUDE,
        bill_status: Callable[[int], bool] | None = None,
        on_missing_customer: Literal["serve", "reject"] = "serve",
        idempotency_header: str | None = None,
        sink: EventSink | None = None,
        settings: CommetSettings | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        transport: Any = None,
        dialect: Dialect | None = None,
        api_version: str | None = None,
        timeout: float | None = None,
        spool_path: str | None = None,
        dead_letter: DeadLetterHook | None = None,
        quota_gate: QuotaGate | None = None,
        connect_timeout: float | None = None,
        quota_timeout: float | None = None,
        max_retries: int | None = None,
        backoff_base: float | None = None,
        backoff_cap: float | None = None,
        retry_after_cap: float | None = None,
        queue_limit: int | None = None,
        overflow: OverflowPolicy | None = None,
        overflow_block_timeout: float | None = None,
        max_concurrency: int | None = None,
        batch_size: int | None = None,
        shutdown_timeout: float | None = None,
        aggregate_window: float | None = None,
        fold_when_behind: bool | None = None,
        verify_on_startup: StartupCheck | None = None,
        quota_store: str | None = None,
        quota_store_timeout: float | None = None,
        quota_lease: float | None = None,
        idempotency_ttl: float | None = None,
        idempotency_replay: bool = False,
    ) -> None:
        # Every CommetSettings field is a keyword here (explicit, so add_middleware can type
        # them); the ones given (not None) win over settings= and the environment.
        given = {name: value for name, value in locals().items() if name in SETTING_FIELDS}
        self.app = app
        self._set_up(
            customer=customer,
            rules=MeteringRules(
                meter=meter,
                exclude=exclude,
                bill_status=bill_status,
                on_missing_customer=on_missing_customer,
            ),
            idempotency_header=idempotency_header,
            settings=build_settings(settings, given),
            sink=sink,
            quota_gate=quota_gate,
            idempotency_replay=idempotency_replay,
        )
        # A WSGI app is built as its process starts (there is no lifespan): check now, so a
        # wrong key is one line in the worker's start-up log ("raise": the worker fails to boot).
        self._startup_checks()

    def close(self) -> None:
        """Flush and close the delivery queue this middleware owns (at worker shutdown), then
        the quota gate's client."""
        self._sinks.close()
        self._gates.close()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("commet.applied"):
            return self.app(environ, start_response)
        environ["commet.applied"] = True
        if not self._sinks.started:
            self._sinks.start()
        return _WSGICall(self, environ, start_response).run()


class _WSGICall(BillingCall):
    """One WSGI request: the billing core, told what ``start_response`` and the body say."""

    __slots__ = ("_start_response", "capture", "context", "environ", "mw")

    def __init__(
        self,
        middleware: CommetWSGIMiddleware,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> None:
        super().__init__(middleware.new_context(), middleware.rules, middleware.stats)
        self.mw = middleware
        self.environ = environ
        self._start_response = start_response
        # The response as it goes out, kept for an Idempotency-Key replay (opt-in).
        self.capture: ResponseCapture | None = None
        # The app and every chunk of its body run in this context, so @metered code that runs
        # lazily inside a streamed body still finds the request.
        self.context = contextvars.copy_context()
        self.context.run(_current.set, self.ctx)

    def admit_client_key(self) -> list[bytes] | None:
        """Claim the client's Idempotency-Key for this request (its body read and hashed).

        Returns None to run the app (the body is there to read again), or the body of the
        answer the key's record gave instead (already started).
        """
        guard = self.mw._idempotency
        header = self.mw.idempotency_header
        environ = self.environ
        client_key = environ.get("HTTP_" + header.upper().replace("-", "_")) if header else None
        if guard is None or not client_key:
            return None
        body = _read_body(environ)
        admission = guard.begin(
            str(client_key),
            self.ctx.customer_id,
            str(environ.get("REQUEST_METHOD", "GET")),
            self._path(),
            str(environ.get("QUERY_STRING", "")),
            body,
        )
        if isinstance(admission, IdempotencyAnswer):
            self.answered()
            refusal = Refusal(admission.status, admission.body, tuple(admission.headers))
            self._answer(refusal, None)
            return [refusal.body]
        self.ctx.key_seed = admission.seed
        self.ctx.idempotency = admission
        self.capture = admission.capture
        return None

    def _path(self) -> str:
        return str(self.environ.get("SCRIPT_NAME", "")) + str(self.environ.get("PATH_INFO", ""))

    def run(self) -> Iterable[bytes]:
        ctx = self.ctx
        resolver = self.mw.customer
        if resolver is not None:
            environ = self.environ
            ctx.customer_id = resolve_now(resolver, environ)
            if ctx.customer_id is None:  # asked again once the app has authenticated the user
                ctx.late_resolver = lambda: resolve_now(resolver, environ)
        if self.mw._idempotency is not None:
            answered = self.admit_client_key()
            if answered is not None:
                return answered
        try:
            result = self.context.run(self.mw.app, self.environ, self.start_response)
        except (CustomerRequiredError, RequestRefusedError):
            # The app let the refusal through (Flask in testing mode does).
            if self.refused:
                return [self.refusal_body()]
            if not self.refusal_raised():
                raise
            self._refuse(None)
            return [self.refusal_body()]
        except BaseException:
            self.ended()
            raise
        wrapper_type = self.environ.get("wsgi.file_wrapper")
        if (
            isinstance(wrapper_type, type)
            and isinstance(result, wrapper_type)
            and not self.refused
            and self._hook_file_wrapper(result)
        ):
            return result
        return _BillingIterable(self, result)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Write:
        ctx = self.ctx
        code = status[:3]
        status_code: int | None
        if code.isdigit() and status[3:4] in ("", " "):
            status_code = int(code)
        else:
            try:
                status_code = int(status.split(None, 1)[0])
            except ValueError:
                status_code = None
        if ctx.customer_id is None:
            ctx.customer()
        content_length = None
        for name, value in headers:
            if name == "Content-Length" or name.lower() == "content-length":
                content_length = value
                break
        refusal = self.response_started(
            status_code,
            method=self.environ.get("REQUEST_METHOD", "GET"),
            content_length=content_length,
            feature=None if self.rules.meter is None else self._zero_code_feature(),
            path=self._path(),
        )
        if refusal is not None:
            self._answer(refusal, exc_info)
            return _discard
        extra = self.extra_headers()
        if extra:
            headers = [*headers, *extra]
        if exc_info is not None:
            write = self._start_response(status, headers, exc_info)
        else:
            write = self._start_response(status, headers)
        capture = self.capture
        if capture is None:
            return write
        capture.start(status_code or 0, headers)

        def captured_write(data: bytes) -> object:
            capture.add(data)
            return write(data)

        return captured_write

    def _zero_code_feature(self) -> str | None:
        environ = self.environ
        rules = self.rules
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        path = str(environ.get("PATH_INFO", "")) or "/"
        if rules.single_feature is not None and method != "OPTIONS":
            # One feature for every request (meter="api_calls"): only the path can exclude it.
            return None if rules.excludes_path(path) else rules.single_feature
        # Flask (werkzeug) leaves its request, and through it the matched rule, in the environ.
        rule = getattr(getattr(environ.get("werkzeug.request"), "url_rule", None), "rule", None)
        preflight = "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ
        return rules.zero_code_feature(
            environ, method, path, rule if isinstance(rule, str) else None, preflight
        )

    def refusal_body(self) -> bytes:
        """The body of the answer sent instead of the app's."""
        refusal = self.ctx.refusal
        return CUSTOMER_REQUIRED.body if refusal is None else refusal.body

    def _refuse(self, exc_info: OptExcInfo | None) -> None:
        self._answer(
            self.refuse(str(self.environ.get("REQUEST_METHOD", "")), self._path()), exc_info
        )

    def _answer(self, refusal: Refusal, exc_info: OptExcInfo | None) -> None:
        """Start ``refusal`` in place of the app's response (its body is the iterable's)."""
        headers = [*refusal.headers, ("Content-Length", str(len(refusal.body)))]
        if exc_info is not None:
            self._start_response(status_line(refusal.status), headers, exc_info)
        else:
            self._start_response(status_line(refusal.status), headers)

    def finish(self, *, complete: bool) -> None:
        """The body is all handed over (``complete``) or given up: settle the request.

        Called up to three times per response (its last chunk, its end, its close): the first
        settles, the others return at once."""
        if self.phase in SETTLED:
            return
        if complete:
            if self.before_last():  # before the last chunk goes out: the spool's group commit
                self.ctx.wait_committed()
            self.after_last()
        self.ended()  # settles what is left: a body given up, or a response never started

    def _hook_file_wrapper(self, result: object) -> bool:
        if self.capture is not None:
            self.capture.overflow = True  # a file the server sends is not kept for a replay
        # Returning the server's own file wrapper keeps its sendfile fast path; billing then
        # happens when the server closes it, which it does after sending the file.
        inner_close = getattr(result, "close", None)

        def close() -> None:
            try:
                if inner_close is not None:
                    self.context.run(inner_close)
            finally:
                self.finish(complete=sys.exc_info()[0] is None)

        try:
            result.close = close  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            return False
        return True


def _read_body(environ: WSGIEnvironment) -> bytes | None:
    """Read the whole request body and put it back for the app; None when it is too large."""
    stream = environ.get("wsgi.input")
    length = str(environ.get("CONTENT_LENGTH") or "").strip()
    if stream is None:
        return b""
    if length.isdigit():
        if int(length) > MAX_BODY_BYTES:
            return None
        body = stream.read(int(length))
    elif environ.get("wsgi.input_terminated"):
        body = stream.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            return None
    else:
        body = b""  # no length and no end marker: WSGI says there is no body to read
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return bytes(body)


# What ``next`` returns here for an exhausted body (see _BillingIterable.__next__).
_END = cast("bytes", object())


def _discard(data: bytes) -> None:
    """The ``write`` given to an app whose response was replaced by the 401."""


class _BillingIterable:
    """The body handed to the server: inner chunks in the request's context, then settle.

    A billable response is settled (usage enqueued, so spooled) before the client can have
    all of it, so a crash loses nothing. When the last chunk is known before it is handed
    over, settling happens just before that: the last item of a list or tuple body, or the
    chunk that completes the declared ``Content-Length`` (the first chunk of a HEAD, 204 or
    304). Otherwise the body is chunked or close-delimited, and its end can only be written
    once the server has pulled ``StopIteration`` from here: gunicorn (sync and gthread)
    writes each chunk as it pulls it, then the terminating empty chunk in ``resp.close()``,
    then calls our ``close()``; waitress, werkzeug and wsgiref do the same, and an HTTP/1.0
    body ends when the connection closes, later still. This object has no ``len()``, so no
    server derives a ``Content-Length`` of its own from it. Settling on ``StopIteration`` is
    therefore still before the client has the whole response, without reading a chunk ahead:
    a one-chunk lookahead would hold every streamed chunk (server-sent events) back until the
    app produced the next one, and gain nothing.
    """

    def __init__(self, call: _WSGICall, inner: Iterable[bytes]) -> None:
        self._call = call
        self._inner = inner
        self._iterator: Iterator[bytes] | None = None
        # A list or tuple says which chunk is the last one; other iterables only say so late.
        self._chunks_left = len(inner) if isinstance(inner, (list, tuple)) else None
        self._exhausted = False
        self._failed = False
        self._closed = False
        self._rejection_sent = False

    def __iter__(self) -> _BillingIterable:
        return self

    def __next__(self) -> bytes:
        call = self._call
        if call.phase is Phase.REFUSED:
            return self._next_rejection_chunk()
        try:
            iterator = self._iterator
            if iterator is None:
                iterator = self._iterator = call.context.run(iter, self._inner)
            # A sentinel rather than StopIteration: no exception to raise through Context.run
            # and catch here on every response's end.
            chunk = call.context.run(next, iterator, _END)
        except (CustomerRequiredError, RequestRefusedError):
            # A lazy body (generator app) refused before calling start_response.
            if not call.refused:
                if not call.refusal_raised():
                    self._failed = True
                    raise
                call._refuse(None)
            return self._next_rejection_chunk()
        except BaseException:
            self._failed = True
            raise
        if chunk is _END:
            # The whole body is in the server's hands and it has not yet written the end of a
            # chunked or close-delimited body: the response is complete. Settling here rather
            # than in close() also bills under clients that never close (werkzeug's test
            # client unless buffered); close() still runs the inner close exactly once.
            self._exhausted = True
            call.finish(complete=True)
            raise StopIteration
        if call.refused:  # start_response in this very chunk decided to refuse
            return self._next_rejection_chunk()
        if call.capture is not None:
            call.capture.add(chunk)
        if self._is_last(chunk) and call.billable:
            # Settled before the last chunk is handed over: a crash after it loses nothing.
            call.finish(complete=True)
        return chunk

    def _is_last(self, chunk: bytes) -> bool:
        """Return True when the client has the whole response once ``chunk`` is written."""
        last = False
        if self._chunks_left is not None:
            self._chunks_left -= 1
            last = self._chunks_left <= 0
        return self._call.completes_with(len(chunk), last=last)

    def _next_rejection_chunk(self) -> bytes:
        if self._rejection_sent:
            raise StopIteration
        self._rejection_sent = True
        return self._call.refusal_body()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        call = self._call
        try:
            inner_close = getattr(self._inner, "close", None)
            if inner_close is not None:
                call.context.run(inner_close)
        finally:
            call.finish(complete=self._exhausted and not self._failed)
