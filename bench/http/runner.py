"""Side by side over real HTTP: what each middleware costs a hello-world endpoint under wrk.

    ./dev bench http [--duration 10] [--rounds 3] [--frameworks starlette,fastapi,flask,django]
                     [--cases bare,passthrough,zero_code,metered,apitally,moesif,...]

Servers: uvicorn (1 worker, httptools, no access log) for Starlette and FastAPI; gunicorn with
one sync worker (``flask-sync``) and one gthread worker with 4 threads (``flask-gthread``) for
Flask; gunicorn with one sync worker (``django-sync``) for Django, whose cases put our
middleware in ``MIDDLEWARE`` with the same options in ``COMMET`` (the peers' SDKs and the
pure-WSGI floor are not set up there). The server is pinned to core 0; wrk, the sink and
py-spy to core 1. Every vendor URL points at the sink (``bench.http.sink``), so our cases
deliver their events for real inside the measured run and the figure includes the background
sender's CPU.

Per server run: start, warm up (wrk, not measured), wait for the sink to go quiet, take the
sink's counters, measure (wrk ``--latency``), read the server's peak RSS (VmHWM), wait for the
billing to arrive, stop the server gracefully (SIGTERM: lifespan shutdown or gunicorn's
graceful stop flush the queue), then compare what wrk saw answered 2xx with what the sink
received: the quantity the case ``expects`` (usage events, the usage total, units added to a
quota). wrk stops counting at the end of the duration while up to ``--connections`` requests
are still in flight on the server (served and billed, never counted by wrk), so the check is
``ok <= delivered <= ok + connections + socket errors``.

Cases run interleaved: each round runs every case of a framework once, in an order rotated per
round, and the ratio to ``bare`` is taken within the round; the table shows medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

from bench.http.apps import CASES, CUSTOMER, CUSTOMER_HEADER, PATH, supports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SERVER_CORE = "0"
LOAD_CORE = "1"
# Each framework expands to the server stacks that serve it.
STACKS = {
    "starlette": ["starlette"],
    "fastapi": ["fastapi"],
    "flask": ["flask-sync", "flask-gthread"],
    "flask-sync": ["flask-sync"],
    "flask-gthread": ["flask-gthread"],
    "django": ["django-sync"],
    "django-sync": ["django-sync"],
}
# The stacks gunicorn serves (the others are uvicorn's).
GUNICORN_STACKS = frozenset({"flask-sync", "flask-gthread", "django-sync"})
DEFAULT_CASES = "bare,passthrough,zero_code,metered,apitally,moesif"
# The sink's counters (bench/http/sink.py); a case's ``expects`` is one of them.
COUNTERS = (
    "commet_events",
    "usage_total",
    "duplicate_events",
    "quota_added",
    "quota_fetches",
    "duplicate_quota_changes",
)


@dataclass
class Run:
    """One case on one stack in one round."""

    stack: str
    case: str
    round: int
    requests: int = 0
    ok: int = 0
    socket_errors: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_mb: float = 0.0
    expects: str | None = None  # the sink counter each 2xx must raise by one (Case.expects)
    delivered: float | None = None  # how much that counter rose during the run
    sink: dict[str, float] = field(default_factory=dict)  # how much every counter rose
    sink_requests: int = 0  # every request the sink got during the run (peers: exports)
    commet_requests: int = 0  # of which to Commet's API (/api/...): events, quota reads, adds
    sink_paths: dict[str, int] = field(default_factory=dict)
    check: str = ""
    refused: int = 0  # events the server logged as NOT delivered (queue full)
    unflushed: int = 0  # events the server logged as undelivered when its close timed out
    spool_left: int = 0  # rows still in the spool files after the server stopped
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv]


@dataclass(frozen=True)
class SinkSnapshot:
    """The sink's counters (``COUNTERS``) and its requests per path at one moment."""

    counters: dict[str, float]
    paths: dict[str, int]

    @property
    def requests(self) -> int:
        return sum(self.paths.values())

    def since(self, base: SinkSnapshot) -> SinkSnapshot:
        """What changed from ``base`` to this snapshot (paths that did not move are left out)."""
        return SinkSnapshot(
            {name: value - base.counters[name] for name, value in self.counters.items()},
            {
                path: n - base.paths.get(path, 0)
                for path, n in self.paths.items()
                if n != base.paths.get(path, 0)
            },
        )


def sink_snapshot(sink_url: str) -> SinkSnapshot:
    with urllib.request.urlopen(sink_url + "/__bench/stats", timeout=5) as response:
        stats = json.loads(response.read())
    requests = stats["requests"]
    assert isinstance(requests, dict)
    return SinkSnapshot(
        {name: stats[name] for name in COUNTERS},
        {str(path): int(n) for path, n in requests.items()},
    )


def wait_quiet(
    sink_url: str,
    *,
    expects: str | None = None,
    at_least: float = 0,
    quiet: float = 1.0,
    stalled: float = 5.0,
    limit: float = 30.0,
) -> SinkSnapshot:
    """Wait until the sink's ``expects`` counter reached ``at_least`` and nothing has moved for
    ``quiet`` seconds; or nothing moved for ``stalled`` seconds (what is missing was refused, or
    waits in a retry that the server's graceful stop flushes); or ``limit`` ran out. Return the
    last snapshot."""
    deadline = time.monotonic() + limit
    last, since = sink_snapshot(sink_url), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = sink_snapshot(sink_url)
        if now != last:
            last, since = now, time.monotonic()
            continue
        still = time.monotonic() - since
        reached = expects is None or last.counters[expects] >= at_least
        if (reached and still >= quiet) or still >= stalled:
            break
    return last


def start_sink(port: int, emulator: str | None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.http.sink", "--port", str(port)]
    if emulator:
        argv += ["--emulator", emulator]
    process = subprocess.Popen(pinned(LOAD_CORE, argv), cwd=ROOT, text=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            sink_snapshot(f"http://127.0.0.1:{port}")
            return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the sink did not start") from None
            time.sleep(0.1)


def server_argv(stack: str, port: int) -> list[str]:
    bind = ["127.0.0.1", str(port)]
    if stack in ("starlette", "fastapi"):
        http = "httptools" if find_spec("httptools") else "h11"
        return [
            sys.executable, "-m", "uvicorn", "bench.http.apps:asgi_app",
            "--host", bind[0], "--port", bind[1], "--workers", "1", "--no-access-log",
            "--http", http, "--lifespan", "on", "--log-level", "warning",
            "--timeout-graceful-shutdown", "15",
        ]  # fmt: skip
    worker = ["-k", "gthread", "--threads", "4"] if stack == "flask-gthread" else ["-k", "sync"]
    return [
        sys.executable, "-m", "gunicorn", "-w", "1", *worker, "-b", ":".join(bind),
        "--log-level", "warning", "--graceful-timeout", "15", "bench.http.apps:wsgi_app",
    ]  # fmt: skip


def framework_of(stack: str) -> str:
    return stack.split("-", 1)[0]


def serving_pid(server: subprocess.Popen[str], stack: str) -> int:
    """The process that runs the app: uvicorn's own, gunicorn's one worker."""
    if stack in GUNICORN_STACKS:
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        if children:
            return int(children[0])
    return server.pid


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_ready(port: int, server: subprocess.Popen[str], stack: str) -> None:
    deadline = time.monotonic() + 30
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{PATH}", headers={CUSTOMER_HEADER: CUSTOMER}
    )
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200 and (
                    stack not in GUNICORN_STACKS or serving_pid(server, stack) != server.pid
                ):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"the {stack} server did not start")
        time.sleep(0.1)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_latency(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"unknown latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str, run: Run) -> None:
    requests = re.search(r"(\d+) requests in", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not requests or not rps:
        raise RuntimeError("wrk printed no result:\n" + output)
    run.requests = int(requests.group(1))
    run.rps = float(rps.group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    run.ok = run.requests - (int(non_2xx.group(1)) if non_2xx else 0)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors:
        run.socket_errors = sum(int(n) for n in errors.groups())
    for percentile, attribute in (("50", "p50_ms"), ("99", "p99_ms")):
        found = re.search(rf"^\s+{percentile}(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
        if found:
            setattr(run, attribute, parse_latency(found.group(1)))


def wrk(port: int, duration: int, connections: int, *, latency: bool) -> str:
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-H",
        f"{CUSTOMER_HEADER}: {CUSTOMER}", f"http://127.0.0.1:{port}{PATH}",
    ]  # fmt: skip
    if latency:
        argv.insert(1, "--latency")
    done = subprocess.run(
        pinned(LOAD_CORE, argv), capture_output=True, text=True, check=True, timeout=duration + 60
    )
    return done.stdout


def py_spy(pid: int, out: Path, duration: float) -> subprocess.Popen[str]:
    """Start py-spy on ``pid`` (raw collapsed stacks, every thread) for ``duration`` seconds."""
    argv = [
        str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
        "--format", "raw", "--nonblocking", "--threads", "--duration", f"{duration:g}",
        "--rate", "200", "--output", str(out),
    ]  # fmt: skip
    return subprocess.Popen(pinned(LOAD_CORE, argv), stdout=subprocess.DEVNULL, text=True)


def run_case(stack: str, case: str, round_: int, args: argparse.Namespace, sink_url: str) -> Run:
    """Start the server, warm up, measure, wait for the billing, stop it, check the sink."""
    run = Run(stack, case, round_, expects=CASES[case].expects)
    with tempfile.TemporaryDirectory(prefix="commet-bench-spool-") as spool_dir:
        server_log = serve_and_measure(run, args, sink_url, Path(spool_dir))
        run.spool_left = spool_leftovers(Path(spool_dir), run)
    run.refused = server_log.count("NOT delivering")
    run.unflushed = server_log.count("undelivered at shutdown")
    if run.expects is not None:
        run.check = delivery_check(run, args.connections)
    return run


def serve_and_measure(run: Run, args: argparse.Namespace, sink_url: str, spool_dir: Path) -> str:
    """Run the server through warm-up and measurement into ``run``; return the server's log."""
    port = free_port()
    env = {
        **os.environ,
        "BENCH_FRAMEWORK": framework_of(run.stack),
        "BENCH_CASE": run.case,
        "BENCH_SINK_URL": sink_url,
        "BENCH_SPOOL_DIR": str(spool_dir),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            pinned(SERVER_CORE, server_argv(run.stack, port)),
            cwd=ROOT,
            env=env,
            text=True,
            stderr=log,
        )
        profiler: subprocess.Popen[str] | None = None
        try:
            wait_ready(port, server, run.stack)
            pid = serving_pid(server, run.stack)
            wrk(port, args.warmup, args.connections, latency=False)
            base = wait_quiet(sink_url)
            if args.py_spy and run.case in args.profile_cases:
                out = Path(args.py_spy) / f"{run.stack}-{run.case}-r{run.round}.txt"
                profiler = py_spy(pid, out, args.duration)
            parse_wrk(wrk(port, args.duration, args.connections, latency=True), run)
            run.rss_mb = peak_rss_mb(pid)
            if run.expects is not None:
                at_least = base.counters[run.expects] + run.ok
                wait_quiet(sink_url, expects=run.expects, at_least=at_least)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                run.notes.append("server did not stop in 30 s; killed")
                server.kill()
                server.wait()
            if profiler is not None:
                profiler.wait(30)
        log.seek(0)
        server_log = log.read()
    if server.returncode not in (0, -signal.SIGTERM) or "Traceback" in server_log:
        run.notes.append(f"server exit {server.returncode}: {server_log[-2000:]}")
    delta = wait_quiet(sink_url, quiet=0.5, limit=10).since(base)
    run.sink = delta.counters
    run.sink_paths = delta.paths
    run.sink_requests = delta.requests
    run.commet_requests = sum(n for path, n in delta.paths.items() if path.startswith("/api/"))
    if run.expects is not None:
        run.delivered = delta.counters[run.expects]
    return server_log


def spool_leftovers(spool_dir: Path, run: Run) -> int:
    """Count the rows the stopped server left in its spool files (pending or dead-lettered)."""
    left = 0
    for path in spool_dir.glob("*.sqlite3"):
        try:
            with closing(sqlite3.connect(path)) as db:
                for table in ("pending", "dead_letter"):
                    left += int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        except sqlite3.Error as exc:
            run.notes.append(f"could not read the spool {path.name}: {exc}")
    return left


def amount(value: float) -> str:
    """``value`` with thousands separators; whole numbers without decimals."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def delivery_check(run: Run, connections: int) -> str:
    """``ok`` when every 2xx wrk counted was billed at the sink, and at most what was in flight
    more."""
    assert run.delivered is not None
    ceiling = run.ok + connections + run.socket_errors
    if run.delivered > ceiling:
        return f"EXTRA {amount(run.delivered - ceiling)}"
    if run.delivered >= run.ok:
        return "ok"
    check = f"MISSING {amount(run.ok - run.delivered)}"
    if run.refused:
        check += f" ({run.refused} refused: queue full)"
    if run.unflushed:
        check += f" ({run.unflushed} undelivered at shutdown)"
    if run.spool_left:
        check += f" ({run.spool_left} left in the spool)"
    return check


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[Run], stacks: list[str], cases: list[str]) -> str:
    by_key: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_key.setdefault((run.stack, run.case), []).append(run)
    lines = [
        "| framework | case | req/s | vs bare | p50 ms | p99 ms | billed / 2xx | billed as "
        "| check | sink requests | peak RSS MB | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for stack in stacks:
        bare = {run.round: run.rps for run in by_key.get((stack, "bare"), [])}
        for case in cases:
            group = by_key.get((stack, case), [])
            if not group:
                continue
            ratios = [run.rps / bare[run.round] for run in group if bare.get(run.round)]
            expects = group[0].expects
            if expects is not None:
                delivered = sum(run.delivered or 0 for run in group)
                billed = f"{amount(delivered)} / {sum(run.ok for run in group):,}"
                check = ", ".join(sorted({run.check for run in group}))
            else:
                # Peers bill nothing we can count: their requests to the sink are exports.
                billed = "n/a" if case not in ("bare", "passthrough") else "-"
                expects, check = "-", "-"
            lines.append(
                f"| {stack} | {case} | {median([r.rps for r in group]):,.0f} "
                f"| {median(ratios):.2f} | {median([r.p50_ms for r in group]):.2f} "
                f"| {median([r.p99_ms for r in group]):.2f} | {billed} | {expects} | {check} "
                f"| {sum(run.sink_requests for run in group):,} "
                f"| {median([r.rss_mb for r in group]):.0f} | {len(group)} |"
            )
    return "\n".join(lines)


def start_redis() -> subprocess.Popen[str]:
    """Start a redis-server (no persistence) for the Redis quota-store case, on the load core;
    its URL goes to the servers in BENCH_REDIS_URL."""
    if shutil.which("redis-server") is None:
        subprocess.run([str(ROOT / "scripts" / "ensure-redis")], check=True)
    port = free_port()
    argv = [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
        "--appendonly", "no", "--loglevel", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(
        pinned(LOAD_CORE, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    os.environ["BENCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
                    return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def available(case: str) -> bool:
    requires = CASES[case].requires
    return requires is None or find_spec(requires) is not None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="./dev bench http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--frameworks", default="starlette,fastapi,flask,django")
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="deliver to the Commet emulator (bench/http/catalogue.toml), not the counting sink",
    )
    parser.add_argument("--json", metavar="FILE", help="write every run to FILE")
    parser.add_argument("--py-spy", metavar="DIR", help="profile the server with py-spy")
    parser.add_argument("--profile-cases", default="zero_code", help="cases py-spy records")
    args = parser.parse_args(argv)
    args.profile_cases = set(args.profile_cases.split(","))

    if shutil.which("wrk") is None:
        subprocess.run([str(HERE / "ensure-wrk")], check=True)
    stacks = [s for fw in args.frameworks.split(",") for s in STACKS[fw.strip()]]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(CASES)}")
    for case in [c for c in cases if not available(c)]:
        print(f"skipping {case}: {CASES[case].requires} is not installed", file=sys.stderr)
        cases.remove(case)
    if "bare" not in cases:
        cases.insert(0, "bare")
    if args.py_spy:
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)

    redis = start_redis() if any("redis" in case for case in cases) else None
    sink_port = free_port()
    sink_url = f"http://127.0.0.1:{sink_port}"
    catalogue = str(HERE / "catalogue.toml") if args.emulator else None
    sink = start_sink(sink_port, catalogue)
    runs: list[Run] = []
    try:
        for round_ in range(1, args.rounds + 1):
            for stack in stacks:
                # Rotate the order each round, so no case always runs first (or last).
                shift = (round_ - 1) % len(cases)
                for case in cases[shift:] + cases[:shift]:
                    if not supports(framework_of(stack), case):
                        continue  # e.g. the peers' SDKs on Django: not set up here
                    run = run_case(stack, case, round_, args, sink_url)
                    runs.append(run)
                    delivered = (
                        "" if run.delivered is None else f" {run.expects} {amount(run.delivered)}"
                    )
                    print(
                        f"round {round_} {stack:<13} {case:<20} {run.rps:>9,.0f} req/s "
                        f"p50 {run.p50_ms:.2f} ms p99 {run.p99_ms:.2f} ms 2xx {run.ok}"
                        f"{delivered} {run.check} sink requests {run.sink_requests} "
                        f"rss {run.rss_mb:.0f} MB " + " ".join(run.notes),
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        sink.send_signal(signal.SIGINT)
        try:
            sink.wait(10)
        except subprocess.TimeoutExpired:
            sink.kill()
        if redis is not None:
            redis.kill()
            redis.wait()
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(run) for run in runs], indent=1))
    print(summarise(runs, stacks, cases))
    return 0 if all(run.check in ("", "ok") for run in runs) else 1
