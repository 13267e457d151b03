"""The SQLite quota store: one file shared by every process of one host, no server needed.

Each decision is one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock), so processes
reserving at once are serialised by the file, never by check-then-set in Python. Tables are
prefixed ``cm_quota_``, so the file may be the spool's. WAL journal, ``synchronous=NORMAL``:
quota state is rebuilt from Commet if a crash loses the last commits, so no fsync per check.
A lock held longer than ``timeout`` is an outage (``QuotaStoreError``), not a wait.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Literal

from commet_middleware._results import QuotaAllowance

from ._decide import Number, Verdict, decide
from ._reservations import Reservation
from ._store import MISS, IdempotencyState, QuotaStoreError, ReserveMode, StoreOutcome

__all__ = ["SQLiteQuotaStore"]

# How often one process sweeps a key's expired holds and changes out of its sums (seconds).
_SWEEP_EVERY = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cm_quota_allowance (
    customer TEXT NOT NULL, feature TEXT NOT NULL,
    current NUMERIC, included NUMERIC, billed NUMERIC, unlimited INTEGER, overage INTEGER,
    as_of TEXT, fetched_at REAL NOT NULL DEFAULT 0, overlapped INTEGER NOT NULL DEFAULT 0,
    read_until REAL NOT NULL DEFAULT 0,
    held NUMERIC NOT NULL DEFAULT 0, pending NUMERIC NOT NULL DEFAULT 0,
    unconfirmed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (customer, feature)
);
CREATE TABLE IF NOT EXISTS cm_quota_hold (
    id TEXT PRIMARY KEY, customer TEXT NOT NULL, feature TEXT NOT NULL,
    count INTEGER NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cm_quota_hold_key ON cm_quota_hold (customer, feature, expires);
CREATE TABLE IF NOT EXISTS cm_quota_pending (
    key TEXT PRIMARY KEY, customer TEXT NOT NULL, feature TEXT NOT NULL,
    delta NUMERIC NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cm_quota_pending_key ON cm_quota_pending (customer, feature, expires);
CREATE TABLE IF NOT EXISTS cm_quota_idempotency (
    record TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, state TEXT NOT NULL,
    response BLOB, expires REAL NOT NULL
);
"""


class SQLiteQuotaStore:
    """A :class:`QuotaStore` in a SQLite file; thread-safe, fork-safe (reopens in a child)."""

    shared = True

    def __init__(self, path: str, *, timeout: float = 1.0) -> None:
        if not path:
            raise ValueError("the SQLite quota store needs a file path: sqlite:///PATH")
        self.path = path
        self.url = "sqlite://" + path
        # Processes contending for the write lock wait at most this long (a lock held longer is
        # an outage). Never less than a quarter second: a burst of workers is not an outage.
        self.timeout = max(timeout, 0.25)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        # When this process last swept each key's expired entries (see _maybe_sweep).
        self._swept: dict[tuple[str, str], float] = {}

    def __repr__(self) -> str:
        return f"<SQLiteQuotaStore {self.path!r}>"

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                self._drop()
                raise QuotaStoreError(f"the SQLite quota store {self.path!r}: {exc}") from exc
            try:
                yield conn
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise QuotaStoreError(f"the SQLite quota store {self.path!r}: {exc}") from exc
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._drop()
                    raise QuotaStoreError(f"the SQLite quota store {self.path!r}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        # Caller holds the lock. A connection must not cross a fork: a child opens its own.
        pid = os.getpid()
        if self._conn is not None and self._pid == pid:
            return self._conn
        self._conn = None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn = sqlite3.connect(
                    self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
                )
                try:
                    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("PRAGMA synchronous = NORMAL")
                    conn.executescript(_SCHEMA)
                except BaseException:
                    conn.close()
                    raise
                break
            except sqlite3.OperationalError as exc:
                # Workers forked together open the file together: a journal-mode change can
                # answer "locked" at once, without waiting out the busy timeout.
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        self._conn, self._pid = conn, pid
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with suppress(sqlite3.Error):
                conn.close()

    # the state of one key, inside a transaction. The allowance row keeps running sums of the
    # units held and of our unconfirmed changes, so a decision reads one row, however far
    # delivery lags; expired entries leave the sums first (found through an index on expiry).

    def _maybe_sweep(
        self, conn: sqlite3.Connection, customer: str, feature: str, now: float, force: bool
    ) -> bool:
        # Expired leases matter only when a worker died: sweeping once a second per key (and
        # always before a refusal) keeps a fifth of a decision's statements off most requests.
        key = (customer, feature)
        if not force and now - self._swept.get(key, 0.0) < _SWEEP_EVERY:
            return False
        if len(self._swept) >= 10_000:
            self._swept.clear()
        self._swept[key] = now
        self._sweep(conn, customer, feature, now)
        return True

    @staticmethod
    def _sweep(conn: sqlite3.Connection, customer: str, feature: str, now: float) -> None:
        held = conn.execute(
            "SELECT COALESCE(SUM(count), 0), COUNT(*) FROM cm_quota_hold "
            "WHERE customer = ? AND feature = ? AND expires <= ?",
            (customer, feature, now),
        ).fetchone()
        if held[1]:
            conn.execute(
                "DELETE FROM cm_quota_hold WHERE customer = ? AND feature = ? AND expires <= ?",
                (customer, feature, now),
            )
            conn.execute(
                "UPDATE cm_quota_allowance SET held = held - ? WHERE customer = ? AND feature = ?",
                (held[0], customer, feature),
            )
        pending = conn.execute(
            "SELECT COALESCE(SUM(delta), 0), COUNT(*) FROM cm_quota_pending "
            "WHERE customer = ? AND feature = ? AND expires <= ?",
            (customer, feature, now),
        ).fetchone()
        if pending[1]:
            conn.execute(
                "DELETE FROM cm_quota_pending WHERE customer = ? AND feature = ? AND expires <= ?",
                (customer, feature, now),
            )
            conn.execute(
                "UPDATE cm_quota_allowance SET pending = pending - ?, "
                "unconfirmed = unconfirmed - ?, "
                "overlapped = CASE WHEN unconfirmed - ? <= 0 THEN 0 ELSE overlapped END "
                "WHERE customer = ? AND feature = ?",
                (pending[0], pending[1], pending[1], customer, feature),
            )

    @staticmethod
    def _row(
        conn: sqlite3.Connection, customer: str, feature: str
    ) -> tuple[QuotaAllowance | None, float, int, int]:
        # (the allowance with our unconfirmed changes applied, or None; its age's start;
        # the units held; how many changes are unconfirmed)
        row = conn.execute(
            "SELECT current, included, billed, unlimited, overage, as_of, fetched_at, held, "
            "pending, unconfirmed FROM cm_quota_allowance WHERE customer = ? AND feature = ?",
            (customer, feature),
        ).fetchone()
        if row is None:
            return None, 0.0, 0, 0
        current, included, billed, unlimited, overage, as_of, fetched_at, held, pending, n = row
        if included is None:
            return None, fetched_at, int(held), int(n)
        base = QuotaAllowance(
            feature, current, included, None, billed, bool(unlimited), bool(overage), as_of
        )
        return _with_current(base, current + pending), fetched_at, int(held), int(n)

    # the protocol

    def reserve(
        self,
        customer_id: str,
        feature: str,
        count: int,
        *,
        mode: ReserveMode,
        hard_limit: bool,
        ttl: float,
        lease: float,
    ) -> StoreOutcome:
        """Decide from the stored allowance and hold ``count`` units if they fit (atomically)."""
        now = time.time()
        with self._tx() as conn:
            swept = self._maybe_sweep(conn, customer_id, feature, now, force=False)
            allowance, fetched_at, held, _ = self._row(conn, customer_id, feature)
            if mode == "blind":
                conn.execute(
                    "INSERT OR IGNORE INTO cm_quota_allowance (customer, feature) VALUES (?, ?)",
                    (customer_id, feature),
                )
                reservation = self._hold(conn, customer_id, feature, count, now + lease)
                return StoreOutcome("allowed", None, None, held + count, False, reservation)
            if allowance is None or (mode == "fresh" and now - fetched_at >= ttl):
                return MISS

            def verdict_now() -> Verdict:
                assert allowance is not None  # checked above; for mypy inside the closure
                return decide(
                    allowance.current,
                    allowance.included,
                    allowance.unlimited,
                    allowance.overage_enabled,
                    held,
                    count,
                    hard_limit,
                )

            verdict = verdict_now()
            if not verdict.allowed and not swept:
                # A refusal is decided only from sums without expired entries.
                self._maybe_sweep(conn, customer_id, feature, now, force=True)
                allowance, fetched_at, held, _ = self._row(conn, customer_id, feature)
                verdict = verdict_now()
            if not verdict.allowed:
                return StoreOutcome("refused", allowance, verdict.left, held, verdict.enforced)
            reservation = self._hold(conn, customer_id, feature, count, now + lease)
        kind: Literal["allowed"] = "allowed"
        return StoreOutcome(
            kind, allowance, verdict.left, held + count, verdict.enforced, reservation
        )

    @staticmethod
    def _hold(
        conn: sqlite3.Connection, customer: str, feature: str, count: int, expires: float
    ) -> Reservation:
        reservation = Reservation(customer, feature, count)
        conn.execute(
            "INSERT INTO cm_quota_hold (id, customer, feature, count, expires) "
            "VALUES (?, ?, ?, ?, ?)",
            (reservation.id, customer, feature, count, expires),
        )
        conn.execute(
            "UPDATE cm_quota_allowance SET held = held + ? WHERE customer = ? AND feature = ?",
            (count, customer, feature),
        )
        return reservation

    @staticmethod
    def _unhold(conn: sqlite3.Connection, reservation: Reservation) -> bool:
        gone = conn.execute(
            "DELETE FROM cm_quota_hold WHERE id = ? AND expires > ?", (reservation.id, time.time())
        ).rowcount
        if gone != 1:
            return False
        conn.execute(
            "UPDATE cm_quota_allowance SET held = held - ? WHERE customer = ? AND feature = ?",
            (reservation.count, reservation.customer_id, reservation.feature),
        )
        return True

    def claim_read(self, customer_id: str, feature: str, lease: float, ttl: float) -> bool:
        """Take the read claim unless another process holds one, or a fresh allowance is in."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO cm_quota_allowance (customer, feature) VALUES (?, ?)",
                (customer_id, feature),
            )
            taken = conn.execute(
                "UPDATE cm_quota_allowance SET read_until = ? "
                "WHERE customer = ? AND feature = ? AND read_until <= ? AND fetched_at <= ?",
                (now + lease, customer_id, feature, now, now - ttl),
            ).rowcount
        return taken == 1

    def end_read(self, customer_id: str, feature: str) -> None:
        """Give the read claim back."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE cm_quota_allowance SET read_until = 0 WHERE customer = ? AND feature = ?",
                (customer_id, feature),
            )

    def reading(self, customer_id: str, feature: str) -> bool:
        """Return True while a read claim is held."""
        with self._tx(write=False) as conn:
            row = conn.execute(
                "SELECT read_until FROM cm_quota_allowance WHERE customer = ? AND feature = ?",
                (customer_id, feature),
            ).fetchone()
        return row is not None and row[0] > time.time()

    def fresh(self, customer_id: str, feature: str, ttl: float) -> bool:
        """Return True when the stored allowance is younger than ``ttl``."""
        with self._tx(write=False) as conn:
            allowance, fetched_at, _, _ = self._row(conn, customer_id, feature)
        return allowance is not None and time.time() - fetched_at < ttl

    def save_allowance(self, customer_id: str, feature: str, allowance: QuotaAllowance) -> None:
        """Store Commet's answer and end the read claim. While changes of ours are unconfirmed
        the answer may predate some of them: the higher balance is kept."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO cm_quota_allowance (customer, feature) VALUES (?, ?)",
                (customer_id, feature),
            )
            self._maybe_sweep(conn, customer_id, feature, now, force=True)
            conn.execute(
                "UPDATE cm_quota_allowance SET "
                "current = CASE WHEN unconfirmed > 0 AND current IS NOT NULL "
                "THEN MAX(current, ?) ELSE ? END, "
                "included = ?, billed = ?, unlimited = ?, overage = ?, as_of = ?, "
                "fetched_at = ?, read_until = 0 WHERE customer = ? AND feature = ?",
                (
                    allowance.current,
                    allowance.current,
                    allowance.included,
                    allowance.billed_quantity,
                    int(allowance.unlimited),
                    int(allowance.overage_enabled),
                    allowance.as_of,
                    now,
                    customer_id,
                    feature,
                ),
            )

    def commit(self, reservation: Reservation, change_key: str, pending_ttl: float) -> bool:
        """Turn the held units into an unconfirmed change."""
        now = time.time()
        with self._tx() as conn:
            if not self._unhold(conn, reservation):
                return False
            self._add_pending(
                conn,
                reservation.customer_id,
                reservation.feature,
                change_key,
                reservation.count,
                now + pending_ttl,
            )
        return True

    def release(self, reservation: Reservation) -> bool:
        """Give the held units back."""
        with self._tx() as conn:
            return self._unhold(conn, reservation)

    def add_pending(
        self, customer_id: str, feature: str, change_key: str, delta: int, pending_ttl: float
    ) -> None:
        """Count a change of ours as unconfirmed."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO cm_quota_allowance (customer, feature) VALUES (?, ?)",
                (customer_id, feature),
            )
            self._add_pending(conn, customer_id, feature, change_key, delta, now + pending_ttl)

    @staticmethod
    def _add_pending(
        conn: sqlite3.Connection,
        customer: str,
        feature: str,
        change_key: str,
        delta: int,
        expires: float,
    ) -> None:
        added = conn.execute(
            "INSERT OR IGNORE INTO cm_quota_pending (key, customer, feature, delta, expires) "
            "VALUES (?, ?, ?, ?, ?)",
            (change_key, customer, feature, delta, expires),
        ).rowcount
        if added:
            conn.execute(
                "UPDATE cm_quota_allowance SET pending = pending + ?, "
                "unconfirmed = unconfirmed + 1, "
                "overlapped = CASE WHEN unconfirmed + 1 > 1 THEN 1 ELSE overlapped END "
                "WHERE customer = ? AND feature = ?",
                (delta, customer, feature),
            )

    def _settle(
        self, customer_id: str, feature: str, change_key: str, new_balance: Number | None
    ) -> bool:
        # Commet applied the change (new_balance may be None) or never will (forget: below).
        with self._tx() as conn:
            row = conn.execute(
                "SELECT delta FROM cm_quota_pending WHERE key = ?", (change_key,)
            ).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM cm_quota_pending WHERE key = ?", (change_key,))
            conn.execute(
                "UPDATE cm_quota_allowance SET pending = pending - ?, "
                "unconfirmed = unconfirmed - 1 WHERE customer = ? AND feature = ?",
                (row[0], customer_id, feature),
            )
            state = conn.execute(
                "SELECT unconfirmed, overlapped, included IS NOT NULL FROM cm_quota_allowance "
                "WHERE customer = ? AND feature = ?",
                (customer_id, feature),
            ).fetchone()
            left, overlapped, known = state
            exact = bool(known) and left <= 0 and not overlapped and new_balance is not None
            if exact:
                conn.execute(
                    "UPDATE cm_quota_allowance SET current = ? WHERE customer = ? AND feature = ?",
                    (new_balance, customer_id, feature),
                )
            elif known:
                conn.execute(
                    "UPDATE cm_quota_allowance SET current = MAX(current + ?, 0) "
                    "WHERE customer = ? AND feature = ?",
                    (row[0], customer_id, feature),
                )
            if left <= 0:
                conn.execute(
                    "UPDATE cm_quota_allowance SET overlapped = 0 "
                    "WHERE customer = ? AND feature = ?",
                    (customer_id, feature),
                )
        return exact

    def confirm(
        self, customer_id: str, feature: str, change_key: str, new_balance: Number | None
    ) -> bool:
        """Fold a confirmed change into the stored balance."""
        return self._settle(customer_id, feature, change_key, new_balance)

    def forget(self, customer_id: str, feature: str, change_key: str) -> None:
        """Drop the change and make the next check read Commet."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT delta FROM cm_quota_pending WHERE key = ?", (change_key,)
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM cm_quota_pending WHERE key = ?", (change_key,))
                conn.execute(
                    "UPDATE cm_quota_allowance SET pending = pending - ?, "
                    "unconfirmed = unconfirmed - 1 WHERE customer = ? AND feature = ?",
                    (row[0], customer_id, feature),
                )
            conn.execute(
                "UPDATE cm_quota_allowance SET fetched_at = 0, "
                "overlapped = CASE WHEN unconfirmed <= 0 THEN 0 ELSE overlapped END "
                "WHERE customer = ? AND feature = ?",
                (customer_id, feature),
            )

    def in_flight(self, customer_id: str, feature: str) -> int:
        """Return the units held (leases not expired)."""
        with self._tx() as conn:
            self._maybe_sweep(conn, customer_id, feature, time.time(), force=True)
            return self._row(conn, customer_id, feature)[2]

    def last_known(self, customer_id: str, feature: str) -> QuotaAllowance | None:
        """Return the stored allowance with our unconfirmed changes applied."""
        with self._tx() as conn:
            self._maybe_sweep(conn, customer_id, feature, time.time(), force=True)
            return self._row(conn, customer_id, feature)[0]

    def begin_idempotent(self, record: str, fingerprint: str, lease: float) -> IdempotencyState:
        """Claim ``record`` for this request, or say why not."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute(
                "SELECT fingerprint, state, response FROM cm_quota_idempotency "
                "WHERE record = ? AND expires > ?",
                (record, now),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT OR REPLACE INTO cm_quota_idempotency "
                    "(record, fingerprint, state, response, expires) VALUES (?, ?, 'running', "
                    "NULL, ?)",
                    (record, fingerprint, now + lease),
                )
                conn.execute("DELETE FROM cm_quota_idempotency WHERE expires <= ?", (now,))
                return IdempotencyState("new")
        if row[0] != fingerprint:
            return IdempotencyState("reused")
        if row[1] == "running":
            return IdempotencyState("running")
        return IdempotencyState("done", None if row[2] is None else bytes(row[2]))

    def finish_idempotent(
        self, record: str, fingerprint: str, response: bytes | None, ttl: float
    ) -> None:
        """Keep the succeeded request's record for ``ttl`` seconds."""
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO cm_quota_idempotency "
                "(record, fingerprint, state, response, expires) VALUES (?, ?, 'done', ?, ?)",
                (record, fingerprint, response, time.time() + ttl),
            )

    def abandon_idempotent(self, record: str, fingerprint: str) -> None:
        """Forget the failed request's record."""
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM cm_quota_idempotency "
                "WHERE record = ? AND fingerprint = ? AND state = 'running'",
                (record, fingerprint),
            )

    def close(self) -> None:
        """Close this process's connection."""
        with self._lock:
            self._drop()


def _with_current(allowance: QuotaAllowance, current: Number) -> QuotaAllowance:
    from ._decide import with_balance

    return with_balance(allowance, max(current, 0))
