"""Who pays for a Django request: the authenticated user, or the ``COMMET["customer"]`` function.

Usable from sync code, from async code (``await request.auser()``, a database lookup in
Django's sync thread) and from code on an event loop that must not block (what is known now).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import SynchronousOnlyOperation  # type: ignore[import-untyped]
from django.utils.functional import LazyObject, empty  # type: ignore[import-untyped]

from commet_middleware._models import MAX_CUSTOMER_ID_LENGTH
from commet_middleware.customers import CustomerResolver, from_callable

__all__ = ["CustomerLookup", "loop_running"]

logger = logging.getLogger("commet_middleware")

_LOOKUP_FAILED = (
    "commet: finding the customer of a request (COMMET['customer'], or request.user) failed; "
    "treated as no customer"
)


class CustomerLookup:
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
        return self.if_loaded(request) if loop_running() else self.now(request)

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


def loop_running() -> bool:
    """True when called from code running on an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
