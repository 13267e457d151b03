"""The vendor end of the HTTP benchmark: a local server that every case delivers to, and counts.

    python -m bench.http.sink --port N [--emulator CATALOGUE.toml]

Default: a minimal counting sink on raw asyncio + httptools, cheap enough not to be the
bottleneck while it shares a core with wrk. It answers every request at once (201 with a
``usage_event`` body on Commet's usage path, 200 ``{}`` anywhere else, which is what the peers'
exporters accept) and counts requests per path and distinct ``Idempotency-Key`` values.

``--emulator``: the real Commet emulator (``FakeCommet`` loaded from the catalogue, under
uvicorn), so events are validated against the benchmark's customers and features; slower.

Either way ``GET /__bench/stats`` answers ``{"commet_events": N, "requests": {path: N}}``:
``commet_events`` is distinct idempotency keys the sink accepted (the emulator: events it
recorded, so a duplicate delivery is not counted twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections import Counter
from typing import Any

STATS_PATH = "/__bench/stats"
_USAGE_BODY = json.dumps({"object": "usage_event"}).encode()


class CountingSink:
    """What the counting sink has seen; one per process."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.keys: set[str] = set()

    def stats(self) -> bytes:
        return json.dumps(
            {"commet_events": len(self.keys), "requests": dict(self.requests)}
        ).encode()


class _Protocol(asyncio.Protocol):
    """One keep-alive connection: parse with httptools, answer each request when it ends."""

    def __init__(self, sink: CountingSink) -> None:
        import httptools

        self.sink = sink
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.key: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.key = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"idempotency-key":
            self.key = value.decode("latin-1")

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        if path == STATS_PATH:
            status, body = b"200 OK", self.sink.stats()
        else:
            self.sink.requests[path] += 1
            if path.endswith("/usage/events"):
                if self.key is not None:
                    self.sink.keys.add(self.key)
                status, body = b"201 Created", _USAGE_BODY
            else:
                status, body = b"200 OK", b"{}"
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve_counting(host: str, port: int) -> None:
    sink = CountingSink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Protocol(sink), host, port, backlog=1024)
    print(f"sink on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def emulator_app(catalogue: str) -> Any:
    """The Commet emulator loaded from ``catalogue``, plus the stats route."""
    from commet_middleware.testing import FakeCommet

    fake = FakeCommet.from_catalogue(catalogue)
    inner = fake.app

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == STATS_PATH:
            requests = Counter(r.path for r in fake.requests)
            body = json.dumps(
                {"commet_events": len(fake.events()), "requests": dict(requests)}
            ).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        await inner(scope, receive, send)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http.sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--emulator", metavar="CATALOGUE", default=None)
    args = parser.parse_args(argv)
    if args.emulator:
        import uvicorn

        print(f"emulator on http://{args.host}:{args.port}", flush=True)
        uvicorn.run(
            emulator_app(args.emulator),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_counting(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
