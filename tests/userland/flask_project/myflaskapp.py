"""A user's small Flask service: search is metered."""

from __future__ import annotations

from flask import Flask

from commet_middleware import metered
from commet_middleware.flask import Commet

commet = Commet()


def create_app() -> Flask:
    """Build the app (the factory the tests may call per test)."""
    app = Flask(__name__)
    app.config["COMMET_CUSTOMER_HEADER"] = "X-Customer-ID"
    commet.init_app(app)

    @app.get("/search")
    @metered("api_calls")
    def search() -> dict[str, str]:
        return {"ok": "yes"}

    return app


app = create_app()
