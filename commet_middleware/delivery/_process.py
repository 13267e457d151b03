"""Process-level hooks of delivery: the live queues, the default queues, exit and fork.

Fork: the HTTP stack is imported up front by the thread that creates a queue or starts its worker,
never by a worker thread, and before any fork (``os.register_at_fork``) every queue stops its
worker thread (see ``_workers``); after it the parent restarts them, and in the child every queue
starts afresh with an empty queue of its own: what the parent had queued is the parent's to
deliver. At exit every queue with work is closed (flushed within ``shutdown_timeout``).
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from commet_middleware._settings import CommetSettings

if TYPE_CHECKING:
    from ._queue import DeliveryQueue

__all__ = [
    "aflush",
    "close_default_queues",
    "default_queue",
    "flush",
    "fork_generation",
    "import_http_stack",
    "live_queues",
]

logger = logging.getLogger("commet_middleware.delivery")

# What the default client imports on first use rather than at import time (httpx imports httpcore
# lazily; httpcore, anyio and the socket layer import their backends on the first request).
_HTTP_STACK_MODULES = (
    "commet_middleware._client",
    "commet_middleware._wire",
    "certifi",
    "encodings.idna",
    "sniffio",
    "httpcore",
    "httpcore._backends.anyio",
    "httpcore._backends.auto",
    "anyio._backends._asyncio",
    "anyio.abc",
    "anyio.lowlevel",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "anyio.to_thread",
)
_http_stack_imported = False


def import_http_stack() -> None:
    """Import what the default client needs, in the calling thread, once per process.

    A worker thread that imports holds the import lock of a half-built module; a fork then
    leaves the child that lock and the half-built module (``partially initialized module``).
    """
    global _http_stack_imported
    if _http_stack_imported:
        return
    for name in _HTTP_STACK_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # another version lays itself out differently: imported on use
            logger.debug("commet: could not import %s ahead of use", name)
    _http_stack_imported = True


# Every queue of this process (each adds itself): the fork and exit hooks visit them.
live_queues: weakref.WeakSet[DeliveryQueue] = weakref.WeakSet()
# Bumped in a forked child, so a queue sees it was inherited without a getpid() system call
# per enqueue (system calls are what a busy request path can least afford; see bench/).
fork_generation = 0
_registry_lock = threading.Lock()
_defaults_by_id: dict[int, DeliveryQueue] = {}
_defaults: list[DeliveryQueue] = []


def default_queue(settings: CommetSettings) -> DeliveryQueue:
    """Return the process-wide queue for ``settings`` (equal settings, same transport and hook)."""
    queue = _defaults_by_id.get(id(settings))
    if queue is not None and queue.settings is settings:
        return queue
    # Imported here: the queue module sits above this one (it registers its queues here).
    from ._queue import DeliveryQueue

    with _registry_lock:
        for queue in _defaults:
            known = queue.settings
            if (
                known == settings
                and known.transport is settings.transport
                and known.dead_letter is settings.dead_letter
            ):
                break
        else:
            queue = DeliveryQueue(settings)
            _defaults.append(queue)
        # The queue holds its settings, so this id cannot be reused while the entry exists.
        _defaults_by_id[id(settings)] = queue
        return queue


def close_default_queues(timeout: float | None = None) -> bool:
    """Close and forget every default queue; True if all delivered everything."""
    with _registry_lock:
        queues = list(_defaults)
        _defaults.clear()
        _defaults_by_id.clear()
    results = [queue.close(timeout) for queue in queues]  # close every one, no short cut
    return all(results)


def flush(timeout: float = 10.0) -> bool:
    """Deliver what every delivery queue of this process holds; False if ``timeout`` ran out.

    For processes whose life is short or not theirs to end: a script, a job worker between jobs,
    a serverless handler before it returns. Call it from plain code or a thread; on an event
    loop, ``await aflush()``. The queues stay usable.
    """
    deadline = time.monotonic() + timeout
    results = [queue.flush(max(deadline - time.monotonic(), 0.0)) for queue in list(live_queues)]
    return all(results)


async def aflush(timeout: float = 10.0) -> bool:
    """Like :func:`flush`, awaited: the event loop goes on serving meanwhile."""
    queues = list(live_queues)
    if not queues:
        return True
    results = await asyncio.gather(*(queue.aflush(timeout) for queue in queues))
    return all(results)


def _close_all_at_exit() -> None:
    for queue in list(live_queues):
        queue._close_at_exit()


_held_queues: list[DeliveryQueue] = []


def _before_fork() -> None:
    for queue in list(live_queues):
        try:
            queue._hold_for_fork()
        except Exception:
            logger.exception("commet: could not stop the delivery sender before a fork")
        _held_queues.append(queue)


def _after_fork_in_parent() -> None:
    queues = list(_held_queues)
    _held_queues.clear()
    for queue in queues:
        try:
            queue._release_after_fork()
        except Exception:
            logger.exception("commet: could not restart the delivery sender after a fork")


def _after_fork_in_child() -> None:
    global _registry_lock, fork_generation
    fork_generation += 1
    _registry_lock = threading.Lock()
    _held_queues.clear()
    for queue in list(live_queues):
        queue._reset_after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
