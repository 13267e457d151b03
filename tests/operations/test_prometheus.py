"""stats() as Prometheus metrics: the collector reads the middlewares' counters at each scrape."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from commet_middleware import CommetMiddleware, metered, quota_guard
from commet_middleware.customers import from_header
from commet_middleware.prometheus import CommetCollector
from commet_middleware.testing import FakeCommet


def test_metrics_count_what_was_delivered_and_decided(
    fake_commet: FakeCommet, tmp_path: object
) -> None:
    """Sent, queued, quota decisions, request outcomes and spool rows appear as metrics."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware,
        customer=from_header("X-Customer-ID"),
        api_key="ck_test_metrics",
        transport=fake_commet.transport,
        spool_path=f"{tmp_path}/spool.sqlite3",
        fold_when_behind=False,  # one send per event: the counts below are exact
    )

    @app.get("/search")
    @metered("api_calls")
    def search() -> dict[str, str]:
        return {}

    @app.post("/numbers")
    @quota_guard("whatsapp_numbers")
    def add_number() -> dict[str, str]:
        return {}

    with TestClient(app) as client:
        for _ in range(3):
            assert client.get("/search", headers={"X-Customer-ID": "user_123"}).status_code == 200
        for _ in range(4):
            client.post("/numbers", headers={"X-Customer-ID": "user_free"})
        assert client.get("/search").status_code == 200  # no customer: unattributed
        assert fake_commet.settle()
        mw = app.middleware_stack
        while not isinstance(mw, CommetMiddleware):
            mw = mw.app  # type: ignore[attr-defined]
        registry = CollectorRegistry()
        registry.register(CommetCollector(lambda: [mw]))
        text = generate_latest(registry).decode()
    assert "commet_delivery_sent_total 6.0" in text  # 3 usage events + 3 quota adds
    assert "commet_delivery_queued_total 6.0" in text
    assert "commet_delivery_dead_lettered_total 0.0" in text
    assert "commet_delivery_queue_depth 0.0" in text
    assert 'commet_quota_checks_total{outcome="refused"} 1.0' in text
    assert 'commet_quota_checks_total{outcome="allowed"} 3.0' in text
    assert 'commet_requests_total{outcome="unattributed_requests"} 1.0' in text
    assert 'commet_spool_rows{state="pending"} 0.0' in text
    assert 'commet_spool_rows{state="dead"} 0.0' in text


def test_default_collector_reads_every_live_middleware(fake_commet: FakeCommet) -> None:
    """Without arguments the collector sums the process's live middlewares."""
    app = FastAPI()
    app.add_middleware(CommetMiddleware, api_key="ck_t", transport=fake_commet.transport)
    app.build_middleware_stack()
    registry = CollectorRegistry()
    registry.register(CommetCollector())
    text = generate_latest(registry).decode()
    assert "commet_delivery_sent_total" in text
