"""The emulator dashboard in headless Chromium: live feed, quota bars and fault controls."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest

from commet_middleware.testing import FakeCommet

# Without playwright the browser fixture skips (or, under CI, fails) saying what is missing.
with contextlib.suppress(ImportError):
    from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.browser, pytest.mark.server]

HEADERS = {"x-api-key": "ck_sandbox_browser"}
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def _api(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers=HEADERS, timeout=5)


def _track(url: str, customer: str = "user_123", value: int = 1) -> int:
    body = {"customerId": customer, "featureCode": "api_calls", "value": value}
    with _api(url) as client:
        return client.post("/api/v1/usage/events", json=body).status_code


def _add_quota(url: str, feature: str, count: int) -> int:
    body = {"customerId": "user_123", "featureCode": feature, "count": count}
    with _api(url) as client:
        return client.post("/api/v1/usage/quota", json=body).status_code


def test_page_loads_and_shows_customers(page: Page) -> None:
    """Every catalogue customer has a card; the unsubscribed one says so."""
    for customer in ("user_123", "user_free", "user_unsubscribed"):
        expect(page.locator(f'[data-customer="{customer}"]')).to_be_visible()
    expect(page.locator('[data-customer="user_unsubscribed"] .badge')).to_have_text(
        "no subscription"
    )


def test_event_appears_in_the_live_feed_without_a_reload(page: Page, url: str) -> None:
    """A usage event sent to the API shows in the feed and the totals, the page never reloading."""
    page.evaluate("window.notReloaded = true")
    assert _track(url, value=7) == 201
    newest = page.locator("#feed li").first
    expect(newest).to_contain_text("user_123")
    expect(newest).to_contain_text("+7")
    total = page.locator('[data-customer="user_123"] tr[data-feature="api_calls"] .num')
    expect(total).to_have_text("7")
    expect(page.locator("#requests tr").first).to_contain_text("201")
    assert page.evaluate("window.notReloaded") is True


def test_customer_ids_are_rendered_as_text(fake: FakeCommet, page: Page, url: str) -> None:
    """A customer id holding markup is shown literally and never parsed into elements."""
    hostile = '<img src=x onerror="window.pwned=1">'
    fake.add_customer(hostile)
    assert _track(url, customer=hostile) == 201
    expect(page.locator("#feed li .who").first).to_have_text(hostile)
    expect(page.locator(".customer h3").last).to_have_text(hostile)
    assert page.locator("main img").count() == 0
    assert page.evaluate("window.pwned") is None


def test_quota_bar_moves_after_a_quota_add(page: Page, url: str) -> None:
    """Adding past ``included`` moves the bar and shows the overage."""
    quota = page.locator('[data-customer="user_123"] .quota[data-feature="tasks"]')
    expect(quota.locator(".bar")).to_have_attribute("aria-valuenow", "0")
    assert _add_quota(url, "tasks", 4) == 200
    expect(quota.locator(".bar")).to_have_attribute("aria-valuenow", "4")
    expect(quota.locator(".figures")).to_have_text("4 / 10 included")
    assert _add_quota(url, "tasks", 8) == 200
    expect(quota.locator(".bar")).to_have_attribute("aria-valuenow", "12")
    expect(quota.locator(".figures")).to_have_text("12 / 10 included · 2 over")
    expect(page.locator("#feed li").first).to_contain_text("4 → 12")


def test_fail_next_clicked_in_the_page_fails_the_next_api_request(page: Page, url: str) -> None:
    """Arming fail-next from the page makes the next API request fail with that status."""
    form = page.locator("#fault-fail-next")
    form.locator('input[name="status"]').fill("502")
    form.get_by_role("button", name="Arm").click()
    expect(page.locator("#faults-armed")).to_contain_text("fail next 1 (502)")
    assert _track(url) == 502
    assert _track(url) == 201
    expect(page.locator("#requests tr").nth(1)).to_contain_text("fail_next")
    expect(page.locator("#faults-injected")).to_contain_text("fail_next: 1")


def test_error_rate_started_and_stopped_from_the_page(page: Page, url: str) -> None:
    """Start sets an error rate the API obeys; Stop turns it off again."""
    form = page.locator("#fault-error-rate")
    form.locator('input[name="rate"]').fill("100")
    form.get_by_role("button", name="Start").click()
    expect(page.locator("#faults-armed")).to_contain_text("error rate 100% → 500")
    assert _track(url) == 500
    form.get_by_role("button", name="Stop").click()
    expect(page.locator("#faults-armed")).to_have_text("none")
    assert _track(url) == 201


def test_dashboard_screenshot(page: Page, url: str) -> None:
    """With some traffic and a fault armed, the page renders; saved as artifacts/dashboard.png."""
    for value in (3, 5):
        assert _track(url, value=value) == 201
    assert _track(url, customer="user_free") == 201
    assert _add_quota(url, "tasks", 13) == 200
    assert _add_quota(url, "whatsapp_numbers", 2) == 200
    assert _add_quota(url, "automations", 5) == 200
    page.locator("#fault-latency").get_by_role("button", name="Start").click()
    expect(page.locator("#faults-armed")).to_contain_text("latency 250 ms")
    with _api(url) as client:
        assert client.get("/api/v1/usage/quota/all").status_code == 400
    expect(page.locator("#requests tr")).to_have_count(7)
    expect(page.locator("#faults-injected")).to_have_text("latency: 1")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 0
