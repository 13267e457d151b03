"""The sender's lifecycle: a thread worker, a task worker, and the one slot a queue runs them in.

A worker is one generation of the sender: it runs the pump (``_pump``) on one event loop with at
most ``settings.max_concurrency`` sends in flight. A ``TaskWorker`` is a task on the app's running
loop (started inside one); a ``ThreadWorker`` is a daemon thread running a loop of its own. A
worker whose loop or thread has gone away (a test client's loop closed, a fork) is replaced on the
next enqueue or flush, and what it had taken is queued again, never lost.

Fork: a thread that holds a lock when the process forks holds it forever in the child (an import
lock, OpenSSL's locks while it builds an SSL context). So before any fork every worker *thread* of
this process is stopped at an await and joined: what it had taken goes back to the queue (spool
claims stay this process's), and it is restarted after the fork if work is pending. A task worker
on an app's event loop needs nothing: no other thread runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from ._items import Item
from ._state import QueueState

__all__ = ["Run", "TaskWorker", "ThreadWorker", "Worker", "WorkerSlot", "running_loop"]

logger = logging.getLogger("commet_middleware.delivery")

# What a worker runs on its loop (the pump's run loop).
Run = Callable[["Worker"], Coroutine[Any, Any, None]]

# How long a fork waits for a worker thread to stop; it forks anyway afterwards (and says so).
_FORK_JOIN_TIMEOUT = 5.0


def running_loop() -> asyncio.AbstractEventLoop | None:
    """Return the calling thread's running event loop, None outside one."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Worker(ABC):
    """One generation of the sender; replaced, never revived, when it dies.

    The pump reads and updates its fields on the worker's loop; ``owned``, ``in_flight`` and
    ``retrying`` only under the queue's lock.
    """

    # True: the worker runs its own loop in its own thread, so a blocking call may run inline.
    owns_loop: ClassVar[bool] = False

    def __init__(self, max_concurrency: int) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread_id: int | None = None
        # asyncio.Event binds to a loop on first wait, so creating it here is fine.
        self.wakeup = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.free_slots = max_concurrency
        # Items this generation took from the queue and has not finished: on its death they go
        # back to the queue.
        self.owned: set[Item] = set()
        self.in_flight = 0
        self.retrying = 0
        self.retired = False
        # Set before a fork: stop at the next await and put back what it holds (see the pump).
        self.stop_requested = False

    @abstractmethod
    def alive(self) -> bool:
        """True while it can still take and send items."""

    def on_this_thread(self) -> bool:
        """True if called from the thread that runs the worker's loop."""
        return self.thread_id == threading.get_ident()

    def poke(self, *, all_waits: bool = False) -> bool:
        """Wake it from any thread (``all_waits``: a wait for a free slot too).

        False if its loop is closed: it can never wake again and needs replacing.
        """

        def wake() -> None:
            self.wakeup.set()
            if all_waits:
                self.slot_free.set()

        loop = self.loop
        if self.on_this_thread():
            if loop is not None and loop.is_closed():
                return False  # its loop was closed without cancelling it
            wake()
            return True
        if loop is None:
            return True  # still starting: it looks at the queue before it ever waits
        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:  # its loop is closed
            return False
        return True

    def retire(self) -> list[Item]:
        """(Queue lock held.) Mark it retired; return the items it took and has not finished."""
        self.retired = True
        owned = list(self.owned)
        self.owned.clear()
        return owned

    @abstractmethod
    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for it to stop, from any thread but its own."""

    @abstractmethod
    async def wait_stopped(self, timeout: float) -> None:
        """Like :meth:`join`, from an event loop."""


class TaskWorker(Worker):
    """A worker that is a task on the app's running event loop.

    The loop is the app's, and it may end before the process does (``asyncio.run`` in a script
    or a test, a test client without lifespan): ``ended`` is called when the task was cancelled
    by its loop's shutdown, so the slot hands the work to a thread at once rather than leaving
    it until the next enqueue, or exit.
    """

    def __init__(self, max_concurrency: int, *, ended: Callable[[TaskWorker], None]) -> None:
        super().__init__(max_concurrency)
        self.task: asyncio.Task[None] | None = None
        self._ended = ended

    def start(self, loop: asyncio.AbstractEventLoop, run: Run) -> None:
        """Start ``run(self)`` as a task of ``loop``, the calling thread's running loop."""
        self.loop = loop
        self.thread_id = threading.get_ident()
        self.task = loop.create_task(run(self))
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and not (self.retired or self.stop_requested):
            self._ended(self)

    def alive(self) -> bool:
        """True while its task runs on a running loop."""
        if self.retired or self.stop_requested:
            return False
        loop, task = self.loop, self.task
        return loop is not None and task is not None and loop.is_running() and not task.done()

    def join(self, timeout: float) -> None:
        """Nothing to join from a thread: its loop belongs to the app, which runs it down."""

    async def wait_stopped(self, timeout: float) -> None:
        """Wait up to ``timeout`` for its task, if it runs on the calling loop."""
        if self.task is not None and self.loop is asyncio.get_running_loop():
            await asyncio.wait({self.task}, timeout=timeout)


class ThreadWorker(Worker):
    """A worker that is a daemon thread running an event loop of its own."""

    owns_loop = True

    def __init__(self, max_concurrency: int, *, ended: Callable[[ThreadWorker], None]) -> None:
        super().__init__(max_concurrency)
        self.thread: threading.Thread | None = None
        self._ended = ended

    def start(self, run: Run) -> bool:
        """Start the thread running ``run(self)``; False if no thread can start (shutdown)."""
        thread = threading.Thread(
            target=self._main, args=(run,), name="commet-delivery", daemon=True
        )
        self.thread = thread
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: no new threads
            self.retired = True
            return False
        return True

    def _main(self, run: Run) -> None:
        loop = asyncio.new_event_loop()
        try:
            self.loop = loop
            self.thread_id = threading.get_ident()
            loop.run_until_complete(run(self))
        except Exception:
            logger.exception("commet: the delivery thread failed")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
        self._ended(self)

    def alive(self) -> bool:
        """True while its thread runs."""
        if self.retired or self.stop_requested:
            return False
        return self.thread is not None and self.thread.is_alive()

    def stop_for_fork(self) -> None:
        """Ask it to stop at its next await and join it (it puts back what it holds)."""
        thread = self.thread
        if thread is None:
            return
        self.stop_requested = True
        self.poke(all_waits=True)
        thread.join(_FORK_JOIN_TIMEOUT)
        if thread.is_alive():
            logger.error(
                "commet: the delivery thread did not stop within %.0fs before a fork; the "
                "child may inherit a lock it holds",
                _FORK_JOIN_TIMEOUT,
            )

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the thread, unless called from it."""
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    async def wait_stopped(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the thread, off the calling loop."""
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, timeout)


class WorkerSlot:
    """A queue's one current worker (``state.worker``): starts it, replaces a dead one, and
    stops a worker thread for a fork.

    ``prepare_thread`` runs in the starting thread before a worker thread starts (the up-front
    HTTP stack import); ``on_start`` there too, each time a worker is made current;
    ``keep_polling``: a spooled queue's worker also polls, so one stopped for a fork is restarted
    even with nothing pending.
    """

    def __init__(
        self,
        state: QueueState,
        *,
        max_concurrency: int,
        run: Run,
        prepare_thread: Callable[[], None] | None = None,
        keep_polling: bool = False,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self._state = state
        # Told, in the starting thread, each time a worker is made current.
        self._on_start = on_start
        self._max_concurrency = max_concurrency
        self._run = run
        self._prepare_thread = prepare_thread
        self._keep_polling = keep_polling
        self._start_lock = threading.Lock()
        # Set from before a fork until after it, in the parent: _start_lock is held meanwhile.
        self._held_for_fork = False
        self._stopped_for_fork = False

    def ensure(self, *, thread_only: bool = False) -> bool:
        """Make sure a live worker exists; return False if none could be started.

        ``thread_only``: start a thread even on a running loop (restarting a thread worker).
        """
        state = self._state
        with self._start_lock:
            current = state.worker
            if current is not None and current.alive():
                return True
            loop = None if thread_only else running_loop()
            if loop is None and self._prepare_thread is not None:
                self._prepare_thread()  # here, never in the worker thread
            if loop is not None:
                task_worker = TaskWorker(self._max_concurrency, ended=self._task_ended)
                self._install(task_worker, current)
                task_worker.start(loop, self._run)
                return True
            worker = ThreadWorker(self._max_concurrency, ended=self._thread_ended)
            self._install(worker, current)
            if worker.start(self._run):
                return True
            with state.lock:
                if state.worker is worker:
                    state.worker = None
            return False

    def _install(self, worker: Worker, current: Worker | None) -> None:
        """Make ``worker`` the current one; ``current`` (dead) gives its items back."""
        state = self._state
        with state.lock:
            if current is not None:
                state.detach(current, requeue=True)
            state.worker = worker
            state.idle = False
        if self._on_start is not None:
            self._on_start()

    def poke(self, worker: Worker, *, all_waits: bool = False) -> None:
        """Wake ``worker``; replace it if its loop is closed (unless waking it to stop)."""
        if not worker.poke(all_waits=all_waits) and not all_waits:
            self.ensure()

    def nudge(self, worker: Worker | None, wake: bool) -> None:
        """After queueing: start a worker if ``worker`` (read under the lock) is gone, or wake
        it if ``wake`` says it may be waiting."""
        if worker is None or not worker.alive():
            self.ensure()
        elif wake:
            self.poke(worker)

    def _task_ended(self, worker: TaskWorker) -> None:
        """A worker's loop shut down under it: its work goes on in a thread, now."""
        state = self._state
        with state.lock:
            if state.worker is not worker:
                return
            state.detach(worker, requeue=True)
            work = bool(state.pending)
        if work or self._keep_polling:
            try:
                self.ensure(thread_only=True)
            except Exception:
                logger.exception("commet: could not hand the delivery over to a thread")

    def _thread_ended(self, worker: ThreadWorker) -> None:
        if worker.stop_requested and not self._held_for_fork and self._state.pending:
            # Stopped for a fork that did not wait for it: the fork is over, carry on.
            with contextlib.suppress(Exception):
                self.ensure(thread_only=True)

    def hold_for_fork(self) -> None:
        """Before a fork: stop the worker thread and start none until after it."""
        # Held across the fork, so no thread starts a worker in between (released after it).
        self._held_for_fork = self._start_lock.acquire(timeout=_FORK_JOIN_TIMEOUT)
        if not self._held_for_fork:
            logger.error("commet: forking while another thread starts a delivery sender")
        worker = self._state.worker
        if not isinstance(worker, ThreadWorker) or worker.retired:
            return
        thread = worker.thread
        if thread is None or thread is threading.current_thread():
            return  # forked from a listener on the worker's own loop: it is at a safe point
        self._stopped_for_fork = True
        worker.stop_for_fork()

    def release_after_fork(self) -> None:
        """After a fork, in the parent: restart a stopped worker thread if work is pending."""
        if self._held_for_fork:
            self._held_for_fork = False
            self._start_lock.release()
        stopped, self._stopped_for_fork = self._stopped_for_fork, False
        # Eagerly: no later enqueue may come to restart it, and a spool worker also polls.
        if stopped and (self._state.pending or self._keep_polling):
            self.ensure(thread_only=True)
