"""``@metered`` and ``track``: record billable usage from inside a request or a job."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeAlias, TypeVar, cast

import wrapt

from ._models import (
    UsageValue,
    clean_properties,
    normalize_customer_id,
    validate_feature_code,
    validate_properties,
    validate_recorded_value,
)
from .billing._context import (
    CustomerRequiredError,
    RequestContext,
    _current,
    default_sink,
    get_current_context,
)

__all__ = ["MeteredCustomer", "PropertiesSpec", "ValueSpec", "metered", "track"]

P = ParamSpec("P")
R = TypeVar("R")

ValueSpec: TypeAlias = "UsageValue | Callable[[Any], object]"
"""A usage value, or a function of the decorated function's return value that computes it."""
PropertiesSpec: TypeAlias = "Mapping[str, str] | Callable[[Any], object] | None"
"""Event properties, or a function of the decorated function's return value computing them."""
MeteredCustomer: TypeAlias = "str | Callable[..., object] | None"
"""A customer id, or a function of the decorated function's arguments returning one."""

logger = logging.getLogger("commet_middleware")


def metered(
    feature: str,
    value: ValueSpec = 1,
    properties: PropertiesSpec = None,
    *,
    customer: MeteredCustomer = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Bill ``value`` units of ``feature`` each time the decorated function succeeds.

    In a request (under ``CommetMiddleware`` / ``CommetWSGIMiddleware``) the usage is recorded
    when the function returns and billed by the middleware only if the response succeeds (and,
    for a streaming response, completes); an exception records nothing. The signature is left
    untouched, so FastAPI still injects dependencies and documents parameters; sync functions
    stay sync and async functions async. Put ``@app.get(...)`` outermost.

    ``value`` is any real number (``Decimal`` and ``Fraction`` included: a whole one is sent as
    an int, any other as the float that is exactly it, or refused when none is; see
    ``validate_usage_value``). ``value`` and ``properties`` may be functions of the decorated
    function's *return value* (e.g. ``value=lambda rows: len(rows)``); a computed value that
    is not a number from 0 to ``MAX_USAGE_VALUE`` is logged as an error and counted, the
    response is still served, and nothing is billed for that call. Computed properties that
    break the rules are dropped or cut with a WARNING, and the call is billed. Constant ones
    are checked here.

    ``customer`` (a customer id, or a function of the decorated function's arguments; stripped
    of surrounding whitespace like a resolver's answer) bills a fixed customer; it is what a
    plain function outside any request or ``commet_context`` needs. There, usage is enqueued
    as soon as the function returns, and calling it with no customer raises
    ``CustomerRequiredError`` before the function runs.

    Raises ``ValueError`` now for an invalid feature code, constant value or properties.
    """
    feature = validate_feature_code(feature)
    if not callable(value):
        # A Decimal or other real number is converted once, here (see validate_usage_value).
        value = validate_recorded_value(value)
    if properties is not None and not callable(properties):
        validate_properties(dict(properties))
    if isinstance(customer, str):
        customer = normalize_customer_id(customer)
    elif customer is not None and not callable(customer):
        raise TypeError(f"customer must be a str or a callable, got {type(customer).__name__}")

    # A constant value and no properties were validated above: each call records them as they are.
    constant_value = None if callable(value) or properties is not None else value

    def prepare(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[RequestContext, str | None]:
        explicit = None if customer is None else _explicit_customer(customer, args, kwargs)
        ctx = _current.get()
        if ctx is None:
            if explicit is None:
                raise CustomerRequiredError(
                    f"@metered({feature!r}) called outside a request with no customer: pass "
                    "customer= to @metered, or run it inside commet_context(customer=...)"
                )
            return RequestContext(sink=default_sink(), customer_id=explicit, direct=True), explicit
        if explicit is None and ctx.customer() is None:
            if ctx.direct:
                raise CustomerRequiredError(
                    f"@metered({feature!r}) in a commet_context with no customer: pass "
                    "customer= or call set_customer() first"
                )
            if ctx.reject_missing_customer:
                # The middleware turns this into a 401 without the function doing unpaid work.
                ctx.customer_required = True
                raise CustomerRequiredError(f"request to bill {feature!r} has no customer")
        return ctx, explicit

    def finish(ctx: RequestContext, explicit: str | None, result: object) -> None:
        if constant_value is not None:
            ctx.record(feature, constant_value, None, explicit)
        else:
            _record(ctx, feature, value, properties, result, explicit)

    def sync_wrapper(
        wrapped: Callable[..., Any], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ctx, explicit = prepare(args, kwargs)
        result = wrapped(*args, **kwargs)
        finish(ctx, explicit, result)
        return result

    async def async_wrapper(
        wrapped: Callable[..., Any], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ctx, explicit = prepare(args, kwargs)
        result = await wrapped(*args, **kwargs)
        finish(ctx, explicit, result)
        return result

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        )
        wrapper = async_wrapper if is_async else sync_wrapper
        # wrapt keeps __signature__, __wrapped__, the code flags and the class, so FastAPI and
        # inspect.iscoroutinefunction see the original function.
        return cast("Callable[P, R]", wrapt.FunctionWrapper(fn, wrapper))

    return decorate


def track(feature: str, value: UsageValue = 1, properties: Mapping[str, str] | None = None) -> None:
    """Record ``value`` units of ``feature`` for the current request or job context.

    In a request it joins the usage billed if the response succeeds; in ``commet_context`` it is
    enqueued at once. ``value`` may be any real number (``Decimal``, ``Fraction``: see
    ``validate_usage_value`` for how it is sent). An invalid feature or value is logged as an
    error and counted, never raised, so the response is still served; invalid properties are
    dropped or cut with a WARNING and the usage is billed. Raises ``RuntimeError`` outside a
    request or ``commet_context``, and ``CustomerRequiredError`` in a ``commet_context`` with
    no customer.
    """
    ctx = get_current_context()
    if ctx is None:
        raise RuntimeError(
            f"track({feature!r}) called outside a Commet request context: install the "
            "middleware, or wrap the job in commet_context(customer=...)"
        )
    try:
        feature = validate_feature_code(feature)
    except ValueError:
        logger.exception("commet: track() with an invalid feature code; not billed")
        ctx.count_invalid()
        return
    _record(ctx, feature, value, properties, None, None)


def _explicit_customer(
    customer: MeteredCustomer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    if customer is None:
        return None
    if isinstance(customer, str):
        return customer
    try:
        found = customer(*args, **kwargs)
    except Exception:
        logger.exception("commet: the customer= function of @metered failed")
        return None
    if isinstance(found, str) and found.strip():
        # Stripped like a resolver's answer; whatever else is wrong with it is said when the
        # event is built.
        return found.strip()
    return None


def _record(
    ctx: RequestContext,
    feature: str,
    value: ValueSpec,
    properties: PropertiesSpec,
    result: object,
    explicit_customer: str | None,
) -> None:
    if ctx.direct or not (callable(value) or callable(properties)):
        measured = _measure(ctx, feature, value, properties, result)
        if measured is not None:
            ctx.record(feature, *measured, explicit_customer)
        return
    # Functions of the result run only if the response is billed (at its settle): an error
    # response the view returned (a 422 JSONResponse) is not billed, so nothing is measured
    # and a value function written for the success shape is never fed the error's.
    ctx.record(
        feature,
        0,
        None,
        explicit_customer,
        measure=lambda: _measure(ctx, feature, value, properties, result),
    )


def _measure(
    ctx: RequestContext,
    feature: str,
    value: ValueSpec,
    properties: PropertiesSpec,
    result: object,
) -> tuple[int | float, dict[str, str] | None] | None:
    """Compute and check the value and properties of one usage; None (logged, counted) if the
    value cannot be billed. Bad properties are dropped with a WARNING, the usage kept."""
    try:
        computed_value = value(result) if callable(value) else value
        checked_value = validate_recorded_value(computed_value)
    except Exception:
        # Loud, counted, and never allowed to turn a served response into an error.
        logger.exception(
            "commet: could not compute the usage of %r for request %s; NOT billed",
            feature,
            ctx.request_id,
        )
        ctx.count_invalid()
        return None
    # Properties only describe the usage: a bad one is dropped or cut (one WARNING), never the
    # billable event with it.
    try:
        computed_props = properties(result) if callable(properties) else properties
    except Exception:
        logger.warning(
            "commet: the properties function of %r failed; the usage is billed without them",
            feature,
            exc_info=True,
        )
        computed_props = None
    pairs = clean_properties(computed_props, feature)
    return checked_value, dict(pairs) if pairs else None
