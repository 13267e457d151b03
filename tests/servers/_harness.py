"""Run an example app under a real server subprocess and check what Commet was billed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from commet_middleware.delivery._aggregation import AGGREGATE_KEY_PREFIX
from commet_middleware.testing import FakeCommet, Hold

__all__ = [
    "REPO_ROOT",
    "Call",
    "Launch",
    "ServerProcess",
    "assert_ledger",
    "free_port",
    "hold_one_delivery",
    "python_module",
    "send_calls",
    "server_env",
    "tally",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 25.0
SHUTDOWN_HEAD_START = 0.3
REQUEST_TIMEOUT = 10.0
# Lines the delivery pipeline writes when it loses or refuses an event.
DELIVERY_FAILURES = ("giving up", "undelivered", "NOT delivering", "could not enqueue")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server subprocess bound to 127.0.0.1, its output kept in a temporary file."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], port: int) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        # A file, not a pipe: a chatty server must never block on a full pipe buffer.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(  # noqa: S603 - argv built by the tests themselves
            self.argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        """Return everything the server printed so far (stdout and stderr)."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def wait_ready(self, path: str = "/health") -> None:
        """Poll ``path`` until it answers 200; fail if the server dies or takes too long."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {READY_TIMEOUT}s:\n{self.output()}")

    def terminate(self, *, then_release: Hold | None = None) -> int:
        """Send SIGTERM (a graceful shutdown) and return the exit code.

        With ``then_release``, an emulator gate parking a usage request is opened only once the
        server has begun shutting down, so its exit must wait for that in-flight delivery.
        """
        self.process.send_signal(signal.SIGTERM)
        if then_release is not None:
            time.sleep(SHUTDOWN_HEAD_START)
            then_release.release()
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"server ignored SIGTERM for {STOP_TIMEOUT}s:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        """Kill the server and anything left in its process group (gunicorn's workers)."""
        # The server leads a process group of its own, so this reaches orphaned workers too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """Kill the server if needed and drop its log."""
        self.kill()
        self._log.close()


Launch = Callable[[Callable[[int], Sequence[str]]], ServerProcess]
"""The ``launch`` fixture: start a server from a function of its port, once it answers."""


def server_env(commet_url: str) -> dict[str, str]:
    """The environment of a server process: Commet settings pointing at the emulator."""
    env = dict(os.environ)
    env.update(
        COMMET_API_KEY="ck_test_servers",
        COMMET_BASE_URL=commet_url,
        PYTHONUNBUFFERED="1",
    )
    env.pop("COMMET_SPOOL", None)
    return env


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@dataclass(frozen=True)
class Call:
    """One request and what it must produce: its status and the usage it bills."""

    method: str
    path: str
    status: int
    customer: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    # (customer, feature) -> value billed by this request; empty when nothing is billed.
    bills: dict[tuple[str, str], int] = field(default_factory=dict)

    def request_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.customer is not None:
            headers["X-Customer-ID"] = self.customer
        if self.status >= 500:
            # uvicorn closes the connection after an app exception; reusing it races the close.
            headers["Connection"] = "close"
        return headers


def hold_one_delivery(fake: FakeCommet) -> Hold:
    """Park the next usage request at the emulator until the returned gate is released."""
    return fake.faults.hold_next(1)


def send_calls(base_url: str, calls: Iterable[Call], *, concurrency: int = 1) -> None:
    """Send ``calls`` (``concurrency`` at a time) and check every status code."""

    def send(client: httpx.Client, call: Call) -> tuple[Call, int, str]:
        response = client.request(
            call.method, call.path, headers=call.request_headers(), json=call.json
        )
        return call, response.status_code, response.text

    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
        if concurrency == 1:
            results = [send(client, call) for call in calls]
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                results = list(pool.map(lambda call: send(client, call), calls))
    wrong = [
        f"{call.method} {call.path} -> {status} (expected {call.status}): {text[:200]}"
        for call, status, text in results
        if status != call.status
    ]
    assert not wrong, "unexpected statuses:\n" + "\n".join(wrong)


Ledger = tuple[Counter[tuple[str, str]], dict[tuple[str, str], float]]


def tally(usages: Iterable[tuple[str, str, float]]) -> Ledger:
    """Return event counts and usage totals per (customer, feature) of ``usages``."""
    counts: Counter[tuple[str, str]] = Counter()
    totals: dict[tuple[str, str], float] = {}
    for customer, feature, value in usages:
        counts[(customer, feature)] += 1
        totals[(customer, feature)] = totals.get((customer, feature), 0) + value
    return counts, totals


def assert_ledger(fake: FakeCommet, calls: Sequence[Call], server: ServerProcess) -> None:
    """Assert the emulator holds exactly the usage ``calls`` bill: no more, no less, no dups."""
    events = fake.events()
    counts, totals = tally((e.customer_id, e.feature, e.value) for e in events)
    want_counts, want_totals = tally(
        (customer, feature, value)
        for call in calls
        for (customer, feature), value in call.bills.items()
    )
    log = server.output()
    assert totals == want_totals, f"usage totals differ; server log:\n{log}"
    keys = [event.idempotency_key for event in events]
    assert None not in keys
    assert len(set(keys)) == len(keys), "two events share an idempotency key"
    # A sender that fell behind folds waiting events of one customer and feature into one event
    # of their total (the default): fewer events, then, and only through such aggregates.
    folded = any(key.startswith(AGGREGATE_KEY_PREFIX) for key in keys if key)
    for group, count in want_counts.items():
        if folded:
            assert counts[group] <= count, f"more events than calls; server log:\n{log}"
        else:
            assert counts[group] == count, f"event counts differ; server log:\n{log}"
    # Without faults every event is sent once and accepted once: no retry, no replay.
    answers = [(r.method, r.path, r.status, r.replayed) for r in fake.requests]
    assert answers == [("POST", "/api/v1/usage/events", 201, False)] * len(events), answers
    failures = [line for line in log.splitlines() if any(s in line for s in DELIVERY_FAILURES)]
    assert not failures, "delivery lost events:\n" + "\n".join(failures)
