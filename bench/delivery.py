"""Delivery pipeline: what an enqueue costs the request, and how fast events reach Commet.

    python -m bench delivery [--enqueues N] [--events N] [--concurrency N] [--no-http]

1. Enqueue cost: every call timed on its own (``perf_counter_ns``, whose own cost is printed
   too) while the background sender drains into a no-op sender; median and p99 per enqueue.
2. Throughput: events per second from the first enqueue to ``flush()`` returning, through the
   real ``AsyncCommetClient`` to the local emulator, in process (its httpx transport) and, unless
   ``--no-http``, over real HTTP to the emulator served by uvicorn on 127.0.0.1 in a child
   process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from commet_middleware import CommetSettings, UsageEvent
from commet_middleware._models import Operation
from commet_middleware.delivery import DeliveryQueue


class NoopSender:
    async def send_once(self, operation: Operation, *, request_body: bytes | None = None) -> None:
        return None


def events(n: int, prefix: str) -> list[UsageEvent]:
    return [
        UsageEvent.create("cus_1", "api_calls", 1, idempotency_key=f"{prefix}-{i}")
        for i in range(n)
    ]


def timer_overhead_ns(samples: int = 100_000) -> int:
    clock = time.perf_counter_ns
    costs = []
    for _ in range(samples):
        start = clock()
        costs.append(clock() - start)
    return int(statistics.median(costs))


def bench_enqueue(n: int) -> None:
    queue = DeliveryQueue(
        CommetSettings(queue_limit=n + 1),
        sender_factory=lambda settings: NoopSender(),
        encoder=lambda operation, dialect: b"{}",
    )
    batch = events(n, "enqueue")
    queue.start()
    clock = time.perf_counter_ns
    enqueue = queue.enqueue
    costs = []
    for event in batch:
        start = clock()
        enqueue(event)
        costs.append(clock() - start)
    delivered = queue.close(30)
    costs.sort()
    print(f"enqueue: {n} calls, sender draining in a thread (delivered all: {delivered})")
    print(f"  median {statistics.median(costs):.0f} ns, p99 {costs[int(len(costs) * 0.99)]} ns,")
    print(f"  max {costs[-1]} ns (timer overhead ~{timer_overhead_ns()} ns, not subtracted)")


def bench_throughput(n: int, concurrency: int, *, http: bool) -> None:
    from commet_middleware.testing import FakeCommet

    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_customer("cus_1")

    def run(settings: CommetSettings, label: str) -> None:
        queue = DeliveryQueue(settings)
        batch = events(n, label)
        queue.start()
        start = time.perf_counter()
        for event in batch:
            queue.enqueue(event)
        delivered = queue.flush(120)
        elapsed = time.perf_counter() - start
        queue.close(10)
        stats = queue.stats()
        print(
            f"throughput ({label}): {n} events in {elapsed:.2f} s = {n / elapsed:,.0f} events/s "
            f"(concurrency {concurrency}; delivered all: {delivered}; sent {stats.sent}, "
            f"retried {stats.retried}, dead-lettered {stats.dead_lettered})"
        )

    base = CommetSettings(
        api_key="ck_bench", queue_limit=n + 1, max_concurrency=concurrency, batch_size=100
    )
    run(base.replace(base_url="http://commet.test", transport=fake.transport), "in-process")
    if http:
        # The server runs in its own process so that it does not share the GIL with the sender.
        with subprocess.Popen(
            [sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as server:
            assert server.stdout is not None
            assert server.stdin is not None
            url = server.stdout.readline().strip()
            try:
                run(base.replace(base_url=url), "http")
            finally:
                server.stdin.close()
                server.wait(10)


_SERVE = """
import sys
from commet_middleware.testing import FakeCommet
fake = FakeCommet()
fake.add_feature("api_calls")
fake.add_customer("cus_1")
with fake.serve() as url:
    print(url, flush=True)
    sys.stdin.read()
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench delivery", description=__doc__)
    parser.add_argument("--enqueues", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-http", action="store_true", help="skip the uvicorn run")
    args = parser.parse_args(argv)
    bench_enqueue(args.enqueues)
    bench_throughput(args.events, args.concurrency, http=not args.no_http)
    return 0
