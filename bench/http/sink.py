"""The vendor end of the HTTP benchmark: a local server that every case delivers to, and counts.

    python -m bench.http.sink --port N [--emulator CATALOGUE.toml]

Default: a minimal counting sink on raw asyncio + httptools, cheap enough not to be the
bottleneck while it shares a core with wrk. It answers every request at once and speaks just
enough of Commet's usage and quota API (both dialects) for our middleware:

- ``POST .../usage/events``: 201 with a ``usage_event`` body. The JSON body is read: the event
  counts once per customer and event key (v1 ``eventId``, legacy ``idempotencyKey``, else the
  ``Idempotency-Key`` header), the first delivery wins and its ``value`` (default 1) is added to
  the usage total; a later one with the same key is a duplicate delivery, counted apart.
- ``GET .../usage/quota?customerId=&featureCode=``: 200 with a ``usage_quota`` allowance of
  ``QUOTA_INCLUDED`` units (no overage, never unlimited), so ``@quota_guard`` always allows.
- ``POST .../usage/quota`` (add), ``POST .../usage/quota/remove`` or ``DELETE .../usage/quota``
  (remove), ``PUT .../usage/quota`` (set): 200 with a ``usage_quota_event``; a change counts once
  per ``Idempotency-Key`` header (the one idempotency the quota bodies have), and a replay gets
  ``Idempotent-Replayed: true`` and the current balance.
- anything else: 200 ``{}``, which is what the peers' exporters accept.

``--emulator``: the real Commet emulator (``FakeCommet`` loaded from the catalogue, under
uvicorn), so events and quota changes are validated against the benchmark's customers and
features; slower.

Either way ``GET /__bench/stats`` answers::

    {"commet_events": N,        distinct usage events recorded
     "usage_total": N,          sum of their values (what aggregation must preserve)
     "duplicate_events": N,     usage deliveries of an already recorded event
     "quota_added": N,          sum of the counts of distinct quota adds
     "quota_fetches": N,        quota allowance reads (GET .../usage/quota)
     "duplicate_quota_changes": N,
     "requests": {path: N}}     every request but the stats, per path
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

STATS_PATH = "/__bench/stats"
# The allowance the counting sink grants every customer: no benchmark gets near it.
QUOTA_INCLUDED = 10**12

_USAGE_BODY = json.dumps({"object": "usage_event"}).encode()
_JSON = b"application/json"


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class CountingSink:
    """What the counting sink has seen, and the quota balances it keeps; one per process."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.event_keys: set[tuple[str, str]] = set()
        self.unkeyed_events = 0
        self.usage_total: int | float = 0
        self.duplicate_events = 0
        self.quota_keys: set[str] = set()
        self.quota_added = 0
        self.quota_fetches = 0
        self.duplicate_quota_changes = 0
        self.balances: dict[tuple[str, str], int] = {}

    def stats(self) -> bytes:
        return json.dumps(
            {
                "commet_events": len(self.event_keys) + self.unkeyed_events,
                "usage_total": self.usage_total,
                "duplicate_events": self.duplicate_events,
                "quota_added": self.quota_added,
                "quota_fetches": self.quota_fetches,
                "duplicate_quota_changes": self.duplicate_quota_changes,
                "requests": dict(self.requests),
            }
        ).encode()

    def record_event(self, body: dict[str, Any], header_key: str | None) -> None:
        """Count one usage event delivery: once per (customer, event key), first one wins."""
        event_key = body.get("eventId") or body.get("idempotencyKey") or header_key
        value = body.get("value", 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"value must be a number, got {value!r}")
        if event_key is None:
            # Nothing to deduplicate by: every delivery is an event (our client always sends one).
            self.unkeyed_events += 1
            self.usage_total += value
            return
        key = (str(body.get("customerId")), str(event_key))
        if key in self.event_keys:
            self.duplicate_events += 1
            return
        self.event_keys.add(key)
        self.usage_total += value

    def allowance(self, customer_id: str, feature: str) -> dict[str, Any]:
        """A UsageQuota for ``feature``: ``QUOTA_INCLUDED`` units, the balance the adds built."""
        current = self.balances.get((customer_id, feature), 0)
        return {
            "featureCode": feature,
            "current": current,
            "included": QUOTA_INCLUDED,
            "remaining": max(QUOTA_INCLUDED - current, 0),
            "billedQuantity": max(current - QUOTA_INCLUDED, 0),
            "unlimited": False,
            "overageEnabled": False,
            "asOf": _iso_now(),
            "object": "usage_quota",
            "livemode": False,
        }

    def change_quota(
        self, action: str, body: dict[str, Any], header_key: str | None
    ) -> tuple[dict[str, Any], bool]:
        """Apply one quota add/remove/set, once per ``Idempotency-Key``; return the
        UsageQuotaEvent and whether it was a replay."""
        customer, feature = str(body.get("customerId")), str(body.get("featureCode"))
        count = int(body.get("count", 1))
        key = (customer, feature)
        previous = self.balances.get(key, 0)
        replayed = header_key is not None and header_key in self.quota_keys
        if replayed:
            self.duplicate_quota_changes += 1
            new = previous
        else:
            if header_key is not None:
                self.quota_keys.add(header_key)
            if action == "add":
                new = previous + count
                self.quota_added += count
            elif action == "remove":
                new = max(previous - count, 0)
            else:
                new = count
            self.balances[key] = new
        now = _iso_now()
        event = {
            "id": f"uqe_bench_{len(self.quota_keys)}",
            "customerId": customer,
            "featureCode": feature,
            "previousBalance": previous,
            "newBalance": new,
            "ts": now,
            "createdAt": now,
            "object": "usage_quota_event",
            "livemode": False,
        }
        return event, replayed

    def answer(
        self, method: bytes, url: bytes, body: bytes, header_key: str | None
    ) -> tuple[bytes, bytes, bytes]:
        """Return (status line, extra header lines, body) for one request."""
        raw_path, _, query = url.partition(b"?")
        path = raw_path.decode("latin-1")
        if path == STATS_PATH:
            return b"200 OK", b"", self.stats()
        self.requests[path] += 1
        try:
            if path.endswith("/usage/events") and method == b"POST":
                self.record_event(json.loads(body), header_key)
                return b"201 Created", b"", _USAGE_BODY
            if path.endswith("/usage/quota") and method == b"GET":
                self.quota_fetches += 1
                params = parse_qs(query.decode("latin-1"))
                allowance = self.allowance(
                    params.get("customerId", [""])[0], params.get("featureCode", [""])[0]
                )
                return b"200 OK", b"", json.dumps(allowance).encode()
            action = _quota_action(path, method)
            if action is not None:
                event, replayed = self.change_quota(action, json.loads(body), header_key)
                extra = b"idempotent-replayed: true\r\n" if replayed else b""
                return b"200 OK", extra, json.dumps(event).encode()
        except (ValueError, TypeError, AttributeError):
            # Not the JSON object the API expects: Commet's answer, so the client dead-letters it
            # and the run's check shows the loss.
            error = {"error": {"type": "validation_error", "code": "invalid_json"}}
            return b"400 Bad Request", b"", json.dumps(error).encode()
        return b"200 OK", b"", b"{}"


def _quota_action(path: str, method: bytes) -> str | None:
    if path.endswith("/usage/quota/remove") and method == b"POST":
        return "remove"
    if path.endswith("/usage/quota"):
        return {b"POST": "add", b"DELETE": "remove", b"PUT": "set"}.get(method)
    return None


class _Protocol(asyncio.Protocol):
    """One keep-alive connection: parse with httptools, answer each request when it ends."""

    def __init__(self, sink: CountingSink) -> None:
        import httptools

        self.sink = sink
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
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
        self.body = []
        self.key = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"idempotency-key":
            self.key = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status, extra, body = self.sink.answer(
            self.parser.get_method(), self.url, b"".join(self.body), self.key
        )
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: " + _JSON + b"\r\n" + extra
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve_counting(host: str, port: int) -> None:
    sink = CountingSink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Protocol(sink), host, port, backlog=1024)
    print(f"sink on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def emulator_stats(fake: Any) -> dict[str, Any]:
    """The stats of the counting sink, read from a ``FakeCommet``'s ledger."""
    events = fake.events()
    requests = fake.requests
    replays = [r for r in requests if r.replayed or r.status == 409]
    return {
        "commet_events": len(events),
        "usage_total": sum(event.value for event in events),
        "duplicate_events": sum(1 for r in replays if r.path.endswith("/usage/events")),
        "quota_added": sum(q.count for q in fake.quota_events() if q.action == "add"),
        "quota_fetches": sum(
            1 for r in requests if r.method == "GET" and r.path.endswith("/usage/quota")
        ),
        "duplicate_quota_changes": sum(1 for r in replays if "/usage/quota" in r.path),
        "requests": dict(Counter(r.path for r in requests)),
    }


def emulator_app(catalogue: str) -> Any:
    """The Commet emulator loaded from ``catalogue``, plus the stats route."""
    from commet_middleware.testing import FakeCommet

    fake = FakeCommet.from_catalogue(catalogue)
    inner = fake.app

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == STATS_PATH:
            body = json.dumps(emulator_stats(fake)).encode()
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
