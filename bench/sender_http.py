"""HTTP/1.1 against HTTP/2: what one usage event costs the background sender's client.

    python -m bench.sender_http [--events N] [--rounds R] [--concurrency C] [--warmup N]
                                [--profile-events N] [--no-profile] [--keep-profile DIR]

Three processes. The server, pinned to core 1 (``taskset -c 1``), is Hypercorn serving a tiny
ASGI app on 127.0.0.1 that answers ``POST /api/v1/usage/events`` with 201 and a small
``usage_event`` body, over HTTP/1.1 (h11) and over cleartext HTTP/2 with prior knowledge (h2c:
Hypercorn's HTTP/1.1 reader sees the ``PRI * HTTP/2.0`` preface and switches to h2). The
client, pinned to core 0, builds the real ``AsyncCommetClient`` with the delivery queue's own
factory (``default_sender_factory``) and sends N events with ``send_once`` and C in flight, a
task per event as the sender does. HTTP/1.1 is the queue's default client (``transport=None``);
HTTP/2 injects ``httpx.AsyncHTTPTransport(http1=False, http2=True)`` through
``CommetSettings.transport`` (``http1=False`` is what makes httpcore speak h2c with prior
knowledge on an ``http://`` URL; it needs the ``h2`` package). This process only orchestrates.

Per run: a fresh client, ``--warmup`` events to open the connections (not measured), then N
events with their bodies already encoded, as the queue hands them over (the encoding is measured
on its own: ``default_encoder``, which calls ``_wire.encode_body``). Measured: client CPU
(``time.process_time()`` delta / N), wall time (events/s) and the server's CPU per event; the
server counts requests per HTTP version, and a run whose count differs from what was sent, or
that had a failed send, fails the benchmark. Rounds alternate which protocol goes first, and
the ratio to HTTP/1.1 is taken within each round.

Then, unless ``--no-profile``, one run per protocol of ``--profile-events`` is sampled with
py-spy (``record -r 500 -f raw --nonblocking --function``, attached to the client after its
warm-up) and a shorter one is run under cProfile for exact call counts (and in place of py-spy
if py-spy cannot record). The HTTP/1.1 profile is summarised by layer and function, as % of the
client's main thread; the two protocols are set side by side by layer.

The results are printed as the markdown section of bench/README.md.

Since the async client sends over its own HTTP/1.1 connections when no transport is set
(``commet_middleware._http11``), the HTTP/1.1 runs measure those, not httpx; the HTTP/2 runs
stay on httpx. ``bench/sender_cost.py`` compares the client before and after that change.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib.metadata
import json
import os
import platform
import pstats
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

USAGE_PATH = "/api/v1/usage/events"
STATS_PATH = "/__bench/stats"
PROTOCOLS = {"http1": "HTTP/1.1", "http2": "HTTP/2 (h2c)"}
# What the server's ASGI scope says for each protocol.
SCOPE_VERSIONS = {"http1": "1.1", "http2": "2"}

# A UsageEvent as the reference shapes it; the client parses every field of it.
RESPONSE_BODY = json.dumps(
    {
        "id": "uev_01J9ZBENCH0000000000000000",
        "object": "usage_event",
        "featureCode": "api_calls",
        "value": 1,
        "customerId": "cus_bench",
        "eventId": "evt_bench",
        "ts": "2026-01-01T00:00:00.000Z",
        "createdAt": "2026-01-01T00:00:00.000Z",
        "properties": [],
        "livemode": False,
    },
    separators=(",", ":"),
).encode()

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --- the server (its own process, core 1) -----------------------------------------------------


class UsageEndpoint:
    """Commet's track endpoint, reduced to answering 201 and counting requests per version."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.empty_bodies = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if scope["method"] == "POST" and scope["path"] == USAGE_PATH:
            self.requests[scope["http_version"]] += 1
            self.empty_bodies += size == 0
            await _respond(send, 201, RESPONSE_BODY)
        elif scope["path"] == STATS_PATH:
            stats = {
                "requests": dict(self.requests),
                "empty_bodies": self.empty_bodies,
                "cpu_s": time.process_time(),
            }
            await _respond(send, 200, json.dumps(stats).encode())
        else:
            await _respond(send, 404, b'{"error":{"code":"not_found"}}')


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", b"req_bench"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve() -> None:
    """Serve ``UsageEndpoint`` on a free port of 127.0.0.1 (printed first) until terminated."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it; Hypercorn sets it only on sockets it binds itself.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = Config()
    # Hypercorn takes the socket over by its descriptor; detached, only Hypercorn closes it.
    config.bind = [f"fd://{listener.detach()}"]
    # The defaults close a connection after 1000 requests, which would make every run reconnect.
    config.keep_alive_max_requests = 2**62
    config.keep_alive_timeout = 300
    config.accesslog = None
    config.include_date_header = False
    print(port, flush=True)
    asyncio.run(hypercorn_serve(UsageEndpoint(), config))  # type: ignore[arg-type]


# --- the client (its own process, core 0) -----------------------------------------------------


def _events(n: int, label: str) -> list[tuple[Any, bytes]]:
    """``n`` usage events with their bodies, encoded as the delivery queue encodes them."""
    from commet_middleware import UsageEvent
    from commet_middleware.delivery._pump import default_encoder

    batch = []
    for i in range(n):
        event = UsageEvent.create("cus_bench", "api_calls", 1, idempotency_key=f"{label}-{i}")
        body = default_encoder(event, "v1")
        assert body is not None
        batch.append((event, body))
    return batch


def _sender(url: str, protocol: str, concurrency: int) -> Any:
    """The client the delivery queue would build, for ``protocol``."""
    import httpx

    from commet_middleware import CommetSettings
    from commet_middleware._client import AsyncCommetClient
    from commet_middleware.delivery._pump import default_sender_factory

    transport = None
    if protocol == "http2":
        transport = httpx.AsyncHTTPTransport(http1=False, http2=True)
    settings = CommetSettings(
        api_key="ck_bench", base_url=url, transport=transport, max_concurrency=concurrency
    )
    client = default_sender_factory(settings)
    assert isinstance(client, AsyncCommetClient)
    return client


async def _send_all(client: Any, batch: list[tuple[Any, bytes]], concurrency: int) -> int:
    """Send every event with ``concurrency`` in flight, a task each; return the failures."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    failures = 0
    running: set[asyncio.Task[None]] = set()

    async def deliver(event: Any, body: bytes) -> None:
        nonlocal failures
        try:
            await client.send_once(event, request_body=body)
        except Exception as exc:
            failures += 1
            if failures == 1:
                print(f"send failed: {exc!r}", file=sys.stderr)
        finally:
            slots.release()

    for event, body in batch:
        await slots.acquire()
        task = loop.create_task(deliver(event, body))
        running.add(task)
        task.add_done_callback(running.discard)
    for _ in range(concurrency):
        await slots.acquire()
    return failures


async def _server_stats(stats_client: Any) -> dict[str, Any]:
    response = await stats_client.get(STATS_PATH)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def _one_run(
    url: str,
    protocol: str,
    label: str,
    *,
    events: int,
    warmup: int,
    concurrency: int,
    stats_client: Any,
    before_measure: Callable[[], None] | None = None,
    profiler: cProfile.Profile | None = None,
) -> dict[str, Any]:
    client = _sender(url, protocol, concurrency)
    try:
        warm_failures = await _send_all(client, _events(warmup, f"{label}-warm"), concurrency)
        batch = _events(events, label)
        if before_measure is not None:
            before_measure()
        gc.collect()
        before = await _server_stats(stats_client)
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        failures = await _send_all(client, batch, concurrency)
        if profiler is not None:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        after = await _server_stats(stats_client)
    finally:
        await client.aclose()
    version = SCOPE_VERSIONS[protocol]
    counted = {
        key: after["requests"].get(key, 0) - before["requests"].get(key, 0)
        for key in set(after["requests"]) | set(before["requests"])
    }
    return {
        "protocol": protocol,
        "events": events,
        "cpu_s": cpu,
        "wall_s": wall,
        "server_cpu_s": after["cpu_s"] - before["cpu_s"],
        "failures": failures + warm_failures,
        "counted": counted,
        "ok": failures + warm_failures == 0
        and counted.get(version, 0) == events
        and sum(counted.values()) == events
        and after["empty_bodies"] == 0,
    }


def _encoding_cost(events: int, rounds: int) -> dict[str, float]:
    """Median CPU per event of the queue's encoder and of ``encode_body`` alone, in seconds."""
    from commet_middleware._wire import encode_body
    from commet_middleware.delivery._pump import default_encoder

    batch = [event for event, _ in _events(events, "encode")]
    costs: dict[str, list[float]] = {"default_encoder": [], "encode_body": []}
    for _ in range(rounds):
        for name, encode in (("default_encoder", default_encoder), ("encode_body", encode_body)):
            start = time.process_time()
            for event in batch:
                encode(event, "v1")
            costs[name].append((time.process_time() - start) / events)
    return {name: statistics.median(values) for name, values in costs.items()}


async def _client_main(args: argparse.Namespace) -> None:
    import httpx

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)

    async with httpx.AsyncClient(base_url=args.client) as stats_client:
        if args.profile:

            def handshake() -> None:
                # The profiler attaches now: after imports, connections and warm-up. Blocking the
                # loop is harmless here (nothing is in flight), and a reader thread would show
                # up in the profile.
                emit({"ready": os.getpid()})
                sys.stdin.readline()

            profiler = cProfile.Profile() if args.profile == "cprofile" else None
            record = await _one_run(
                args.client,
                args.profile_protocol,
                "profile",
                events=args.events,
                warmup=args.warmup,
                concurrency=args.concurrency,
                stats_client=stats_client,
                before_measure=handshake,
                profiler=profiler,
            )
            if profiler is not None:
                profiler.dump_stats(args.profile_out)
            emit({"run": record})
            return
        emit({"encoding": _encoding_cost(args.events, args.rounds)})
        for round_no in range(args.rounds):
            order = ["http1", "http2"] if round_no % 2 == 0 else ["http2", "http1"]
            for protocol in order:
                record = await _one_run(
                    args.client,
                    protocol,
                    f"r{round_no}-{protocol}",
                    events=args.events,
                    warmup=args.warmup,
                    concurrency=args.concurrency,
                    stats_client=stats_client,
                )
                record["round"] = round_no
                emit({"run": record})


# --- the profile summary ------------------------------------------------------------------------

# py-spy's raw frames with --function: "name (file:first line)".
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>.*?):(?P<line>\d+)\)$")
# A function: its file, shortened to start at the package, and its first line.
FunctionKey = tuple[str, int]
_STACK_LAYERS = ("httpx/", "httpcore/", "h11/", "anyio/", "commet_middleware/")


@dataclass
class Profile:
    """Where the client's CPU went: per function self and inclusive, per layer self.

    ``calls`` (from a cProfile run) is calls per event: exact, where the sampled shares are
    estimates.
    """

    source: str
    total: float = 0
    own: Counter[FunctionKey] = field(default_factory=Counter)
    inclusive: Counter[FunctionKey] = field(default_factory=Counter)
    layers: Counter[str] = field(default_factory=Counter)
    names: dict[FunctionKey, str] = field(default_factory=dict)
    calls: dict[FunctionKey, float] = field(default_factory=dict)
    # Samples of other threads, left out (the executor thread asyncio starts for getaddrinfo:
    # py-spy counts it as busy while it waits on its work queue).
    other_threads: float = 0
    # Samples whose stack py-spy read only in part and that could not be completed.
    unresolved: float = 0
    # The profiled run's client CPU per event, in seconds (under cProfile: slowed down).
    cpu_per_event: float = 0


@dataclass
class ProfileReport:
    """The HTTP/1.1 client's profile, and both protocols under cProfile for comparison."""

    by_protocol: dict[str, Profile]
    note: str

    @property
    def main(self) -> Profile:
        """The HTTP/1.1 client's profile."""
        return self.by_protocol["http1"]


def _short_file(path: str) -> str:
    for marker in ("site-packages/", f"python{sys.version_info[0]}.{sys.version_info[1]}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.removeprefix(str(Path(__file__).resolve().parent.parent) + "/")


def _layer(short_file: str) -> str:
    return short_file.split("/", 1)[0].removesuffix(".py") or "?"


def _from_py_spy(path: Path) -> Profile:
    """Read py-spy's raw stacks, completing those whose outer frames it lost.

    Sampling without pausing the process, py-spy often reads only the inner part of a stack
    that changed under it. The leaf is right (self time is sound) but inclusive time would miss
    the outer frames, so such a stack is completed with the most frequent complete path that
    leads to its outermost frame; ``unresolved`` counts the samples that had none.
    """
    profile = Profile("py-spy samples")
    stacks: list[tuple[list[FunctionKey], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames: list[FunctionKey] = []
        for raw in stack.split(";"):
            match = _FRAME.match(raw)
            if match is None:  # a process or thread name, not a frame
                continue
            key = (_short_file(match["file"]), int(match["line"]))
            profile.names.setdefault(key, match["name"])
            frames.append(key)
        if not frames:
            continue
        if profile.names[frames[0]] == "Thread._bootstrap":
            profile.other_threads += int(count_text)
            continue
        stacks.append((frames, int(count_text)))
    roots: Counter[FunctionKey] = Counter()
    for frames, count in stacks:
        roots[frames[0]] += count
    if not roots:
        return profile
    main_root = roots.most_common(1)[0][0]
    paths: dict[FunctionKey, Counter[tuple[FunctionKey, ...]]] = {}
    for frames, count in stacks:
        if frames[0] == main_root:
            for depth, key in enumerate(frames):
                paths.setdefault(key, Counter())[tuple(frames[:depth])] += count
    for frames, count in stacks:
        if frames[0] != main_root:
            known = paths.get(frames[0])
            if known:
                frames = [*known.most_common(1)[0][0], *frames]
            else:
                profile.unresolved += count
        profile.total += count
        profile.own[frames[-1]] += count
        profile.layers[_layer(frames[-1][0])] += count
        for key in set(frames):
            profile.inclusive[key] += count
    return profile


def _from_cprofile(path: Path, events: int) -> Profile:
    profile = Profile("cProfile seconds")
    stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    for (file, line, name), (_prim, calls, tottime, cumtime, _callers) in stats.items():
        key = (_short_file(file) if file != "~" else "builtins", line)
        profile.names.setdefault(key, name)
        profile.own[key] += tottime
        profile.inclusive[key] += cumtime
        profile.layers[_layer(key[0])] += tottime
        profile.calls[key] = calls / events
    profile.total = sum(profile.own.values())
    return profile


def _comparison_lines(report: ProfileReport) -> list[str]:
    """Both protocols side by side: where HTTP/2 saves and where it pays, per event."""
    if len(report.by_protocol) < len(PROTOCOLS):
        return []
    profiles = [report.by_protocol[p] for p in PROTOCOLS]
    layers = sorted(
        {name for p in profiles for name, _ in p.layers.most_common(8)},
        key=lambda name: -max(p.layers[name] / p.total for p in profiles),
    )

    def cells(values: Iterable[float]) -> str:
        # A share of a profile, times the client CPU per event of its run.
        return " | ".join(
            f"{1e6 * v / p.total * p.cpu_per_event:.0f}"
            for v, p in zip(values, profiles, strict=True)
        )

    def inclusive(profile: Profile, wanted: str) -> float:
        return max(
            (
                value
                for key, value in profile.inclusive.items()
                if key[0].startswith("httpcore/")
                and profile.names[key].rsplit(".", 1)[-1] == wanted
            ),
            default=0.0,
        )

    how = (
        "each layer's share of the py-spy samples times the client CPU per event of that run"
        if profiles[0].source == "py-spy samples"
        else "under cProfile, which slows the client several times over, and more so for code "
        "that makes many small calls"
    )
    lines = [
        "",
        f"Both protocols, one profiled run each, µs of client CPU per event ({how}):",
        "",
        "| | " + " | ".join(PROTOCOLS.values()) + " |",
        "|---|" + "---|" * len(PROTOCOLS),
        f"| all | {cells(p.total for p in profiles)} |",
    ]
    lines += [f"| {name} (self) | {cells(p.layers[name] for p in profiles)} |" for name in layers]
    for wanted in ("_assign_requests_to_connections", "has_expired"):
        values = [inclusive(p, wanted) for p in profiles]
        lines.append(f"| `{wanted}` (httpcore, inclusive) | {cells(values)} |")
    if all(p.calls for p in profiles):
        calls = " | ".join(f"{sum(p.calls.values()):.0f}" for p in profiles)
        lines.append(f"| Python function calls per event (cProfile) | {calls} |")
    return lines


def _profile_notes(profile: Profile) -> list[str]:
    """What the shares and counts in the profile tables mean."""
    notes = [
        "Shares are of the client's main thread; *self* is time in the function itself, "
        "*inclusive* with what it calls."
    ]
    if profile.source == "py-spy samples":
        completed = 100 * (1 - profile.unresolved / profile.total) if profile.total else 0
        notes[0] += (
            " Without pausing the client, py-spy often reads only the inner part of a stack; "
            "for inclusive time such a stack is completed with the most frequent full path to "
            f"its outermost frame ({completed:.0f} % of the samples are full or completed)."
        )
        if profile.other_threads:
            notes[0] += (
                f" {profile.other_threads:,.0f} samples of an idle executor thread (asyncio's "
                "getaddrinfo) are left out."
            )
    if profile.calls:
        notes[0] += (
            " *Calls per event* is cProfile's exact count, in which an `async def` counts once "
            "per resumption."
        )
    return notes


def _profile_lines(profile: Profile, top: int = 15) -> list[str]:
    def pct(key: FunctionKey, counts: Counter[FunctionKey]) -> str:
        return f"{100 * counts[key] / profile.total:.1f} %"

    def row(key: FunctionKey) -> str:
        file, _ = key
        calls = profile.calls.get(key)
        shown = "?" if calls is None else f"{calls:.1f}"
        own, inclusive = pct(key, profile.own), pct(key, profile.inclusive)
        return f"| `{profile.names[key]}` ({file}) | {own} | {inclusive} | {shown} |"

    header = ["| function | self | inclusive | calls per event |", "|---|---|---|---|"]
    lines = ["| layer | self |", "|---|---|"]
    lines += [
        f"| {name} | {100 * value / profile.total:.1f} % |"
        for name, value in profile.layers.most_common(10)
    ]
    lines += ["", "Top functions by self time:", "", *header]
    lines += [row(key) for key, _ in profile.own.most_common(top)]
    in_stack = [
        key
        for key, _ in profile.inclusive.most_common()
        if key[0].startswith(_STACK_LAYERS) and not key[0].startswith("commet_middleware/")
    ]
    lines += ["", "The HTTP stack's functions by inclusive time:", "", *header]
    lines += [row(key) for key in in_stack[:top]]
    return lines


# --- the orchestrator ------------------------------------------------------------------------


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv]


def _client_argv(url: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.sender_http",
        "--client",
        url,
        "--events",
        str(args.events),
        "--rounds",
        str(args.rounds),
        "--concurrency",
        str(args.concurrency),
        "--warmup",
        str(args.warmup),
        *extra,
    ]


def _records(lines: Iterable[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def _client_with_handshake(
    argv: list[str], attach: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Run a profiling client: ``attach`` its pid once it is warm, then let it send."""
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as c:
        assert c.stdin is not None
        assert c.stdout is not None
        ready = json.loads(c.stdout.readline())
        if attach is not None:
            attach(ready["ready"])
        c.stdin.write("go\n")
        c.stdin.flush()
        run: dict[str, Any] = _records(c.stdout)[-1]["run"]
    return run


def _py_spy_profile(
    url: str, args: argparse.Namespace, protocol: str, workdir: Path, py_spy: str
) -> Profile | None:
    raw = workdir / f"client-{protocol}.py-spy.txt"
    spy: subprocess.Popen[str] | None = None

    def attach(pid: int) -> None:
        nonlocal spy
        # --nonblocking: pausing the client for each sample (the default) lands most samples
        # just after a system call here (getpid in asyncio's get_running_loop, getpeername,
        # poll), a bias cProfile and the non-pausing samples both contradict. --function: frames
        # carry their function's first line, as cProfile's do. On core 1, off the client's core.
        spy_argv = [py_spy, "record", "-r", "500", "-f", "raw", "--nonblocking", "--function"]
        spy_argv += ["-o", str(raw), "--pid", str(pid)]
        spy = subprocess.Popen(
            _pinned(1, spy_argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        time.sleep(1.0)  # let it attach

    spied = argparse.Namespace(**{**vars(args), "events": args.profile_events})
    argv = _client_argv(url, spied, "--profile", "py-spy", "--profile-protocol", protocol)
    run = _client_with_handshake(_pinned(0, argv), attach)
    assert spy is not None
    _, spy_err = spy.communicate(timeout=60)
    if spy.returncode != 0 or not raw.exists() or raw.stat().st_size == 0:
        reason = spy_err.strip()[-200:]
        print(f"py-spy could not record ({reason}); using cProfile", file=sys.stderr)
        return None
    profile = _from_py_spy(raw)
    profile.cpu_per_event = run["cpu_s"] / run["events"]
    return profile


def _cprofile_profile(
    url: str, args: argparse.Namespace, protocol: str, workdir: Path
) -> Profile | None:
    stats_file = workdir / f"client-{protocol}.pstats"
    argv = _client_argv(url, args, "--profile", "cprofile", "--profile-out", str(stats_file))
    run = _client_with_handshake(_pinned(0, [*argv, "--profile-protocol", protocol]))
    if not stats_file.exists():
        return None
    profile = _from_cprofile(stats_file, args.events)
    profile.cpu_per_event = run["cpu_s"] / run["events"]
    return profile


def _profile_run(url: str, args: argparse.Namespace, workdir: Path) -> ProfileReport | None:
    """Profile one run per protocol with py-spy (else cProfile); count calls with cProfile."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # cProfile slows the client down several times, so its shares are skewed towards code that
    # makes many small calls (h2 and hpack more than h11); its call counts are exact.
    counted = argparse.Namespace(**{**vars(args), "events": min(args.profile_events, 5_000)})
    by_protocol: dict[str, Profile] = {}
    for protocol in PROTOCOLS:
        sampled = None
        if Path(py_spy).exists():
            sampled = _py_spy_profile(url, args, protocol, workdir, py_spy)
        exact = _cprofile_profile(url, counted, protocol, workdir)
        if sampled is None:
            sampled = exact
        elif exact is not None:
            sampled.calls = exact.calls
        if sampled is not None:
            by_protocol[protocol] = sampled
    if "http1" not in by_protocol:
        return None
    if by_protocol["http1"].source == "py-spy samples":
        note = (
            f"py-spy `record -r 500 -f raw --nonblocking --function`, {args.profile_events} "
            f"events, {by_protocol['http1'].total:,.0f} samples of the main thread; calls per "
            f"event counted by cProfile over {counted.events} events"
        )
    else:
        note = f"cProfile (py-spy could not record), {counted.events} events"
    return ProfileReport(by_protocol, note)


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _report(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    encoding: dict[str, float],
    profile: ProfileReport | None,
    load: tuple[str, str],
) -> list[str]:
    by_protocol = {p: [r for r in runs if r["protocol"] == p] for p in PROTOCOLS}
    http1_cpu = {r["round"]: r["cpu_s"] / r["events"] for r in by_protocol["http1"]}
    lines = ["## sender_http: HTTP/1.1 against HTTP/2", ""]
    lines.append(
        f"`.venv/bin/python -m bench.sender_http --events {args.events} --rounds {args.rounds} "
        f"--concurrency {args.concurrency}` (warm-up {args.warmup} events per run, not measured)"
    )
    lines += [
        "",
        f"Machine: {os.cpu_count()} cores ({_cpu_model()}), shared with other jobs (load average "
        f"{load[0]} before, {load[1]} after); client on core 0, server (Hypercorn "
        f"{_version('hypercorn')}) on core 1. Python {platform.python_version()}, httpx "
        f"{_version('httpx')}, httpcore {_version('httpcore')}, h11 {_version('h11')}, h2 "
        f"{_version('h2')}. Absolute figures move with the load; the ratios are taken within "
        "each round, the two protocols side by side.",
        "",
        "| protocol | client CPU µs/event (median) | vs HTTP/1.1 (median of per-round ratios) "
        "| events/s (median) | server CPU µs/event (median) | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for protocol, label in PROTOCOLS.items():
        mine = by_protocol[protocol]
        if not mine:
            continue
        cpu = _median(r["cpu_s"] / r["events"] * 1e6 for r in mine)
        ratio = _median(r["cpu_s"] / r["events"] / http1_cpu[r["round"]] for r in mine)
        rate = _median(r["events"] / r["wall_s"] for r in mine)
        server = _median(r["server_cpu_s"] / r["events"] * 1e6 for r in mine)
        lines.append(
            f"| {label} | {cpu:.1f} | {ratio:.2f}x | {rate:,.0f} | {server:.1f} | {len(mine)} |"
        )
    ratios = sorted(r["cpu_s"] / r["events"] / http1_cpu[r["round"]] for r in by_protocol["http2"])
    rates = {p: {r["round"]: r["events"] / r["wall_s"] for r in by_protocol[p]} for p in PROTOCOLS}
    rate_ratios = sorted(rates["http2"][n] / rates["http1"][n] for n in rates["http2"])
    lines += [
        "",
        "HTTP/2 against HTTP/1.1 in each round, sorted: client CPU per event "
        + ", ".join(f"{x:.2f}" for x in ratios)
        + "; events/s "
        + ", ".join(f"{x:.2f}" for x in rate_ratios)
        + ".",
    ]
    http1 = _median(http1_cpu.values()) * 1e6
    lines += [
        "",
        f"JSON encoding per event (`default_encoder`, done once per event before the send, not "
        f"in the figures above): {encoding['default_encoder'] * 1e6:.2f} µs "
        f"(`_wire.encode_body` alone: {encoding['encode_body'] * 1e6:.2f} µs), "
        f"{100 * encoding['default_encoder'] * 1e6 / http1:.1f} % of the HTTP/1.1 send.",
    ]
    failed = [r for r in runs if not r["ok"]]
    lines += [
        "",
        f"Check: {len(runs) - len(failed)} of {len(runs)} runs delivered every event over the "
        "protocol they meant (server-side count per HTTP version, no failed send).",
    ]
    if profile is not None:
        summary = profile.main
        lines += ["", f"Profile of the HTTP/1.1 client: {profile.note}.", ""]
        lines += [*_profile_notes(summary), "", "Self time by layer:", "", *_profile_lines(summary)]
        lines += _comparison_lines(profile)
    return lines


def _orchestrate(args: argparse.Namespace) -> int:
    if shutil.which("taskset") is None:
        print("taskset is needed (util-linux) to pin the client and the server", file=sys.stderr)
        return 2
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    server_argv = _pinned(1, [sys.executable, "-m", "bench.sender_http", "--serve"])
    with (
        subprocess.Popen(server_argv, stdout=subprocess.PIPE, text=True) as server,
        tempfile.TemporaryDirectory(prefix="sender_http-") as tmp,
    ):
        try:
            assert server.stdout is not None
            url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
            workdir = Path(args.keep_profile or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            argv = _pinned(0, _client_argv(url, args))
            done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
            records = _records(done.stdout.splitlines())
            encoding = next(r["encoding"] for r in records if "encoding" in r)
            runs = [r["run"] for r in records if "run" in r]
            profile = None if args.no_profile else _profile_run(url, args, workdir)
        finally:
            server.terminate()
            server.wait(10)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("\n".join(_report(args, runs, encoding, profile, (load_before, load_after))))
    return 0 if all(r["ok"] for r in runs) else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sender_http", description=__doc__)
    parser.add_argument("--events", type=int, default=5_000, help="measured events per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8, help="sends in flight")
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured events per run")
    parser.add_argument("--profile-events", type=int, default=10_000)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--keep-profile", metavar="DIR", help="keep the raw profile in DIR")
    # The child processes' modes.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=["py-spy", "cprofile"], help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    parser.add_argument("--profile-protocol", default="http1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.client:
        asyncio.run(_client_main(args))
        return 0
    return _orchestrate(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
