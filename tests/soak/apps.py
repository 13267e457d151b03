"""Tiny apps the soak and shutdown tests run under real servers (uvicorn, gunicorn).

Configured from the environment: ``COMMET_BASE_URL``, ``COMMET_API_KEY``, ``COMMET_SPOOL`` as
usual, plus ``SOAK_SHUTDOWN_TIMEOUT`` (seconds, default 10), ``SOAK_QUEUE_LIMIT`` (default
10000), ``SOAK_MAX_CONCURRENCY`` (default 8) and ``SOAK_FOLD`` (default 0: every event goes
with its own key, so the soak can check each one; 1: the default folding of a sender behind).
The customer comes from ``x-customer``; event keys come from the client's ``Idempotency-Key``,
so the load generator knows every key.

    uvicorn --app-dir tests/soak apps:asgi_app
    gunicorn --chdir tests/soak apps:wsgi_app
"""

from __future__ import annotations

import os
import resource
from typing import Any

from commet_middleware import CommetMiddleware, CommetSettings, CommetWSGIMiddleware, metered
from commet_middleware.customers import from_header

IDEMPOTENCY_HEADER = "Idempotency-Key"


def settings() -> CommetSettings:
    """The settings every app here uses, from the environment."""
    return CommetSettings.from_env(
        shutdown_timeout=float(os.environ.get("SOAK_SHUTDOWN_TIMEOUT", "10")),
        queue_limit=int(os.environ.get("SOAK_QUEUE_LIMIT", "10000")),
        max_concurrency=int(os.environ.get("SOAK_MAX_CONCURRENCY", "8")),
        fold_when_behind=os.environ.get("SOAK_FOLD", "0") == "1",
        backoff_base=0.05,
        retry_after_cap=2.0,
        timeout=5.0,
    )


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build_asgi_app() -> Any:
    """A FastAPI app: ``/work`` (async) and ``/work-sync`` metered, ``/health`` and ``/rss`` not."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/work")
    @metered("api_calls")
    async def work() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/work-sync")
    @metered("api_calls")
    def work_sync() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "pid": str(os.getpid())}

    @app.get("/rss")
    async def rss() -> dict[str, int]:
        return {"max_rss_kb": _rss_kb()}

    app.add_middleware(
        CommetMiddleware,
        customer=from_header("x-customer"),
        idempotency_header=IDEMPOTENCY_HEADER,
        settings=settings(),
    )
    return app


def build_wsgi_app() -> Any:
    """A Flask app with the same routes, wrapped in ``CommetWSGIMiddleware``."""
    from flask import Flask

    app = Flask(__name__)

    @app.get("/work")
    @metered("api_calls")
    def work() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "pid": str(os.getpid())}

    @app.get("/rss")
    def rss() -> dict[str, int]:
        return {"max_rss_kb": _rss_kb()}

    app.wsgi_app = CommetWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        customer=from_header("x-customer"),
        idempotency_header=IDEMPOTENCY_HEADER,
        settings=settings(),
    )
    return app


def asgi_app() -> Any:
    """Factory for ``uvicorn --factory apps:asgi_app``."""
    return build_asgi_app()


def __getattr__(name: str) -> Any:
    # Built on first access, so importing this module (the tests do) starts nothing.
    if name == "wsgi_app":
        return build_wsgi_app()
    raise AttributeError(name)
