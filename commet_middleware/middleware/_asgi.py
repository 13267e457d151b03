"""``CommetMiddleware``: the pure ASGI adapter of the billing core (Starlette, FastAPI...)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from commet_middleware._settings import (
    SETTING_FIELDS,
    CommetSettings,
    DeadLetterHook,
    Dialect,
    OverflowPolicy,
    StartupCheck,
)
from commet_middleware.billing._context import EventSink, _current
from commet_middleware.billing._core import BillingCall, Phase
from commet_middleware.billing._refusals import (
    CustomerRequiredError,
    Refusal,
    RequestRefusedError,
)
from commet_middleware.billing._rules import DEFAULT_EXCLUDE, MeteringRules, MeterSpec
from commet_middleware.billing._setup import MiddlewareSetup, build_settings
from commet_middleware.customers import (
    CustomerResolver,
    resolve_async,
    resolve_now,
    resolve_now_or_later,
)
from commet_middleware.quota import QuotaGate
from commet_middleware.quota._idempotency import (
    IdempotencyAnswer,
    ResponseCapture,
    capture_asgi,
    read_asgi_body,
    replay_receive,
)

__all__ = ["CommetMiddleware"]

logger = logging.getLogger("commet_middleware")


class CommetMiddleware(MiddlewareSetup):
    """Bill each successful HTTP request's usage to its customer through Commet.

    ``customer`` resolves the paying customer (see :mod:`commet_middleware.customers`); code in
    the request may also call ``set_customer``. Usage comes from ``@metered``/``track`` in the
    endpoint and, in zero-code mode, from ``meter`` (a feature code, a table of route pattern
    or method to feature, or a function of the scope), skipping ``exclude`` paths and CORS
    preflights (``exclude`` concerns zero-code metering only: an explicit ``@metered``
    endpoint is metered wherever it lives). Usage is billed only when the response status
    passes ``bill_status`` (default ``status < 400``) and the response completed. An endpoint
    that raises is never billed.

    A crash loses nothing: a billable request is settled (quota reservations committed, usage
    enqueued, so written to the spool when there is one) *before* the message that gives the
    client the whole response is forwarded. That message is the final body message
    (``more_body`` false, or ``http.response.pathsend``), or earlier the body message that
    carries the last byte of a declared ``Content-Length``, or the response start itself for
    a response without a body (HEAD, 204, 304). Every message is still forwarded as soon as it
    arrives; nothing is buffered. So only that one send is inside the billed window: a client
    that disconnects before it (mid-stream, or a send that raised earlier) is not billed and
    is counted in ``stats.incomplete_responses``, while a send of that very message that
    fails (the client left just then) leaves the request billed: the endpoint did the work and
    produced the whole response. A non-billable response settles (releases its reservations)
    after its last message. Usage recorded after the request settled (a background task) is
    billed at once if the request was billed. ``stats`` counts what was enqueued,
    unattributed, rejected, invalid and incomplete.

    A billable request without a customer is never billed to anyone. With
    ``on_missing_customer="serve"`` (default) it is served, logged and counted in
    ``stats.unattributed_requests``. With ``"reject"`` it gets a 401 JSON error
    (``customer_required``): a ``@metered`` endpoint refuses before running; zero-code and
    ``track`` usage are checked when the response starts, so the handler has already run.

    ``idempotency_header`` (e.g. ``"Idempotency-Key"``) opts in to the client's keys: a key is
    bound to the customer, method, path, query and a hash of the body, and recorded in the quota
    store. The same key on a different request answers 422 ``idempotency_key_reused``; a repeat
    of a request that succeeded answers 409 ``idempotency_key_already_used`` (or, with
    ``idempotency_replay=True``, the stored answer, up to 64 KiB, for ``idempotency_ttl``);
    a repeat while the first runs answers 409 ``idempotency_in_progress``; a retry of a request
    that failed runs, and its events get the same keys, so it is billed once. Without it, keys
    come from a fresh id per executed request. Pass ``settings=`` or the common client
    settings as keywords (``api_key``, ``base_url``, ``transport``, ``dialect``,
    ``api_version``, ``timeout``, ``spool_path``, ``dead_letter``: every field of
    ``CommetSettings``, such as ``aggregate_window=``), or ``sink=`` to collect operations
    yourself. Precedence: keyword > ``settings`` > ``COMMET_*`` environment > default; a field
    of ``settings`` left at its default defers to the environment.
    ``quota_store`` (default ``COMMET_QUOTA_STORE``, else ``"memory"``) says where the quota
    guards keep their state: ``"memory"`` for one process, ``"sqlite:///PATH"`` for every
    worker of one host, ``"redis://HOST:PORT/DB"`` for several hosts.
    """

    def __init__(
        self,
        app: ASGIApp,
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http" or scope.get("commet.applied"):
            await self.app(scope, receive, send)
            return
        # Servers and test clients that never send lifespan still get a started queue.
        if not self._sinks.started:
            self._sinks.start()
            await self._astartup_checks()
        scope = dict(scope)
        scope["commet.applied"] = True
        # The request runs here rather than in a method of _HTTPCall: one coroutine less per
        # request (bench/RESULTS.md: each costs a busy server a microsecond or two).
        call = _HTTPCall(self, scope, send)
        ctx = call.ctx
        resolver = self.customer
        if resolver is not None:
            found = resolve_now_or_later(resolver, scope)
            ctx.customer_id = found if found is None or isinstance(found, str) else await found
            if ctx.customer_id is None:
                # Asked again later: values that appear only once the app has routed the
                # request or authenticated the user (path params, scope["user"]).
                ctx.late_resolver = lambda: resolve_now(resolver, scope)
        header = self.idempotency_header
        if header is not None:
            client_key = _header(scope, header.encode("latin-1"))
            if client_key:
                admitted = await call.admit_client_key(client_key, receive)
                if admitted is None:
                    return  # answered from the key's record; the app did not run
                receive = admitted
        token = _current.set(ctx)
        try:
            await self.app(scope, receive, call.send)
        except (CustomerRequiredError, RequestRefusedError):
            if not call.refusal_raised():
                if call.refused:
                    return  # the refusal was already sent, in place of the app's error page
                raise
            await call.answer(call.refuse(scope.get("method", ""), scope["path"]))
        finally:
            _current.reset(token)
            call.ended()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = False  # whether the app read a lifespan message

        async def receive_wrapper() -> Message:
            nonlocal asked
            asked = True
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._sinks.start()
                # "raise" fails the startup here: the server reports it and does not serve.
                await self._astartup_checks()
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                # Flush before the server is told it may exit.
                await self._sinks.aclose()
                await self._gates.aclose()
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception:
            if asked:
                raise
            # The app refuses lifespan without reading it (Django's ASGI app does). Answer it
            # here: otherwise nothing tells this process it is about to stop, and uvicorn ends
            # a SIGTERM'd process by re-raising the signal, so no exit hook flushes the queue.
            logger.debug("commet: the app does not handle lifespan; CommetMiddleware answers it")
            await self._answer_lifespan(receive, send)

    async def _answer_lifespan(self, receive: Receive, send: Send) -> None:
        """Run the lifespan protocol for an app that has none: start, and flush at shutdown."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._sinks.start()
                try:
                    await self._astartup_checks()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._sinks.aclose()
                await self._gates.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if bytes(key).lower() == b"content-length":
            return bytes(value).decode("latin-1")
    return None


class _HTTPCall(BillingCall):
    """One HTTP request: the billing core, told what the ASGI messages say.

    It extends the core rather than holding one: one object less per request.
    """

    __slots__ = ("_send", "capture", "mw", "scope")

    def __init__(self, middleware: CommetMiddleware, scope: Scope, send: Send) -> None:
        super().__init__(middleware.new_context(), middleware.rules, middleware.stats)
        self.mw = middleware
        self.scope = scope
        self._send = send
        # The response as it goes out, kept for an Idempotency-Key replay (opt-in).
        self.capture: ResponseCapture | None = None

    async def admit_client_key(self, client_key: str, receive: Receive) -> Receive | None:
        """Claim the client's Idempotency-Key for this request (its body read and hashed).

        Returns the ``receive`` the app reads the body from again, or None when the key's
        record answered instead (a refusal or a replay, already sent).
        """
        guard = self.mw._idempotency
        if guard is None:
            return receive
        body, messages = await read_asgi_body(receive)
        scope = self.scope
        admission = guard.begin(
            client_key,
            self.ctx.customer_id,
            str(scope.get("method", "GET")),
            scope["path"],
            bytes(scope.get("query_string", b"")).decode("latin-1"),
            body,
        )
        if isinstance(admission, IdempotencyAnswer):
            self.answered()
            await self.answer(Refusal(admission.status, admission.body, tuple(admission.headers)))
            return None
        self.ctx.key_seed = admission.seed
        self.ctx.idempotency = admission
        self.capture = admission.capture
        return replay_receive(messages, receive)

    async def send(self, message: Message) -> None:
        if self.phase is Phase.REFUSED:
            return  # the app's own response was replaced by the refusal
        if self.capture is not None:
            capture_asgi(self.capture, message)
        kind = message["type"]
        # Whether forwarding this message gives the client the whole response.
        if kind == "http.response.body":
            completes = self.completes_with(
                len(message.get("body", b"")), last=not message.get("more_body", False)
            )
        elif kind == "http.response.start":
            if self.ctx.customer_id is None and self.mw.customer is not None:
                self.ctx.customer_id = await resolve_async(self.mw.customer, self.scope)
            started = self._start(message)
            if isinstance(started, Refusal):
                await self.answer(started)
                return
            message = started
            completes = self.body_left == 0  # the start alone completes it (HEAD, 204, 304)
        else:
            completes = kind == "http.response.pathsend"
        # Settled (spooled) before the message that lets the client have the whole response.
        if completes and self.before_last():
            await self.ctx.committed()  # the spool's group commit of what was enqueued
        try:
            await self._send(message)
        except BaseException:
            self.client_gone()
            raise
        if completes:
            self.after_last()

    def _start(self, message: Message) -> Message | Refusal:
        """Tell the core the response started: the start to forward, or the refusal to send
        instead. A plain method, not a coroutine: it runs on every request."""
        scope = self.scope
        rules = self.rules
        refusal = self.response_started(
            int(message["status"]),
            method=scope.get("method", "GET"),
            content_length=_content_length(message.get("headers", ())),
            feature=None if rules.meter is None else self._zero_code_feature(),
            path=scope["path"],
        )
        if refusal is not None:
            return refusal
        extra = self.extra_headers()
        if extra:
            message = dict(message)
            message["headers"] = [*message.get("headers", ()), *_encode(extra)]
        return message

    def _zero_code_feature(self) -> str | None:
        scope = self.scope
        rules = self.rules
        method = str(scope.get("method", "GET")).upper()
        if rules.single_feature is not None and method != "OPTIONS":
            # One feature for every request (meter="api_calls"): only the path can exclude it.
            path = scope["path"]
            return None if rules.excludes_path(path) else rules.single_feature
        route = getattr(scope.get("route"), "path", None)
        preflight = (
            method == "OPTIONS" and _header(scope, b"access-control-request-method") is not None
        )
        return rules.zero_code_feature(
            scope, method, scope["path"], route if isinstance(route, str) else None, preflight
        )

    async def answer(self, refusal: Refusal) -> None:
        """Send ``refusal`` in place of the app's response."""
        await self._send(
            {
                "type": "http.response.start",
                "status": refusal.status,
                "headers": [
                    *_encode(refusal.headers),
                    (b"content-length", str(len(refusal.body)).encode("ascii")),
                ],
            }
        )
        await self._send({"type": "http.response.body", "body": refusal.body})
