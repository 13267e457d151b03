"""The gate on a shared store: one fleet-wide decision, one read per TTL, outages, bad keys."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from commet_middleware._results import QuotaChangeResult
from commet_middleware._settings import CommetSettings
from commet_middleware.quota import QuotaGate, refusal_body, status_for
from commet_middleware.quota._workers import server_workers
from commet_middleware.testing import FakeCommet

from .conftest import API_KEY, quota_reads
from .redis_server import RedisServer, redis_server_or_skip


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh shared store of each kind."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/quota.db"
        return
    with redis_server_or_skip() as server:
        yield server.url


def gates(settings: CommetSettings, url: str, n: int) -> list[QuotaGate]:
    """``n`` gates on one store: what ``n`` worker processes have."""
    shared = settings.replace(quota_store=url, quota_store_timeout=0.5)
    return [QuotaGate(shared) for _ in range(n)]


def test_gates_sharing_a_store_let_exactly_the_allowance_through(
    settings: CommetSettings, fake: FakeCommet, store_url: str
) -> None:
    """40 racing checks over 4 gates (workers) on 5 slots: 5 allowed, and ONE read of Commet."""
    fleet = gates(settings, store_url, 4)
    allowed: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(40)

    def race(gate: QuotaGate) -> None:
        start.wait()
        decision = gate.check("user_1", "tasks")
        with lock:
            allowed.append(decision.allowed)

    threads = [threading.Thread(target=race, args=(fleet[i % 4],)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert allowed.count(True) == 5
    assert quota_reads(fake) == 1
    for gate in fleet:
        gate.close()


def test_a_commit_in_one_worker_is_seen_by_the_others(
    settings: CommetSettings, fake: FakeCommet, store_url: str
) -> None:
    """Units committed by one gate count in another's next decision, before Commet confirms."""
    first, second = gates(settings, store_url, 2)
    decision = first.check("user_1", "tasks", 4)
    assert decision.reservation is not None
    change = first.commit(decision.reservation, idempotency_key="k-1")
    refused = second.check("user_1", "tasks", 2)
    assert (refused.allowed, refused.remaining) == (False, 1)
    first.confirm(change, QuotaChangeResult(previous_balance=0, new_balance=4))
    assert second.check("user_1", "tasks", 1).allowed
    assert quota_reads(fake) == 1
    first.close()
    second.close()


def test_redis_stopped_mid_run_falls_back_to_the_policy(
    settings: CommetSettings, redis_server: RedisServer
) -> None:
    """Redis gone: open allows (degraded, still billed), closed refuses 503; nothing raises."""
    (gate,) = gates(settings.replace(quota_store_timeout=0.05), redis_server.url, 1)
    assert gate.check("user_1", "tasks").allowed
    redis_server.stop()
    opened = gate.check("user_1", "tasks")
    assert (opened.allowed, opened.degraded) == (True, True)
    assert opened.reservation is not None
    change = gate.commit(opened.reservation, idempotency_key="k-down")
    assert (change.action, change.count) == ("add", 1)
    closed = gate.check("user_1", "tasks", on_unavailable="closed")
    assert (closed.code, status_for(closed)) == ("quota_unavailable", 503)
    assert gate.stats.snapshot()["store_errors"] >= 2
    gate.close()


def test_a_rejected_key_refuses_with_503_and_one_error(
    fake: FakeCommet, caplog: pytest.LogCaptureFixture
) -> None:
    """401 on the quota read: refused 503 commet_key_rejected even fail-open; ONE error line."""
    strict = FakeCommet(api_keys={"ck_the_right_key"})
    strict.add_feature("tasks", quota=True, included=5)
    strict.add_customer("user_1")
    settings = CommetSettings(
        api_key=API_KEY, base_url="http://commet.test", transport=strict.transport, max_retries=0
    )
    gate = QuotaGate(settings)
    with caplog.at_level(logging.ERROR, logger="commet_middleware.quota"):
        decisions = [gate.check("user_1", "tasks", on_unavailable="open") for _ in range(3)]
    assert {(d.allowed, d.code, status_for(d)) for d in decisions} == {
        (False, "commet_key_rejected", 503)
    }
    assert refusal_body(decisions[0])["error"]["code"] == "commet_key_rejected"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "COMMET_API_KEY" in errors[0].getMessage()
    assert API_KEY not in caplog.text
    gate.close()


@pytest.mark.parametrize(
    ("argv", "environ", "found"),
    [
        (["/usr/bin/gunicorn", "-w", "4", "app:app"], {}, ("gunicorn", 4)),
        (["/x/gunicorn/__main__.py", "--workers=3", "app:app"], {}, ("gunicorn", 3)),
        (["gunicorn", "-w2", "app:app"], {}, ("gunicorn", 2)),
        (["gunicorn", "app:app"], {"GUNICORN_CMD_ARGS": "--workers 5"}, ("gunicorn", 5)),
        (["gunicorn", "app:app"], {"WEB_CONCURRENCY": "6"}, ("gunicorn", 6)),
        (["/x/uvicorn/__main__.py", "--workers", "4", "m:app"], {}, ("uvicorn", 4)),
        (["uvicorn", "m:app"], {}, ("uvicorn", 1)),
        (["python", "serve.py"], {"WEB_CONCURRENCY": "4"}, None),
    ],
)
def test_server_workers_reads_what_the_servers_expose(
    argv: list[str], environ: dict[str, str], found: tuple[str, int] | None
) -> None:
    """The worker count comes from the command line, GUNICORN_CMD_ARGS or WEB_CONCURRENCY."""
    assert server_workers(argv, environ) == found


def test_several_workers_on_the_memory_store_warn_once(
    monkeypatch: pytest.MonkeyPatch, settings: CommetSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Under gunicorn -w 4 the first guarded check warns, naming COMMET_QUOTA_STORE; once."""
    monkeypatch.setattr("sys.argv", ["/usr/bin/gunicorn", "-w", "4", "app:app"])
    gate = QuotaGate(settings)
    with caplog.at_level(logging.WARNING, logger="commet_middleware.quota"):
        gate.check("user_1", "tasks")
        gate.check("user_1", "tasks")
    warnings = [r.getMessage() for r in caplog.records if "workers" in r.getMessage()]
    assert len(warnings) == 1
    assert "COMMET_QUOTA_STORE" in warnings[0]
    gate.close()


def test_the_middleware_keyword_opens_the_named_store(tmp_path: Path) -> None:
    """quota_store= on either middleware gives its gate that store (here SQLite)."""
    from commet_middleware import CommetMiddleware, CommetWSGIMiddleware

    url = f"sqlite://{tmp_path}/quota.db"
    asgi = CommetMiddleware(lambda *a: None, api_key=API_KEY, quota_store=url)  # type: ignore[arg-type]
    wsgi = CommetWSGIMiddleware(lambda *a: [], api_key=API_KEY, quota_store=url)  # type: ignore[arg-type]
    assert asgi.gate.quota_store.url == wsgi.gate.quota_store.url == url
    assert asgi.gate.quota_store.shared
    wsgi.close()
