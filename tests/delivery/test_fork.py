"""A fork while a sender thread is busy: stopped and joined first, nothing lost or sent twice."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from commet_middleware import CommetSettings, CommetTransportError
from commet_middleware.delivery import MAX_CLIENT_ATTEMPTS, DeliveryQueue

from .conftest import DeadLetters, FakeSender, QueueFactory, RecordingEncoder, event

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


class GatedSleep:
    """A retry wait that lasts until ``gate`` opens; counts the waits begun."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    async def __call__(self, delay: float) -> None:
        self.started.release()
        # A threading.Event, polled: it is opened from the test's thread.
        while not self.gate.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until true; fail after a generous bound naming ``what``."""
    done = threading.Event()
    for _ in range(5000):
        if condition():
            return
        done.wait(0.002)
    pytest.fail(f"never happened: {what}")


def delivery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "commet-delivery"]


def run_child(body: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Fork; run ``body`` in the child and return its JSON report to the parent."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(body()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    report: dict[str, object] = json.loads(b"".join(chunks))
    return report


@needs_fork
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_fork_mid_send_and_mid_retry_stops_the_thread_and_both_sides_deliver(
    sender: FakeSender,
    encoder: RecordingEncoder,
    dead_letters: DeadLetters,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fork joins a mid-send, mid-retry sender thread; child and parent each deliver once."""
    sender.gated_prefix = "parent-send"
    sender.script["parent-retry"] = [CommetTransportError("down")]
    sleep = GatedSleep()
    queue = DeliveryQueue(
        CommetSettings(api_key="ck_test_secret", dead_letter=dead_letters, fold_when_behind=False),
        sender_factory=lambda settings: sender,
        encoder=encoder,
        sleep=sleep,
    )
    try:
        queue.enqueue(event("parent-send"))
        queue.enqueue(event("parent-retry"))
        assert sleep.started.acquire(timeout=10)  # parent-retry failed and waits to retry
        wait_for(lambda: bool(sender.attempts_for("parent-send")), "parent-send is in flight")
        (before,) = delivery_threads()

        seen_in_hook: list[object] = []
        hold = queue._slot.hold_for_fork

        def recording_hold() -> None:
            hold()
            seen_in_hook.extend([before.is_alive(), len(delivery_threads()), queue.stats().pending])

        monkeypatch.setattr(queue._slot, "hold_for_fork", recording_hold)

        def child() -> dict[str, object]:
            inherited = queue.stats()
            for i in range(3):
                queue.enqueue(event(f"child-{i}"))
            flushed = queue.flush(5)
            stats = queue.stats()
            return {
                "inherited_pending": inherited.pending,
                "flushed": flushed,
                "stats": [stats.sent, stats.queued, stats.pending, stats.dead_lettered],
                "completed": [k for k in sender.completed if k.startswith("child")],
            }

        report = run_child(child)

        # Inside the before-fork hook the sender thread had stopped; the two events were kept.
        assert seen_in_hook == [False, 0, 2]
        assert report == {
            "inherited_pending": 0,
            "flushed": True,
            "stats": [3, 3, 0, 0],
            "completed": ["child-0", "child-1", "child-2"],
        }
        # The parent restarted its sender at once (pending work) and delivers both, once each.
        assert [t.is_alive() for t in delivery_threads()] == [True]
        sender.gate.set()
        sleep.gate.set()
        assert queue.flush(5)
        assert sorted(sender.completed) == ["parent-retry", "parent-send"]
        stats = queue.stats()
        assert (stats.sent, stats.pending, stats.dead_lettered) == (2, 0, 0)
        assert dead_letters.received == []
        # Each event keeps its bytes across the restart: encoded once, the same body re-sent.
        assert encoder.calls == {"parent-send": 1, "parent-retry": 1}
        assert len(set(sender.attempts_for("parent-send"))) == 1
    finally:
        sender.gate.set()
        sleep.gate.set()
        queue.close(1)


@needs_fork
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_fork_with_an_idle_sender_thread_restarts_it_only_when_needed(
    make_queue: QueueFactory, sender: FakeSender
) -> None:
    """An idle sender thread is stopped for a fork and not restarted until there is work."""
    queue = make_queue()
    queue.enqueue(event("a"))
    assert queue.flush(5)
    assert len(delivery_threads()) == 1

    report = run_child(lambda: {"threads": len(delivery_threads())})

    assert report == {"threads": 0}
    assert delivery_threads() == []
    queue.enqueue(event("b"))
    assert queue.flush(5)
    assert sender.completed == ["a", "b"]


@pytest.mark.swallows_errors
def test_a_client_that_cannot_be_built_is_given_up_loudly_and_the_events_kept(
    sender: FakeSender,
    encoder: RecordingEncoder,
    dead_letters: DeadLetters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After MAX_CLIENT_ATTEMPTS failed builds the sender stops with an ERROR; events wait."""
    builds: list[threading.Thread] = []
    gave_up = threading.Event()
    both_queued = threading.Event()

    def factory(settings: CommetSettings) -> FakeSender:
        both_queued.wait(10)  # both events wait for the first sender, none starts a second
        builds.append(threading.current_thread())
        if len(builds) <= MAX_CLIENT_ATTEMPTS:
            if len(builds) == MAX_CLIENT_ATTEMPTS:
                gave_up.set()
            raise RuntimeError("partially initialized module 'httpcore'")
        return sender

    async def no_wait(delay: float) -> None:
        await asyncio.sleep(0)

    queue = DeliveryQueue(
        CommetSettings(api_key="ck_test_secret", dead_letter=dead_letters, fold_when_behind=False),
        sender_factory=factory,
        encoder=encoder,
        sleep=no_wait,
    )
    caplog.set_level(logging.ERROR, logger="commet_middleware")
    queue.enqueue(event("a"))
    queue.enqueue(event("b"))
    both_queued.set()
    assert gave_up.wait(10)
    builds[-1].join(10)
    assert not builds[-1].is_alive()  # it stopped instead of retrying forever

    assert queue.stats().pending == 2
    assert sender.attempts == []
    assert dead_letters.received == []
    final = [r for r in caplog.records if "attempts); NOT sending" in r.getMessage()]
    assert len(final) == 1
    assert final[0].levelno == logging.ERROR
    assert "2 operations stay queued" in final[0].getMessage()

    # The next flush starts a new sender, whose client builds: nothing was lost.
    assert queue.flush(5)
    assert sender.completed == ["a", "b"]
    assert len(builds) == MAX_CLIENT_ATTEMPTS + 1
    queue.close(1)


def test_the_sender_thread_imports_nothing() -> None:
    """With the real client, the sender thread finds its HTTP stack already imported."""
    script = textwrap.dedent(
        """
        import socket, sys, threading
        from importlib.abc import MetaPathFinder

        seen = []

        class Spy(MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if threading.current_thread().name == "commet-delivery":
                    seen.append(name)
                return None

        sys.meta_path.insert(0, Spy())
        from commet_middleware import CommetSettings, UsageEvent
        from commet_middleware.delivery import DeliveryQueue

        with socket.socket() as s:  # a port nobody listens on: connection refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = CommetSettings(
            api_key="ck_test_secret", base_url=f"http://127.0.0.1:{port}", backoff_base=0.01
        )
        queue = DeliveryQueue(settings)
        queue.enqueue(UsageEvent.create("cus_1", "api_calls", 1, idempotency_key="k"))
        queue.flush(0.5)  # every attempt is refused: it tries, retries, and is still pending
        queue.close(0.1)
        # Only what got imported: a module that is not installed (sniffio) is tried on each use.
        print(sorted({name for name in seen if name in sys.modules}))
        """
    )
    done = subprocess.run(  # noqa: S603 - this interpreter running our own script
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


@needs_fork
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_fork_mid_send_keeps_the_parents_spool_claim_for_the_parent(
    sender: FakeSender, encoder: RecordingEncoder, tmp_path: Path
) -> None:
    """With a spool, the parent keeps its claimed row over a fork; the child sends only its own."""
    sender.gated_prefix = "parent"
    queue = DeliveryQueue(
        CommetSettings(api_key="ck_test_secret", spool_path=str(tmp_path / "spool.db")),
        sender_factory=lambda settings: sender,
        encoder=encoder,
    )
    try:
        queue.enqueue(event("parent-0"))
        wait_for(lambda: bool(sender.attempts_for("parent-0")), "parent-0 is in flight")

        def child() -> dict[str, object]:
            queue.enqueue(event("child-0"))
            return {"flushed": queue.flush(5), "completed": list(sender.completed)}

        report = run_child(child)

        assert report == {"flushed": True, "completed": ["child-0"]}
        sender.gate.set()
        assert queue.flush(5)
        assert sender.completed == ["parent-0"]
        assert queue.stats().pending == 0
    finally:
        sender.gate.set()
        queue.close(1)
