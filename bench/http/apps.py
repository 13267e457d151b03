"""The benchmarked apps: one hello-world JSON endpoint per framework, and the case table.

The server imports ``asgi_app`` (uvicorn) or ``wsgi_app`` (gunicorn) from here; which framework
and case it builds comes from the environment the runner sets:

    BENCH_FRAMEWORK  starlette | fastapi | flask | django
    BENCH_CASE       a key of CASES
    BENCH_SINK_URL   http://127.0.0.1:PORT, where every vendor URL points
    BENCH_SPOOL_DIR  a fresh directory per run, for the spool cases' files
    BENCH_REDIS_URL  the redis-server the runner started for the quota_guard_warm_redis case

Adding a case is one entry in ``CASES``: how to install it on the framework's app, an optional
decorator for the endpoint, and what each 2xx response must bill (``expects``: the runner then
checks the sink's matching quantity against the 2xx count).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from commet_middleware import (
    CommetMiddleware,
    CommetSettings,
    CommetWSGIMiddleware,
    metered,
    quota_guard,
)
from commet_middleware.customers import from_header
from commet_middleware.delivery import DeliveryQueue

FRAMEWORKS = ("starlette", "fastapi", "flask", "django")
ASGI_FRAMEWORKS = frozenset({"starlette", "fastapi"})
FEATURE = "api_calls"
# A quota feature (bench/http/catalogue.toml) for the quota_guard cases.
QUOTA_FEATURE = "tasks"
CUSTOMER = "bench_customer"
CUSTOMER_HEADER = "X-Customer-Id"
PATH = "/hello"
# Valid formats for the peers; never real credentials.
APITALLY_TOKEN = "apt_" + "b" * 24
MOESIF_APP_ID = "bench-application-id"

Endpoint = Callable[..., Any]
Decorator = Callable[[Endpoint], Endpoint]
# What every 2xx response must bill, as the sink's stats name it: one usage event
# ("commet_events"), one unit of usage however it was batched ("usage_total": aggregation sums
# many requests into one event), or one unit added to a quota ("quota_added").
Expects = Literal["commet_events", "usage_total", "quota_added"]


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration of an app.

    ``install(app, framework, sink_url)`` adds the middleware (or SDK) to the framework's app
    object; ``decorate`` wraps the endpoint; ``expects`` names the sink quantity that each 2xx
    response must raise by exactly one (None: nothing is checked).
    """

    install: Callable[[Any, str, str], None] | None = None
    decorate: Decorator | None = None
    expects: Expects | None = None
    # A peer SDK that might not be installed: the runner skips the case when it is missing.
    requires: str | None = None


def add_middleware(app: Any, framework: str, asgi: type, wsgi: type, **options: Any) -> None:
    """Install a middleware class the idiomatic way for ``framework``."""
    if framework == "django":
        app.add_middleware(asgi, options)
    elif framework in ASGI_FRAMEWORKS:
        app.add_middleware(asgi, **options)
    else:
        app.wsgi_app = wsgi(app.wsgi_app, **options)


def commet_options(sink_url: str, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of our middlewares for the benchmark: customer from a header, the sink."""
    return {
        "customer": from_header(CUSTOMER_HEADER),
        "api_key": "ck_bench",
        "base_url": sink_url,
        **extra,
    }


class PassthroughASGI:
    """The floor: a pure ASGI middleware that only forwards the call."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class PassthroughDjango:
    """The floor for Django: a middleware in MIDDLEWARE that only forwards the call."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)


class PassthroughWSGI:
    """The floor: a WSGI middleware that only forwards the call."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


def _passthrough(app: Any, framework: str, sink_url: str) -> None:
    add_middleware(app, framework, PassthroughASGI, PassthroughWSGI)


def _zero_code(app: Any, framework: str, sink_url: str) -> None:
    add_middleware(
        app,
        framework,
        CommetMiddleware,
        CommetWSGIMiddleware,
        **commet_options(sink_url, meter=FEATURE),
    )


def _zero_code_thread(app: Any, framework: str, sink_url: str) -> None:
    """``zero_code`` whose sender is a thread from the start, never a task on the app's loop:
    what a sender that always lives in a thread would cost an ASGI app (issue 13, item 3)."""
    queue = DeliveryQueue(CommetSettings.from_env(api_key="ck_bench", base_url=sink_url))
    # Started from a thread with no running loop, so the worker is a thread (install may run
    # on the server's loop); the queue flushes at exit.
    starter = threading.Thread(target=queue.start)
    starter.start()
    starter.join()
    add_middleware(
        app,
        framework,
        CommetMiddleware,
        CommetWSGIMiddleware,
        **commet_options(sink_url, meter=FEATURE, sink=queue),
    )


def _metered_middleware(app: Any, framework: str, sink_url: str) -> None:
    add_middleware(
        app, framework, CommetMiddleware, CommetWSGIMiddleware, **commet_options(sink_url)
    )


# Aggregation on: usage events of one customer and feature summed over half a second, so the
# sink sees one event per window; the sum of their values is what each 2xx must raise by one.
AGGREGATE_WINDOW = 0.5


def _aggregating(sink_url: str, **extra: Any) -> dict[str, Any]:
    options = commet_options(sink_url, **extra)
    options["settings"] = CommetSettings.from_env(
        api_key=options.pop("api_key"),
        base_url=options.pop("base_url"),
        aggregate_window=AGGREGATE_WINDOW,
    )
    return options


def _zero_code_agg(app: Any, framework: str, sink_url: str) -> None:
    add_middleware(
        app,
        framework,
        CommetMiddleware,
        CommetWSGIMiddleware,
        **_aggregating(sink_url, meter=FEATURE),
    )


def _metered_agg(app: Any, framework: str, sink_url: str) -> None:
    add_middleware(app, framework, CommetMiddleware, CommetWSGIMiddleware, **_aggregating(sink_url))


def _quota_store(
    kind: Literal["sqlite", "redis"], *, aggregate: bool = False
) -> Callable[[Any, str, str], None]:
    """The warm quota guard's middleware with a shared quota store: a SQLite file of the run
    (``quota.db`` in BENCH_SPOOL_DIR) or the Redis the runner started (BENCH_REDIS_URL)."""

    def install(app: Any, framework: str, sink_url: str) -> None:
        if kind == "sqlite":
            directory = os.environ.get("BENCH_SPOOL_DIR") or tempfile.mkdtemp(prefix="commet-")
            url = "sqlite://" + os.path.join(directory, "quota.db")
        else:
            url = os.environ["BENCH_REDIS_URL"]
        if aggregate:
            options = _aggregating(sink_url)
            options["settings"] = options["settings"].replace(quota_store=url)
        else:
            options = commet_options(sink_url, quota_store=url)
        add_middleware(app, framework, CommetMiddleware, CommetWSGIMiddleware, **options)

    return install


def _spool_path() -> str:
    # One file per serving process, in the directory the runner makes (and removes) per run.
    directory = os.environ.get("BENCH_SPOOL_DIR") or tempfile.mkdtemp(prefix="commet-bench-")
    return os.path.join(directory, f"spool-{os.getpid()}.sqlite3")


def _spool_on(app: Any, framework: str, sink_url: str) -> None:
    add_middleware(
        app,
        framework,
        CommetMiddleware,
        CommetWSGIMiddleware,
        **commet_options(sink_url, meter=FEATURE, spool_path=_spool_path()),
    )


def _spool_on_agg(app: Any, framework: str, sink_url: str) -> None:
    add_middleware(
        app,
        framework,
        CommetMiddleware,
        CommetWSGIMiddleware,
        **_aggregating(sink_url, meter=FEATURE, spool_path=_spool_path()),
    )


def _apitally(app: Any, framework: str, sink_url: str) -> None:
    import importlib

    # apitally 1.x exports OTLP; otlp_endpoint (or APITALLY_OTLP_ENDPOINT) is its base URL.
    module = importlib.import_module(f"apitally.{framework}")
    module.init(app, write_token=APITALLY_TOKEN, env="bench", otlp_endpoint=sink_url)


def _moesif(app: Any, framework: str, sink_url: str) -> None:
    # Both SDKs read the API base URL from the BASE_URI setting (default https://api.moesif.net).
    settings = {"APPLICATION_ID": MOESIF_APP_ID, "BASE_URI": sink_url, "LOG_BODY": False}
    if framework in ASGI_FRAMEWORKS:
        from moesifasgi import MoesifMiddleware as MoesifASGI  # type: ignore[import-untyped]

        app.add_middleware(MoesifASGI, settings=settings)
    else:
        from moesifwsgi import MoesifMiddleware as MoesifWSGI  # type: ignore[import-untyped]

        app.wsgi_app = MoesifWSGI(app.wsgi_app, settings)


class FloorASGI:
    """For reference, the least a billing middleware can do: the customer from a header, the
    status from the response start, a counter bumped in a dict when a response succeeds. No
    context for the app, no keys, nothing delivered."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: dict[str, int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        customer = None
        for name, value in scope["headers"]:
            if name == b"x-customer-id":
                customer = value.decode("latin-1")
                break
        status = 0

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif customer and status < 400 and not message.get("more_body", False):
                self.counts[customer] = self.counts.get(customer, 0) + 1
            await send(message)

        await self.app(scope, receive, send_wrapper)


class FloorWSGI:
    """The WSGI counterpart of ``FloorASGI`` (counts when the app has returned its body)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: dict[str, int] = {}

    def __call__(self, environ: Any, start_response: Any) -> Any:
        customer = environ.get("HTTP_X_CUSTOMER_ID")
        status = [0]

        def start_wrapper(line: str, headers: Any, exc_info: Any = None) -> Any:
            status[0] = int(line[:3])
            if exc_info is not None:
                return start_response(line, headers, exc_info)
            return start_response(line, headers)

        body = self.app(environ, start_wrapper)
        if customer and status[0] < 400:
            self.counts[customer] = self.counts.get(customer, 0) + 1
        return body


def _floor(app: Any, framework: str, sink_url: str) -> None:
    add_middleware(app, framework, FloorASGI, FloorWSGI)


class DroppingSink:
    """A sink that takes every operation and keeps none (the ladder cases deliver nothing)."""

    def enqueue(self, operation: Any, /) -> None:
        """Drop ``operation``."""


def _ladder(**options: Any) -> Callable[[Any, str, str], None]:
    # Our middleware with part of its work on: what each part adds, without delivery.
    def install(app: Any, framework: str, sink_url: str) -> None:
        add_middleware(
            app, framework, CommetMiddleware, CommetWSGIMiddleware, sink=DroppingSink(), **options
        )

    return install


CASES: dict[str, Case] = {
    "bare": Case(),
    "passthrough": Case(install=_passthrough),
    "zero_code": Case(install=_zero_code, expects="usage_total"),
    "zero_code_thread": Case(install=_zero_code_thread, expects="usage_total"),
    "metered": Case(install=_metered_middleware, decorate=metered(FEATURE), expects="usage_total"),
    "zero_code_agg": Case(install=_zero_code_agg, expects="usage_total"),
    "metered_agg": Case(install=_metered_agg, decorate=metered(FEATURE), expects="usage_total"),
    # The quota cache is warm once the runner's warm-up has run: one read, then a read per TTL.
    "quota_guard_warm": Case(
        install=_metered_middleware, decorate=quota_guard(QUOTA_FEATURE), expects="quota_added"
    ),
    "quota_guard_warm_agg": Case(
        install=_metered_agg, decorate=quota_guard(QUOTA_FEATURE), expects="quota_added"
    ),
    # The same with the state in a store shared by processes: each request reserves in one
    # store transaction (SQLite) or one Lua script (Redis), and commits in another.
    "quota_guard_warm_sqlite": Case(
        install=_quota_store("sqlite"), decorate=quota_guard(QUOTA_FEATURE), expects="quota_added"
    ),
    "quota_guard_warm_redis": Case(
        install=_quota_store("redis"), decorate=quota_guard(QUOTA_FEATURE), expects="quota_added"
    ),
    "quota_guard_warm_sqlite_agg": Case(
        install=_quota_store("sqlite", aggregate=True),
        decorate=quota_guard(QUOTA_FEATURE),
        expects="quota_added",
    ),
    "quota_guard_warm_redis_agg": Case(
        install=_quota_store("redis", aggregate=True),
        decorate=quota_guard(QUOTA_FEATURE),
        expects="quota_added",
    ),
    "spool_on": Case(install=_spool_on, expects="usage_total"),
    "spool_on_agg": Case(install=_spool_on_agg, expects="usage_total"),
    "floor": Case(install=_floor),
    # The middleware taken apart (see bench/request_path.py): the wrapper alone, then with the
    # customer resolver, then metering into a sink that drops the event.
    "ladder_wrapper": Case(install=_ladder()),
    "ladder_customer": Case(install=_ladder(customer=from_header(CUSTOMER_HEADER))),
    "ladder_meter": Case(install=_ladder(customer=from_header(CUSTOMER_HEADER), meter=FEATURE)),
    "apitally": Case(install=_apitally, requires="apitally"),
    "moesif": Case(install=_moesif, requires="moesifasgi"),
}


def _endpoint_starlette(case: Case) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def hello(request: Any) -> JSONResponse:
        return JSONResponse({"message": "hello"})

    endpoint = case.decorate(hello) if case.decorate else hello
    return Starlette(routes=[Route(PATH, endpoint)])


def _endpoint_fastapi(case: Case) -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    async def hello() -> dict[str, str]:
        return {"message": "hello"}

    app.get(PATH)(case.decorate(hello) if case.decorate else hello)
    return app


def _endpoint_flask(case: Case) -> Any:
    from flask import Flask

    app = Flask("bench")

    def hello() -> dict[str, str]:
        return {"message": "hello"}

    app.get(PATH)(case.decorate(hello) if case.decorate else hello)
    return app


class DjangoProject:
    """A Django project being put together: middlewares go in ``MIDDLEWARE`` (their options
    in ``COMMET``), then :meth:`application` configures Django and returns its WSGI app."""

    # Our middleware, and the passthrough floor, by the dotted paths MIDDLEWARE takes.
    PATHS: ClassVar[dict[type, str]] = {
        CommetMiddleware: "commet_middleware.django.CommetMiddleware",
        PassthroughASGI: f"{__name__}.PassthroughDjango",
    }

    def __init__(self, case: Case) -> None:
        from django.http import JsonResponse

        def hello(request: Any) -> JsonResponse:
            return JsonResponse({"message": "hello"})

        self.view = case.decorate(hello) if case.decorate else hello
        self.middleware: list[str] = []
        self.commet: dict[str, Any] = {}

    def add_middleware(self, asgi: type, options: dict[str, Any]) -> None:
        """Add the Django counterpart of ``asgi``; the options become ``settings.COMMET``."""
        if asgi not in self.PATHS:
            raise ValueError(f"no Django counterpart of {asgi.__name__}")
        self.middleware.append(self.PATHS[asgi])
        self.commet = dict(options)

    def application(self) -> Any:
        import django
        from django.conf import settings
        from django.core.wsgi import get_wsgi_application
        from django.urls import path

        # A class is a URLconf too (anything with urlpatterns); no module of its own needed.
        urlconf = type("BenchURLConf", (), {"urlpatterns": [path(PATH.lstrip("/"), self.view)]})
        settings.configure(
            DEBUG=False,
            SECRET_KEY="bench-only",  # noqa: S106 - signs nothing: no sessions, no forms
            ALLOWED_HOSTS=["127.0.0.1", "localhost"],
            ROOT_URLCONF=urlconf,
            INSTALLED_APPS=[],
            DATABASES={},
            MIDDLEWARE=self.middleware,
            COMMET=self.commet,
            USE_TZ=True,
        )
        django.setup()
        return get_wsgi_application()


# Cases whose install has no Django counterpart (a pure-ASGI/WSGI floor, the peers' SDKs).
NOT_ON_DJANGO = frozenset({"floor", "apitally", "moesif"})


def supports(framework: str, case_name: str) -> bool:
    """Whether ``case_name`` can be built on ``framework``."""
    return framework != "django" or case_name not in NOT_ON_DJANGO


def build(framework: str, case_name: str, sink_url: str) -> Any:
    """Return the framework's app object with ``case_name`` installed."""
    builders = {
        "starlette": _endpoint_starlette,
        "fastapi": _endpoint_fastapi,
        "flask": _endpoint_flask,
        "django": DjangoProject,
    }
    case = CASES[case_name]
    app = builders[framework](case)
    if case.install is not None:
        case.install(app, framework, sink_url)
    return app.application() if isinstance(app, DjangoProject) else app


def _from_env() -> Any:
    return build(
        os.environ.get("BENCH_FRAMEWORK", "starlette"),
        os.environ.get("BENCH_CASE", "bare"),
        os.environ.get("BENCH_SINK_URL", "http://127.0.0.1:9"),
    )


def __getattr__(name: str) -> Any:
    # Built on first access, so the runner can import CASES without building an app.
    if name in ("asgi_app", "wsgi_app"):
        app = _from_env()
        globals()[name] = app
        return app
    raise AttributeError(name)
