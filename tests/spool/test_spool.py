"""The durable spool: written before enqueue returns, removed after acceptance, replayed, shared."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from commet_middleware import CommetAPIError, CommetTransportError
from commet_middleware._spool import Spool, operation_from_json, operation_to_json
from commet_middleware._spool_cli import main as spool_main

from .conftest import (
    DeadLetters,
    QueueFactory,
    RecordingSender,
    encode,
    enqueue_committed,
    event,
    rows,
)

WORKER = str(Path(__file__).with_name("worker.py"))


def test_operation_survives_the_json_round_trip() -> None:
    """Every field of a stored operation comes back as it was."""
    from commet_middleware import QuotaChange, UsageEvent

    usage = UsageEvent.create(
        "cus_1", "ai_tokens", 0.5, idempotency_key="k", properties={"model": "small"}
    )
    quota = QuotaChange.create("cus_1", "tasks", "remove", 3, idempotency_key="q")
    assert operation_from_json(operation_to_json(usage)) == usage
    assert operation_from_json(operation_to_json(quota)) == quota


def test_spooled_once_the_commit_enqueue_returned_is_done(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """When the commit enqueue returned is done, the operation and its bytes are in the file."""
    sender.gate.clear()
    queue = make_queue()
    assert queue._bridge is not None
    queue._bridge.writer.leads = False  # through the writer thread, as on an event loop
    operation = event("k1")
    commit = queue.enqueue(operation)
    assert commit is not None
    assert commit.wait(10)
    assert commit.durable
    assert rows(spool_path) == [("k1", encode(operation, "v1"))]


def test_removed_only_after_acceptance(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """A row stays while its send is in flight and leaves once Commet accepted it."""
    sender.gate.clear()
    queue = make_queue()
    queue.enqueue(event("k1"))
    deadline = time.monotonic() + 5
    while not sender.attempts and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sender.attempts
    assert len(rows(spool_path)) == 1
    sender.gate.set()
    assert queue.flush(5)
    assert rows(spool_path) == []
    assert sender.delivered == ["k1"]


def test_retries_resend_the_spooled_bytes(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """A retried spooled operation is sent with the same bytes every time."""
    sender.failing["k1"] = CommetTransportError("down")
    queue = make_queue()
    queue.enqueue(event("k1"))
    deadline = time.monotonic() + 5
    while len(sender.attempts) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    del sender.failing["k1"]
    assert queue.flush(5)
    bodies = {body for key, body in sender.attempts if key == "k1"}
    assert bodies == {encode(event("k1"), "v1")}
    assert rows(spool_path) == []


def test_replay_after_a_crash_delivers_exactly_once(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """A process killed with claimed rows in flight: a new queue on the file delivers each once."""
    # S603: this interpreter running our own worker script, no outside input.
    subprocess.run([sys.executable, WORKER, "crash", str(spool_path), "20"], check=False)  # noqa: S603
    assert len(rows(spool_path)) == 20
    queue = make_queue()
    queue.start()
    assert queue.flush(10)
    assert sorted(sender.delivered) == sorted(f"crash-{i}" for i in range(20))
    assert rows(spool_path) == []


def test_replay_keeps_the_original_bytes(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """What an earlier process spooled is re-sent byte for byte, not re-encoded."""
    Spool(spool_path).add(event("old"), "v1", b'{"original":true}', claim=False)
    queue = make_queue()
    queue.start()
    assert queue.flush(5)
    assert sender.attempts == [("old", b'{"original":true}')]


def test_processes_sharing_a_spool_never_double_send(tmp_path: Path, spool_path: Path) -> None:
    """Three processes drain one file (backlog plus their own events): each key is sent once."""
    spool = Spool(spool_path)
    backlog = [f"backlog-{i}" for i in range(300)]
    for key in backlog:
        spool.add(event(key), "v1", b"{}", claim=False)
    outs = [tmp_path / f"out{n}.txt" for n in range(3)]
    workers = [
        subprocess.Popen(  # noqa: S603 - our own worker script
            [sys.executable, WORKER, "drain", str(spool_path), str(out), f"p{n}", "100"]
        )
        for n, out in enumerate(outs)
    ]
    assert [worker.wait(120) for worker in workers] == [0, 0, 0]
    sent = Counter(line for out in outs for line in out.read_text().split())
    expected = set(backlog) | {f"p{n}-{i}" for n in range(3) for i in range(100)}
    assert set(sent) == expected
    assert [key for key, times in sent.items() if times > 1] == []
    assert spool.stats().pending == spool.stats().claimed == 0
    # Every process took part in the backlog: the claim really is shared.
    assert all(any(line.startswith("backlog") for line in out.read_text().split()) for out in outs)


def test_a_live_lease_is_respected_and_an_expired_one_reclaimed(spool_path: Path) -> None:
    """Rows another claimer holds are not claimable until its lease runs out."""
    first = Spool(spool_path, lease_seconds=0.3)
    second = Spool(spool_path, lease_seconds=0.3)
    first.add(event("k1"), "v1", b"{}", claim=False)
    assert [row.operation.idempotency_key for row in first.claim(10)] == ["k1"]
    assert second.claim(10) == []
    assert second.stats().claimed == 1
    time.sleep(0.4)
    assert [row.operation.idempotency_key for row in second.claim(10)] == ["k1"]


def test_renewing_a_lease_keeps_the_rows(spool_path: Path) -> None:
    """A claimer that renews keeps its rows past the original lease (a long send)."""
    first = Spool(spool_path, lease_seconds=0.6)
    second = Spool(spool_path, lease_seconds=0.6)
    first.add(event("k1"), "v1", b"{}", claim=True)
    for _ in range(4):
        time.sleep(0.2)
        assert first.renew() == 1
        assert second.claim(10) == []


def test_rows_of_a_dead_local_process_are_freed_at_once(spool_path: Path) -> None:
    """Rows claimed by a process of this host that no longer exists need not wait the lease."""
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    spool = Spool(spool_path, lease_seconds=3600)
    spool.add(event("k1"), "v1", b"{}", claim=False)
    with spool._use() as conn:
        conn.execute(
            "UPDATE pending SET claimed_by = ?, lease_until = 1e12",
            (f"{socket.gethostname()}:{dead.stdout.strip()}:abcd",),
        )
    assert spool.claim(10) == []
    assert spool.reclaim_dead_owners() == 1
    assert len(spool.claim(10)) == 1


def test_poison_operations_go_to_the_dead_letter_table(
    make_queue: QueueFactory,
    sender: RecordingSender,
    dead_letters: DeadLetters,
    spool_path: Path,
) -> None:
    """A non-retryable refusal moves the row to dead_letter with its reason; the hook is called."""
    sender.failing["bad"] = CommetAPIError(404, type="not_found_error", code="customer_not_found")
    queue = make_queue()
    queue.enqueue(event("bad"))
    queue.enqueue(event("good"))
    assert queue.flush(5)
    assert rows(spool_path) == []
    [dead] = Spool(spool_path).dead()
    assert dead.idempotency_key == "bad"
    assert "customer_not_found" in dead.reason
    assert dead_letters.keys == ["bad"]
    assert [key for key, _ in sender.attempts].count("bad") == 1


def test_cli_stats_dead_and_retry(
    make_queue: QueueFactory,
    sender: RecordingSender,
    spool_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """spool stats counts rows, dead lists reasons, retry moves dead rows back to pending."""
    sender.failing["bad"] = CommetAPIError(400, type="billing_error", code="insufficient_balance")
    queue = make_queue()
    queue.enqueue(event("bad"))
    assert queue.flush(5)
    queue.close(1)
    assert spool_main(["spool", "stats", "--path", str(spool_path)]) == 0
    assert capsys.readouterr().out.split() == ["pending", "0", "claimed", "0", "dead", "1"]
    assert spool_main(["spool", "dead", "--path", str(spool_path)]) == 0
    listing = capsys.readouterr().out
    assert "bad" in listing
    assert "insufficient_balance" in listing
    assert spool_main(["spool", "retry", "--path", str(spool_path)]) == 0
    assert "moved 1" in capsys.readouterr().out
    assert Spool(spool_path).stats().pending == 1
    # The revived row is delivered by the next sender.
    del sender.failing["bad"]
    queue.start()
    assert queue.flush(5)
    assert sender.delivered == ["bad"]


def test_cli_runs_as_a_command(spool_path: Path) -> None:
    """The spool commands run in a subprocess and fail clearly on a missing file."""
    Spool(spool_path).add(event("k1"), "v1", b"{}", claim=False)
    command = [sys.executable, "-m", "commet_middleware._spool_cli", "spool"]
    done = subprocess.run(  # noqa: S603 - this interpreter, our own module
        [*command, "stats", "--path", str(spool_path)], capture_output=True, text=True, check=True
    )
    assert done.stdout.split()[:2] == ["pending", "1"]
    missing = subprocess.run(  # noqa: S603 - as above
        [*command, "stats", "--path", str(spool_path) + ".nope"], capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert "no spool file" in missing.stderr


def test_memory_stays_bounded_while_the_spool_grows(
    make_queue: QueueFactory, sender: RecordingSender, spool_path: Path
) -> None:
    """Past queue_limit, operations spill to the spool: pending stays at the limit, none lost."""
    sender.gate.clear()
    queue = make_queue(queue_limit=5, overflow="block")
    for i in range(200):
        enqueue_committed(queue, event(f"k{i}"))
        assert queue.stats().pending <= 5
    assert len(rows(spool_path)) == 200
    assert queue.stats().dropped == 0
    sender.gate.set()
    assert queue.flush(10)
    assert sorted(sender.delivered) == sorted(f"k{i}" for i in range(200))
    assert rows(spool_path) == []


def test_close_leaves_the_undelivered_in_the_spool(
    make_queue: QueueFactory,
    sender: RecordingSender,
    dead_letters: DeadLetters,
    spool_path: Path,
) -> None:
    """A close that times out gives rows back to the spool instead of dead-lettering them."""
    sender.gate.clear()
    queue = make_queue()
    for i in range(3):
        queue.enqueue(event(f"k{i}"))
    assert queue.close(0.1) is False
    assert dead_letters.keys == []
    assert Spool(spool_path).stats().pending == 3  # released: claimable at once


@pytest.mark.filterwarnings("ignore")
def test_an_unwritable_spool_keeps_the_event_in_memory(
    make_queue: QueueFactory,
    sender: RecordingSender,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If the spool cannot be written, the waiter is released, an error logged, and the event
    delivered from memory."""
    # A missing directory would be created (0700): a file where the directory should be is not.
    (tmp_path / "not-a-dir").write_text("")
    queue = make_queue(spool_path=str(tmp_path / "not-a-dir" / "spool.sqlite3"))
    assert queue._bridge is not None
    queue._bridge.writer.leads = False  # through the writer thread, as on an event loop
    commit = queue.enqueue(event("k1"))
    assert commit is not None
    assert commit.wait(10)
    assert not commit.durable
    assert queue.flush(5)
    assert sender.delivered == ["k1"]
    assert "could not write to the spool" in caplog.text
