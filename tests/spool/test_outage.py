"""The spool against the emulator over real HTTP: an outage of minutes' worth, then recovery."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from commet_middleware import CommetSettings, UsageEvent
from commet_middleware._spool import Spool
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.testing import FakeCommet

pytestmark = pytest.mark.server


def test_outage_then_recovery_delivers_everything_once(tmp_path: Path) -> None:
    """Commet failing (5xx, 429, drops) while events pile up: all arrive once it recovers."""
    fake = FakeCommet()
    fake.add_feature("api_calls")
    for n in range(20):
        fake.add_customer(f"cust_{n}")
    spool_path = tmp_path / "spool.sqlite3"
    with fake.serve() as url:
        fake.faults.error_rate(1.0, status=503)
        settings = CommetSettings(
            api_key="ck_test",
            base_url=url,
            spool_path=str(spool_path),
            queue_limit=20,
            backoff_base=0.01,
            retry_after_cap=0.2,
        )
        queue = DeliveryQueue(settings, backoff_cap=0.1)
        keys = [f"outage-{i}" for i in range(300)]
        for i, key in enumerate(keys):
            queue.enqueue(UsageEvent.create(f"cust_{i % 20}", "api_calls", 1, idempotency_key=key))
            assert queue.stats().pending <= 20
        time.sleep(0.5)  # the outage goes on: everything still waits in the spool
        assert Spool(spool_path).stats().pending + Spool(spool_path).stats().claimed == 300
        assert fake.events() == []
        fake.faults.error_rate(0.0)
        fake.faults.rate_limit_next(3, retry_after=1)
        fake.faults.drop_next(3)
        fake.faults.fail_next(5, status=502)
        assert queue.close(60)
    counts = Counter(event.idempotency_key for event in fake.events())
    assert set(counts) == set(keys)
    assert max(counts.values()) == 1
    assert Spool(spool_path).stats().pending == 0
