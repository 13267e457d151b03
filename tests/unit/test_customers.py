"""Customer resolvers on ASGI scopes and WSGI environs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from commet_middleware.customers import (
    first_of,
    from_callable,
    from_cookie,
    from_environ,
    from_header,
    from_path_param,
    from_query,
    from_scope_user,
    from_state,
    resolve_async,
    resolve_now,
)


def asgi(**extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": []}
    scope.update(extra)
    return scope


def wsgi(**extra: Any) -> dict[str, Any]:
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    environ.update(extra)
    return environ


def test_from_header_reads_asgi_and_wsgi_case_insensitively() -> None:
    """from_header finds the header in raw ASGI headers and in HTTP_* environ keys."""
    resolver = from_header("X-Customer-ID")
    assert resolver(asgi(headers=[(b"x-customer-id", b" cus_1 ")])) == "cus_1"
    assert resolver(wsgi(HTTP_X_CUSTOMER_ID="cus_2")) == "cus_2"
    assert resolver(asgi()) is None
    assert resolver(wsgi(HTTP_X_CUSTOMER_ID="  ")) is None


def test_from_query_reads_the_query_string() -> None:
    """from_query parses the query string of both scope kinds."""
    resolver = from_query("customer")
    assert resolver(asgi(query_string=b"a=1&customer=cus_1")) == "cus_1"
    assert resolver(wsgi(QUERY_STRING="customer=cus_2")) == "cus_2"
    assert resolver(asgi(query_string=b"a=1")) is None


def test_from_path_param_reads_routed_params() -> None:
    """from_path_param reads scope path_params and wsgiorg.routing_args."""
    resolver = from_path_param("org")
    assert resolver(asgi(path_params={"org": "cus_1"})) == "cus_1"
    assert resolver(asgi()) is None
    assert resolver(wsgi(**{"wsgiorg.routing_args": ((), {"org": "cus_2"})})) == "cus_2"
    assert resolver(wsgi()) is None


class _User:
    def __init__(self, identity: str, authenticated: bool = True) -> None:
        self.identity = identity
        self.account = identity.upper()
        self.is_authenticated = authenticated


def test_from_scope_user_reads_the_authenticated_user() -> None:
    """from_scope_user reads an attribute or a function of scope["user"], ignoring anonymous."""
    assert from_scope_user()(asgi(user=_User("cus_1"))) == "cus_1"
    assert from_scope_user(lambda u: u.account)(asgi(user=_User("cus_1"))) == "CUS_1"
    assert from_scope_user()(asgi(user=_User("cus_1", authenticated=False))) is None
    assert from_scope_user()(wsgi(REMOTE_USER="cus_3")) == "cus_3"


def test_from_state_reads_request_state() -> None:
    """from_state reads scope["state"] as Starlette's request.state stores it."""
    assert from_state("customer")(asgi(state={"customer": "cus_1"})) == "cus_1"
    assert from_state("customer")(asgi()) is None


def test_from_environ_and_from_cookie() -> None:
    """from_environ reads an environ key; from_cookie parses the Cookie header."""
    assert from_environ("REMOTE_USER")(wsgi(REMOTE_USER="cus_1")) == "cus_1"
    cookie = from_cookie("cid")
    assert cookie(asgi(headers=[(b"cookie", b"a=b; cid=cus_2")])) == "cus_2"
    assert cookie(wsgi(HTTP_COOKIE="cid=cus_3")) == "cus_3"
    assert cookie(wsgi()) is None


def test_from_callable_sync_and_async() -> None:
    """from_callable accepts sync and async functions and ignores non-string results."""

    def sync_fn(source: Mapping[str, Any]) -> object:
        return source.get("tenant")

    async def async_fn(source: Mapping[str, Any]) -> object:
        return source.get("tenant")

    assert resolve_now(from_callable(sync_fn), asgi(tenant="cus_1")) == "cus_1"
    assert resolve_now(from_callable(sync_fn), asgi(tenant=42)) is None
    assert asyncio.run(resolve_async(from_callable(async_fn), asgi(tenant="cus_2"))) == "cus_2"


def test_first_of_takes_the_first_answer_across_sync_and_async() -> None:
    """first_of tries resolvers in order, awaiting async ones when it reaches them."""

    async def late(source: Mapping[str, Any]) -> str:
        return "cus_async"

    header_first = first_of(from_header("x-c"), from_callable(late))
    assert asyncio.run(resolve_async(header_first, asgi(headers=[(b"x-c", b"cus_h")]))) == "cus_h"
    assert asyncio.run(resolve_async(header_first, asgi())) == "cus_async"
    with pytest.raises(ValueError, match="at least one"):
        first_of()


def test_async_resolver_at_a_sync_call_site_is_skipped() -> None:
    """resolve_now never leaves an un-awaited coroutine behind; it reports no customer."""

    async def async_fn(source: Mapping[str, Any]) -> str:
        return "cus_1"

    assert resolve_now(from_callable(async_fn), wsgi()) is None


def test_a_failing_resolver_is_logged_not_raised(allow_commet_errors: None) -> None:
    """A resolver that raises means 'no customer', never a broken request."""

    def broken(source: Mapping[str, Any]) -> str:
        raise KeyError("boom")

    assert resolve_now(broken, wsgi()) is None
    assert asyncio.run(resolve_async(broken, asgi())) is None


def test_first_of_skips_a_failing_resolver(allow_commet_errors: None) -> None:
    """A resolver that raises inside first_of is logged and the next one still answers."""

    def broken(source: Mapping[str, Any]) -> str:
        raise RuntimeError("bug")

    chain = first_of(broken, from_header("x-c"))
    assert resolve_now(chain, asgi(headers=[(b"x-c", b"cus_1")])) == "cus_1"
