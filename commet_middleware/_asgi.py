"""``CommetMiddleware``: pure ASGI middleware that bills successful requests to their customer."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._context import (
    DEFAULT_EXCLUDE,
    REJECTION_BODY,
    CustomerRequiredError,
    EventSink,
    MeteringRules,
    MeteringStats,
    MeterSpec,
    RequestContext,
    RequestRefusedError,
    _current,
    declared_body_length,
)
from ._live import redirected, register
from ._models import Operation
from ._settings import (
    SETTING_FIELDS,
    CommetSettings,
    DeadLetterHook,
    Dialect,
    OverflowPolicy,
    StartupCheck,
    resolve_settings,
)
from ._startup import averify, verify, warn_if_unconfigured
from .customers import CustomerResolver, resolve_async, resolve_now, resolve_now_or_later
from .quota import QuotaGate
from .quota._idempotency import (
    IdempotencyAnswer,
    IdempotencyGuard,
    ResponseCapture,
    capture_asgi,
    read_asgi_body,
    replay_receive,
)

__all__ = ["CommetMiddleware"]

logger = logging.getLogger("commet_middleware")


def build_settings(settings: CommetSettings | None, overrides: dict[str, Any]) -> CommetSettings:
    """Return the settings of a middleware being built: keyword > ``settings`` > env > default.

    Every field of ``CommetSettings`` is a keyword of both middlewares (a test checks it).
    Read now: a middleware built lazily (Starlette builds its
    stack on the first request) uses the environment of that moment.
    """
    return resolve_settings(settings, overrides)


def chain_dead_letter(first: DeadLetterHook, then: DeadLetterHook | None) -> DeadLetterHook:
    """Return a dead-letter hook that calls ``first`` (ours), then the user's ``then``."""

    def hook(operation: Operation, error: Exception) -> None:
        try:
            first(operation, error)
        except Exception:
            logger.exception("commet: forgetting a dead-lettered quota change failed")
        if then is not None:
            then(operation, error)

    return hook


class QuotaGateOwner:
    """The quota gate a middleware's guards use: built from its settings, or the one given.

    The gate hears of every quota change Commet confirms (a delivery listener) or gives up on
    (the dead-letter hook of the queue the middleware owns), so its cache stays exact.
    """

    def __init__(self, gate: QuotaGate | None, settings: CommetSettings) -> None:
        self.owned = gate is None
        self.gate = gate if gate is not None else QuotaGate(settings)

    def queue_settings(self, settings: CommetSettings) -> CommetSettings:
        """Return ``settings`` for the owned delivery queue, telling the gate of dead letters."""
        return settings.replace(
            dead_letter=chain_dead_letter(self.gate.forget, settings.dead_letter)
        )

    def listen_to(self, sink: EventSink) -> None:
        """Register the gate as a listener of ``sink`` when the sink takes listeners."""
        add_listener = getattr(sink, "add_listener", None)
        if add_listener is not None:
            add_listener(self.gate.confirm)

    def close(self) -> None:
        """Close the gate's sync client, if the middleware built the gate."""
        if self.owned:
            try:
                self.gate.close()
            except Exception:
                logger.exception("commet: closing the quota gate failed")

    async def aclose(self) -> None:
        """Close the gate's clients, if the middleware built the gate."""
        if self.owned:
            try:
                await self.gate.aclose()
            except Exception:
                logger.exception("commet: closing the quota gate failed")
            self.close()


class SinkOwner:
    """Builds, starts and closes the delivery queue a middleware owns (or uses a given sink)."""

    def __init__(self, sink: EventSink | None, settings: CommetSettings) -> None:
        self.settings = settings
        self.owned = sink is None
        if sink is None:
            from .delivery import DeliveryQueue  # only needed when the app really delivers

            sink = DeliveryQueue(settings)
        self.sink: EventSink = sink
        # Read without the lock on every request; start() decides under it.
        self.started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the owned queue once; called at lifespan startup or on the first request."""
        if self.started:
            return
        with self._lock:
            if self.started:
                return
            self.started = True
            start = getattr(self.sink, "start", None) if self.owned else None
            if start is not None:
                try:
                    start()
                except Exception:
                    logger.exception("commet: could not start the delivery queue")

    async def aclose(self) -> None:
        """Flush and close the owned queue, within the settings' shutdown timeout."""
        if not self.owned:
            return
        self.started = False  # the queue stays usable; a later lifespan starts it again
        aclose = getattr(self.sink, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose(self.settings.shutdown_timeout)
        except Exception:
            logger.exception("commet: closing the delivery queue failed")

    def close(self) -> None:
        """Flush and close the owned queue from sync code (WSGI, atexit)."""
        if not self.owned:
            return
        self.started = False
        close = getattr(self.sink, "close", None)
        if close is None:
            return
        try:
            close(self.settings.shutdown_timeout)
        except Exception:
            logger.exception("commet: closing the delivery queue failed")


class MiddlewareSetup:
    """What the ASGI and WSGI middlewares share: rules, settings, counters, sink and gate.

    The middlewares keep their own explicit keyword signatures (typed for ``add_middleware``)
    and hand the result to :meth:`_set_up`.
    """

    customer: CustomerResolver | None
    rules: MeteringRules
    idempotency_header: str | None
    settings: CommetSettings
    stats: MeteringStats

    def _set_up(
        self,
        *,
        customer: CustomerResolver | None,
        rules: MeteringRules,
        idempotency_header: str | None,
        settings: CommetSettings,
        sink: EventSink | None,
        quota_gate: QuotaGate | None,
        idempotency_replay: bool = False,
    ) -> None:
        self.customer = customer
        self.rules = rules
        self.idempotency_header = idempotency_header
        self.idempotency_replay = idempotency_replay
        self.stats = MeteringStats()
        self._checked = False
        # The settings the app asked for, before any test redirection (``retarget`` goes back).
        self.configured_settings = settings
        self._build_owners(redirected(settings), sink, quota_gate)
        register(self)

    def _build_owners(
        self, settings: CommetSettings, sink: EventSink | None, quota_gate: QuotaGate | None
    ) -> None:
        self.settings = settings
        self._gates = QuotaGateOwner(quota_gate, settings)
        self._sinks = SinkOwner(
            sink, self._gates.queue_settings(settings) if sink is None else settings
        )
        self._gates.listen_to(self._sinks.sink)
        # Client keys are recorded in the quota store, so every worker and host sees them.
        self._idempotency = (
            IdempotencyGuard(
                self._gates.gate.quota_store,
                ttl=settings.idempotency_ttl,
                lease=settings.quota_lease,
                replay=self.idempotency_replay,
            )
            if self.idempotency_header
            else None
        )

    def retarget(self, settings: CommetSettings) -> None:
        """Deliver to ``settings`` from the next request on (the testing tools' seam).

        What the middleware's own queue holds is flushed and closed first, to where it was
        going; its own quota gate (and so its allowance cache) is replaced. A ``sink=`` or
        ``quota_gate=`` given at build time stays.
        """
        old_sinks, old_gates = self._sinks, self._gates
        old_sinks.close()
        old_gates.close()
        self._build_owners(
            settings,
            None if old_sinks.owned else old_sinks.sink,
            None if old_gates.owned else old_gates.gate,
        )

    def _startup_checks(self) -> None:
        """Once per middleware, at start: warn of a missing key; ``verify_on_startup``."""
        if self._checked:
            return
        self._checked = True
        if self._sinks.owned:
            warn_if_unconfigured(self.settings)
        verify(self.settings)

    async def _astartup_checks(self) -> None:
        """Like :meth:`_startup_checks`, on an event loop."""
        if self._checked:
            return
        self._checked = True
        if self._sinks.owned:
            warn_if_unconfigured(self.settings)
        await averify(self.settings)

    @property
    def sink(self) -> EventSink:
        """The sink billable operations go to."""
        return self._sinks.sink

    @property
    def gate(self) -> QuotaGate:
        """The quota gate ``@quota_guard`` and ``@quota_release`` use in this middleware."""
        return self._gates.gate


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
            idempotency_header=idempotency_header.lower() if idempotency_header else None,
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
            if call.rejected:
                return  # the refusal was already sent, in place of the app's error page
            if call.response_started:
                raise
            await call.reject()
        finally:
            _current.reset(token)
            if not ctx.settled:
                if call.response_started and not call.completed and not call.rejected:
                    self.stats.add("incomplete_responses")
                ctx.settle(billable=False)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_wrapper() -> Message:
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

        await self.app(scope, receive_wrapper, send_wrapper)


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


class _HTTPCall:
    """The middleware's state for one HTTP request; never stored on the middleware."""

    __slots__ = (
        "_send",
        "billable",
        "body_left",
        "capture",
        "completed",
        "ctx",
        "feature",
        "mw",
        "rejected",
        "response_started",
        "scope",
        "send_failed",
    )

    def __init__(self, middleware: CommetMiddleware, scope: Scope, send: Send) -> None:
        self.mw = middleware
        self.scope = scope
        self._send = send
        self.response_started = False
        self.completed = False
        self.rejected = False
        self.feature: str | None = None
        # Body bytes still to send before the client has the whole response (Content-Length,
        # 0 for HEAD/204/304), or None when only the final message ends it.
        self.body_left: int | None = None
        self.send_failed = False
        # Whether the response's status is billed; known once the response starts.
        self.billable = False
        self.ctx = RequestContext(
            sink=middleware._sinks.sink,
            settings=middleware.settings,
            reject_missing_customer=middleware.rules.reject_missing_customer,
            stats=middleware.stats,
            gate=middleware._gates.gate,
        )
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
            self.rejected = self.response_started = True
            await self._send(
                {
                    "type": "http.response.start",
                    "status": admission.status,
                    "headers": [
                        *_encode(admission.headers),
                        (b"content-length", str(len(admission.body)).encode("ascii")),
                    ],
                }
            )
            await self._send({"type": "http.response.body", "body": admission.body})
            return None
        self.ctx.key_seed = admission.seed
        self.ctx.idempotency = admission
        self.capture = admission.capture
        return replay_receive(messages, receive)

    async def send(self, message: Message) -> None:
        if self.rejected:
            return  # the app's own response was replaced by the 401
        if self.capture is not None:
            capture_asgi(self.capture, message)
        kind = message["type"]
        # Whether forwarding this message gives the client the whole response.
        if kind == "http.response.body":
            left = self.body_left
            if left is not None:
                left -= len(message.get("body", b""))
                self.body_left = left
            completes = (left is not None and left <= 0) or not message.get("more_body", False)
        elif kind == "http.response.start":
            if self.ctx.customer_id is None and self.mw.customer is not None:
                await self._learn_customer()
            started = self._start(message)
            if started is None:
                await self.reject()
                return
            message = started
            completes = self.body_left == 0
        else:
            completes = kind == "http.response.pathsend"
        settle_after = False
        if completes and not self.completed:
            if self.billable and not self.send_failed:
                # Settle (spool) before the message that lets the client have the whole
                # response: a crash after this loses nothing; a send that fails now still bills.
                self._complete(billable=True)
                if self.ctx.commits:  # the spool's group commit of what it enqueued
                    await self.ctx.committed()
            else:
                settle_after = True  # releases reservations once the response is out
        try:
            await self._send(message)
        except BaseException:
            self.send_failed = True  # the client is gone: what follows is not billed
            raise
        if settle_after:
            self._complete(billable=False)

    def _start(self, message: Message) -> Message | None:
        """Take in the response start (status, zero-code feature); None: send a refusal instead.

        A plain method, not a coroutine: it runs on every request, and the one await a start
        may need (an async customer resolver) happens in ``send`` before it.
        """
        self.response_started = True
        ctx = self.ctx
        ctx.status = status = int(message["status"])
        mw = self.mw
        rules = mw.rules
        if rules.meter is not None:
            self.feature = self._zero_code_feature()
        if ctx.refusal is not None or (ctx.reject_missing_customer and self._customer_missing()):
            return None
        self.billable = billable = (
            status < 400 if rules.default_bill_status else rules.billable_status(status)
        )
        headers = message.get("headers", ())
        self.body_left = declared_body_length(
            self.scope.get("method", "GET"), status, _content_length(headers)
        )
        if ctx.response_headers and billable:
            # A guard's RateLimit headers, on responses that will use the reserved units.
            message = dict(message)
            message["headers"] = [*headers, *_encode(ctx.response_headers)]
        return message

    async def _learn_customer(self) -> None:
        resolver = self.mw.customer
        if self.ctx.customer_id is None and resolver is not None:
            self.ctx.customer_id = await resolve_async(resolver, self.scope)

    def _zero_code_feature(self) -> str | None:
        scope = self.scope
        rules = self.mw.rules
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

    def _customer_missing(self) -> bool:
        """In reject mode: True when this response would bill, or was refused, for want of a
        customer (a guard's refusal and the serve mode are the caller's checks)."""
        ctx = self.ctx
        if ctx.customer_required:
            return True
        would_bill = bool(ctx.pending) or self.feature is not None
        return would_bill and self.mw.rules.billable_status(ctx.status) and ctx.customer() is None

    async def reject(self) -> None:
        """Answer with the refusal (or the 401) in place of the app's response."""
        self.rejected = True
        self.response_started = True
        self.ctx.settle(billable=False)
        refusal = self.ctx.refusal
        if refusal is not None:
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
            return
        self.mw.stats.add("rejected_requests")
        logger.warning(
            "commet: rejected %s %s with 401: billable and no customer",
            self.scope.get("method"),
            self.scope.get("path"),
        )
        await self._send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(REJECTION_BODY)).encode("ascii")),
                ],
            }
        )
        await self._send({"type": "http.response.body", "body": REJECTION_BODY})

    def _complete(self, *, billable: bool) -> None:
        self.completed = True
        ctx = self.ctx
        if billable and self.feature is not None:
            ctx.settle_with_usage(self.feature)
        else:
            ctx.settle(billable=billable)
