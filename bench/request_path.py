"""What our middleware costs per request on the request path alone, in-process, without a server.

``./dev bench request_path [--frameworks starlette,fastapi,flask] [--cases ...] [--requests N]
[--repeats R] [--calls]``

The app of each case (``bench/http/apps.py``, ``floor`` and ``ladder_*`` included) is called
directly: an ASGI app with a uvicorn-shaped scope and ``send``/``receive`` that never suspend,
a WSGI app with a gunicorn-shaped environ, its body iterated and closed as a server does. No
sockets, no HTTP parsing: what is left is the framework and our middleware, so the difference
to ``bare`` is what the middleware adds to one request, measured far more steadily than over
HTTP (a run of ``./dev bench http`` on this 2-core machine moves by several percent). The ASGI
loop yields every 64 requests so that the delivery queue's sender (a task on the same loop)
seals its windows and sends, as it would under a server.

Usage events go to a counting sink (``bench.http.sink``, started here on 127.0.0.1), so the
aggregated cases deliver for real; the non-aggregated ``zero_code``/``metered`` cases are left
out by default, because in-process requests outrun one HTTP send per event and their queue
would fill (see ``./dev bench http`` for those).

``floor`` is the least a billing middleware can do (customer from a header, the status, a
counter in a dict), for reference. The ladder takes ours apart: ``ladder_wrapper`` is the
middleware with a sink that drops everything, no customer resolver and no metering (the
per-request context, the ``send``/``start_response`` wrapper, settling); ``ladder_customer``
adds ``from_header("X-Customer-Id")``; ``ladder_meter`` adds ``meter="api_calls"`` (the usage
event is built and dropped); ``zero_code_agg`` then hands it to the real aggregating queue.

Per case: the median of ``--repeats`` timed runs of ``--requests`` requests, the rounds of all
cases interleaved; the ratio to ``bare`` of the same framework; garbage-collector passes per
10,000 requests; and with ``--calls``, Python function calls per request (cProfile, C calls
included).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import logging
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench.http.apps import ASGI_FRAMEWORKS, CASES, CUSTOMER, PATH, build
from bench.http.runner import start_sink

SINK_PORT = 18_990
DEFAULT_CASES = (
    "bare,passthrough,floor,ladder_wrapper,ladder_customer,ladder_meter,"
    "zero_code_agg,metered_agg,quota_guard_warm_agg"
)


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"x-customer-id", CUSTOMER.encode()),
        ],
        "state": {},
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


def _environ() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": PATH,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_X_CUSTOMER_ID": CUSTOMER,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


class Runner:
    """One app, ready to serve ``n`` requests at a time (ASGI on a loop of its own)."""

    def __init__(self, framework: str, case: str, sink_url: str) -> None:
        self.app = build(framework, case, sink_url)
        self.asgi = framework in ASGI_FRAMEWORKS
        self.loop = asyncio.new_event_loop() if self.asgi else None

    def serve(self, n: int) -> None:
        """Serve ``n`` requests."""
        if self.loop is not None:
            self.loop.run_until_complete(self._serve_asgi(n))
            return
        app = self.app
        for _ in range(n):
            body: Iterable[bytes] = app(_environ(), _start_response)
            for _chunk in body:
                pass
            close: Callable[[], None] | None = getattr(body, "close", None)
            if close is not None:
                close()

    async def _serve_asgi(self, n: int) -> None:
        app = self.app
        for i in range(n):
            await app(_scope(), _receive, _send)
            if i % 64 == 0:
                await asyncio.sleep(0)  # the sender's turn, as between a server's requests

    def close(self) -> None:
        """Let the sender finish and close the loop."""
        if self.loop is not None:
            self.loop.run_until_complete(asyncio.sleep(0.6))
            self.loop.close()


class _GCCounter:
    def __init__(self) -> None:
        self.passes = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.passes += 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench request_path", description=__doc__)
    parser.add_argument("--frameworks", default="starlette,fastapi,flask")
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", action="store_true", help="count function calls (cProfile)")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(CASES)}")
    logging.disable(logging.CRITICAL)  # the harness does not flush the queues at exit
    sink = start_sink(SINK_PORT, None)
    sink_url = f"http://127.0.0.1:{SINK_PORT}"
    print("| framework | case | us/request | vs bare | added us | GC passes / 10k | calls/req |")
    print("|---|---|---:|---:|---:|---:|---:|")
    try:
        for framework in args.frameworks.split(","):
            runners = {case: Runner(framework, case, sink_url) for case in cases}
            timings: dict[str, list[float]] = {case: [] for case in cases}
            gc_passes: dict[str, int] = dict.fromkeys(cases, 0)
            for runner in runners.values():
                runner.serve(2_000)  # warm-up: imports, caches, the allowance cache
            for _ in range(args.repeats):
                for case, runner in runners.items():
                    counter = _GCCounter()
                    gc.callbacks.append(counter)
                    started = time.perf_counter()
                    runner.serve(args.requests)
                    elapsed = time.perf_counter() - started
                    gc.callbacks.remove(counter)
                    timings[case].append(elapsed / args.requests * 1e6)
                    gc_passes[case] += counter.passes
            calls = {case: _calls_per_request(runners[case]) for case in cases if args.calls}
            bare = statistics.median(timings["bare"]) if "bare" in timings else None
            for case in cases:
                median = statistics.median(timings[case])
                ratio = f"{bare / median:.2f}" if bare else "-"
                added = f"{median - bare:+.1f}" if bare else "-"
                per_10k = gc_passes[case] * 10_000 / (args.requests * args.repeats)
                call_count = f"{calls[case]:.0f}" if case in calls else "-"
                print(
                    f"| {framework} | {case} | {median:.2f} | {ratio} | {added} | "
                    f"{per_10k:.0f} | {call_count} |",
                    flush=True,
                )
            for runner in runners.values():
                runner.close()
    finally:
        sink.terminate()
        sink.wait(10)
    return 0


def _calls_per_request(runner: Runner, n: int = 5_000) -> float:
    profile = cProfile.Profile()
    profile.enable()
    runner.serve(n)
    profile.disable()
    return float(pstats.Stats(profile).total_calls) / n  # type: ignore[attr-defined]
