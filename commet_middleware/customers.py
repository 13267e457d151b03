"""Customer resolvers: small functions that find the paying customer of a request.

A resolver takes the ASGI ``scope`` or the WSGI ``environ`` and returns the customer id, or
None when the request does not say. It may return an awaitable (ASGI only). Pass one to the
middleware's ``customer=``; combine several with :func:`first_of`. The middleware calls the
resolver when the request arrives and, while no customer is known, again later in the request
(when ``@metered`` or ``track`` records usage, and when the response starts), so values that
only exist after routing or authentication (path params, ``scope["user"]``) are found too.
Application code can always override with :func:`commet_middleware.set_customer`.

Header, cookie and query bytes are read as UTF-8 (what clients send), and as latin-1 only
when they are not valid UTF-8; a WSGI server hands them over as latin-1 text (PEP 3333), which
is read again as UTF-8 the same way. So ``josé`` is billed as ``josé``, not ``josÃ©``.

Whatever a resolver finds is checked like every customer id (at most 255 printable
characters: no control or invisible characters): a value that fails is treated as "not
said", with a WARNING (at most one a minute, so hostile headers cannot flood the log), and the
request goes on as one with no customer (401 ``customer_required`` where that is required).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any, TypeAlias
from urllib.parse import parse_qs

from ._errors import CustomerRequiredError
from ._models import MAX_CUSTOMER_ID_LENGTH, customer_id_problem

__all__ = [
    "CustomerRequiredError",
    "CustomerResolver",
    "first_of",
    "from_callable",
    "from_cookie",
    "from_environ",
    "from_header",
    "from_path_param",
    "from_query",
    "from_scope_user",
    "from_state",
    "is_asgi_scope",
    "resolve_async",
    "resolve_now",
    "resolve_now_or_later",
]

_logger = logging.getLogger("commet_middleware")

ResolverResult: TypeAlias = "str | Awaitable[str | None] | None"
CustomerResolver: TypeAlias = Callable[[Mapping[str, Any]], ResolverResult]
"""A function of the ASGI scope or WSGI environ returning the customer id (or an awaitable)."""


def is_asgi_scope(source: Mapping[str, Any]) -> bool:
    """Return True for an ASGI scope, False for a WSGI environ."""
    return "REQUEST_METHOD" not in source and "type" in source


# When the last refused customer id was logged, and how many have been refused since.
_refusals: list[float] = [-math.inf, 0]
_REFUSAL_LOG_INTERVAL = 60.0


def _acceptable(value: str) -> str | None:
    """Return ``value`` if it can name a customer; else log why (rate-limited) and None."""
    # The common case costs two checks; the reason is only worked out for a refused id.
    if len(value) <= MAX_CUSTOMER_ID_LENGTH and value.isprintable():
        return value
    now = time.monotonic()
    last, since = _refusals
    if now - last < _REFUSAL_LOG_INTERVAL:
        _refusals[1] = since + 1
        return None
    _refusals[:] = [now, 0]
    _logger.warning(
        "commet: a customer resolver found an unusable customer id, treated as none (%s)%s",
        customer_id_problem(value),
        f"; {since} more since the last warning" if since else "",
    )
    return None


def _decoded(raw: bytes) -> str:
    """Return request bytes as text: UTF-8 when they are valid UTF-8, else latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Every byte string is latin-1: an old client's é (0xE9) still reads as é.
        return raw.decode("latin-1")


def _utf8_again(value: object) -> object:
    """Return text made of bytes read as latin-1, read again as UTF-8 when they are UTF-8.

    A WSGI server decodes header bytes as latin-1 (PEP 3333), so UTF-8 ``é`` arrives as
    ``Ã©``; a quoted cookie's octal escapes are bytes too. Text that could not have come from
    such a step (a character above U+00FF: something already decoded it) or whose bytes are
    not UTF-8 is kept as it is.
    """
    if not isinstance(value, str) or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _clean(value: object) -> str | None:
    # Only a non-blank string names a customer; anything else means "not said".
    if type(value) is not str:  # a str is the common case: checked first
        if isinstance(value, bytes):
            value = _decoded(value)
        elif not isinstance(value, str):
            return None
    value = value.strip()
    return _acceptable(value) if value else None


def _environ_key(header: str) -> str:
    """Return the WSGI environ key of request header ``header``."""
    key = header.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def _header(source: Mapping[str, Any], name: str) -> str | None:
    """Return the text of request header ``name``, unchecked (a Cookie header is no id)."""
    if is_asgi_scope(source):
        wanted = name.lower().encode("latin-1")
        for key, value in source.get("headers") or ():
            if key.lower() == wanted:
                return _decoded(bytes(value))
        return None
    value = _utf8_again(source.get(_environ_key(name)))
    return value if isinstance(value, str) else None


def from_header(name: str) -> CustomerResolver:
    """Read the customer id from request header ``name`` (ASGI and WSGI).

    Use header identity **only behind a trusted gateway** that sets the header itself and strips
    any value sent by the client: otherwise any caller can bill any customer.
    """
    # Runs on every request: the names are worked out once, here.
    wanted = name.lower().encode("latin-1")
    environ_key = _environ_key(name)

    def resolve(source: Mapping[str, Any]) -> str | None:
        if "REQUEST_METHOD" in source or "type" not in source:  # a WSGI environ
            return _clean(_utf8_again(source.get(environ_key)))
        for key, value in source.get("headers") or ():
            if key == wanted or key.lower() == wanted:
                found = _decoded(bytes(value)).strip()
                return _acceptable(found) if found else None
        return None

    return resolve


def from_query(name: str) -> CustomerResolver:
    """Read the customer id from query parameter ``name`` (ASGI and WSGI).

    Like a header, a query parameter is whatever the client sent: trust it only when something
    upstream has authenticated it.
    """

    def resolve(source: Mapping[str, Any]) -> str | None:
        if is_asgi_scope(source):
            raw = source.get("query_string", b"")
            query = _decoded(raw) if isinstance(raw, bytes) else str(raw)
        else:
            query = str(_utf8_again(source.get("QUERY_STRING", "")))
        try:
            values = parse_qs(query, errors="strict").get(name)
        except UnicodeDecodeError:  # percent-escapes that are not UTF-8 (%E9 for é)
            values = parse_qs(query, encoding="latin-1").get(name)
        return _clean(values[0]) if values else None

    return resolve


def from_path_param(name: str) -> CustomerResolver:
    """Read the customer id from path parameter ``name`` once the app has routed the request.

    ASGI: ``scope["path_params"]`` (Starlette, FastAPI). WSGI: the ``wsgiorg.routing_args``
    environ key when a router sets it (Flask does not: use ``set_customer`` in
    ``before_request`` with ``request.view_args`` there).
    """

    def resolve(source: Mapping[str, Any]) -> str | None:
        if is_asgi_scope(source):
            return _clean((source.get("path_params") or {}).get(name))
        routing_args = source.get("wsgiorg.routing_args")
        if isinstance(routing_args, tuple) and len(routing_args) == 2:
            return _clean(routing_args[1].get(name))
        return None

    return resolve


def from_scope_user(attr: str | Callable[[Any], object] = "identity") -> CustomerResolver:
    """Read the customer id from the authenticated user of the request.

    ASGI: ``scope["user"]`` as set by Starlette's ``AuthenticationMiddleware``; ``attr`` is the
    attribute to read (default ``identity``) or a function of the user. Unauthenticated users
    give None. WSGI: ``environ["REMOTE_USER"]`` when ``attr`` is left at its default.
    """

    def resolve(source: Mapping[str, Any]) -> str | None:
        if not is_asgi_scope(source):
            if attr != "identity":
                return None
            return _clean(_utf8_again(source.get("REMOTE_USER")))
        user = source.get("user")
        if user is None or getattr(user, "is_authenticated", True) is False:
            return None
        if callable(attr):
            return _clean(attr(user))
        try:
            return _clean(getattr(user, attr, None))
        except NotImplementedError:  # starlette's BaseUser leaves identity abstract
            return None

    return resolve


def from_state(attr: str) -> CustomerResolver:
    """Read the customer id from ``request.state.<attr>`` (ASGI ``scope["state"]`` only).

    Set it from auth middleware or a dependency; the middleware finds it later in the request.
    """

    def resolve(source: Mapping[str, Any]) -> str | None:
        state = source.get("state") if is_asgi_scope(source) else None
        if isinstance(state, Mapping):
            return _clean(state.get(attr))
        return _clean(getattr(state, attr, None)) if state is not None else None

    return resolve


def from_environ(key: str) -> CustomerResolver:
    """Read the customer id from WSGI ``environ[key]`` (in ASGI, from ``scope[key]``).

    Useful when an outer middleware or the server (e.g. ``REMOTE_USER``) has put it there.
    A server's variable (a key without a dot: ``REMOTE_USER``, ``HTTP_X_CUSTOMER``) is PEP 3333
    latin-1 text and is read again as UTF-8; a dotted key is an extension's, taken as it is.
    """
    server_variable = "." not in key

    def resolve(source: Mapping[str, Any]) -> str | None:
        value = source.get(key)
        if server_variable and not is_asgi_scope(source):
            value = _utf8_again(value)
        return _clean(value)

    return resolve


def from_cookie(name: str) -> CustomerResolver:
    """Read the customer id from cookie ``name`` (ASGI and WSGI).

    A cookie is client input: use it only when it is signed or otherwise verified upstream.
    """

    def resolve(source: Mapping[str, Any]) -> str | None:
        raw = _header(source, "cookie")
        return _clean(_cookie_value(raw, name)) if raw else None

    return resolve


def _cookie_value(header: str, name: str) -> str | None:
    """Return the value of the first cookie ``name`` in a ``Cookie`` header, or None.

    Read pair by pair rather than with ``SimpleCookie.load``, which stops at the first pair it
    cannot parse (a non-ASCII value such as ``josé``, a JSON value) and so loses every cookie
    after it. A double-quoted value is unquoted as ``SimpleCookie`` writes it (its octal
    escapes included).
    """
    for pair in header.split(";"):
        key, equals, value = pair.partition("=")
        if not equals or key.strip() != name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            quoted: SimpleCookie = SimpleCookie()
            try:
                quoted.load(f"{_COOKIE_KEY}={value}")
            except CookieError:
                return None
            morsel = quoted.get(_COOKIE_KEY)
            # Escapes are bytes: werkzeug writes é as \303\251 (UTF-8), Python as \351.
            return str(_utf8_again(morsel.value)) if morsel is not None else None
        return value
    return None


# Any name SimpleCookie accepts: the real name may be one it does not (a non-ASCII one).
_COOKIE_KEY = "c"


def from_callable(fn: Callable[[Mapping[str, Any]], object]) -> CustomerResolver:
    """Use ``fn(scope_or_environ)``, sync or async, as the resolver.

    Its result counts only if it is a non-blank string. An async ``fn`` works only under ASGI,
    and only at the points where the middleware can await (request start, response start).
    """
    if inspect.iscoroutinefunction(fn):

        async def resolve_async(source: Mapping[str, Any]) -> str | None:
            return _clean(await fn(source))

        return resolve_async

    def resolve(source: Mapping[str, Any]) -> ResolverResult:
        result = fn(source)
        if inspect.isawaitable(result):
            return _await_clean(result)
        return _clean(result)

    return resolve


async def _await_clean(result: Awaitable[object]) -> str | None:
    return _clean(await result)


def first_of(*resolvers: CustomerResolver) -> CustomerResolver:
    """Try ``resolvers`` in order and return the first customer id found."""
    if not resolvers:
        raise ValueError("first_of() needs at least one resolver")

    def resolve(source: Mapping[str, Any]) -> ResolverResult:
        for index, resolver in enumerate(resolvers):
            result = _guarded(resolver, source)
            if inspect.isawaitable(result):
                return _continue_async(result, resolvers[index + 1 :], source)
            if result is not None:
                return result
        return None

    return resolve


async def _continue_async(
    first: Awaitable[str | None],
    rest: tuple[CustomerResolver, ...],
    source: Mapping[str, Any],
) -> str | None:
    try:
        found = await first
    except Exception:
        _logger.exception("commet: a customer resolver in first_of() failed; trying the next")
        found = None
    if found is not None:
        return found
    for resolver in rest:
        result = _guarded(resolver, source)
        if inspect.isawaitable(result):
            try:
                result = await result
            except Exception:
                _logger.exception("commet: a customer resolver in first_of() failed")
                result = None
        if result is not None:
            return result
    return None


def _guarded(resolver: CustomerResolver, source: Mapping[str, Any]) -> ResolverResult:
    # One broken resolver in a chain must not hide the answer of the next one.
    try:
        return resolver(source)
    except Exception:
        _logger.exception("commet: customer resolver %r failed; trying the next", resolver)
        return None


def resolve_now(resolver: CustomerResolver, source: Mapping[str, Any]) -> str | None:
    """Run ``resolver`` without awaiting; errors and async results are logged, never raised."""
    try:
        result = resolver(source)
    except Exception:
        _logger.exception("commet: customer resolver %r failed; treating as no customer", resolver)
        return None
    if result is None or type(result) is str:  # the common answers: no awaitable check
        return _clean(result)
    if inspect.isawaitable(result):
        # Only a sync call site gets here (WSGI, or a sync endpoint): the value cannot be read.
        if inspect.iscoroutine(result):
            result.close()
        _logger.debug("commet: async customer resolver skipped at a sync call site")
        return None
    return _clean(result)


def resolve_now_or_later(
    resolver: CustomerResolver, source: Mapping[str, Any]
) -> str | Awaitable[str | None] | None:
    """Run ``resolver``: its cleaned answer, or for an async resolver an awaitable of it.

    What :func:`resolve_async` does, without the cost of a coroutine when the resolver is sync
    (most are: a header, a cookie, the scope's user). Errors are logged, never raised.
    """
    try:
        result = resolver(source)
    except Exception:
        _logger.exception("commet: customer resolver %r failed; treating as no customer", resolver)
        return None
    if result is None:
        return None
    if type(result) is str:
        found = result.strip()
        return _acceptable(found) if found else None
    if inspect.isawaitable(result):
        return _await_guarded(resolver, result)
    return _clean(result)


async def _await_guarded(resolver: CustomerResolver, result: Awaitable[object]) -> str | None:
    try:
        value = await result
    except Exception:
        _logger.exception("commet: customer resolver %r failed; treating as no customer", resolver)
        return None
    return _clean(value)


async def resolve_async(resolver: CustomerResolver, source: Mapping[str, Any]) -> str | None:
    """Run ``resolver``, awaiting it if needed; errors are logged, never raised."""
    try:
        result = resolver(source)
        if inspect.isawaitable(result):
            result = await result
    except Exception:
        _logger.exception("commet: customer resolver %r failed; treating as no customer", resolver)
        return None
    return _clean(result)
