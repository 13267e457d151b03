"""Background delivery: takes billable operations off the request path and gets them to Commet.

``DeliveryQueue.enqueue`` is a deque append under a lock plus, only when the sender is idle, a
wake-up; it never raises and never waits on the network. One sender per queue drains it with at
most ``settings.max_concurrency`` sends in flight over one pooled client: an asyncio task when
started inside a running event loop (handed to a thread when that loop shuts down), else a
daemon thread running its own loop. Delivery is at
least once on the wire and exactly once in effect (one encoded body and idempotency key per
operation, re-sent on every retry); only what Commet accepted counts as sent.

One job per module, all over one shared state (``_state.QueueState``: the lock, the deque, the
counters, the current worker):

- ``_queue``: ``DeliveryQueue``, admission and overflow, flush and close, the counters' snapshots;
- ``_leftovers``: what a close could not deliver, taken off the queue and reported once;
- ``_items``: the item on its way, the stats, ``UndeliveredError``, the seams' types;
- ``_aggregation``: what an aggregate is (sum, key, timestamp) and the window groups;
- ``_folding``: a sender behind folds waiting events of one group into one exact event;
- ``_pacing``: a sender behind takes partial batches at most every 20 ms, so more of it folds;
- ``_sealing``: places each operation: queued, folded, or held in its window's group;
- ``_reporting``: rate-limited log lines about retries, configuration failures, dead letters;
- ``_ordering``: the per-(customer, feature) turns of quota changes;
- ``_spool_bridge``: everything done with the SQLite spool (spill, claim, settle, leases);
- ``_workers``: the thread worker and the task worker, and the slot that starts them;
- ``_pump``: what a worker runs: take, deliver, retry, finish, split;
- ``_process``: the default queues, ``flush``/``aflush`` of every queue, exit and fork hooks.
"""

from __future__ import annotations

from ._items import (
    AggregationStats,
    DeliveryListener,
    DeliveryStats,
    Encoder,
    OperationSender,
    SenderFactory,
    UndeliveredError,
)
from ._process import aflush, close_default_queues, default_queue, flush
from ._pump import BACKOFF_CAP, MAX_CLIENT_ATTEMPTS, MAX_UNEXPECTED_ATTEMPTS, retry_delay
from ._queue import DeliveryQueue

__all__ = [
    "BACKOFF_CAP",
    "MAX_CLIENT_ATTEMPTS",
    "MAX_UNEXPECTED_ATTEMPTS",
    "AggregationStats",
    "DeliveryListener",
    "DeliveryQueue",
    "DeliveryStats",
    "Encoder",
    "OperationSender",
    "SenderFactory",
    "UndeliveredError",
    "aflush",
    "close_default_queues",
    "default_queue",
    "flush",
    "retry_delay",
]
