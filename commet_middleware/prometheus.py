"""Prometheus metrics of the Commet middlewares of a process (the `prometheus` extra).

``CommetCollector`` reads, at each scrape, the counters every live middleware already keeps
(``stats``, its delivery queue's ``stats()`` and ``aggregation_stats()``, its quota gate's
decisions, its spool's row counts) and sums them over the middlewares of the process::

    from prometheus_client import REGISTRY
    from commet_middleware.prometheus import CommetCollector

    REGISTRY.register(CommetCollector())

Nothing is counted twice and nothing runs on the request path: the collector only reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._live import live_middlewares

__all__ = ["CommetCollector"]

# DeliveryStats fields: totals since the queue started (counters), then gauges.
_DELIVERY_COUNTERS = {
    "queued": "operations accepted by the delivery queue",
    "sent": "operations Commet accepted (duplicates included)",
    "retried": "sends retried after a transient failure",
    "duplicates": "operations Commet had already recorded (a resend under the same key)",
    "dead_lettered": "operations Commet refused for good (dead letters)",
    "dropped": "operations lost: dropped by overflow='drop' or never delivered at close",
}
_DELIVERY_GAUGES = {
    "in_flight": "sends waiting for Commet's answer",
    "pending": "operations accepted and not yet finished",
    "queue_depth": "places taken in the queue (a fold of many events is one)",
}


class CommetCollector(Collector):
    """A prometheus-client collector summing the counters of the process's middlewares.

    ``middlewares`` (a callable returning them) defaults to every middleware alive in the
    process; pass your own to export one app's only.
    """

    def __init__(self, middlewares: Callable[[], Iterable[Any]] | None = None) -> None:
        self._middlewares = middlewares or live_middlewares

    def collect(self) -> Iterator[Metric]:
        """Yield the metrics, read now."""
        delivery: Counter[str] = Counter()
        aggregation: Counter[str] = Counter()
        spool: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        quota: Counter[str] = Counter()
        seen_sinks: set[int] = set()
        for middleware in self._middlewares():
            requests.update(middleware.stats.as_dict())
            gate_stats = getattr(getattr(middleware, "gate", None), "stats", None)
            if gate_stats is not None:
                quota.update(gate_stats.snapshot())
            sink = middleware.sink
            if id(sink) in seen_sinks:
                continue  # two middlewares sharing one queue: count it once
            seen_sinks.add(id(sink))
            _read_sink(sink, delivery, aggregation, spool)
        for name, doc in _DELIVERY_COUNTERS.items():
            yield CounterMetricFamily(f"commet_delivery_{name}", doc, value=delivery[name])
        for name, doc in _DELIVERY_GAUGES.items():
            yield GaugeMetricFamily(f"commet_delivery_{name}", doc, value=delivery[name])
        yield CounterMetricFamily(
            "commet_aggregated_members",
            "usage events and quota adds taken into an aggregate",
            value=aggregation["aggregated_members"],
        )
        yield CounterMetricFamily(
            "commet_aggregates_sent",
            "aggregates of two or more members Commet accepted",
            value=aggregation["aggregates_sent"],
        )
        rows = GaugeMetricFamily(
            "commet_spool_rows", "rows of the durable spool, by state", labels=["state"]
        )
        for state in ("pending", "claimed", "dead"):
            rows.add_metric([state], spool[state])
        yield rows
        metering = CounterMetricFamily(
            "commet_requests",
            "what the middlewares did with requests and usage, by outcome",
            labels=["outcome"],
        )
        for outcome, value in sorted(requests.items()):
            metering.add_metric([outcome], value)
        yield metering
        decisions = CounterMetricFamily(
            "commet_quota_checks",
            "quota guard checks and their outcomes (allowed, refused, degraded_open, ...)",
            labels=["outcome"],
        )
        for outcome, value in sorted(quota.items()):
            decisions.add_metric([outcome], value)
        yield decisions


def _read_sink(
    sink: Any, delivery: Counter[str], aggregation: Counter[str], spool: Counter[str]
) -> None:
    stats = getattr(sink, "stats", None)
    if stats is None:
        return  # a sink of the app's own (sink=): nothing to read
    snapshot = stats()
    for name in (*_DELIVERY_COUNTERS, *_DELIVERY_GAUGES):
        delivery[name] += getattr(snapshot, name, 0)
    aggregation_stats = getattr(sink, "aggregation_stats", None)
    if aggregation_stats is not None:
        folded = aggregation_stats()
        aggregation["aggregated_members"] += folded.aggregated_members
        aggregation["aggregates_sent"] += folded.aggregates_sent
    # The spool's counts through the queue's bridge to it (None without a spool).
    spool_file = getattr(getattr(sink, "_bridge", None), "spool", None)
    if spool_file is not None:
        counts = spool_file.stats()
        spool["pending"] += counts.pending
        spool["claimed"] += counts.claimed
        spool["dead"] += counts.dead
