"""The spool writer: one thread per queue that commits spooled operations in groups.

A request does not touch SQLite. ``SpoolBridge.enqueue`` hands its operation to the writer
(:meth:`SpoolWriter.submit`, a list append under the writer's own lock) and gets back the
:class:`GroupCommit` of the group it joined. The writer thread takes whatever has gathered while
its previous commit ran, writes it in one transaction (``Spool.add_many``), lets the bridge place
the committed items in the queue (``publish``: under the queue's lock, so the sender never sends
a row that is not yet durable), and then resolves the group: one ``Event.set`` for the threads
waiting on it (WSGI) and one ``call_soon_threadsafe`` per event loop awaiting it (ASGI), not one
per request. The request's response completes only after that (see ``_asgi`` and ``_wsgi``), so
a crash after a response loses nothing. No linger: groups form by themselves while a commit runs
(``bench/spool_cost.py`` measures both the group sizes and what a request waits).

A group whose transaction failed (disk full, a lock held past the busy timeout) is kept in memory
by ``publish`` as without a spool, and its waiters are released all the same.

Fork: before a fork the writer is held between two groups (never inside SQLite, whose mutexes a
child would inherit); in the child it starts afresh, empty, its thread not started: what the
parent had submitted is the parent's to commit. At exit every writer commits what it holds
before the queues close (``atexit`` runs this module's hook before ``_process``'s: it is
registered later).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Generator
from typing import Any

from commet_middleware._spool import NewRow, Spool

from ._items import Item

__all__ = ["GroupCommit", "Publish", "SpoolWriter"]

logger = logging.getLogger("commet_middleware.delivery")

# How long a fork or the exit hook waits for a writer to finish the group it is committing.
_HOLD_TIMEOUT = 5.0

# Given the committed items with their ``room`` flags and the row ids (None: the transaction
# failed), places them; may return work to run once the group's waiters are released.
Publish = Callable[[list[tuple[Item, bool]], "list[int] | None", "BaseException | None"], Any]


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class GroupCommit:
    """One group's commit, as the requests in it see it: wait for it from a thread or a loop.

    ``done`` turns True once the group's operations are durable in the spool (``durable``) or,
    if the write failed, kept in memory (``durable`` False).
    """

    __slots__ = ("_event", "_futures", "_lock", "done", "durable", "entries", "releases")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.done = False
        self.durable = False
        self.entries: list[tuple[Item, bool]] = []
        self.releases: list[int] = []
        # Made on the first wait of their kind: most groups are awaited from one loop only.
        self._event: threading.Event | None = None
        self._futures: dict[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        return f"<GroupCommit ops={len(self.entries)} done={self.done} durable={self.durable}>"

    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling thread until the group is done; False if ``timeout`` ran out."""
        if self.done:
            return True
        with self._lock:
            if self.done:
                return True
            event = self._event
            if event is None:
                event = self._event = threading.Event()
        return event.wait(timeout)

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait_on_loop().__await__()

    async def _wait_on_loop(self) -> None:
        if self.done:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.done:
                return
            futures = self._futures
            if futures is None:
                futures = self._futures = {}
            future = futures.get(loop)
            if future is None:
                future = futures[loop] = loop.create_future()
        # Shielded: one request cancelled while it waits must not cancel the others' future.
        await asyncio.shield(future)

    def resolve(self, *, durable: bool) -> None:
        """(Writer thread.) Mark the group done and wake everything waiting on it."""
        with self._lock:
            self.durable = durable
            self.done = True
            event, futures = self._event, self._futures
        if event is not None:
            event.set()
        if futures:
            for loop, future in futures.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_set_done, future)


class SpoolWriter:
    """The thread that commits a queue's spooled operations, a group per transaction.

    ``publish`` is the bridge's: it places a committed group's items (see :data:`Publish`).
    ``publishing`` is held from a group's commit until its items are placed; a claim of spooled
    rows holds it too, so it never takes a row committed unclaimed ahead of an older operation
    that is about to be placed.
    """

    # False: every group goes through the thread (the tests that hold a commit use it).
    leads = True

    def __init__(self, spool: Spool, dialect: str, publish: Publish) -> None:
        self._spool = spool
        self._dialect = dialect
        self._publish = publish
        self._fresh()
        _live_writers.add(self)

    def _fresh(self) -> None:
        """Everything a writer runs on, new: at creation and in a forked child."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._open = GroupCommit(self._lock)
        # Groups being committed: by the thread, or by a caller that leads (see ``submit``).
        self._committing = 0
        self._thread: threading.Thread | None = None
        # Held by the thread while it commits and places a group; a fork takes it in between.
        self._busy = threading.Lock()
        self._held = False
        self.publishing = threading.Lock()
        # Groups committed, and operations in them (bench/spool_cost.py reads them).
        self.groups = 0
        self.operations = 0

    def __repr__(self) -> str:
        return f"<SpoolWriter {self._spool.path!r} groups={self.groups}>"

    @property
    def idle(self) -> bool:
        """True if nothing is waiting to be committed nor being committed."""
        open_group = self._open
        return not (self._committing or open_group.entries or open_group.releases)

    def submit(self, item: Item, *, room: bool, may_lead: bool = False) -> GroupCommit | None:
        """Queue ``item`` for the next group (``room``: claimed for this process, placed in the
        queue once committed); return that group.

        None: the group was committed here, before returning. That happens when no writer
        thread can run (interpreter shutdown), and when ``may_lead`` (a thread with no event
        loop: a WSGI worker, which would wait for the commit anyway) finds the writer idle: the
        caller then commits its own group of one instead of waking the writer and waiting for
        it, since two thread hand-offs cost a one-thread worker more than the commit itself
        (``bench/spool_cost.py``); operations arriving meanwhile gather for the writer.
        """
        with self._lock:
            lead = may_lead and self.leads and self.idle
            if lead:
                self._committing += 1
            elif self._ensure_thread():
                group = self._open
                group.entries.append((item, room))
                if len(group.entries) == 1:
                    self._work.notify()
                return group
        group = GroupCommit(threading.Lock())
        group.entries.append((item, room))
        if not lead:
            self._commit(group)
            return None
        try:
            with self._busy:
                self._commit(group)
        finally:
            with self._lock:
                self._committing -= 1
                self._idle.notify_all()
        return None

    def release(self, row_ids: list[int]) -> GroupCommit | None:
        """Give rows back to the spool with the next group; None if it was done here (shutdown)."""
        with self._lock:
            if self._ensure_thread():
                group = self._open
                group.releases.extend(row_ids)
                self._work.notify()
                return group
        group = GroupCommit(threading.Lock())
        group.releases.extend(row_ids)
        self._commit(group)
        return None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything submitted so far is committed; False if ``timeout`` ran out."""
        with self._lock:
            return self._idle.wait_for(lambda: self.idle or self._thread is None, timeout)

    def _ensure_thread(self) -> bool:
        # Lock held.
        thread = self._thread
        if thread is not None and thread.is_alive():
            return True
        thread = threading.Thread(target=self._run, name="commet-spool-writer", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: no new threads
            self._thread = None
            return False
        self._thread = thread
        return True

    def _run(self) -> None:
        lock = self._lock
        while True:
            with lock:
                while not (self._open.entries or self._open.releases):
                    self._work.wait()
                group = self._open
                self._open = GroupCommit(lock)
                self._committing += 1
            try:
                with self._busy:
                    self._commit(group)
            finally:
                with lock:
                    self._committing -= 1
                    self._idle.notify_all()

    def _commit(self, group: GroupCommit) -> None:
        """Give back ``group``'s releases, write its operations, place them, release its waiters."""
        entries, dialect = group.entries, self._dialect
        if group.releases:  # before the group is resolved: a close waits for them
            try:
                self._spool.release(group.releases)
            except Exception:
                logger.exception("commet: could not release spool rows; they wait out their lease")
        follow_up: Any = None
        row_ids: list[int] | None = None
        error: BaseException | None = None
        try:
            with self.publishing:
                if entries:
                    rows: list[NewRow] = [
                        (item.operation, dialect, item.body, room) for item, room in entries
                    ]
                    try:
                        row_ids = self._spool.add_many(rows)
                    except Exception as exc:
                        error = exc
                    self.groups += 1
                    self.operations += len(entries)
                    follow_up = self._publish(entries, row_ids, error)
        except Exception:
            logger.exception("commet: could not place a committed spool group")
            row_ids = None
        finally:
            group.resolve(durable=row_ids is not None)
        if follow_up is not None:
            try:
                follow_up()
            except Exception:
                logger.exception("commet: could not keep a spool group in memory")

    # -- process hooks ---------------------------------------------------------------------

    def _hold(self) -> None:
        """Before a fork: let the group being committed finish, start none until after it."""
        self._held = self._busy.acquire(timeout=_HOLD_TIMEOUT)
        if not self._held:
            logger.error("commet: forking while the spool writer is still committing")

    def _unhold(self) -> None:
        if self._held:
            self._held = False
            self._busy.release()

    def _drain(self) -> None:
        if not self.idle and not self.wait_idle(_HOLD_TIMEOUT):
            logger.error("commet: the spool writer did not finish its last group at exit")


_live_writers: weakref.WeakSet[SpoolWriter] = weakref.WeakSet()


def _before_fork() -> None:
    for writer in list(_live_writers):
        writer._hold()


def _after_fork_in_parent() -> None:
    for writer in list(_live_writers):
        writer._unhold()


def _after_fork_in_child() -> None:
    for writer in list(_live_writers):
        writer._fresh()


def _drain_at_exit() -> None:
    for writer in list(_live_writers):
        writer._drain()


atexit.register(_drain_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
