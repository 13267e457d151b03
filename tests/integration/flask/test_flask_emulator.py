"""End to end on Flask: the WSGI middleware's DeliveryQueue delivers to the Commet emulator."""

from __future__ import annotations

from flask import Flask

from commet_middleware import CommetWSGIMiddleware, metered
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet


def test_events_reach_the_emulator_after_flush(fake_commet: FakeCommet) -> None:
    """Billed views land in FakeCommet once the middleware's queue is flushed and closed."""
    app = Flask(__name__)
    middleware = CommetWSGIMiddleware(
        app.wsgi_app,
        customer=from_header("X-Customer-ID"),
        api_key="ck_test_key",
        transport=fake_commet.transport,
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]

    @app.get("/search")
    @metered("api_calls")
    def search() -> str:
        return "ok"

    client = app.test_client()
    for _ in range(4):
        assert client.get("/search", headers={"X-Customer-ID": "user_123"}).data == b"ok"
    middleware.close()
    assert fake_commet.usage_total("user_123", "api_calls") == 4
    # Four events, or fewer if the sender fell behind and folded some into one of their total.
    assert 1 <= len(fake_commet.events("user_123", "api_calls")) <= 4
