"""@quota_guard under real multi-worker servers sharing a quota store (SQLite, Redis).

Every server here runs on 127.0.0.1 against the emulator served over HTTP. The race: 50
concurrent creates for one customer whose plan includes 5 tasks (no overage).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from quota.redis_server import RedisServer, redis_server_or_skip

from commet_middleware.testing import FakeCommet

from ._harness import DELIVERY_FAILURES, ServerProcess, free_port, python_module, server_env

pytestmark = pytest.mark.server

CUSTOMER = "user_123"
HEADERS = {"X-Customer-ID": CUSTOMER}
FLASK = "tests.servers._quota_apps:flask_app"
FASTAPI = "tests.servers._quota_apps:fastapi_app"
Argv = Callable[[int], Sequence[str]]


def gunicorn(workers: int) -> Argv:
    """gunicorn with ``workers`` sync workers serving the Flask app."""
    return lambda port: python_module(
        "gunicorn", "--bind", f"127.0.0.1:{port}", "-w", str(workers),
        "--graceful-timeout", "10", "--timeout", "30", FLASK,
    )  # fmt: skip


def uvicorn(workers: int) -> Argv:
    """uvicorn with ``workers`` worker processes serving the FastAPI app."""
    return lambda port: python_module(
        "uvicorn", FASTAPI, "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--lifespan", "on", "--no-access-log",
        "--timeout-graceful-shutdown", "10",
    )  # fmt: skip


@pytest.fixture
def tasks_commet(commet: FakeCommet) -> FakeCommet:
    """The served emulator with a ``tasks`` quota of 5 included, no overage."""
    commet.add_feature("tasks", quota=True, included=5)
    return commet


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own on 127.0.0.1 (skipped without one, failed in CI)."""
    with redis_server_or_skip() as server:
        yield server


@pytest.fixture
def start(commet_url: str) -> Iterator[Callable[..., ServerProcess]]:
    """Start a server from ``argv_for(port)`` with extra environment; kill it at teardown."""
    started: list[ServerProcess] = []

    def launch(argv_for: Argv, **env: str) -> ServerProcess:
        port = free_port()
        server = ServerProcess(argv_for(port), {**server_env(commet_url), **env}, port)
        started.append(server)
        server.wait_ready()
        return server

    yield launch
    for server in started:
        try:
            server.kill()
            print(f"--- {' '.join(server.argv)} ---\n{server.output()}")
        finally:
            server.close()


def race(urls: Sequence[str], racers: int = 50, path: str = "/tasks") -> Counter[int]:
    """Send ``racers`` concurrent creates spread over ``urls``; return the count per status."""
    barrier = threading.Barrier(racers)

    def create(index: int) -> int:
        with httpx.Client(timeout=20.0) as client:
            barrier.wait()
            return client.post(urls[index % len(urls)] + path, headers=HEADERS).status_code

    with ThreadPoolExecutor(max_workers=racers) as pool:
        return Counter(pool.map(create, range(racers)))


def quota_reads(fake: FakeCommet) -> int:
    """How many allowance reads the emulator answered."""
    return sum(1 for r in fake.requests if r.method == "GET" and "/usage/quota" in r.path)


def assert_billed(fake: FakeCommet, servers: Sequence[ServerProcess], units: int) -> None:
    """Stop the servers (they flush), then Commet's balance is ``units``: nothing refused,
    nothing dead-lettered."""
    for server in servers:
        assert server.terminate() == 0, server.output()
    assert fake.quota(CUSTOMER, "tasks").current == units
    refused = [
        (r.method, r.path, r.status)
        for r in fake.requests
        if "/usage/quota" in r.path and r.method != "GET" and r.status != 200
    ]
    assert refused == []
    logs = "\n".join(server.output() for server in servers)
    failures = [line for line in logs.splitlines() if any(s in line for s in DELIVERY_FAILURES)]
    assert failures == []


def test_gunicorn_four_workers_on_sqlite_hold_the_quota(
    start: Callable[..., ServerProcess], tasks_commet: FakeCommet, tmp_path: Path
) -> None:
    """gunicorn -w 4 (Flask), SQLite store: 50 racers give 5 x 201 and 45 x 402, one read."""
    server = start(gunicorn(4), COMMET_QUOTA_STORE=f"sqlite://{tmp_path}/quota.db")
    assert race([server.url]) == Counter({201: 5, 402: 45})
    assert quota_reads(tasks_commet) == 1
    assert_billed(tasks_commet, [server], 5)


def test_uvicorn_four_workers_on_sqlite_hold_the_quota(
    start: Callable[..., ServerProcess], tasks_commet: FakeCommet, tmp_path: Path
) -> None:
    """uvicorn --workers 4 (FastAPI), SQLite store: 5 x 201, 45 x 402, balance exactly 5."""
    server = start(uvicorn(4), COMMET_QUOTA_STORE=f"sqlite://{tmp_path}/quota.db")
    assert race([server.url]) == Counter({201: 5, 402: 45})
    assert quota_reads(tasks_commet) == 1
    assert_billed(tasks_commet, [server], 5)


def test_two_servers_sharing_redis_hold_the_quota(
    start: Callable[..., ServerProcess], tasks_commet: FakeCommet, redis_server: RedisServer
) -> None:
    """A gunicorn (Flask) and a uvicorn (FastAPI) server sharing one Redis: exactly 5 pass."""
    flask_server = start(gunicorn(2), COMMET_QUOTA_STORE=redis_server.url)
    fastapi_server = start(uvicorn(2), COMMET_QUOTA_STORE=redis_server.url)
    assert race([flask_server.url, fastapi_server.url]) == Counter({201: 5, 402: 45})
    assert quota_reads(tasks_commet) == 1
    assert_billed(tasks_commet, [flask_server, fastapi_server], 5)


def test_redis_stopped_mid_run_the_policy_holds(
    start: Callable[..., ServerProcess], tasks_commet: FakeCommet, redis_server: RedisServer
) -> None:
    """Redis dies: fail-closed endpoints answer 503, fail-open ones 201 and are still billed;
    no 500, no hang (every answer within the client's timeout)."""
    server = start(gunicorn(2), COMMET_QUOTA_STORE=redis_server.url)
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=10.0) as client:
        assert [client.post("/tasks").status_code for _ in range(2)] == [201, 201]
        redis_server.stop()
        closed = [client.post("/tasks-closed") for _ in range(3)]
        assert [r.status_code for r in closed] == [503] * 3
        assert {r.json()["error"]["code"] for r in closed} == {"quota_unavailable"}
        assert [client.post("/tasks").status_code for _ in range(2)] == [201, 201]
    assert "quota store" in server.output()
    assert_billed(tasks_commet, [server], 4)


def test_a_killed_workers_reserved_units_come_back(
    start: Callable[..., ServerProcess], tasks_commet: FakeCommet, tmp_path: Path
) -> None:
    """A worker SIGKILLed while holding all 5 units: once its lease ends they are usable."""
    pid_file = tmp_path / "slow.pid"
    server = start(
        gunicorn(2),
        COMMET_QUOTA_STORE=f"sqlite://{tmp_path}/quota.db",
        QUOTA_LEASE="1.5",
        QUOTA_PID_FILE=str(pid_file),
    )

    def slow() -> None:
        # Its worker is killed under it.
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(server.url + "/slow-tasks", headers=HEADERS, timeout=30.0)

    holder = threading.Thread(target=slow)
    holder.start()
    deadline = time.monotonic() + 15
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), server.output()
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=10.0) as client:
        assert client.post("/tasks").status_code == 402  # all 5 held by the slow request
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        holder.join(timeout=30)
        statuses = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            statuses.append(client.post("/tasks").status_code)
            if statuses[-1] != 402:
                break
            time.sleep(0.2)
    assert statuses[-1] == 201, statuses
    assert set(statuses) <= {201, 402}
    assert_billed(tasks_commet, [server], 1)


def test_several_workers_on_the_memory_store_warn(
    start: Callable[..., ServerProcess], tasks_commet: FakeCommet
) -> None:
    """gunicorn -w 2 with the per-process store: the first guarded request logs the warning
    naming COMMET_QUOTA_STORE."""
    server = start(gunicorn(2), COMMET_QUOTA_STORE="memory")
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=10.0) as client:
        assert client.post("/tasks").status_code == 201
    assert server.terminate() == 0
    warnings = [line for line in server.output().splitlines() if "runs 2 workers" in line]
    assert len(warnings) == 1
    assert "COMMET_QUOTA_STORE" in warnings[0]
