"""The demo's setup in Chromium: requests through the FastAPI example app show on the dashboard."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from commet_middleware._demo import _app_env, _AppProcess, _free_port, _server_argv

# Without playwright the browser fixture skips (or, under CI, fails) saying what is missing.
with contextlib.suppress(ImportError):
    from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.browser, pytest.mark.server]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CUSTOMER = {"X-Customer-ID": "user_123"}


@pytest.fixture
def example_app(url: str) -> Iterator[str]:
    """The FastAPI example under uvicorn, billing the served emulator; its URL once healthy."""
    port = _free_port()
    argv, _ = _server_argv("fastapi", port)
    with tempfile.TemporaryFile() as log:
        app = _AppProcess(argv, _app_env(url, None), port, log)
        try:
            app.wait_ready()
            yield app.url
        finally:
            app.stop()


def test_a_request_through_the_example_app_reaches_the_dashboard_live(
    page: Page, example_app: str
) -> None:
    """A search through the app shows in the live feed; a task create and delete move the bar."""
    page.evaluate("window.notReloaded = true")
    with httpx.Client(base_url=example_app, headers=CUSTOMER, timeout=10) as client:
        assert client.get("/search", params={"q": "policy"}).status_code == 200
        newest = page.locator("#feed li").first
        expect(newest).to_contain_text("user_123")
        expect(newest).to_contain_text("api_calls")
        total = page.locator('[data-customer="user_123"] tr[data-feature="api_calls"] .num')
        expect(total).to_have_text("1")

        quota = page.locator('[data-customer="user_123"] .quota[data-feature="tasks"]')
        expect(quota.locator(".bar")).to_have_attribute("aria-valuenow", "0")
        created = client.post("/tasks", json={"title": "Call the bank"})
        assert created.status_code == 201, created.text
        expect(quota.locator(".bar")).to_have_attribute("aria-valuenow", "1")
        expect(quota.locator(".figures")).to_have_text("1 / 10 included")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo-dashboard.png"), full_page=True)

        assert client.delete(f"/tasks/{created.json()['id']}").status_code == 200
        expect(quota.locator(".bar")).to_have_attribute("aria-valuenow", "0")
    assert page.evaluate("window.notReloaded") is True
    assert (ARTIFACTS / "demo-dashboard.png").stat().st_size > 0
