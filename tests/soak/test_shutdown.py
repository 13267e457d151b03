"""Graceful SIGTERM under real servers: the queue drains by the deadline, the rest stays spooled."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.soak import API_KEY, event_key, start_server
from commet_middleware import CommetSettings
from commet_middleware._spool import Spool
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.testing import FakeCommet

pytestmark = pytest.mark.server

SERVERS = [
    pytest.param("uvicorn", False, id="uvicorn"),
    pytest.param("gunicorn-sync", False, id="gunicorn-sync"),
    pytest.param("gunicorn-sync", True, id="gunicorn-sync-preload"),
    pytest.param("gunicorn-gthread", False, id="gunicorn-gthread"),
    pytest.param("gunicorn-gthread", True, id="gunicorn-gthread-preload"),
]
REQUESTS = 30


@pytest.fixture
def commet() -> Iterator[tuple[FakeCommet, str]]:
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_customer("cust_1")
    with fake.serve() as url:
        yield fake, url


def _load(url: str, prefix: str) -> list[str]:
    """Send REQUESTS metered requests; return the event keys of those answered 2xx."""
    keys = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(REQUESTS):
            key = f"{prefix}-{i}"
            response = client.get("/work", headers={"x-customer": "cust_1", "Idempotency-Key": key})
            assert response.status_code == 200
            keys.append(event_key(key, "/work", "cust_1"))
    return keys


@pytest.mark.parametrize(("kind", "preload"), SERVERS)
def test_sigterm_drains_the_queue(
    kind: str, preload: bool, commet: tuple[FakeCommet, str], tmp_path: Path
) -> None:
    """Events still queued at SIGTERM are delivered before the server exits."""
    fake, url = commet
    spool_path = tmp_path / "spool.sqlite3"
    # Slow Commet, one send at a time: a backlog is certain when the signal arrives.
    fake.faults.latency(0.1)
    env = {
        "COMMET_BASE_URL": url,
        "COMMET_API_KEY": API_KEY,
        "COMMET_SPOOL": str(spool_path),
        "SOAK_SHUTDOWN_TIMEOUT": "20",
        "SOAK_MAX_CONCURRENCY": "1",
    }
    server = start_server(kind, env, preload=preload, workers=2, log_dir=tmp_path)
    keys = _load(server.url, "drain")
    assert len(fake.events()) < REQUESTS  # not all delivered yet
    server.stop(signal.SIGTERM, timeout=60)
    recorded = Counter(event.idempotency_key for event in fake.events())
    assert recorded == Counter(keys), server.log.read_text()
    assert Spool(spool_path).stats().pending == 0


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-sync"])
def test_sigterm_drains_a_folded_backlog(
    kind: str, commet: tuple[FakeCommet, str], tmp_path: Path
) -> None:
    """With the default folding, a backlog at SIGTERM is delivered as exact totals: Commet's
    ledger adds up to one unit per request served, and the spool is empty."""
    fake, url = commet
    spool_path = tmp_path / "spool.sqlite3"
    fake.faults.latency(0.1)
    env = {
        "COMMET_BASE_URL": url,
        "COMMET_API_KEY": API_KEY,
        "COMMET_SPOOL": str(spool_path),
        "SOAK_SHUTDOWN_TIMEOUT": "20",
        "SOAK_MAX_CONCURRENCY": "1",
        "SOAK_FOLD": "1",
    }
    server = start_server(kind, env, preload=False, workers=2, log_dir=tmp_path)
    _load(server.url, "fold")
    server.stop(signal.SIGTERM, timeout=60)
    assert fake.usage_total("cust_1", "api_calls") == REQUESTS, server.log.read_text()
    assert len(fake.events()) < REQUESTS  # some of them were folded
    assert Spool(spool_path).stats().pending == 0


@pytest.mark.parametrize(("kind", "preload"), SERVERS)
def test_sigterm_deadline_leaves_the_rest_in_the_spool(
    kind: str, preload: bool, commet: tuple[FakeCommet, str], tmp_path: Path
) -> None:
    """With Commet down, the server still exits at the deadline and nothing leaves the spool."""
    fake, url = commet
    spool_path = tmp_path / "spool.sqlite3"
    fake.faults.error_rate(1.0, status=503)
    env = {
        "COMMET_BASE_URL": url,
        "COMMET_API_KEY": API_KEY,
        "COMMET_SPOOL": str(spool_path),
        "SOAK_SHUTDOWN_TIMEOUT": "1",
    }
    server = start_server(kind, env, preload=preload, workers=2, log_dir=tmp_path)
    keys = _load(server.url, "deadline")
    server.stop(signal.SIGTERM, timeout=60)
    assert fake.events() == []
    stats = Spool(spool_path).stats()
    assert stats.pending == REQUESTS  # given back: claimable at once
    assert stats.claimed == 0
    # The next process (here: a queue in the test) delivers them, each once.
    fake.faults.clear()
    queue = DeliveryQueue(
        CommetSettings(
            api_key=API_KEY, base_url=url, spool_path=str(spool_path), fold_when_behind=False
        )
    )
    queue.start()
    assert queue.close(30)
    assert Counter(event.idempotency_key for event in fake.events()) == Counter(keys)
