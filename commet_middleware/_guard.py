"""``@quota_guard`` and ``@quota_release``: hold a quota unit before an endpoint, free one after."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeAlias, TypeVar, cast

import wrapt

from ._models import validate_feature_code, validate_quota_count
from .billing._context import PendingQuota, RequestContext, get_current_context
from .billing._refusals import Refusal, RequestRefusedError
from .quota import (
    OnUnavailable,
    QuotaDecision,
    QuotaGate,
    ratelimit_headers,
    refusal_body,
    status_for,
)

__all__ = ["CountSpec", "RefusalHandler", "quota_guard", "quota_release"]

P = ParamSpec("P")
R = TypeVar("R")

CountSpec: TypeAlias = "int | Callable[..., object]"
"""A whole number of units, or a function computing it (see each decorator for its input)."""
RefusalHandler: TypeAlias = (
    "Callable[[QuotaDecision], tuple[int, object, Mapping[str, str] | None] | None]"
)
"""``on_refused(decision) -> (status, body, headers)``: body JSON-able or bytes; None: default."""

logger = logging.getLogger("commet_middleware")


def quota_guard(
    feature: str,
    count: CountSpec = 1,
    *,
    hard_limit: bool = False,
    on_unavailable: OnUnavailable = "open",
    refusal_status: int | None = None,
    on_refused: RefusalHandler | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Let the decorated endpoint run only if the customer's ``feature`` quota has ``count``
    units left; add ``count`` to the quota when the response succeeds.

    Before the endpoint runs, ``count`` units are reserved (atomically, so concurrent requests
    racing for the last units cannot overshoot). The reservation is committed, as a quota add
    sent to Commet through the delivery queue, when the response passes ``bill_status`` and
    completes; it is released when the endpoint raises or the response fails. A refused request
    never reaches the endpoint: the middleware answers with a JSON error (``refusal_body``):
    402 ``quota_exceeded``, 401 ``customer_required``, 402 ``no_active_subscription``, 403
    ``feature_not_in_plan``, 503 ``quota_unavailable``, 503 ``commet_key_rejected`` (Commet
    refused our API key on the quota read, whatever ``on_unavailable`` says; see
    ``status_for``), with RateLimit
    headers; allowed responses carry the RateLimit headers too. A plan with overage enabled,
    or an unlimited one, is never refused unless ``hard_limit=True`` (which makes ``included``
    a ceiling even with overage).

    ``count`` may be a function of the endpoint's call arguments (FastAPI passes them by
    keyword: ``count=lambda **kw: len(kw["body"].items)``): it runs before the endpoint, and a
    result that is not a whole number >= 0 raises ``ValueError``. ``on_unavailable`` says what
    to do when Commet or the quota store cannot be asked: ``"open"`` decides from the last
    known allowance or allows (the units are still billed); ``"closed"`` refuses with 503 and
    ``Retry-After``. ``refusal_status`` replaces
    the status of ``quota_exceeded`` refusals (e.g. 429); ``on_refused(decision)`` may return
    ``(status, body, headers)`` for any refusal (None keeps the default answer).

    Needs ``CommetMiddleware``/``CommetWSGIMiddleware`` (it uses the middleware's quota gate);
    called outside one it raises ``RuntimeError``. Async endpoints check without blocking the
    loop; sync ones (a threadpool under ASGI, WSGI) check synchronously.
    Raises ``ValueError`` now for an invalid feature code, constant count or option.
    """
    feature = validate_feature_code(feature)
    _check_count_spec(count)
    if on_unavailable not in ("open", "closed"):
        raise ValueError(f"on_unavailable must be 'open' or 'closed', got {on_unavailable!r}")
    if refusal_status is not None and not 400 <= refusal_status <= 599:
        raise ValueError(f"refusal_status must be a 4xx or 5xx status, got {refusal_status!r}")

    def prepare(
        args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[RequestContext, QuotaGate, int]:
        ctx, gate = _request(feature, "quota_guard")
        units = count(*args, **kwargs) if callable(count) else count
        return ctx, gate, validate_quota_count(units)

    def admit(ctx: RequestContext, decision: QuotaDecision) -> None:
        if not decision.allowed:
            _refuse(ctx, decision, refusal_status, on_refused)
        if decision.reservation is not None:
            ctx.add_quota(
                PendingQuota(ctx.gate, ctx.next_key(feature), reservation=decision.reservation)
            )
        ctx.add_response_headers(ratelimit_headers(decision))

    def sync_wrapper(
        wrapped: Callable[..., Any], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ctx, gate, units = prepare(args, kwargs)
        admit(
            ctx,
            gate.check(
                ctx.customer(),
                feature,
                units,
                hard_limit=hard_limit,
                on_unavailable=on_unavailable,
            ),
        )
        return wrapped(*args, **kwargs)

    async def async_wrapper(
        wrapped: Callable[..., Any], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ctx, gate, units = prepare(args, kwargs)
        customer = ctx.customer()
        # A warm cache decides without the fetch machinery's coroutines.
        decision = gate.check_cached(
            customer, feature, units, hard_limit=hard_limit, on_unavailable=on_unavailable
        )
        if decision is None:
            decision = await gate.acheck(
                customer, feature, units, hard_limit=hard_limit, on_unavailable=on_unavailable
            )
        admit(ctx, decision)
        return await wrapped(*args, **kwargs)

    return _decorator(sync_wrapper, async_wrapper)


def quota_release(feature: str, count: CountSpec = 1) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Take ``count`` units off the customer's ``feature`` quota when the decorated endpoint's
    response succeeds (a delete); nothing is recorded when it raises or the response fails.

    ``count`` may be a function of the endpoint's *return value*, like ``@metered``'s
    ``value`` (e.g. ``count=lambda r: r["deleted"]``): what was freed is known only after the
    work. A computed count that is not a whole number >= 0 is logged and counted, the response
    is still served, and nothing is recorded. A request with no customer is refused with 401
    before the endpoint runs. Removing more than the balance makes Commet answer 400
    ``insufficient_balance``: the change goes to the dead-letter hook, never retried, and the
    cached allowance is dropped so the next check asks Commet.

    Needs the middleware (or ``commet_context``, where the removal is enqueued at once);
    outside both it raises ``RuntimeError``. Raises ``ValueError`` now for an invalid
    feature code or constant count.
    """
    feature = validate_feature_code(feature)
    _check_count_spec(count)

    def prepare() -> tuple[RequestContext, str]:
        ctx = get_current_context()
        if ctx is None:
            raise RuntimeError(
                f"@quota_release({feature!r}) called outside a Commet request context: install "
                "CommetMiddleware (or CommetWSGIMiddleware), or use commet_context()"
            )
        customer = ctx.customer()
        if customer is None:
            if ctx.direct:
                raise RuntimeError(
                    f"@quota_release({feature!r}) in a commet_context with no customer"
                )
            _refuse(ctx, QuotaDecision(False, feature, 0, code="customer_required"), None, None)
        return ctx, cast("str", customer)

    def finish(ctx: RequestContext, customer: str, result: object) -> None:
        try:
            units = validate_quota_count(count(result) if callable(count) else count)
        except Exception:
            logger.exception(
                "commet: could not compute the count of @quota_release(%r) for request %s; "
                "NOT recorded",
                feature,
                ctx.request_id,
            )
            ctx.count_invalid()
            return
        ctx.add_quota(
            PendingQuota(
                ctx.gate,
                ctx.next_key(feature),
                customer_id=customer,
                feature=feature,
                count=units,
            )
        )

    def sync_wrapper(
        wrapped: Callable[..., Any], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ctx, customer = prepare()
        result = wrapped(*args, **kwargs)
        finish(ctx, customer, result)
        return result

    async def async_wrapper(
        wrapped: Callable[..., Any], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ctx, customer = prepare()
        result = await wrapped(*args, **kwargs)
        finish(ctx, customer, result)
        return result

    return _decorator(sync_wrapper, async_wrapper)


_Wrapper = Callable[[Callable[..., Any], object, tuple[Any, ...], dict[str, Any]], Any]


def _decorator(
    sync_wrapper: _Wrapper, async_wrapper: _Wrapper
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        )
        # wrapt keeps the signature, __wrapped__ and the coroutine flag: FastAPI sees the
        # original endpoint, and a sync one still goes to the threadpool.
        return cast(
            "Callable[P, R]", wrapt.FunctionWrapper(fn, async_wrapper if is_async else sync_wrapper)
        )

    return decorate


def _check_count_spec(count: CountSpec) -> None:
    if not callable(count):
        validate_quota_count(count)


def _request(feature: str, name: str) -> tuple[RequestContext, QuotaGate]:
    ctx = get_current_context()
    if ctx is None or ctx.gate is None:
        raise RuntimeError(
            f"@{name}({feature!r}) needs a request under CommetMiddleware (or "
            "CommetWSGIMiddleware): the middleware's quota gate decides"
        )
    return ctx, ctx.gate


def _refuse(
    ctx: RequestContext,
    decision: QuotaDecision,
    refusal_status: int | None,
    on_refused: RefusalHandler | None,
) -> None:
    """Leave the refusal on the context and stop the endpoint from running."""
    refusal = _custom_refusal(decision, on_refused) or _default_refusal(decision, refusal_status)
    ctx.refusal = refusal
    if ctx.stats is not None:
        ctx.stats.add("quota_refusals")
    raise RequestRefusedError(refusal)


def _default_refusal(decision: QuotaDecision, refusal_status: int | None) -> Refusal:
    status = status_for(decision)
    if refusal_status is not None and decision.code == "quota_exceeded":
        status = refusal_status
    return _build(status, refusal_body(decision), ratelimit_headers(decision))


def _custom_refusal(decision: QuotaDecision, on_refused: RefusalHandler | None) -> Refusal | None:
    if on_refused is None:
        return None
    try:
        answer = on_refused(decision)
        if answer is None:
            return None
        status, body, headers = answer
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"on_refused returned an invalid status {status!r}")
        return _build(status, body, list((headers or {}).items()))
    except Exception:
        # A user hook must not turn a refusal into an allowed request or an error page.
        logger.exception("commet: the on_refused hook failed; sending the default refusal")
        return None


def _build(status: int, body: object, headers: list[tuple[str, str]]) -> Refusal:
    if isinstance(body, bytes):
        data = body
        content_type = "application/octet-stream"
    else:
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        content_type = "application/json"
    names = {name.lower() for name, _ in headers}
    if "content-type" not in names:
        headers = [("Content-Type", content_type), *headers]
    return Refusal(status, data, tuple(headers))
