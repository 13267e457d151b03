"""``commet-middleware demo``: an example app under a real server, billed end to end and checked.

The run, in order:

1. Serve a :class:`~commet_middleware.testing.FakeCommet` on 127.0.0.1 (its dashboard is at
   ``/``) with a small catalogue: metered ``api_calls`` and ``ai_tokens``, and a ``tasks`` quota
   with a hard limit of :data:`TASKS_INCLUDED`.
2. Start one of the apps in ``examples/`` as a subprocess (its own process group) pointed at the
   emulator through ``COMMET_BASE_URL``/``COMMET_API_KEY``, with ``COMMET_SPOOL`` naming a
   temporary SQLite spool, and wait until ``/health`` answers.
3. Drive a scripted load: one thread per customer sends metered requests; each creates tasks
   until the quota refuses (402), deletes one and creates again; an anonymous thread sends
   requests with no customer (served unbilled, or 401) and bad API keys; every customer hits
   the endpoint that fails (500). Once the quotas are done, the emulator answers every API call
   with 503 for ``outage`` seconds, then recovers: the app's delivery retries in the background.
4. Stop the app with SIGTERM (it flushes what is queued), then compare what the load generator
   saw succeed (the billable events it expects) with the emulator's ledger, per customer and
   feature: ``lost`` and ``duplicated`` are computed, not asserted.

:func:`run_demo` returns a :class:`DemoReport`; :func:`format_report` renders its tables.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from .testing import FakeCommet, QuotaAllowance

__all__ = [
    "APPS",
    "DEMO_API_KEY",
    "TASKS_INCLUDED",
    "DemoError",
    "DemoOptions",
    "DemoReport",
    "Tally",
    "demo_commet",
    "demo_customers",
    "format_report",
    "run_demo",
]

AppName = Literal["fastapi", "flask", "starlette"]
APPS: tuple[AppName, ...] = ("fastapi", "flask", "starlette")
DEMO_API_KEY = "ck_sandbox_demo"
TASKS_INCLUDED = 5
# The example apps' demo API keys (examples/*_app.py): who may call /summarize with a Bearer key.
_API_KEYS = {"user_123": "sk_demo_acme", "user_free": "sk_demo_free"}
_NAMES = ("user_123", "user_free", "user_acme", "user_globex", "user_initech", "user_hooli")
MAX_CUSTOMERS = 20
_SOURCE_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The wheel carries examples/ as commet_middleware/_examples (pyproject's force-include), so
# `pip install 'commet-middleware[server]'` then `commet-middleware demo` needs no checkout.
_PACKAGED_EXAMPLES = Path(__file__).resolve().parent / "_examples"


def _examples() -> tuple[Path, str]:
    """The example apps' folder and their package name: packaged, else the source checkout."""
    if (_PACKAGED_EXAMPLES / "__init__.py").exists():
        return _PACKAGED_EXAMPLES, "commet_middleware._examples"
    return _SOURCE_EXAMPLES, "examples"


_EXAMPLES, _EXAMPLES_PACKAGE = _examples()

# Every wait is bounded: a loaded 2-core machine may be slow, never stuck.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 25.0
REQUEST_TIMEOUT = 10.0
SETTLE_TIMEOUT = 20.0
# Pause between one customer's requests: a steady load a small machine carries easily.
PACE = 0.05
NO_CUSTOMER = "(no customer)"
OUTCOMES = ("2xx", "401", "402", "other 4xx", "5xx", "failed")
_SUMMARY_TEXT = "Invoices are due thirty days after issue"


class DemoError(Exception):
    """The demo could not run (an app that does not start, a missing dependency)."""


@dataclass(frozen=True)
class DemoOptions:
    """What :func:`run_demo` runs, and for how long."""

    app: AppName = "fastapi"
    customers: int = 3
    duration: float = 8.0
    # Seconds of 503s from the emulator once the quota phase is over; 0 skips the outage.
    outage: float = 2.0
    spool: bool = True
    emulator_port: int = 0
    app_port: int = 0
    # None: a bar on a TTY, periodic lines otherwise.
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.app not in APPS:
            raise ValueError(f"app must be one of {', '.join(APPS)}, got {self.app!r}")
        if not 1 <= self.customers <= MAX_CUSTOMERS:
            raise ValueError(f"customers must be between 1 and {MAX_CUSTOMERS}")
        if not 1.0 <= self.duration <= 600.0:
            raise ValueError("duration must be between 1 and 600 seconds")
        if not 0.0 <= self.outage <= self.duration:
            raise ValueError("outage must be between 0 and the duration")


@dataclass(frozen=True)
class Tally:
    """How many billable events of one (customer, feature), and the sum of their values."""

    events: int = 0
    total: float = 0

    def plus(self, value: float) -> Tally:
        """Return this tally with one more event of ``value``."""
        return Tally(self.events + 1, self.total + value)


@dataclass
class DemoReport:
    """What a demo run sent, what Commet recorded, and how the two compare.

    ``expected`` and ``recorded`` are keyed by (customer, feature); quota changes use the
    features ``tasks+`` (adds) and ``tasks-`` (removes).
    """

    app: str
    server: str
    dashboard_url: str
    app_url: str
    spool_path: str | None
    requests: dict[str, Counter[str]] = field(default_factory=dict)
    expected: dict[tuple[str, str], Tally] = field(default_factory=dict)
    recorded: dict[tuple[str, str], Tally] = field(default_factory=dict)
    quotas: dict[str, QuotaAllowance] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    # (customer, feature) whose totals differ by less than one unit (a value, not an event).
    mismatched: list[tuple[str, str]] = field(default_factory=list)
    commet_failures: int = 0
    # (still pending, dead letters) in the spool file after the app stopped; None: unknown.
    spool_left: tuple[int, int] | None = None
    # The spool's dead letters (operation and reason), at most ten.
    dead_letters: list[str] = field(default_factory=list)
    app_exit_code: int | None = None
    # Seconds from SIGTERM to the app's exit: its final flush.
    stop_seconds: float | None = None

    @property
    def ok(self) -> bool:
        """True when every billable event reached Commet exactly once, with its value."""
        return self.lost == 0 and self.duplicated == 0 and not self.mismatched


def demo_customers(n: int) -> list[str]:
    """The first ``n`` demo customer ids (the first two have API keys in the examples)."""
    return [_NAMES[i] if i < len(_NAMES) else f"user_{i + 1:03d}" for i in range(n)]


def demo_commet(customers: Sequence[str]) -> FakeCommet:
    """An emulator with the demo's features and ``customers``, all on the full plan."""
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_feature("ai_tokens")
    fake.add_feature("tasks", quota=True, included=TASKS_INCLUDED, overage=False)
    for customer in customers:
        fake.add_customer(customer)
    return fake


# the app under its server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# What each example app needs beyond the toolkit, and the extra that brings it.
_APP_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "fastapi": (("uvicorn", "fastapi"), "commet-middleware[server]"),
    "starlette": (("uvicorn",), "commet-middleware[server]"),
    "flask": (("uvicorn", "flask"), "commet-middleware[server] flask"),
}


def _check_dependencies(app: AppName) -> None:
    """Raise DemoError (one line: what to install) when the app or the emulator cannot run."""
    modules, install = _APP_NEEDS[app]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoError(f"the {app} demo needs {' and '.join(missing)}: pip install '{install}'")


def _server_argv(app: AppName, port: int) -> tuple[list[str], str]:
    """The command line serving ``app`` on 127.0.0.1:``port``, and the server's name."""
    python = sys.executable
    if app in ("fastapi", "starlette"):
        argv = [
            python, "-m", "uvicorn", f"{_EXAMPLES_PACKAGE}.{app}_app:app",
            "--host", "127.0.0.1", "--port", str(port),
            "--lifespan", "on", "--no-access-log", "--timeout-graceful-shutdown", "15",
        ]  # fmt: skip
        return argv, "uvicorn"
    if importlib.util.find_spec("gunicorn") is not None:
        # One worker: the example keeps its tasks in memory. Threads serve concurrent requests;
        # the graceful timeout stays above the settings' shutdown_timeout (10 s).
        argv = [
            python, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
            "--workers", "1", "--threads", "8", "--graceful-timeout", "20",
            f"{_EXAMPLES_PACKAGE}.flask_app:app",
        ]  # fmt: skip
        return argv, "gunicorn (1 worker, 8 threads)"
    # Werkzeug's threaded server; SIGTERM becomes SystemExit so that atexit flushes delivery.
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "from werkzeug.serving import run_simple\n"
        f"from {_EXAMPLES_PACKAGE}.flask_app import app\n"
        f"run_simple('127.0.0.1', {port}, app, threaded=True)\n"
    )
    return [python, "-c", code], "werkzeug (threaded)"


class _AppProcess:
    """An example app served by a subprocess leading its own process group."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: IO[bytes]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._log = log
        self._stopped = False
        self.process = subprocess.Popen(  # noqa: S603 - argv is built above, never from input
            argv,
            cwd=_EXAMPLES.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll ``/health`` until it answers 200; DemoError if the app dies or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DemoError(f"the app exited early:\n{self.output()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise DemoError(f"the app did not answer in {timeout:.0f} s:\n{self.output()[-3000:]}")

    def stop(self) -> int | None:
        """SIGTERM (the server flushes delivery), then SIGKILL to the group if it lingers.

        Idempotent: the group is signalled once, never after its leader was reaped (its id
        could by then belong to someone else).
        """
        if self._stopped:
            return self.process.returncode
        self._stopped = True
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT)
        code = self.process.poll()
        if code is None:
            # Still there after the grace period: the whole group goes (gunicorn's workers too).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        return code


# the load


@dataclass(frozen=True)
class _Call:
    """One request of the script, and what it bills when it succeeds (2xx)."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    feature: str | None = None
    # How the billed value is read from a successful response.
    value: Literal["one", "tokens", "rows"] = "one"


@dataclass(frozen=True)
class _Result:
    customer: str | None
    call: _Call
    status: int | None
    body: Any


def _metered_calls(app: AppName, customer: str) -> tuple[list[_Call], list[_Call]]:
    """The requests one customer sends once at the start, and those it then cycles through."""
    summary = {"text": _SUMMARY_TEXT}
    cycle = [_Call("GET", "/search?q=policy", feature="api_calls")]
    if app == "fastapi":
        once = [_Call("GET", "/documents/doc-9", feature="api_calls")]  # 404: not billed
        cycle += [
            _Call("GET", "/search/titles?q=refund", feature="api_calls"),
            _Call("GET", "/documents/doc-2", feature="api_calls"),
        ]
        key = _API_KEYS.get(customer)
        if key is not None:
            auth = (("Authorization", f"Bearer {key}"),)
            cycle.append(_Call("POST", "/summarize", summary, auth, "ai_tokens", "tokens"))
    else:
        once = [_Call("GET", "/search?q=", feature="api_calls")]  # 400: not billed
        cycle += [
            _Call("GET", "/export.csv", feature="api_calls", value="rows"),
            _Call("POST", "/summarize", summary, feature="ai_tokens", value="tokens"),
        ]
    return once, cycle


_FAILING = _Call("GET", "/reports/usage", headers=(("Connection", "close"),), feature="api_calls")


def _anonymous_calls(app: AppName) -> list[_Call]:
    """Requests with no customer: served and never billed, or refused with 401."""
    calls = [
        _Call("GET", "/search?q=refund", feature="api_calls"),
        _Call("POST", "/tasks", {"title": "nobody's task"}),
    ]
    if app != "starlette":  # the Starlette example has no API keys
        bad_key = (("Authorization", "Bearer sk_wrong"),)
        calls.append(_Call("POST", "/summarize", {"text": _SUMMARY_TEXT}, bad_key, "ai_tokens"))
    return calls


def _billed_value(call: _Call, body: Any, text: str) -> float:
    if call.value == "tokens" and isinstance(body, dict):
        return float(body.get("tokens", 0))
    if call.value == "rows":
        return float(max(text.count("\n") - 1, 0))  # CSV lines after the header
    return 1.0


class _Load:
    """The scripted load: shared results, phase flags and the expected billing."""

    def __init__(self, fake: FakeCommet, app: AppName, url: str, customers: list[str]) -> None:
        self.fake = fake
        self.app = app
        self.url = url
        self.customers = customers
        self.stop = threading.Event()
        self.quotas_done = threading.Event()
        self._lock = threading.Lock()
        self._quota_pending = len(customers)
        self.results: list[_Result] = []
        self.expected: dict[tuple[str, str], Tally] = {}
        self.errors: list[str] = []

    @property
    def sent(self) -> int:
        """Requests answered (or failed) so far."""
        with self._lock:
            return len(self.results)

    def send(self, client: httpx.Client, customer: str | None, call: _Call) -> _Result:
        """Send ``call`` as ``customer``; record the outcome and what a success bills."""
        headers = dict(call.headers)
        if customer is not None:
            headers["X-Customer-ID"] = customer
        status: int | None = None
        body: Any = None
        text = ""
        try:
            response = client.request(call.method, call.path, json=call.json, headers=headers)
            status, text = response.status_code, response.text
            with contextlib.suppress(ValueError):
                body = response.json()
        except httpx.HTTPError as exc:
            with self._lock:
                self.errors.append(f"{call.method} {call.path}: {exc!r}")
        result = _Result(customer, call, status, body)
        with self._lock:
            self.results.append(result)
            if status is not None and 200 <= status < 300 and customer is not None:
                feature = self._billed_feature(call)
                if feature is not None:
                    key = (self._payer(customer, call), feature)
                    value = _billed_value(call, body, text)
                    self.expected[key] = self.expected.get(key, Tally()).plus(value)
        return result

    @staticmethod
    def _billed_feature(call: _Call) -> str | None:
        if call.path == "/tasks" and call.method == "POST":
            return "tasks+"
        if call.path.startswith("/tasks/") and call.method == "DELETE":
            return "tasks-"
        return call.feature

    @staticmethod
    def _payer(customer: str, call: _Call) -> str:
        # A Bearer key names its own customer, whatever X-Customer-ID says.
        for name, value in call.headers:
            if name == "Authorization":
                key = value.partition(" ")[2]
                return next((c for c, k in _API_KEYS.items() if k == key), customer)
        return customer

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT)

    def _quota_done(self) -> None:
        with self._lock:
            self._quota_pending -= 1
            if self._quota_pending == 0:
                self.quotas_done.set()

    def _wait_for_balance(self, customer: str, balance: int, timeout: float = 5.0) -> None:
        # Quota changes travel through the background queue, several in flight at once, so a
        # release can overtake the adds before it and the next add can overtake the release;
        # Commet refuses an add past a hard limit. A person deleting a task and creating
        # another leaves time for each change to land; the script waits for Commet to show it.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            with contextlib.suppress(KeyError):
                if self.fake.quota(customer, "tasks").current == balance:
                    return
            time.sleep(0.02)

    def customer(self, customer: str) -> None:
        """One customer's script: metered calls, the quota round trip, then metered calls."""
        once, calls = _metered_calls(self.app, customer)
        try:
            with self._client() as client:
                for call in [*once, *calls]:
                    self.send(client, customer, call)
                self.send(client, customer, _FAILING)
                self._quota_round(client, customer)
                self._quota_done()
                i = 0
                while not self.stop.wait(PACE):
                    call = _FAILING if i % 15 == 14 else calls[i % len(calls)]
                    self.send(client, customer, call)
                    i += 1
        finally:
            if not self.quotas_done.is_set():
                self._quota_done()

    def _quota_round(self, client: httpx.Client, customer: str) -> None:
        """Create tasks until the quota refuses, delete one, create one more, be refused again."""
        created: list[int] = []
        for n in range(TASKS_INCLUDED + 3):
            result = self.send(client, customer, _Call("POST", "/tasks", {"title": f"task {n}"}))
            if result.status == 201 and isinstance(result.body, dict):
                created.append(int(result.body["id"]))
            elif result.status is not None and result.status != 201:
                break
        if not created:
            return
        self._wait_for_balance(customer, len(created))  # every add landed
        release = _Call("DELETE", f"/tasks/{created[-1]}")
        if self.send(client, customer, release).status == 200:
            self._wait_for_balance(customer, len(created) - 1)
        self.send(client, customer, _Call("POST", "/tasks", {"title": "one more"}))
        self.send(client, customer, _Call("POST", "/tasks", {"title": "one too many"}))

    def anonymous(self) -> None:
        """Requests from nobody in particular, about one every half second."""
        calls = _anonymous_calls(self.app)
        with self._client() as client:
            i = 0
            while True:
                self.send(client, None, calls[i % len(calls)])
                i += 1
                if self.stop.wait(0.5):
                    return


# the report


def _outcome(status: int | None) -> str:
    if status is None:
        return "failed"
    if 200 <= status < 300:
        return "2xx"
    if status in (401, 402):
        return str(status)
    if status >= 500:
        return "5xx"
    return "other 4xx"


def _ledger(fake: FakeCommet) -> tuple[dict[tuple[str, str], Tally], Counter[tuple[str, str]]]:
    """What Commet recorded per (customer, feature), and how many events repeat a key there."""
    recorded: dict[tuple[str, str], Tally] = {}
    seen: set[tuple[str, str]] = set()
    repeated: Counter[tuple[str, str]] = Counter()
    for event in fake.events():
        key = (event.customer_id, event.feature)
        recorded[key] = recorded.get(key, Tally()).plus(float(event.value))
        if event.idempotency_key is not None:
            marker = (event.customer_id, event.idempotency_key)
            if marker in seen:
                repeated[key] += 1
            seen.add(marker)
    for change in fake.quota_events():
        if change.action in ("add", "remove"):
            sign = "+" if change.action == "add" else "-"
            key = (change.customer_id, f"{change.feature}{sign}")
            recorded[key] = recorded.get(key, Tally()).plus(float(change.count))
    return recorded, repeated


def _compare(report: DemoReport, repeated: Counter[tuple[str, str]]) -> None:
    """Set ``lost``, ``duplicated`` and ``mismatched`` from ``expected`` against ``recorded``.

    Compared by billed units, not by events: when the sender falls behind, waiting events of one
    customer and feature are folded into one event with their exact total (see the README). Lost:
    units Commet lacks. Duplicated: events repeating an idempotency key, plus units beyond what
    the load's successful responses account for.
    """
    lost = duplicated = 0
    mismatched: list[tuple[str, str]] = []
    for key in sorted(report.expected.keys() | report.recorded.keys()):
        want = report.expected.get(key, Tally())
        got = report.recorded.get(key, Tally())
        missing = want.total - got.total
        lost += max(round(missing), 0)
        # A repeated key's value is in the total too: the larger of the two counts it once.
        duplicated += max(repeated[key], round(-missing), 0)
        if abs(missing) > 1e-9 and round(missing) == 0:
            mismatched.append(key)
    report.lost, report.duplicated, report.mismatched = lost, duplicated, mismatched


def _settled(fake: FakeCommet, expected: dict[tuple[str, str], Tally]) -> bool:
    recorded, _ = _ledger(fake)
    return all(
        recorded.get(key, Tally()).total >= want.total - 1e-9 for key, want in expected.items()
    )


def _spool_counts(path: str | None) -> tuple[tuple[int, int] | None, list[str]]:
    """(operations still pending, dead letters) in the spool file, and why each letter died.

    None for the counts when there is no spool or it cannot be read.
    """
    if path is None or not os.path.exists(path):
        return None, []
    try:
        from ._spool import Spool

        spool = Spool(path)
        try:
            stats = spool.stats()
            reasons = [f"{row.operation} -> {row.reason}" for row in spool.dead(10)]
            return (stats.pending + stats.claimed, stats.dead), reasons
        finally:
            spool.close()
    except Exception:  # the spool is young; a report must not fail on reading it
        return None, []


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return [line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def format_report(report: DemoReport) -> str:
    """Render the report's tables and its ``lost: N, duplicated: N`` line."""
    out: list[str] = []
    rows: list[list[object]] = []
    for customer in sorted(report.requests, key=lambda c: (c == NO_CUSTOMER, c)):
        counts = report.requests[customer]
        rows.append([customer, sum(counts.values()), *(counts.get(o, 0) for o in OUTCOMES)])
    out += ["Requests per customer and outcome", *_table(["customer", "sent", *OUTCOMES], rows)]

    rows = []
    for key in sorted(report.expected.keys() | report.recorded.keys()):
        want = report.expected.get(key, Tally())
        got = report.recorded.get(key, Tally())
        verdict = "ok" if want == got else "DIFFERS"
        rows.append(
            [
                key[0],
                key[1],
                want.events,
                got.events,
                _number(want.total),
                _number(got.total),
                verdict,
            ]
        )
    out += [
        "",
        "Events in Commet per customer and feature (tasks+/tasks-: quota adds and releases)",
        *_table(
            ["customer", "feature", "expected", "in Commet", "value exp.", "value", "check"], rows
        ),
    ]

    rows = []
    for customer, allowance in sorted(report.quotas.items()):
        remaining = "unlimited" if allowance.remaining is None else allowance.remaining
        rows.append(
            [
                customer,
                allowance.current,
                allowance.included,
                remaining,
                allowance.billed_quantity,
            ]
        )
    out += [
        "",
        "Quota balances in Commet (tasks)",
        *_table(["customer", "current", "included", "remaining", "billed"], rows),
        "",
    ]
    if report.commet_failures:
        out.append(
            f"Commet outage: {report.commet_failures} API calls answered 503; "
            "delivery retried them in the background"
        )
    if report.stop_seconds is not None:
        code = report.app_exit_code
        if code is None:
            how = "still running: killed"
        elif code < 0:  # uvicorn re-raises the signal it handled once it has shut down
            how = f"ended by {signal.Signals(-code).name}"
        else:
            how = f"exit status {code}"
        out.append(f"app stopped {report.stop_seconds:.1f} s after SIGTERM ({how})")
    if report.spool_path is not None:
        if report.spool_left is None:
            left = "could not be read"
        else:
            left = f"{report.spool_left[0]} operations pending, {report.spool_left[1]} dead letters"
        out.append(f"spool (a temporary SQLite file): {left}")
        out += [f"  dead letter: {reason}" for reason in report.dead_letters]
    if report.mismatched:
        out.append("values differ for " + ", ".join(f"{c}/{f}" for c, f in report.mismatched))
    out.append(f"lost: {report.lost}, duplicated: {report.duplicated}")
    return "\n".join(out)


# progress


class _Progress:
    """A ``\\r`` bar on a TTY; one line every few seconds otherwise. Writes to ``stream``."""

    def __init__(self, stream: IO[str], total: float, *, bar: bool | None) -> None:
        self._stream = stream
        self._total = total
        self._bar = stream.isatty() if bar is None else bar
        self._last_line = -10.0
        self._drawn = False

    def update(self, elapsed: float, sent: int, phase: str) -> None:
        """Show the state at ``elapsed`` seconds."""
        fraction = min(elapsed / self._total, 1.0)
        if self._bar:
            width = 30
            filled = int(fraction * width)
            bar = "#" * filled + "." * (width - filled)
            text = f"\r[{bar}] {fraction:4.0%} {elapsed:4.1f}s  {sent:4d} requests  {phase:<28}"
            self._stream.write(text)
            self._drawn = True
        elif elapsed - self._last_line >= 2.0:
            self._last_line = elapsed
            self._stream.write(f"  {elapsed:4.1f}s  {sent:4d} requests  {phase}\n")
        self._stream.flush()

    def done(self) -> None:
        """End the bar's line."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


# the run


def _drive(load: _Load, options: DemoOptions, progress: _Progress) -> None:
    """Run the load for ``options.duration`` seconds, with the outage once the quotas are done."""
    fake = load.fake
    threads = [
        threading.Thread(target=load.customer, args=(c,), name=f"demo-{c}", daemon=True)
        for c in load.customers
    ]
    threads.append(threading.Thread(target=load.anonymous, name="demo-anonymous", daemon=True))
    start = time.monotonic()
    for thread in threads:
        thread.start()
    outage_until: float | None = None
    outage_done = options.outage <= 0
    try:
        while (elapsed := time.monotonic() - start) < options.duration:
            if outage_until is None and not outage_done:
                # Only once every quota round is over: quota changes of one customer must land
                # in order (see _wait_for_balance), and a third of the way in at the earliest.
                # Late quotas (a slow machine) shorten the outage; too late, there is none.
                ready = load.quotas_done.is_set() and elapsed >= options.duration / 3
                if ready and elapsed < options.duration - 1.0:
                    fake.faults.error_rate(1.0, status=503)
                    outage_until = min(elapsed + options.outage, options.duration - 0.5)
            elif outage_until is not None and elapsed >= outage_until:
                fake.faults.clear()
                outage_until, outage_done = None, True
            if outage_until is not None:
                phase = "Commet outage (503s)"
            elif outage_done and options.outage > 0:
                phase = "Commet recovered"
            elif not load.quotas_done.is_set():
                phase = "metered calls and quotas"
            else:
                phase = "metered calls"
            progress.update(elapsed, load.sent, phase)
            time.sleep(0.1)
    finally:
        fake.faults.clear()
        load.stop.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT + 5)
        progress.update(options.duration, load.sent, "load done")
        progress.done()


def _app_env(commet_url: str, spool_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(COMMET_API_KEY=DEMO_API_KEY, COMMET_BASE_URL=commet_url, PYTHONUNBUFFERED="1")
    # A wrong key or URL is one line in app.log at start, not a trickle of dead letters.
    env["COMMET_VERIFY_ON_STARTUP"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_EXAMPLES.parent), env.get("PYTHONPATH", "")) if p
    )
    env.pop("COMMET_SPOOL", None)
    if spool_path is not None:
        env["COMMET_SPOOL"] = spool_path
    return env


@contextlib.contextmanager
def _running_app(
    options: DemoOptions, commet_url: str, workdir: str
) -> Iterator[tuple[_AppProcess, str, str | None]]:
    _check_dependencies(options.app)
    if not (_EXAMPLES / f"{options.app}_app.py").exists():
        raise DemoError(f"the example apps are missing from {_EXAMPLES}: reinstall the package")
    spool_path = os.path.join(workdir, "spool.sqlite3") if options.spool else None
    port = options.app_port or _free_port()
    argv, server = _server_argv(options.app, port)
    with open(os.path.join(workdir, "app.log"), "w+b") as log:
        app = _AppProcess(argv, _app_env(commet_url, spool_path), port, log)
        try:
            app.wait_ready()
            yield app, server, spool_path
        finally:
            app.stop()


def run_demo(
    options: DemoOptions,
    *,
    fake: FakeCommet | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    serve_until: Callable[[DemoReport], None] | None = None,
) -> DemoReport:
    """Run the demo and return its report (the tables are printed by the caller).

    ``fake`` replaces the emulator (it needs the features of :func:`demo_commet` and the
    customers of :func:`demo_customers`). ``serve_until(report)`` keeps the emulator and the
    app running after the load until it returns (``--serve``); the report is then taken once
    Commet has every expected event, and the app is stopped afterwards. Raises
    :class:`DemoError` when the app does not start.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    customers = demo_customers(options.customers)
    fake = fake or demo_commet(customers)
    with (
        fake.serve(port=options.emulator_port) as commet_url,
        tempfile.TemporaryDirectory(prefix="commet-demo-") as workdir,
    ):
        print(f"dashboard: {commet_url}/  (the Commet emulator, live)", file=out, flush=True)
        with _running_app(options, commet_url, workdir) as (app, server, spool_path):
            print(
                f"app:       {app.url}  ({options.app} under {server}; "
                f"spool {'on' if spool_path else 'off'})",
                file=out,
                flush=True,
            )
            print(
                f"load:      {len(customers)} customer{'s' if len(customers) != 1 else ''} "
                f"for {options.duration:g} s"
                + (f", Commet down for {options.outage:g} s" if options.outage > 0 else ""),
                file=out,
                flush=True,
            )
            load = _Load(fake, options.app, app.url, customers)
            _drive(load, options, _Progress(err, options.duration, bar=options.progress))
            report = DemoReport(
                app=options.app,
                server=server,
                dashboard_url=f"{commet_url}/",
                app_url=app.url,
                spool_path=spool_path,
            )
            if serve_until is not None:
                deadline = time.monotonic() + SETTLE_TIMEOUT
                while not _settled(fake, load.expected) and time.monotonic() < deadline:
                    time.sleep(0.1)
                _finish(report, fake, load)
                report.spool_left, report.dead_letters = _spool_counts(spool_path)
                serve_until(report)
            else:
                print("stopping the app (SIGTERM: it flushes its queue) ...", file=err, flush=True)
            stopping = time.monotonic()
            report.app_exit_code = app.stop()
            report.stop_seconds = time.monotonic() - stopping
            if serve_until is None:
                _finish(report, fake, load)
            report.spool_left, report.dead_letters = _spool_counts(spool_path)
            if load.errors:
                print(f"{len(load.errors)} requests failed: {load.errors[0]}", file=err)
            if not report.ok:
                # The middleware's own log lines say what happened to an event that went missing.
                lines = [ln for ln in app.output().splitlines() if "commet" in ln.lower()]
                tail = "\n".join(lines[-30:])
                print(f"--- the app's commet log lines ---\n{tail}\n---", file=err, flush=True)
    return report


def _finish(report: DemoReport, fake: FakeCommet, load: _Load) -> None:
    """Fill the report from the load's results and the emulator's ledger."""
    requests: dict[str, Counter[str]] = {}
    for result in load.results:
        label = result.customer or NO_CUSTOMER
        requests.setdefault(label, Counter())[_outcome(result.status)] += 1
    report.requests = requests
    report.expected = dict(load.expected)
    report.recorded, repeated = _ledger(fake)
    report.quotas = {c: fake.quota(c, "tasks") for c in load.customers}
    report.commet_failures = sum(1 for r in fake.requests if r.fault is not None)
    _compare(report, repeated)
