"""End to end on FastAPI: the middleware's own DeliveryQueue delivers to the Commet emulator."""

from fastapi import FastAPI
from fastapi.testclient import TestClient

from commet_middleware import CommetMiddleware, metered
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet


def test_events_reach_the_emulator_after_lifespan_shutdown(fake_commet: FakeCommet) -> None:
    """Billed requests land in FakeCommet once the lifespan shutdown has flushed the queue."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware,
        customer=from_header("X-Customer-ID"),
        api_key="ck_test_key",
        transport=fake_commet.transport,
    )

    @app.get("/search")
    @metered("api_calls")
    async def search(q: str) -> dict[str, str]:
        return {"q": q}

    @app.get("/sync")
    @metered("ai_tokens", value=lambda r: r["tokens"])
    def sync_endpoint() -> dict[str, int]:
        return {"tokens": 120}

    with TestClient(app) as client:
        for _ in range(3):
            assert (
                client.get("/search?q=a", headers={"X-Customer-ID": "user_123"}).status_code == 200
            )
        assert client.get("/sync", headers={"X-Customer-ID": "user_123"}).status_code == 200
        assert client.get("/search").status_code == 422
    assert fake_commet.usage_total("user_123", "api_calls") == 3
    assert fake_commet.usage_total("user_123", "ai_tokens") == 120
    assert len({e.idempotency_key for e in fake_commet.events()}) == 4
