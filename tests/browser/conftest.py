"""Fixtures of the browser tests: Debian's Chromium under Playwright, and a served emulator."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from commet_middleware.testing import FakeCommet

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

# Debian's package (scripts/ensure-chromium installs it); CHROMIUM_PATH points elsewhere.
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
# Without the networking flags Chromium keeps dialling Google on this closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _unavailable(reason: str) -> None:
    # CI installs Chromium (scripts/ensure-chromium), so there a missing browser is a failure.
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (see scripts/ensure-chromium)")
    pytest.skip(f"{reason}; run scripts/ensure-chromium to enable the browser tests")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per module (a launch per test would dominate run time).

    Not per session: while Playwright's sync API runs it keeps an event loop current in this
    thread, which breaks every async test collected after it.
    """
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def fake() -> FakeCommet:
    """A fresh emulator with the demo catalogue."""
    return FakeCommet.from_catalogue()


@pytest.fixture
def url(fake: FakeCommet) -> Iterator[str]:
    """``fake`` served on 127.0.0.1."""
    with fake.serve() as base:
        yield base


@pytest.fixture
def page(browser: Browser, url: str) -> Iterator[Page]:
    """A fresh page on the dashboard, live (its event stream open); fails on script errors."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    opened.goto(url)
    expect(opened.locator("#connection")).to_have_text("live")
    yield opened
    # Closing the page first lets the stream end before the server stops.
    context.close()
    assert errors == []
