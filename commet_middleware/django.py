"""Django: ``CommetMiddleware`` in ``MIDDLEWARE``, configured by the ``COMMET`` settings dict.

Put it after ``AuthenticationMiddleware``::

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "commet_middleware.django.CommetMiddleware",
        ...,
    ]
    COMMET = {"api_key": env("COMMET_API_KEY"), "meter": {"GET /api/search/": "api_calls"}}

It runs inside Django, so it sees what Django knows (``request.user``, the matched route) and
works under Django's test client, pytest-django, WSGI servers and Django's ASGI handler alike.
Each request is billed to the authenticated ``request.user.pk`` (as a string) unless
``COMMET["customer"]`` says otherwise; a quota refusal is an ordinary response (402, 401, 503),
never an error Django logs with a traceback. Only this module needs Django.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

from asgiref.sync import (
    async_to_sync,
    iscoroutinefunction,
    markcoroutinefunction,
    sync_to_async,
)
from django.conf import settings as django_settings  # type: ignore[import-untyped]
from django.core.exceptions import (  # type: ignore[import-untyped]
    ImproperlyConfigured,
    RequestDataTooBig,
    SynchronousOnlyOperation,
)
from django.http import HttpResponse  # type: ignore[import-untyped]
from django.utils.functional import LazyObject, empty  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]
from starlette.types import ASGIApp, Receive, Scope, Send

from ._asgi import MiddlewareSetup, build_settings
from ._context import (
    DEFAULT_EXCLUDE,
    REJECTION_BODY,
    CustomerRequiredError,
    MeteringRules,
    Refusal,
    RequestContext,
    RequestRefusedError,
    _current,
    declared_body_length,
)
from ._models import MAX_CUSTOMER_ID_LENGTH
from ._settings import SETTING_FIELDS, CommetSettings, env_name, from_config
from .customers import CustomerResolver, from_callable, from_header
from .quota._idempotency import MAX_BODY_BYTES, IdempotencyAnswer, ResponseCapture

__all__ = ["CommetMiddleware", "billing", "response_data", "with_lifespan"]

logger = logging.getLogger("commet_middleware")

# The COMMET keys that are not CommetSettings fields: the middleware's own options.
_OPTIONS = frozenset(
    {
        "customer",
        "customer_header",
        "meter",
        "exclude",
        "bill_status",
        "on_missing_customer",
        "idempotency_header",
        "idempotency_replay",
        "sink",
        "quota_gate",
        "settings",
    }
)
# Options (and settings fields) that may name a callable by its dotted path.
_DOTTED = ("customer", "bill_status", "dead_letter", "meter")


def _importable(key: str, value: Any) -> Any:
    # A feature code never has a dot, so a meter with one is a path; the others are callables.
    if isinstance(value, str) and key in _DOTTED and "." in value:
        try:
            return import_string(value)
        except ImportError as exc:
            raise ImproperlyConfigured(f"settings.COMMET[{key!r}]: {exc}") from exc
    return value


_LOOKUP_FAILED = (
    "commet: finding the customer of a request (COMMET['customer'], or request.user) failed; "
    "treated as no customer"
)


class _CustomerLookup:
    """Finds the paying customer of a Django request, in sync or async code.

    The default is the authenticated ``request.user.pk`` as a string. ``COMMET["customer"]``
    replaces it: a function of the request (sync or async), or a resolver from
    :mod:`commet_middleware.customers`, which reads ``request.META`` (the WSGI environ).
    """

    def __init__(self, fn: Callable[[Any], object] | None) -> None:
        self.default = fn is None
        self._resolver: CustomerResolver | None = None
        if fn is not None:
            if getattr(fn, "__module__", None) == "commet_middleware.customers":
                fn = partial(_on_meta, fn)
            # from_callable cleans what the function returns like every resolver's answer.
            self._resolver = from_callable(fn)

    def now(self, request: Any) -> str | None:
        """The customer, from sync code (a sync request, or a thread)."""
        try:
            if self.default:
                return _user_customer(getattr(request, "user", None))
            result = self._call(request)
            if inspect.isawaitable(result):
                # An async customer function in a sync request: run it to its end here.
                result = async_to_sync(_awaited)(result)
        except Exception:
            logger.exception(_LOOKUP_FAILED)
            return None
        return result if isinstance(result, str) else None

    def later(self, request: Any) -> str | None:
        """The customer, asked again from inside the request (``ctx.late_resolver``): in full
        from sync code, what is known now from code on an event loop (an async view under a
        sync stack runs on one), which must not query the database."""
        return self.if_loaded(request) if _loop_running() else self.now(request)

    def if_loaded(self, request: Any) -> str | None:
        """The customer, from code on an event loop that must not block: what is known now."""
        if self.default:
            user = _loaded_user(request)
            return None if user is empty else _user_customer(user)
        try:
            result = self._call(request)
        except SynchronousOnlyOperation:
            return None  # it needs the database; asked again once the view has returned
        except Exception:
            logger.exception(_LOOKUP_FAILED)
            return None
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            return None
        return result if isinstance(result, str) else None

    async def aresolve(self, request: Any) -> str | None:
        """The customer, from async code: a database lookup runs in Django's sync thread."""
        try:
            if self.default:
                user = _loaded_user(request)
                if user is empty:
                    auser = getattr(request, "auser", None)  # Django 5.0+
                    if auser is not None:
                        user = await auser()
                    else:
                        user = await sync_to_async(_evaluated_user)(request)
                return _user_customer(user)
            try:
                result: Any = self._call(request)
            except SynchronousOnlyOperation:
                # A sync function that touches the ORM (request.user, a query): in a thread.
                result = await sync_to_async(self._call)(request)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            logger.exception(_LOOKUP_FAILED)
            return None
        return result if isinstance(result, str) else None

    def _call(self, request: Any) -> Any:
        assert self._resolver is not None
        return self._resolver(request)


def _on_meta(resolver: Callable[[Any], object], request: Any) -> object:
    return resolver(request.META)


async def _awaited(result: Any) -> Any:
    return await result


def _loaded_user(request: Any) -> Any:
    """``request.user`` if known without a query (assigned, or loaded already), else ``empty``.

    DRF and login code assign a real user; ``AuthenticationMiddleware`` leaves a lazy object
    that, once evaluated (or once ``auser()`` ran), holds the user too.
    """
    user = request.__dict__.get("user")
    if user is None:
        return None
    if isinstance(user, LazyObject):
        wrapped = user._wrapped
        if wrapped is not empty:
            return wrapped
        for cached in ("_acached_user", "_cached_user"):
            if cached in request.__dict__:
                return request.__dict__[cached]
        return empty
    return user


def _evaluated_user(request: Any) -> Any:
    user = getattr(request, "user", None)
    if isinstance(user, LazyObject) and user._wrapped is empty:
        user._setup()
        return user._wrapped
    return user


def _user_customer(user: Any) -> str | None:
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    pk = getattr(user, "pk", None)
    if pk is None:
        return None
    found = str(pk).strip()
    return found if found and found.isprintable() and len(found) <= MAX_CUSTOMER_ID_LENGTH else None


class _DjangoBilling(MiddlewareSetup):
    """Rules, settings, counters, delivery queue and quota gate of one ``COMMET`` config.

    Django builds its middleware once per handler, and its test client builds a handler per
    client: every ``CommetMiddleware`` built from an equal ``COMMET`` dict shares one of these
    (see :func:`billing`), so a test suite runs one delivery queue, not one per test client.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        unknown = sorted(set(config) - _OPTIONS - SETTING_FIELDS)
        if unknown:
            known = ", ".join(sorted(_OPTIONS | SETTING_FIELDS))
            raise ImproperlyConfigured(
                f"settings.COMMET has unknown key(s) {', '.join(unknown)}; known keys: {known}"
            )
        values: dict[str, Any] = {key: _importable(key, value) for key, value in config.items()}
        customer = values.get("customer")
        header = values.get("customer_header")
        if customer is None and header:
            customer = from_header(str(header))
        if customer is not None and not callable(customer):
            raise ImproperlyConfigured(
                "settings.COMMET['customer'] must be a function of the request or its dotted path"
            )
        self.customers = _CustomerLookup(customer)
        settings_object = values.get("settings")
        if settings_object is not None and not isinstance(settings_object, CommetSettings):
            raise ImproperlyConfigured("settings.COMMET['settings'] must be a CommetSettings")
        try:
            # Text is read like the environment ("100" for queue_limit), so values may come
            # straight from os.environ in settings.py.
            given = from_config(
                {env_name(key): value for key, value in values.items() if key in SETTING_FIELDS}
            )
            header_name = values.get("idempotency_header")
            self._set_up(
                customer=None,
                rules=MeteringRules(
                    meter=values.get("meter"),
                    exclude=values.get("exclude", DEFAULT_EXCLUDE),
                    bill_status=values.get("bill_status"),
                    on_missing_customer=values.get("on_missing_customer", "serve"),
                ),
                idempotency_header=str(header_name) if header_name else None,
                settings=build_settings(settings_object, given),
                sink=values.get("sink"),
                quota_gate=values.get("quota_gate"),
                idempotency_replay=bool(values.get("idempotency_replay", False)),
            )
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.COMMET: {exc}") from exc
        if not _loop_running():
            # Built as the process starts (WSGI): a wrong key is one line in its start-up log.
            self._startup_checks()

    def begin(self) -> None:
        """Start delivery on the first request (Django has no lifespan) and run the checks."""
        if not self._sinks.started:
            self._sinks.start()
            self._startup_checks()

    async def abegin(self) -> None:
        """Like :meth:`begin`, on the event loop (the sender becomes a task of it)."""
        if not self._sinks.started:
            self._sinks.start()
            await self._astartup_checks()

    async def aclose(self) -> None:
        """Flush and close the delivery queue (a lifespan shutdown), then the gate's clients.

        The queue stays usable: a later request starts it again.
        """
        await self._sinks.aclose()
        await self._gates.aclose()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# What ``next``/``anext`` return for an exhausted body; also "no such attribute".
_END: Any = object()

_billings: list[tuple[dict[str, Any], _DjangoBilling]] = []
_billings_lock = threading.Lock()


def billing(config: Mapping[str, Any] | None = None) -> _DjangoBilling:
    """The billing of ``config`` (default ``settings.COMMET``), built on first use.

    It carries what the middleware counts and uses: ``stats`` (billed, unattributed, rejected,
    refused...), ``sink`` (the delivery queue) and ``gate`` (the quota gate). Raises
    ``ImproperlyConfigured`` for an unknown key or a value that cannot be read.
    """
    if config is None:
        config = getattr(django_settings, "COMMET", None) or {}
    if not isinstance(config, Mapping):
        raise ImproperlyConfigured("settings.COMMET must be a dict")
    wanted = dict(config)
    with _billings_lock:
        for known, built in _billings:
            if known == wanted:
                return built
        built = _DjangoBilling(wanted)
        _billings.append((wanted, built))
        return built


def with_lifespan(application: ASGIApp) -> ASGIApp:
    """Django's ASGI application, answering the ASGI lifespan protocol for Commet.

    Django's ASGI app refuses lifespan. Without it delivery still starts (on the first
    request), but nothing tells the process it is about to stop, and uvicorn ends a SIGTERM'd
    process by re-raising the signal, so exit hooks never run: usage still queued then is
    lost. Wrapped (``application = with_lifespan(get_asgi_application())``), the server's
    startup starts delivery and its shutdown flushes every Commet billing of the process
    before the server exits. Every other scope goes to Django untouched.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await application(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for built in _live_billings():
                        await built.abegin()
                except Exception as exc:
                    # verify_on_startup="raise": the server reports it and does not serve.
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for built in _live_billings():
                    await built.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


def _live_billings() -> list[_DjangoBilling]:
    with _billings_lock:
        return [built for _, built in _billings]


def response_data(response: Any) -> Any:
    """The data a view's response carries, for ``@metered(value=...)`` and ``properties=``.

    ``@metered`` hands its ``value`` function what the view returned, the response object.
    This returns a DRF ``Response``'s ``data``, and the decoded JSON of a ``JsonResponse``
    (or any JSON ``HttpResponse``); anything else is returned as it is::

        @metered("ai_tokens", value=lambda r: response_data(r)["tokens"])
        def summarize(request):
            return JsonResponse({"summary": ..., "tokens": 70})
    """
    data = getattr(response, "data", _END)
    if data is not _END:
        return data
    if isinstance(response, HttpResponse) and not getattr(response, "streaming", False):
        content_type = str(response.get("Content-Type", ""))
        if content_type.split(";", 1)[0].strip().endswith("json"):
            return json.loads(response.content)
    return response


class CommetMiddleware:
    """Bill each successful Django request's usage to its customer through Commet.

    Configured by ``settings.COMMET``, a dict whose keys are every keyword of
    :class:`commet_middleware.CommetMiddleware`: ``customer`` (a function of the request,
    sync or async, or its dotted path; default the authenticated ``request.user.pk``),
    ``customer_header`` (a trusted header naming the customer, when there is no ``customer``),
    ``meter`` (zero-code: a feature, a table keyed by ``"METHOD route"`` where route is the
    Django route pattern, with or without its leading slash (``"GET /items/<int:pk>/"``), or
    a function of the request), ``exclude``, ``bill_status``, ``on_missing_customer``,
    ``idempotency_header``, ``idempotency_replay``, ``sink``, ``quota_gate``, ``settings``
    (a ``CommetSettings``) and every ``CommetSettings`` field (``api_key``, ``base_url``,
    ``spool_path``, ``quota_store``...). Precedence: ``COMMET`` > ``COMMET["settings"]`` >
    ``COMMET_*`` environment > default.

    A response is billed when its status passes ``bill_status`` (default ``< 400``) and the
    view did not raise; usage is settled (spooled when there is a spool) before the response
    goes back to Django to be sent. A streaming response (``StreamingHttpResponse``,
    ``FileResponse``) is billed only once its body was consumed to the end, settled before
    its last chunk is handed over; one the client abandons is not billed. Under a WSGI server
    with ``wsgi.file_wrapper``, a ``FileResponse`` keeps the server's sendfile path and is
    billed when the server closes it. ``@quota_guard`` refusals and the 401 of
    ``on_missing_customer="reject"`` are answered as responses (``process_exception``), so
    Django logs no error for them.

    When no customer is known before the view runs, it is asked again after (DRF
    authenticates inside the view and sets the user on the request). Sync and async capable:
    under an async stack it never touches ``request.user`` synchronously (``auser()``).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.billing = billing()
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        if _applied_outside(request):
            return self.get_response(request)
        engine = self.billing
        engine.begin()
        call = _DjangoCall(engine, request)
        call.arrived(engine.customers.now(request), partial(engine.customers.later, request))
        answer = call.admit_client_key()
        if answer is not None:
            return answer
        token = _current.set(call.ctx)
        request.__dict__[_CALL_ATTRIBUTE] = call  # for process_exception
        try:
            try:
                response = self.get_response(request)
            except BaseException as exc:
                # Only with DEBUG_PROPAGATE_EXCEPTIONS: Django answers a view's error itself.
                answered = call.raised(exc)
                if answered is None:
                    raise
                return answered
            # A customer still unknown is asked again when needed (ctx.late_resolver).
            response = call.started(response)
            if call.complete_on_return(response):
                call.wait_committed()
        finally:
            _current.reset(token)
            request.__dict__.pop(_CALL_ATTRIBUTE, None)
        return response

    async def __acall__(self, request: Any) -> Any:
        if _applied_outside(request):
            return await self.get_response(request)
        engine = self.billing
        await engine.abegin()
        call = _DjangoCall(engine, request)
        customers = engine.customers
        call.arrived(await customers.aresolve(request), partial(customers.later, request))
        answer = call.admit_client_key()
        if answer is not None:
            return answer
        token = _current.set(call.ctx)
        request.__dict__[_CALL_ATTRIBUTE] = call  # for process_exception
        try:
            try:
                response = await self.get_response(request)
            except BaseException as exc:
                answered = call.raised(exc)
                if answered is None:
                    raise
                return answered
            if call.may_bill_unknown_customer():
                # The view may have logged the user in: ask once more, with the database.
                call.learn_customer(await customers.aresolve(request))
            response = call.started(response)
            if call.complete_on_return(response):
                await call.committed()
        finally:
            _current.reset(token)
            request.__dict__.pop(_CALL_ATTRIBUTE, None)
        return response

    def process_exception(self, request: Any, exception: Exception) -> Any:
        """Answer a refusal the view raised (``@quota_guard``, reject mode) with its response.

        Returning a response here is what keeps Django from logging the refusal as a server
        error; any other exception is left to Django (and the request is not billed).
        """
        call = request.__dict__.get(_CALL_ATTRIBUTE)
        if not isinstance(call, _DjangoCall):
            return None
        return call.raised(exception)


# Where the request's _DjangoCall waits for process_exception.
_CALL_ATTRIBUTE = "_commet_call"


def _applied_outside(request: Any) -> bool:
    """True when CommetWSGIMiddleware/CommetMiddleware already bills this request."""
    if request.META.get("commet.applied"):
        return True
    scope = getattr(request, "scope", None)
    return isinstance(scope, Mapping) and bool(scope.get("commet.applied"))


class _DjangoCall:
    """Every billing decision about one Django request, told what happens to it, in order:

    ``arrived`` (customer known so far), ``raised`` (the view raised), ``learn_customer``
    (asked again after the view), ``started`` (the response, its status and headers),
    ``body`` (a chunk about to go out), ``complete`` (the client is about to have it all),
    ``gone`` (the body will not be finished). Never stored on the middleware.
    """

    __slots__ = (
        "answer",
        "billable",
        "body_left",
        "capture",
        "ctx",
        "engine",
        "failed",
        "feature",
        "request",
    )

    def __init__(self, engine: _DjangoBilling, request: Any) -> None:
        self.engine = engine
        self.request = request
        self.ctx = RequestContext(
            sink=engine.sink,
            settings=engine.settings,
            reject_missing_customer=engine.rules.reject_missing_customer,
            stats=engine.stats,
            gate=engine.gate,
        )
        # The response sent instead of the app's (a refusal, the 401), once decided.
        self.answer: HttpResponse | None = None
        self.failed = False
        self.billable = False
        self.feature: str | None = None
        # Body bytes still to go before the client has it all (Content-Length; 0 for HEAD,
        # 204, 304), or None when only the end of the stream completes it.
        self.body_left: int | None = None
        self.capture: ResponseCapture | None = None

    # -- the request ----------------------------------------------------------------------

    def arrived(self, customer: str | None, later: Callable[[], str | None]) -> None:
        """The request arrived with ``customer`` (None: unknown; ``later`` asks again)."""
        ctx = self.ctx
        ctx.customer_id = customer
        if customer is None:
            # Asked again when @metered, @quota_guard or the settle needs it: the view may have
            # authenticated the user meanwhile.
            ctx.late_resolver = later

    def admit_client_key(self) -> HttpResponse | None:
        """Claim the client's Idempotency-Key (``idempotency_header``) for this request.

        Returns the answer to send instead of running the view (a refusal or a replay), or
        None to run it.
        """
        guard = self.engine._idempotency
        header = self.engine.idempotency_header
        if guard is None or header is None:
            return None
        request = self.request
        client_key = request.headers.get(header)
        if not client_key:
            return None
        admission = guard.begin(
            str(client_key),
            self.ctx.customer_id,
            str(request.method),
            str(request.path),
            str(request.META.get("QUERY_STRING", "")),
            _read_body(request),
        )
        if isinstance(admission, IdempotencyAnswer):
            self.answer = _plain_response(admission.status, admission.headers, admission.body)
            return self.answer
        self.ctx.key_seed = admission.seed
        self.ctx.idempotency = admission
        self.capture = admission.capture
        return None

    def raised(self, exc: BaseException) -> HttpResponse | None:
        """The view raised ``exc``: never billed; a refusal's answer, or None (Django's turn)."""
        if self.answer is not None:
            return self.answer
        self.failed = True
        ctx = self.ctx
        if isinstance(exc, (RequestRefusedError, CustomerRequiredError)) and (
            ctx.refusal is not None or ctx.customer_required
        ):
            return self.refuse()
        ctx.settle(billable=False)
        return None

    def may_bill_unknown_customer(self) -> bool:
        """After the view: True when usage may be billed and no customer is known yet."""
        ctx = self.ctx
        return ctx.customer_id is None and bool(
            ctx.pending or ctx.customer_required or self.engine.rules.meter is not None
        )

    def learn_customer(self, customer: str | None) -> None:
        """After the view: the customer as asked again (DRF authenticates inside the view)."""
        ctx = self.ctx
        if ctx.customer_id is None:
            ctx.customer_id = customer

    # -- the response ---------------------------------------------------------------------

    def started(self, response: Any) -> Any:
        """The view's response, headed for the client: return it, or what is sent instead."""
        if response is self.answer:
            return response
        ctx = self.ctx
        if ctx.refusal is not None or ctx.customer_required:
            # A refusal that reached here as another response (an exception middleware's).
            return self.refuse()
        if self.failed:
            return response
        ctx.status = status = int(response.status_code)
        rules = self.engine.rules
        if rules.meter is not None:
            self.feature = self._zero_code_feature()
        if ctx.reject_missing_customer and self._customer_missing():
            return self.refuse()
        self.billable = billable = (
            status < 400 if rules.default_bill_status else rules.billable_status(status)
        )
        if billable and ctx.response_headers:
            # A guard's RateLimit headers, on responses that use the reserved units.
            for name, value in ctx.response_headers:
                response[name] = value
        self.body_left = declared_body_length(
            str(self.request.method), status, response.get("Content-Length")
        )
        capture = self.capture
        if capture is not None:
            capture.start(status, response.items())
            if not response.streaming:
                capture.add(bytes(response.content))
        return response

    def complete_on_return(self, response: Any) -> bool:
        """Settle now if the response is whole (its body in memory, or none); else make its
        stream report ``body``/``complete``/``gone``. True when a settle needs its commit."""
        if self.ctx.settled:
            return False
        if not getattr(response, "streaming", False) or self.body_left == 0:
            self.complete()
            return bool(self.ctx.commits)
        meta = self.request.META
        wrapper = meta.get("wsgi.file_wrapper")
        if getattr(response, "file_to_stream", None) is not None and wrapper is not None:
            self._bill_when_file_closed(response)
        elif response.is_async:
            response.streaming_content = _AsyncBilledBody(self, response.streaming_content)
        else:
            response.streaming_content = _BilledBody(self, response.streaming_content)
        return False

    def body(self, chunk: bytes) -> bool:
        """``chunk`` is about to be handed to the server; True when it completes the body."""
        if self.capture is not None:
            self.capture.add(chunk)
        left = self.body_left
        if left is None:
            return False
        self.body_left = left = left - len(chunk)
        return left <= 0

    def complete(self) -> None:
        """The client is about to have the whole response: settle it (billed if billable)."""
        ctx = self.ctx
        if ctx.settled:
            return
        if self.billable and self.feature is not None:
            ctx.settle_with_usage(self.feature)
        else:
            ctx.settle(billable=self.billable)

    def gone(self) -> None:
        """The body will not be finished (client gone, stream failed or abandoned)."""
        ctx = self.ctx
        if ctx.settled:
            return
        if self.answer is None:
            self.engine.stats.add("incomplete_responses")
        ctx.settle(billable=False)

    def wait_committed(self) -> None:
        """Block until what the settle enqueued is durable (a spool's group commit)."""
        if self.ctx.commits:
            self.ctx.wait_committed()

    async def committed(self) -> None:
        """Like :meth:`wait_committed`, on the event loop."""
        if self.ctx.commits:
            await self.ctx.committed()

    def refuse(self) -> HttpResponse:
        """Answer with the guard's refusal, or the 401 ``customer_required``, unbilled."""
        ctx = self.ctx
        ctx.settle(billable=False)
        refusal: Refusal | None = ctx.refusal
        if refusal is not None:
            self.answer = _plain_response(refusal.status, refusal.headers, refusal.body)
            return self.answer
        self.engine.stats.add("rejected_requests")
        logger.warning(
            "commet: rejected %s %s with 401: billable and no customer",
            self.request.method,
            self.request.path,
        )
        self.answer = _plain_response(401, [("Content-Type", "application/json")], REJECTION_BODY)
        return self.answer

    def _zero_code_feature(self) -> str | None:
        request = self.request
        rules = self.engine.rules
        method = str(request.method).upper()
        path = str(request.path_info) or "/"
        if rules.single_feature is not None and method != "OPTIONS":
            # One feature for every request (meter="api_calls"): only the path can exclude it.
            return None if rules.excludes_path(path) else rules.single_feature
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        route = route if isinstance(route, str) and route else None
        preflight = method == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in request.META
        # Django writes its routes without the leading slash; tables may use either spelling.
        slashed = route if route is None or route.startswith("/") else "/" + route
        feature = rules.zero_code_feature(request, method, path, slashed, preflight)
        if (
            feature is None
            and route is not None
            and route != slashed
            and isinstance(rules.meter, Mapping)
        ):
            feature = rules.zero_code_feature(request, method, path, route, preflight)
        return feature

    def _customer_missing(self) -> bool:
        """In reject mode: True when this response would bill and nobody pays for it."""
        ctx = self.ctx
        would_bill = bool(ctx.pending) or self.feature is not None
        return (
            would_bill and self.engine.rules.billable_status(ctx.status) and ctx.customer() is None
        )

    def _bill_when_file_closed(self, response: Any) -> None:
        """Keep the WSGI server's sendfile path: billed when the server closes the file.

        Django hands the server ``response.close`` as the file's close; the server calls it
        after sending the file, or while an error (client gone) is propagating.
        """
        if self.capture is not None:
            self.capture.overflow = True  # a file the server sends is not kept for a replay
        django_close = response.close

        def close() -> None:
            try:
                django_close()
            finally:
                if sys.exc_info()[0] is None:
                    self.complete()
                    self.wait_committed()
                else:
                    self.gone()

        response.close = close


def _read_body(request: Any) -> bytes | None:
    """The whole request body (Django keeps it for the view), or None when too large."""
    length = str(request.META.get("CONTENT_LENGTH") or "").strip()
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        return None
    try:
        return bytes(request.body)
    except RequestDataTooBig:
        return None


def _plain_response(status: int, headers: Iterable[tuple[str, str]], body: bytes) -> HttpResponse:
    """A response with exactly ``body`` and ``headers``: the same bytes as the other stacks."""
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response[name] = value
    response["Content-Length"] = str(len(body))
    return response


class _BilledBody:
    """A sync streaming body: each chunk in the request's context, billed once consumed.

    Django closes it with the response (``close``); a body closed, failed or dropped before
    its end is not billed.
    """

    __slots__ = ("_call", "_inner")

    def __init__(self, call: _DjangoCall, inner: Iterable[bytes]) -> None:
        self._call = call
        self._inner: Iterator[bytes] = iter(inner)

    def __iter__(self) -> _BilledBody:
        return self

    def __next__(self) -> bytes:
        call = self._call
        # @metered and track() in a generator body find their request.
        token = _current.set(call.ctx)
        try:
            chunk: bytes = next(self._inner, _END)
        except BaseException:
            call.gone()
            raise
        finally:
            _current.reset(token)
        if chunk is _END:
            call.complete()
            call.wait_committed()
            raise StopIteration
        if call.body(chunk):
            call.complete()
            call.wait_committed()
        return chunk

    def close(self) -> None:
        """Closed by Django with the response: unbilled unless the body had ended."""
        self._call.gone()

    def __del__(self) -> None:
        # A body never iterated nor closed (a test that did not read it): release its units.
        try:
            self._call.gone()
        except Exception:
            logger.exception("commet: settling an abandoned response failed")


class _AsyncBilledBody:
    """The async counterpart of :class:`_BilledBody` (an async ``streaming_content``)."""

    __slots__ = ("_call", "_inner")

    def __init__(self, call: _DjangoCall, inner: Any) -> None:
        self._call = call
        self._inner = aiter(inner)

    def __aiter__(self) -> _AsyncBilledBody:
        return self

    async def __anext__(self) -> bytes:
        call = self._call
        token = _current.set(call.ctx)
        try:
            chunk: bytes = await anext(self._inner, _END)
        except BaseException:
            call.gone()
            raise
        finally:
            _current.reset(token)
        if chunk is _END:
            call.complete()
            await call.committed()
            raise StopAsyncIteration
        if call.body(chunk):
            call.complete()
            await call.committed()
        return chunk

    def close(self) -> None:
        """Closed by Django with the response: unbilled unless the body had ended."""
        self._call.gone()

    def __del__(self) -> None:
        try:
            self._call.gone()
        except Exception:
            logger.exception("commet: settling an abandoned response failed")
