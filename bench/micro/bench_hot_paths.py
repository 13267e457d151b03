"""Micro-benchmarks of the per-request and per-event hot paths, with pytest-benchmark.

Not collected by the test suite (``testpaths`` is ``tests``; these files are ``bench_*.py``).
Run them explicitly:

    .venv/bin/python -m pytest bench/micro/bench_hot_paths.py -q -p no:cacheprovider

What each measures:
- enqueue: ``DeliveryQueue.enqueue`` of one usage event while a no-op sender drains the queue
  in its daemon thread (so the GIL is shared, as in a WSGI worker); and the same into an
  aggregating queue (``aggregate_window=0.5``), whose sender seals a window twice a second.
- key derivation: ``derive_idempotency_key`` (sha256) and ``new_request_id`` (a per-process
  nonce and a counter), both
  paid once per billed event / per request.
- customer resolution: ``from_header`` on an ASGI scope with 10 headers, the customer's last.
- a warm quota check: ``QuotaGate.check_cached`` from a fresh cached allowance (what
  ``@quota_guard`` on an async endpoint does first), its reservation released again.
- one ``@metered`` call in a request context with a list sink: set the context var, call the
  decorated function, settle (builds the ``UsageEvent``), reset.
- per-event sender costs: encoding the request body, and httpcore's async-library sniff, which
  the sender's HTTP client runs several times per request (it imports ``sniffio``; a failed
  import is not cached, so without sniffio installed each call searches ``sys.path``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from commet_middleware import CommetSettings, UsageEvent, metered
from commet_middleware._keys import derive_idempotency_key, new_request_id
from commet_middleware._models import Operation
from commet_middleware._results import QuotaAllowance
from commet_middleware._wire import encode_body
from commet_middleware.billing._context import RequestContext, _current
from commet_middleware.customers import from_header
from commet_middleware.delivery import DeliveryQueue
from commet_middleware.quota import QuotaGate

SEED = "request\x1f" + "0" * 32


class NoopSender:
    async def send_once(self, operation: Operation, *, request_body: bytes | None = None) -> None:
        return None


class ListSink:
    def __init__(self) -> None:
        self.events: list[Operation] = []

    def enqueue(self, operation: Operation, /) -> None:
        self.events.append(operation)


@pytest.fixture
def queue() -> Iterator[DeliveryQueue]:
    # A limit no run reaches, so overflow never blocks; the sender drains concurrently.
    q = DeliveryQueue(
        CommetSettings(queue_limit=50_000_000),
        sender_factory=lambda settings: NoopSender(),
        encoder=lambda operation, dialect: b"{}",
    )
    q.start()
    yield q
    q.close(30)


def test_enqueue(benchmark: Any, queue: DeliveryQueue) -> None:
    event = UsageEvent.create("cus_1", "api_calls", 1, idempotency_key="cm_bench")
    benchmark(queue.enqueue, event)


def test_enqueue_aggregated(benchmark: Any) -> None:
    q = DeliveryQueue(
        CommetSettings(queue_limit=50_000_000, aggregate_window=0.5),
        sender_factory=lambda settings: NoopSender(),
        encoder=lambda operation, dialect: b"{}",
    )
    q.start()
    event = UsageEvent.create("cus_1", "api_calls", 1, idempotency_key="cm_bench")
    try:
        benchmark(q.enqueue, event)
    finally:
        q.close(30)


def test_quota_check_warm(benchmark: Any) -> None:
    gate = QuotaGate(CommetSettings(api_key="ck_bench", base_url="http://127.0.0.1:9"))
    gate.cache.put("cus_1", "tasks", QuotaAllowance("tasks", 0, 10**12, 10**12))

    def check() -> None:
        decision = gate.check_cached("cus_1", "tasks")
        assert decision is not None
        assert decision.reservation is not None
        gate.release(decision.reservation)

    try:
        benchmark(check)
    finally:
        gate.close()


def test_derive_idempotency_key(benchmark: Any) -> None:
    benchmark(derive_idempotency_key, SEED, "api_calls", 1)


def test_new_request_id(benchmark: Any) -> None:
    benchmark(new_request_id)


def test_resolve_customer_from_header(benchmark: Any) -> None:
    headers = [(f"x-header-{i}".encode(), b"value") for i in range(9)]
    scope = {"type": "http", "headers": [*headers, (b"x-customer-id", b"bench_customer")]}
    resolve = from_header("X-Customer-Id")
    assert resolve(scope) == "bench_customer"
    benchmark(resolve, scope)


def test_metered_call_in_request(benchmark: Any) -> None:
    sink = ListSink()

    @metered("api_calls")
    def endpoint() -> dict[str, str]:
        return {"message": "hello"}

    def one_request() -> None:
        ctx = RequestContext(sink=sink, customer_id="bench_customer")
        token = _current.set(ctx)
        try:
            endpoint()
        finally:
            _current.reset(token)
        ctx.settle(billable=True)

    benchmark(one_request)
    assert sink.events


def test_encode_body(benchmark: Any) -> None:
    event = UsageEvent.create("bench_customer", "api_calls", 1, idempotency_key="cm_bench")
    benchmark(encode_body, event, "v1")


def test_httpcore_async_library_sniff_x100(benchmark: Any) -> None:
    from httpcore._synchronization import current_async_library

    loop = asyncio.new_event_loop()

    async def sniff_100() -> None:
        for _ in range(100):
            current_async_library()

    try:
        # 100 calls inside one running loop (sniffio needs one): divide the figure by 100.
        benchmark(lambda: loop.run_until_complete(sniff_100()))
    finally:
        loop.close()
