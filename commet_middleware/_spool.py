"""The durable spool: a SQLite file holding every billable operation until Commet accepted it.

WAL journal with ``synchronous=NORMAL``: a spooled operation survives a crash of the process
(SIGKILL included), but the last few commits may be lost on power loss or an operating-system
crash, because a commit is not fsynced until the next WAL checkpoint.

Group commit: the request path does not write here itself. It hands each operation to the
queue's spool writer (``delivery._spool_writer``), a thread that commits whatever has gathered
while its previous commit ran in one transaction (:meth:`Spool.add_many`), and the request waits
for that commit before its response completes. Measured with ``python -m bench spool_cost``
(ext4, SQLite 3.40): a commit per operation costs about 24 us (median, NORMAL) against about
4 us per operation in groups of 100, and none of it runs on the request's thread or event loop.
The writer's connection has automatic checkpoints off, so the fsync of a checkpoint happens on
the sender's commits instead.

Schema (``PRAGMA user_version`` 1):

- ``pending``: one row per operation not yet accepted: its fields as JSON (``operation``), the
  dialect and the encoded request ``body`` (so a replay sends the very same bytes), ``attempts``,
  the last error, and the claim: ``claimed_by`` (``host:pid:random``) and ``lease_until`` (unix
  time). A row is claimable when its lease has expired (``lease_until < now``); claiming sets a
  lease of ``lease_seconds``, which the owner renews while it holds the row (a long send or a
  backoff). A crashed owner stops renewing, so its rows become claimable once the lease runs out;
  a live one never loses a row to another process. Rows leave ``pending`` only when Commet
  accepted them (or answered ``duplicate``), or to ``dead_letter``.
- ``dead_letter``: operations Commet refused for good, with the reason; ``retry_dead`` moves them
  back to ``pending``.

Several processes may share one file: every transaction is short (``BEGIN IMMEDIATE`` for the
read-then-write claim), and ``busy_timeout`` makes a writer wait for another instead of failing.
Each process opens its own connection (after a fork the child reopens the file).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from ._files import SQLITE_COMPANIONS, prepare_private_file
from ._models import Operation, QuotaChange, UsageEvent

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DeadRow",
    "NewRow",
    "Spool",
    "SpoolRow",
    "SpoolSealError",
    "SpoolStats",
    "operation_from_json",
    "operation_to_json",
]

DEFAULT_LEASE_SECONDS = 30.0
_BUSY_TIMEOUT_MS = 5_000
# Rows per INSERT statement: 8 parameters each, under SQLite's oldest limit of 999 parameters.
_ROWS_PER_INSERT = 120
# Bumped in a forked child: a spool notices it was inherited without a getpid() system call
# on every enqueue.
_fork_generation = 0


def _note_fork() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_note_fork)
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    operation TEXT NOT NULL,
    dialect TEXT NOT NULL,
    body BLOB,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    claimed_by TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pending_by_lease ON pending (lease_until, id);
CREATE INDEX IF NOT EXISTS pending_by_owner ON pending (claimed_by);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY,
    idempotency_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    operation TEXT NOT NULL,
    dialect TEXT NOT NULL,
    body BLOB,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""
_COLUMNS = "id, operation, dialect, body, attempts"
_REVIVE = (
    "INSERT INTO pending (idempotency_key, kind, operation, dialect, body, created_at, attempts, "
    "last_error, claimed_by, lease_until) SELECT idempotency_key, kind, operation, dialect, body, "
    "created_at, 0, reason, NULL, 0 FROM dead_letter WHERE id = ?"
)


def operation_to_json(operation: Operation) -> str:
    """Return the operation's fields as compact JSON (what the spool stores)."""
    if isinstance(operation, UsageEvent):
        fields: dict[str, Any] = {
            "kind": "usage",
            "customer_id": operation.customer_id,
            "feature": operation.feature,
            "value": operation.value,
            "idempotency_key": operation.idempotency_key,
            "timestamp": operation.timestamp,
            "properties": [list(pair) for pair in operation.properties],
        }
    else:
        fields = {
            "kind": "quota",
            "customer_id": operation.customer_id,
            "feature": operation.feature,
            "action": operation.action,
            "count": operation.count,
            "idempotency_key": operation.idempotency_key,
        }
    return json.dumps(fields, separators=(",", ":"), sort_keys=True)


def operation_from_json(text: str) -> Operation:
    """Rebuild the operation :func:`operation_to_json` stored, every field as it was."""
    data = json.loads(text)
    if data["kind"] == "usage":
        return UsageEvent(
            customer_id=data["customer_id"],
            feature=data["feature"],
            value=data["value"],
            idempotency_key=data["idempotency_key"],
            timestamp=data["timestamp"],
            properties=tuple((str(k), str(v)) for k, v in data["properties"]),
        )
    return QuotaChange(
        customer_id=data["customer_id"],
        feature=data["feature"],
        action=data["action"],
        count=data["count"],
        idempotency_key=data["idempotency_key"],
    )


class SpoolSealError(Exception):
    """A seal found a member row gone or held by another process; the spool is unchanged."""


@dataclass(frozen=True, slots=True)
class SpoolRow:
    """A claimed row: the operation, the bytes to send, and how often it was tried."""

    row_id: int
    operation: Operation
    dialect: str
    body: bytes | None
    attempts: int


@dataclass(frozen=True, slots=True)
class DeadRow:
    """A dead-lettered row, with why it was given up."""

    row_id: int
    idempotency_key: str
    kind: str
    operation: str
    attempts: int
    failed_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Row counts: waiting (unclaimed or lease expired), claimed (live lease), dead."""

    pending: int
    claimed: int
    dead: int


_Role = Literal["request", "sender"]

NewRow = tuple[Operation, str, bytes | None, bool]
"""A row for :meth:`Spool.add_many`: operation, dialect, encoded body, claimed by this process."""


class _Handle:
    """One connection and the lock that serialises its use."""

    __slots__ = ("conn", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None


class Spool:
    """One process's handle on a spool file; thread-safe, fork-safe (reopens in a child)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        synchronous: Literal["NORMAL", "FULL", "OFF"] = "NORMAL",
    ) -> None:
        self.path = os.fspath(path)
        prepare_private_file(self.path, companions=SQLITE_COMPANIONS)
        self.lease_seconds = lease_seconds
        self._synchronous = synchronous
        self._pid = -1
        self._generation = -1
        self._owner = ""
        self._handles: dict[_Role, _Handle] = {}
        self._ensure_process()

    def __repr__(self) -> str:
        return f"<Spool {self.path!r}>"

    @property
    def owner(self) -> str:
        """This process's claim id (changes after a fork)."""
        self._ensure_process()
        return self._owner

    def _ensure_process(self) -> None:
        if self._generation == _fork_generation:
            return
        self._generation = _fork_generation
        pid = os.getpid()
        if self._pid != pid:
            # Connections and locks must not cross a fork: a child abandons the parent's.
            self._handles = {"request": _Handle(), "sender": _Handle()}
            self._owner = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
            self._pid = pid

    def _open(self, role: _Role) -> sqlite3.Connection:
        # Processes that start together (gunicorn's workers, forked at once) open the file
        # together, and SQLite can answer "database is locked" without waiting out the busy
        # timeout (a journal-mode change or a WAL recovery meeting another connection's): try
        # again within the same timeout rather than lose the first enqueue's spool write.
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                return self._connect(role)
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    def _connect(self, role: _Role) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )  # fmt: skip
        try:
            self._prepare(conn, role)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection, role: _Role) -> None:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # reading takes no lock
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        if role == "request":
            # Checkpoints (which fsync the database) run on the sender's commits, never inside
            # an enqueue.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        with _transaction(conn):
            if conn.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _use(self, role: _Role = "sender") -> Iterator[sqlite3.Connection]:
        # Two connections, each behind its own lock: an enqueue never queues behind the
        # sender's claim or acknowledgement in this process (SQLite's own write lock is short).
        self._ensure_process()
        handle = self._handles[role]
        with handle.lock:
            if handle.conn is None:
                handle.conn = self._open(role)
            yield handle.conn

    def close(self) -> None:
        """Close this process's connections (a later call reopens them)."""
        self._ensure_process()
        for handle in self._handles.values():
            with handle.lock:
                if handle.conn is not None:
                    handle.conn.close()
                handle.conn = None

    # -- the request path ------------------------------------------------------------------

    def add(self, operation: Operation, dialect: str, body: bytes | None, *, claim: bool) -> int:
        """Write one operation (committed before returning); ``claim`` holds it for this process.

        Raises ``sqlite3.Error`` (or ``OSError``) if the write failed.
        """
        return self.add_many([(operation, dialect, body, claim)])[0]

    def add_many(self, entries: Sequence[NewRow]) -> list[int]:
        """Write operations in one transaction (committed before returning); return their ids.

        Each entry is (operation, dialect, encoded body, claim): ``claim`` holds the row for this
        process. All or nothing: raises ``sqlite3.Error`` (or ``OSError``) and writes no row if
        the transaction failed.
        """
        if not entries:
            return []
        now = time.time()
        owner, lease_until = self.owner, now + self.lease_seconds
        rows = [
            (
                operation.idempotency_key,
                operation.kind,
                operation_to_json(operation),
                dialect,
                body,
                now,
                owner if claim else None,
                lease_until if claim else 0.0,
            )
            for operation, dialect, body, claim in entries
        ]
        handle = self._handles["request"]
        with handle.lock:  # what _use does, on the request role's connection
            conn = handle.conn
            if conn is None:
                conn = handle.conn = self._open("request")
            if len(rows) <= _ROWS_PER_INSERT:
                # One statement is its own transaction: one SQLite call, so the writer thread
                # gives the GIL up and takes it back once per group, not once per row (taking it
                # back from a busy event loop can wait a whole switch interval).
                last = self._insert(conn, rows)
            else:
                with _transaction(conn):
                    for start in range(0, len(rows), _ROWS_PER_INSERT):
                        last = self._insert(conn, rows[start : start + _ROWS_PER_INSERT])
        # One writer at a time (the write lock) and AUTOINCREMENT: the ids are consecutive.
        return list(range(last - len(rows) + 1, last + 1))

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert ``rows`` with one statement; return the last row id."""
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
        cursor = conn.execute(
            # Only placeholders are formatted into the statement.
            "INSERT INTO pending (idempotency_key, kind, operation, dialect, body, created_at,"  # noqa: S608
            f" claimed_by, lease_until) VALUES {values}",
            [field for row in rows for field in row],
        )
        last = cursor.lastrowid
        assert last is not None
        return last

    # -- the sender ------------------------------------------------------------------------

    def seal_aggregate(
        self, member_ids: Sequence[int], aggregate: Operation, dialect: str, body: bytes | None
    ) -> int:
        """Replace member rows this process holds by one aggregate row, in one transaction.

        The aggregate row is held by this process. Raises ``SpoolSealError`` (nothing changed)
        if a member row is gone or held by another process, ``sqlite3.Error`` if the write failed.
        """
        now = time.time()
        with self._use() as conn, _transaction(conn):
            deleted = 0
            for member_id in member_ids:
                deleted += conn.execute(
                    "DELETE FROM pending WHERE id = ? AND claimed_by = ?", (member_id, self._owner)
                ).rowcount
            if deleted != len(member_ids):
                raise SpoolSealError(
                    f"{len(member_ids) - deleted} of {len(member_ids)} member rows are no longer "
                    "held by this process"
                )
            cursor = conn.execute(
                "INSERT INTO pending (idempotency_key, kind, operation, dialect, body, created_at,"
                " claimed_by, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    aggregate.idempotency_key,
                    aggregate.kind,
                    operation_to_json(aggregate),
                    dialect,
                    body,
                    now,
                    self._owner,
                    now + self.lease_seconds,
                ),
            )
            row_id = cursor.lastrowid
        assert row_id is not None
        return row_id

    def claim(self, limit: int) -> list[SpoolRow]:
        """Claim up to ``limit`` rows nobody holds (oldest first) for ``lease_seconds``."""
        if limit <= 0:
            return []
        now = time.time()
        with self._use() as conn, _transaction(conn):
            rows = conn.execute(
                # Only constant fragments are formatted into these statements.
                f"SELECT {_COLUMNS} FROM pending WHERE lease_until < ? ORDER BY id LIMIT ?",  # noqa: S608
                (now, limit),
            ).fetchall()
            if rows:
                conn.executemany(
                    "UPDATE pending SET claimed_by = ?, lease_until = ? WHERE id = ?",
                    [(self._owner, now + self.lease_seconds, row[0]) for row in rows],
                )
        return [
            SpoolRow(row_id, operation_from_json(text), dialect, body, attempts)
            for row_id, text, dialect, body, attempts in rows
        ]

    def renew(self) -> int:
        """Extend the lease of every row this process holds; return how many."""
        with self._use() as conn:
            cursor = conn.execute(
                "UPDATE pending SET lease_until = ? WHERE claimed_by = ?",
                (time.time() + self.lease_seconds, self._owner),
            )
            return cursor.rowcount

    def reclaim_dead_owners(self) -> int:
        """Free at once the rows held by processes of this host that no longer exist.

        Only a shortcut: rows of another host, or of a pid that was reused, wait out their lease.
        """
        host = socket.gethostname()
        with self._use() as conn:
            owners = [
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT claimed_by FROM pending "
                    "WHERE claimed_by IS NOT NULL AND lease_until >= ?",
                    (time.time(),),
                )
            ]
            freed = 0
            for owner in owners:
                if owner == self._owner or not _is_dead_local(owner, host):
                    continue
                cursor = conn.execute(
                    "UPDATE pending SET claimed_by = NULL, lease_until = 0 WHERE claimed_by = ?",
                    (owner,),
                )
                freed += cursor.rowcount
            return freed

    def ack(self, row_id: int) -> None:
        """Forget a row Commet accepted."""
        with self._use() as conn:
            conn.execute("DELETE FROM pending WHERE id = ?", (row_id,))

    def note_failure(self, row_id: int, error: str) -> None:
        """Count a failed attempt on a row this process keeps holding (it will retry)."""
        with self._use() as conn:
            conn.execute(
                "UPDATE pending SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                (error[:500], row_id),
            )

    def release(self, row_ids: Sequence[int] | None = None) -> int:
        """Give rows back (all this process holds if None), claimable at once by anyone."""
        with self._use() as conn:
            if row_ids is None:
                cursor = conn.execute(
                    "UPDATE pending SET claimed_by = NULL, lease_until = 0 WHERE claimed_by = ?",
                    (self._owner,),
                )
                return cursor.rowcount
            with _transaction(conn):
                conn.executemany(
                    "UPDATE pending SET claimed_by = NULL, lease_until = 0 WHERE id = ?",
                    [(row_id,) for row_id in row_ids],
                )
            return len(row_ids)

    def bury(self, row_id: int, reason: str) -> None:
        """Move a row to ``dead_letter`` with ``reason``: it is never sent again by itself."""
        with self._use() as conn, _transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO dead_letter (id, idempotency_key, kind, operation, "
                "dialect, body, created_at, attempts, failed_at, reason) "
                "SELECT id, idempotency_key, kind, operation, dialect, body, created_at, "
                "attempts + 1, ?, ? FROM pending WHERE id = ?",
                (time.time(), reason[:2000], row_id),
            )
            conn.execute("DELETE FROM pending WHERE id = ?", (row_id,))

    # -- inspection (the CLI) --------------------------------------------------------------

    def stats(self) -> SpoolStats:
        """Return the row counts."""
        now = time.time()
        with self._use() as conn:
            waiting = conn.execute(
                "SELECT COUNT(*) FROM pending WHERE lease_until < ?", (now,)
            ).fetchone()[0]
            claimed = conn.execute(
                "SELECT COUNT(*) FROM pending WHERE lease_until >= ?", (now,)
            ).fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0]
        return SpoolStats(pending=int(waiting), claimed=int(claimed), dead=int(dead))

    def waiting(self) -> int:
        """Return how many rows nobody holds (what a flush still has to claim)."""
        with self._use() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM pending WHERE lease_until < ?", (time.time(),)
            ).fetchone()
        return int(row[0])

    def dead(self, limit: int | None = None) -> list[DeadRow]:
        """Return the dead-lettered rows, oldest first."""
        with self._use() as conn:
            rows = conn.execute(
                "SELECT id, idempotency_key, kind, operation, attempts, failed_at, reason "
                "FROM dead_letter ORDER BY id LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        return [DeadRow(*row) for row in rows]

    def retry_dead(self, row_ids: Sequence[int] | None = None) -> int:
        """Move dead rows (all if None) back to ``pending``; return how many moved."""
        with self._use() as conn, _transaction(conn):
            if row_ids is None:
                row_ids = [row[0] for row in conn.execute("SELECT id FROM dead_letter ORDER BY id")]
            moved = 0
            for row_id in row_ids:
                conn.execute(_REVIVE, (row_id,))
                moved += conn.execute("DELETE FROM dead_letter WHERE id = ?", (row_id,)).rowcount
            return moved


def _is_dead_local(owner: str, host: str) -> bool:
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists (another user's process) or we cannot tell: keep the lease
    return False


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so a claim's read and write see one state and a
    # busy database is waited for (busy_timeout) at BEGIN rather than failing mid-transaction.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
