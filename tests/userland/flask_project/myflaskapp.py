"""A user's small Flask service: search is metered."""

from __future__ import annotations

from flask import Flask

from commet_middleware import CommetWSGIMiddleware, metered
from commet_middleware.customers import from_header


def create_app() -> Flask:
    """Build the app (the factory the tests may call per test)."""
    app = Flask(__name__)
    app.wsgi_app = CommetWSGIMiddleware(app.wsgi_app, customer=from_header("X-Customer-ID"))

    @app.get("/search")
    @metered("api_calls")
    def search() -> dict[str, str]:
        return {"ok": "yes"}

    return app


app = create_app()
