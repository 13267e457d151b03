"""The no-loss proof: a real app under load, Commet misbehaving, the app SIGKILLed and restarted.

    python -m bench soak [--requests N] [--kills K] [--clients N] [--customers N] [--json]

The app (``tests/soak/apps.py``: FastAPI, ``CommetMiddleware``, ``@metered``, a spool file) runs
under uvicorn in a subprocess on 127.0.0.1; the Commet emulator runs in this process under
uvicorn too (``FakeCommet.serve``) and injects 5xx at random, 429 with Retry-After, latency,
dropped connections and a short total outage. ``--clients`` threads send N requests (each with
its own ``Idempotency-Key`` and one of ``--customers`` customers); a request that fails in
transport (the app is down) is retried with the same key, as a real client would. The app is
killed with SIGKILL ``--kills`` times mid-load and restarted on the same spool file. At the end
the faults stop, the app drains, is stopped with SIGTERM, and whatever is still spooled is
drained from here. Then the emulator's ledger is compared with what the load generator saw:

- lost: a request answered 2xx whose event is not in the ledger (must be 0).
  ``CommetMiddleware`` enqueues (and so spools) a request's usage *before* forwarding the
  message that completes the response, so even a kill right after the client got its 2xx
  loses nothing; ``lost_at_kill`` still reports how many losses were answered within
  ``KILL_WINDOW`` before a SIGKILL, to tell a regression of that ordering from other losses;
- duplicated: an event key recorded more than once (must be 0);
- billed but unseen: an event recorded for a request whose 2xx answer the client never got
  (killed mid-request); allowed, reported;
- unknown: an event for no request the generator sent (must be 0).

Exit status 0 when lost, duplicated and unknown are all zero.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "tests" / "soak"
FEATURE = "api_calls"
API_KEY = "ck_soak_test"
# How close before a SIGKILL a lost 2xx must have been read to count as "lost at the kill".
KILL_WINDOW = 0.25


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """One app server process (its whole process group is signalled)."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def send_signal(self, sig: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` to the server and wait for it to exit; return its exit code."""
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            raise


def server_command(kind: str, port: int, *, preload: bool = False, workers: int = 1) -> list[str]:
    """The command line of ``kind``: uvicorn, gunicorn-sync or gunicorn-gthread."""
    if kind == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "--app-dir", str(APP_DIR), "--factory",
            "apps:asgi_app", "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on",
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    worker_class = kind.removeprefix("gunicorn-")
    command = [
        sys.executable, "-m", "gunicorn", "--chdir", str(APP_DIR), "-b", f"127.0.0.1:{port}",
        "-w", str(workers), "-k", worker_class, "--graceful-timeout", "30",
        "--log-level", "warning",
    ]  # fmt: skip
    if worker_class == "gthread":
        command += ["--threads", "4"]
    if preload:
        command.append("--preload")
    return [*command, "apps:wsgi_app"]


def start_server(
    kind: str,
    env: dict[str, str],
    *,
    port: int | None = None,
    preload: bool = False,
    workers: int = 1,
    log_dir: Path | None = None,
) -> Server:
    """Start an app server on 127.0.0.1 and wait until ``/health`` answers."""
    import httpx

    port = port or free_port()
    log = Path(log_dir or tempfile.gettempdir()) / f"server-{kind}-{port}-{time.time_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            server_command(kind, port, preload=preload, workers=workers),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited at start:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"{kind} did not start:\n{log.read_text()}")


def event_key(client_key: str, path: str, customer: str, method: str = "GET") -> str:
    """The idempotency key the middleware gives the one event of a request with ``client_key``
    (a GET without a query or body, by ``customer``)."""
    from commet_middleware._keys import client_request_seed, derive_idempotency_key

    seed = client_request_seed(client_key, customer, method, path, "", b"")[2]
    return derive_idempotency_key(seed, FEATURE, 1)


def process_tree_rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its children (gunicorn workers), in KiB; 0 if gone."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(child) for child in children]
    except OSError:
        pass
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass
class LoadResult:
    sent: dict[str, str] = field(default_factory=dict)  # client key -> path
    succeeded: set[str] = field(default_factory=set)
    answered_at: dict[str, float] = field(default_factory=dict)  # client key -> monotonic
    failed: Counter[str] = field(default_factory=Counter)
    transport_retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_load(
    base_url: str, requests: int, clients: int, customers: int, progress: list[int]
) -> LoadResult:
    """Send ``requests`` requests from ``clients`` threads; see the module docstring."""
    import httpx

    result = LoadResult()
    counter = iter(range(requests))
    counter_lock = threading.Lock()

    def client_thread() -> None:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            while True:
                with counter_lock:
                    i = next(counter, None)
                if i is None:
                    return
                key = f"soak-{i}"
                path = "/work" if i % 2 else "/work-sync"
                with result.lock:
                    result.sent[key] = path
                headers = {"x-customer": f"cust_{i % customers}", "Idempotency-Key": key}
                for _ in range(600):  # up to about a minute of the app being down
                    try:
                        response = client.get(path, headers=headers)
                    except httpx.TransportError:
                        with result.lock:
                            result.transport_retries += 1
                        time.sleep(0.1)
                        continue
                    with result.lock:
                        if 200 <= response.status_code < 300:
                            result.succeeded.add(key)
                            result.answered_at[key] = time.monotonic()
                        else:
                            result.failed[str(response.status_code)] += 1
                    break
                else:
                    with result.lock:
                        result.failed["unreachable"] += 1
                with counter_lock:
                    progress[0] += 1

    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


@contextmanager
def chaos(faults: Any, stop: threading.Event) -> Iterator[None]:
    """Inject faults in the background until the block ends."""

    def run() -> None:
        # Every kind of fault early (short runs see them all), then again in cycles.
        faults.error_rate(0.05, status=503)
        step = 0
        while not stop.wait(0.2):
            step += 1
            if step % 5 == 1:
                faults.rate_limit_next(5, retry_after=1)
            if step % 5 == 2:
                faults.drop_next(3)
            if step % 5 == 3:
                faults.fail_next(10, status=502)
            faults.latency(0.02 if step % 2 else 0.0)
            if step % 25 == 4:  # a total outage: the spool takes the load
                faults.error_rate(1.0, status=503)
                stop.wait(1.5)
                faults.error_rate(0.05, status=503)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def soak(
    requests: int,
    kills: int,
    clients: int,
    customers: int,
    queue_limit: int,
) -> dict[str, Any]:
    """Run the soak and return its figures."""
    from commet_middleware import CommetSettings
    from commet_middleware._spool import Spool
    from commet_middleware.delivery import DeliveryQueue
    from commet_middleware.testing import FakeCommet

    fake = FakeCommet()
    fake.add_feature(FEATURE)
    for n in range(customers):
        fake.add_customer(f"cust_{n}")
    workdir = Path(tempfile.mkdtemp(prefix="commet-soak-"))
    spool_path = workdir / "spool.sqlite3"
    started = time.monotonic()
    peak_rss = 0
    kill_log: list[int] = []
    kill_times: list[float] = []
    spooled_at_kill: list[int] = []  # rows the killed process left for its successor
    with fake.serve() as commet_url:
        env = {
            "COMMET_BASE_URL": commet_url,
            "COMMET_API_KEY": API_KEY,
            "COMMET_SPOOL": str(spool_path),
            "SOAK_SHUTDOWN_TIMEOUT": "10",
            "SOAK_QUEUE_LIMIT": str(queue_limit),
        }
        port = free_port()
        server = start_server("uvicorn", env, port=port, log_dir=workdir)
        progress = [0]
        done = threading.Event()
        box: dict[str, LoadResult] = {}

        def load() -> None:
            box["result"] = run_load(server.url, requests, clients, customers, progress)
            done.set()

        stop_chaos = threading.Event()
        with chaos(fake.faults, stop_chaos):
            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            for k in range(kills):
                target = requests * (k + 1) // (kills + 1)
                while progress[0] < target and not done.is_set():
                    peak_rss = max(peak_rss, process_tree_rss_kb(server.proc.pid))
                    time.sleep(0.05)
                if done.is_set():
                    break
                peak_rss = max(peak_rss, process_tree_rss_kb(server.proc.pid))
                kill_times.append(time.monotonic())
                server.stop(signal.SIGKILL)
                kill_log.append(progress[0])
                left = Spool(spool_path).stats()
                spooled_at_kill.append(left.pending + left.claimed)
                server = start_server("uvicorn", env, port=port, log_dir=workdir)
            while not done.wait(0.1):
                peak_rss = max(peak_rss, process_tree_rss_kb(server.proc.pid))
            loader.join()
        injected = fake.faults.injected
        fake.faults.clear()
        load_seconds = time.monotonic() - started
        # Let the app drain what is spooled (its own and the killed processes' rows).
        spool = Spool(spool_path)
        # As long as it makes progress: a long run leaves a backlog of minutes.
        drain_started = time.monotonic()
        last_left, last_progress = -1, time.monotonic()
        while time.monotonic() - last_progress < 60:
            stats = spool.stats()
            left = stats.pending + stats.claimed
            if left == 0:
                break
            if left != last_left:
                last_left, last_progress = left, time.monotonic()
            peak_rss = max(peak_rss, process_tree_rss_kb(server.proc.pid))
            time.sleep(0.1)
        drain_seconds = time.monotonic() - drain_started
        exit_code = server.stop(signal.SIGTERM)
        left_after_stop = spool.stats()
        drained_here = 0
        if left_after_stop.pending or left_after_stop.claimed:
            drained_here_left = left_after_stop.pending + left_after_stop.claimed
            queue = DeliveryQueue(
                CommetSettings(
                    api_key=API_KEY,
                    base_url=commet_url,
                    spool_path=str(spool_path),
                    fold_when_behind=False,  # the soak checks each event by its own key
                )
            )
            queue.start()
            while not queue.close(60):  # as long as it makes progress
                now_left = spool.stats()
                if now_left.pending + now_left.claimed >= drained_here_left:
                    break
                drained_here_left = now_left.pending + now_left.claimed
                queue.start()
            drained_here = left_after_stop.pending + left_after_stop.claimed
        final = spool.stats()
        ledger = Counter(event.idempotency_key for event in fake.events())
        fault_statuses = Counter(
            str(request.status)
            for request in fake.requests
            if request.status is None or request.status >= 429
        )
    result = box["result"]

    def key_of(key: str) -> str:
        customer = f"cust_{int(key.rsplit('-', 1)[1]) % customers}"
        return event_key(key, result.sent[key], customer)

    expected = {key_of(key): key for key in result.sent}
    succeeded = {key_of(key) for key in result.succeeded}
    lost = sorted(succeeded - set(ledger))
    # A 2xx the client read just before a SIGKILL: a loss there means the middleware forwarded
    # the end of a response before its usage was spooled (a regression of that ordering).
    by_event = {key_of(key): key for key in result.succeeded}
    lost_at_kill = [
        key
        for key in lost
        if any(0 <= kill - result.answered_at[by_event[key]] < KILL_WINDOW for kill in kill_times)
    ]
    duplicated = sorted(key for key, count in ledger.items() if count > 1)
    unknown = sorted(key for key in ledger if key not in expected)
    unseen = sorted(key for key in ledger if key in expected and key not in succeeded)
    return {
        "requests": len(result.sent),
        "successes": len(result.succeeded),
        "non_2xx": dict(result.failed),
        "client_transport_retries": result.transport_retries,
        "events": sum(ledger.values()),
        "faults_injected": injected,
        "commet_error_answers": {
            "dropped": fault_statuses.pop("None", 0),
            **{f"status_{k}": v for k, v in sorted(fault_statuses.items())},
        },
        "commet_requests": len(fake.requests),
        "kills": len(kill_log),
        "killed_at_progress": kill_log,
        "spooled_at_kill": spooled_at_kill,
        "lost": len(lost),
        "lost_at_kill": len(lost_at_kill),
        "duplicated": len(duplicated),
        "billed_but_unseen": len(unseen),
        "unknown": len(unknown),
        "final_stop_exit_code": exit_code,
        "left_in_spool_after_stop": left_after_stop.pending + left_after_stop.claimed,
        "drained_after_stop": drained_here,
        "spool_at_end": {"pending": final.pending, "claimed": final.claimed, "dead": final.dead},
        "peak_rss_mb": round(peak_rss / 1024, 1),
        "load_seconds": round(load_seconds, 1),
        "drain_seconds": round(drain_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "lost_keys": lost[:20],
        "duplicated_keys": duplicated[:20],
        "workdir": str(workdir),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--queue-limit", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    figures = soak(
        args.requests,
        args.kills,
        args.clients,
        args.customers,
        args.queue_limit,
    )
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        for name, value in figures.items():
            print(f"{name:<28} {value}")
    # Any loss (at a kill or not), a duplicate or an unknown event fails the run.
    ok = figures["lost"] == 0 and figures["duplicated"] == 0 and figures["unknown"] == 0
    return 0 if ok else 1
