"""The Django adapter of the billing core: ``CommetMiddleware`` for ``MIDDLEWARE``.

It runs inside Django, so it sees what Django knows (``request.user``, the matched route) and
works under Django's test client, pytest-django, WSGI servers and Django's ASGI handler alike.
Configuration is in :mod:`._django_config`, the customer lookup in :mod:`._django_users`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import RequestDataTooBig  # type: ignore[import-untyped]
from django.http import HttpResponse  # type: ignore[import-untyped]

from commet_middleware.billing._context import _current
from commet_middleware.billing._core import BillingCall, Phase
from commet_middleware.billing._refusals import (
    CustomerRequiredError,
    Refusal,
    RequestRefusedError,
)
from commet_middleware.quota._idempotency import (
    MAX_BODY_BYTES,
    IdempotencyAnswer,
    ResponseCapture,
)

from ._django_config import DjangoBilling, billing

__all__ = ["CommetMiddleware", "response_data"]

logger = logging.getLogger("commet_middleware")

# What ``next``/``anext`` return for an exhausted body; also "no such attribute".
_END: Any = object()


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
            response = call.response_returned(response)
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
            response = call.response_returned(response)
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


class _DjangoCall(BillingCall):
    """One Django request: the billing core, told what the view and the response do.

    ``arrived`` (customer known so far), ``raised`` (the view raised), ``learn_customer``
    (asked again after the view), ``response_returned`` (the response, its status and headers), then
    for a streamed body ``body`` (a chunk about to go out), ``complete`` (the client is about
    to have it all) or ``gone`` (the body will not be finished). Never stored on the
    middleware.
    """

    __slots__ = ("answer", "capture", "engine", "request")

    def __init__(self, engine: DjangoBilling, request: Any) -> None:
        super().__init__(engine.new_context(), engine.rules, engine.stats)
        self.engine = engine
        self.request = request
        # The response sent instead of the view's (a refusal, the 401), once decided.
        self.answer: HttpResponse | None = None
        # The response as it goes out, kept for an Idempotency-Key replay (opt-in).
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
            self.answered()
            self.answer = _plain_response(
                Refusal(admission.status, admission.body, tuple(admission.headers))
            )
            return self.answer
        self.ctx.key_seed = admission.seed
        self.ctx.idempotency = admission
        self.capture = admission.capture
        return None

    def raised(self, exc: BaseException) -> HttpResponse | None:
        """The view raised ``exc``: never billed; a refusal's answer, or None (Django's turn)."""
        if self.answer is not None:
            return self.answer
        ctx = self.ctx
        if (
            isinstance(exc, (RequestRefusedError, CustomerRequiredError))
            and (ctx.refusal is not None or ctx.customer_required)
            and self.refusal_raised()
        ):
            return self._refused()
        self.ended()
        return None

    def may_bill_unknown_customer(self) -> bool:
        """After the view: True when usage may be billed and no customer is known yet."""
        ctx = self.ctx
        return ctx.customer_id is None and bool(
            ctx.pending or ctx.customer_required or self.rules.meter is not None
        )

    def learn_customer(self, customer: str | None) -> None:
        """After the view: the customer as asked again (DRF authenticates inside the view)."""
        ctx = self.ctx
        if ctx.customer_id is None:
            ctx.customer_id = customer

    # -- the response ---------------------------------------------------------------------

    def response_returned(self, response: Any) -> Any:
        """The view's response, headed for the client: return it, or what is sent instead."""
        if response is self.answer or self.phase is not Phase.RUNNING:
            return response  # a refusal already answered, or the view raised (Django's 500)
        request = self.request
        status = int(response.status_code)
        refusal = self.response_started(
            status,
            method=str(request.method),
            content_length=response.get("Content-Length"),
            feature=None if self.rules.meter is None else self._zero_code_feature(),
            path=str(request.path),
        )
        if refusal is not None:
            self.answer = _plain_response(refusal)
            return self.answer
        for name, value in self.extra_headers():
            response[name] = value
        capture = self.capture
        if capture is not None:
            capture.start(status, response.items())
            if not response.streaming:
                capture.add(bytes(response.content))
        return response

    def complete_on_return(self, response: Any) -> bool:
        """Settle now if the response is whole (its body in memory, or none); else make its
        stream report ``body``/``complete``/``gone``. True when a settle needs its commit."""
        if self.phase is not Phase.STARTED:
            return False
        if not getattr(response, "streaming", False) or self.complete_at_start:
            return self.complete()
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
        return self.completes_with(len(chunk), last=False)

    def complete(self) -> bool:
        """The client is about to have the whole response: settle it (billed if billable).

        True when the settle enqueued what must be committed first (a spool).
        """
        must_wait = self.before_last()
        self.after_last()  # a non-billable response: released now, it bills nothing
        return must_wait

    def gone(self) -> None:
        """The body will not be finished (client gone, stream failed or abandoned)."""
        self.ended()

    def wait_committed(self) -> None:
        """Block until what the settle enqueued is durable (a spool's group commit)."""
        if self.ctx.commits:
            self.ctx.wait_committed()

    async def committed(self) -> None:
        """Like :meth:`wait_committed`, on the event loop."""
        if self.ctx.commits:
            await self.ctx.committed()

    def _refused(self) -> HttpResponse:
        """Answer with the guard's refusal, or the 401 ``customer_required``, unbilled."""
        request = self.request
        self.answer = _plain_response(self.refuse(str(request.method), str(request.path)))
        return self.answer

    def _zero_code_feature(self) -> str | None:
        request = self.request
        rules = self.rules
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
                    if self.complete():
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


def _plain_response(refusal: Refusal) -> HttpResponse:
    """``refusal`` as a Django response: the same bytes and headers as the other stacks."""
    response = HttpResponse(refusal.body, status=refusal.status)
    for name, value in refusal.headers:
        response[name] = value
    response["Content-Length"] = str(len(refusal.body))
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
        if (chunk is _END or call.body(chunk)) and call.complete():
            call.wait_committed()
        if chunk is _END:
            raise StopIteration
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
        if (chunk is _END or call.body(chunk)) and call.complete():
            await call.committed()
        if chunk is _END:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        """Closed by Django with the response: unbilled unless the body had ended."""
        self._call.gone()

    def __del__(self) -> None:
        try:
            self._call.gone()
        except Exception:
            logger.exception("commet: settling an abandoned response failed")
