"""A user's small FastAPI service: search is metered, phone numbers are a quota."""

from __future__ import annotations

from fastapi import FastAPI

from commet_middleware import CommetMiddleware, metered, quota_guard
from commet_middleware.customers import from_header


def create_app() -> FastAPI:
    """Build the app (the factory the tests may call per test)."""
    app = FastAPI()
    app.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"))

    @app.get("/search")
    @metered("api_calls")
    async def search(q: str) -> dict[str, str]:
        return {"q": q}

    @app.post("/numbers")
    @quota_guard("whatsapp_numbers")
    def add_number() -> dict[str, bool]:
        return {"added": True}

    return app


app = create_app()
