"""Threat: the API key escapes through an output channel someone else reads.

One scenario drives every path that produces output: a served app whose events are retried,
dead-lettered and spooled; a client that fails against Commet and against a closed port; a
wrong key; the emulator's dashboard. Then each channel is searched for the key.
"""

from __future__ import annotations

import logging
import sqlite3
import traceback
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from commet_middleware import (
    AsyncCommetClient,
    CommetClient,
    CommetError,
    CommetMiddleware,
    CommetSettings,
)
from commet_middleware._spool import Spool
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet

SECRET = "ck_test_secret_5e3f9a2c7b1d4e6f"
WRONG = "ck_test_wrong_0d9e8f7a6b5c4d3e"
KEYS = (SECRET, WRONG)


class _Collect(logging.Handler):
    """Keeps every record formatted as a log file would show it, traceback included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _app(key: str, fake: FakeCommet, spool: Path) -> Starlette:
    async def search(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/search", search)],
        middleware=[
            Middleware(
                CommetMiddleware,
                customer=from_header("X-Customer-ID"),
                meter="api_calls",
                settings=CommetSettings(
                    api_key=key,
                    transport=fake.transport,
                    spool_path=str(spool),
                    backoff_base=0.01,
                    max_retries=1,
                ),
            )
        ],
    )


def _failure_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error)) + repr(error) + str(error)


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Everything the scenario wrote, by channel."""
    tmp = tmp_path_factory.mktemp("keys")
    fake = FakeCommet.from_catalogue(api_keys=[SECRET])
    collect = _Collect()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    out: dict[str, str] = {}
    try:
        fake.faults.fail_next(2)  # retried, and logged as retried
        for key, spool in ((SECRET, tmp / "spool.sqlite3"), (WRONG, tmp / "wrong.sqlite3")):
            with TestClient(_app(key, fake, spool)) as client:
                for customer in ("user_123", "nobody"):  # nobody: 404, dead-lettered
                    client.get("/search", headers={"X-Customer-ID": customer})
        failures = []
        with CommetClient(api_key=SECRET, transport=fake.transport, max_retries=0) as direct:
            with pytest.raises(CommetError) as refused:
                direct.track("nobody", "api_calls")
            failures.append(refused.value)
        closed = CommetClient(api_key=SECRET, base_url="http://127.0.0.1:9", max_retries=0)
        with closed, pytest.raises(CommetError) as unreachable:
            closed.track("user_123", "api_calls")
        failures.append(unreachable.value)
        out["exceptions"] = "\n".join(_failure_text(e) for e in failures)
        settings = CommetSettings(api_key=SECRET, transport=fake.transport)
        out["reprs"] = "\n".join(
            [
                repr(settings),
                str(settings),
                repr(CommetClient(settings)),
                repr(AsyncCommetClient(settings)),
                repr(CommetMiddleware(lambda s, r, c: None, settings=settings)),
                repr(Spool(tmp / "spool.sqlite3")),
            ]
        )
        with TestClient(fake.app) as browser:
            pages = ("/", "/_emulator/dashboard.js", "/_emulator/state", "/_emulator/faults")
            out["dashboard"] = "\n".join(browser.get(path).text for path in pages)
    finally:
        root.removeHandler(collect)
        root.setLevel(previous)
    out["logs"] = "\n".join(collect.lines)
    spool_bytes = b""
    for name in ("spool.sqlite3", "wrong.sqlite3"):
        for suffix in ("", "-wal", "-shm"):
            path = tmp / (name + suffix)
            spool_bytes += path.read_bytes() if path.exists() else b""
    out["spool file bytes"] = spool_bytes.decode("latin-1")
    dead_rows = []
    for name in ("spool.sqlite3", "wrong.sqlite3"):
        with sqlite3.connect(tmp / name) as conn:
            dead_rows += [repr(row) for row in conn.execute("SELECT * FROM dead_letter")]
    out["dead-letter table"] = "\n".join(dead_rows)
    return out


def test_scenario_produced_output_on_every_channel(channels: dict[str, str]) -> None:
    """The search below means something: every channel holds what it should (retries, 404s)."""
    assert "nobody" in channels["dead-letter table"]  # the 404 was dead-lettered with its row
    assert "nobody" in channels["spool file bytes"]
    assert "503" in channels["logs"] or "retry" in channels["logs"].lower()
    assert "401" in channels["logs"] or "rejected" in channels["logs"]  # the wrong key
    assert "customer_not_found" in channels["exceptions"]
    assert "CommetTransportError" in channels["exceptions"]
    assert "user_123" in channels["dashboard"]
    assert "ck_" in channels["reprs"]  # the mask's prefix, not the key


@pytest.mark.parametrize(
    "channel",
    ["logs", "reprs", "exceptions", "spool file bytes", "dead-letter table", "dashboard"],
)
def test_api_key_is_in_no_output_channel(channels: dict[str, str], channel: str) -> None:
    """Neither the right key nor a rejected one appears, whole or as its secret half."""
    text = channels[channel]
    for key in KEYS:
        assert key not in text
        assert key[8:24] not in text  # not even a recognisable part of it
