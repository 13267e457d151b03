"""Delivery's log lines: one per kind of trouble and interval, with counts; never one per event."""

from __future__ import annotations

import logging

import pytest

from commet_middleware.delivery._reporting import DeliveryReport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def report(clock: Clock) -> DeliveryReport:
    return DeliveryReport(logging.getLogger("test.delivery"), clock=clock)


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_an_outage_logs_a_few_lines_and_one_warning_after_30_seconds(
    report: DeliveryReport, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A thousand failed tries over two minutes: one INFO at the start, a summary a minute, one
    WARNING once 30 s have passed without a success, and one recovery line."""
    with caplog.at_level(logging.INFO, logger="test.delivery"):
        for _ in range(1000):
            report.retrying("usage event", "Commet answered 503", waiting=42)
            clock.now += 0.12
        report.delivered()
    warnings = lines(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert "failing for 30 s" in warnings[0]
    assert "42 operations waiting" in warnings[0]
    assert "recovered after 120 s (1000 failed attempts)" in warnings[1]
    assert len(lines(caplog, logging.INFO)) <= 3
    assert report.failing_for() == 0.0


def test_a_short_blip_never_warns(
    report: DeliveryReport, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Failures that end within 30 s stay at INFO, recovery included."""
    with caplog.at_level(logging.INFO, logger="test.delivery"):
        for _ in range(10):
            report.retrying("usage event", "timeout", waiting=1)
            clock.now += 1
        report.delivered()
    assert lines(caplog, logging.WARNING) == []
    assert len(lines(caplog, logging.INFO)) == 2


def test_a_configuration_failure_is_one_error_then_a_summary_every_five_minutes(
    report: DeliveryReport, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused key over ten minutes: the fix once, then one summary per five minutes."""
    with caplog.at_level(logging.INFO, logger="test.delivery"):
        for _ in range(600):
            report.configuration("check COMMET_API_KEY", "401", waiting=7)
            clock.now += 1
    errors = lines(caplog, logging.ERROR)
    assert len(errors) == 2
    assert "check COMMET_API_KEY" in errors[0]
    assert "nothing is dropped" in errors[0]
    assert "300 more attempts" in errors[1]


def test_dead_letters_are_one_line_per_code_and_feature_a_minute(
    report: DeliveryReport, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Per (code, feature): the first at once, the next a minute later with the count between;
    the rest of the count at close."""
    with caplog.at_level(logging.INFO, logger="test.delivery"):
        for i in range(100):
            report.dead_letter("customer_not_found", "api_calls", f"event {i}", "404")
            report.dead_letter("validation_error", "storage_gb", f"event {i}", "422")
            clock.now += 1
        report.close()
    errors = lines(caplog, logging.ERROR)
    assert len(errors) == 6
    assert sum("customer_not_found" in line or "event 0" in line for line in errors) >= 2
    assert any("and on 59 more customer_not_found/api_calls" in line for line in errors)
    assert any("gave up on 39 more customer_not_found/api_calls" in line for line in errors)
