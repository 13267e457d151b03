"""The demo: a real app under a real server, its report checked against the emulator's ledger."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from collections import Counter

import httpx
import pytest

from commet_middleware._demo import (
    NO_CUSTOMER,
    OUTCOMES,
    TASKS_INCLUDED,
    DemoOptions,
    DemoReport,
    Tally,
    _compare,
    demo_commet,
    demo_customers,
    format_report,
    run_demo,
)
from commet_middleware.testing import FakeCommet

CLI = [sys.executable, "-m", "commet_middleware._cli"]


def ledger_tallies(fake: FakeCommet) -> dict[tuple[str, str], Tally]:
    """The emulator's events per (customer, feature), counted here independently of the demo."""
    events: Counter[tuple[str, str]] = Counter()
    totals: Counter[tuple[str, str]] = Counter()
    for event in fake.events():
        events[(event.customer_id, event.feature)] += 1
        totals[(event.customer_id, event.feature)] += event.value
    for change in fake.quota_events():
        key = (change.customer_id, change.feature + ("+" if change.action == "add" else "-"))
        events[key] += 1
        totals[key] += change.count
    return {key: Tally(n, totals[key]) for key, n in events.items()}


@pytest.mark.server
@pytest.mark.parametrize("app", ["fastapi", "flask", "starlette"])
def test_demo_report_agrees_with_the_emulator(app: str) -> None:
    """A short run of each app loses and duplicates nothing, and its numbers are the ledger's."""
    customers = demo_customers(2)
    fake = demo_commet(customers)
    out, err = io.StringIO(), io.StringIO()
    options = DemoOptions(app=app, customers=2, duration=3.0, outage=1.0, progress=False)  # type: ignore[arg-type]

    report = run_demo(options, fake=fake, out=out, err=err)

    assert report.ok, format_report(report) + "\n" + err.getvalue()
    assert (report.lost, report.duplicated) == (0, 0)
    # Expected from the load's successful responses == recorded (in billed units: a sender behind
    # folds waiting events into one of their total), and recorded == the ledger.
    assert report.recorded == ledger_tallies(fake)
    assert {key: tally.total for key, tally in report.expected.items()} == {
        key: tally.total for key, tally in report.recorded.items()
    }
    keys = [event.idempotency_key for event in fake.events()]
    assert None not in keys
    assert len(set(keys)) == len(keys)
    for customer in customers:
        seen = report.requests[customer]
        assert seen["402"] >= 2, seen  # refused at the quota, and again after the release
        assert seen["5xx"] >= 1, seen  # the failing endpoint
        assert report.recorded[(customer, "tasks+")].total == TASKS_INCLUDED + 1
        assert report.recorded[(customer, "tasks-")].total == 1
        allowance = fake.quota(customer, "tasks")
        assert report.quotas[customer] == dataclasses.replace(
            allowance, as_of=report.quotas[customer].as_of
        )
        assert (allowance.current, allowance.remaining) == (TASKS_INCLUDED, 0)
    anonymous = report.requests[NO_CUSTOMER]
    assert anonymous["401"] >= 1, anonymous  # a quota create with no customer
    assert anonymous["2xx"] >= 1, anonymous  # served, billed to no one
    assert not any(key[0] == NO_CUSTOMER for key in report.recorded)
    assert report.commet_failures > 0  # the outage happened, and nothing was lost to it
    assert report.spool_path is not None
    assert report.spool_left in ((0, 0), None)
    assert out.getvalue().startswith("dashboard: http://127.0.0.1:")


@pytest.mark.server
def test_cli_demo_prints_the_dashboard_first_and_the_verdict_last() -> None:
    """`commet-middleware demo` exits 0, dashboard URL first, the three tables, the verdict."""
    result = subprocess.run(  # noqa: S603 - a fixed argv, no outside input
        [*CLI, "demo", "--duration", "2", "--outage", "0.5", "--customers", "2", "--no-spool"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dashboard: http://127.0.0.1:")
    assert "spool off" in lines[1]
    for title in (
        "Requests per customer and outcome",
        "Events in Commet per customer and feature",
        "Quota balances in Commet (tasks)",
    ):
        assert any(line.startswith(title) for line in lines), title
    header = lines[lines.index("Requests per customer and outcome") + 1].split()
    assert header == ["customer", "sent", "2xx", "401", "402", "other", "4xx", "5xx", "failed"]
    assert lines[-1] == "lost: 0, duplicated: 0"
    # The progress went to stderr, never into the tables.
    assert "requests" in result.stderr
    assert "%" not in result.stdout


@pytest.mark.server
def test_serve_keeps_the_app_and_the_dashboard_up_until_told_to_stop() -> None:
    """With serve_until, the report is ready while the app and the dashboard still answer."""
    seen: dict[str, int] = {}

    def serve_until(report: DemoReport) -> None:
        seen["ok"] = report.ok
        seen["app"] = httpx.get(report.app_url + "/health", timeout=5).status_code
        seen["docs"] = httpx.get(report.app_url + "/docs", timeout=5).status_code
        state = httpx.get(report.dashboard_url + "_emulator/state", timeout=5)
        seen["dashboard"] = state.status_code

    options = DemoOptions(customers=1, duration=2.0, outage=0.5, progress=False)
    report = run_demo(options, out=io.StringIO(), err=io.StringIO(), serve_until=serve_until)

    assert seen == {"ok": True, "app": 200, "docs": 200, "dashboard": 200}
    assert report.app_exit_code is not None  # stopped gracefully afterwards
    assert format_report(report).splitlines()[-1] == "lost: 0, duplicated: 0"


def _report(**changes: object) -> DemoReport:
    report = DemoReport(
        app="fastapi",
        server="uvicorn",
        dashboard_url="http://127.0.0.1:1/",
        app_url="http://127.0.0.1:2",
        spool_path=None,
    )
    for name, value in changes.items():
        setattr(report, name, value)
    return report


def test_a_missing_event_is_lost_and_a_repeated_key_is_duplicated() -> None:
    """The verdict is computed: fewer events than successes is lost, a repeated key duplicated."""
    report = _report(
        expected={("a", "api_calls"): Tally(3, 3), ("b", "api_calls"): Tally(1, 1)},
        recorded={("a", "api_calls"): Tally(2, 2), ("b", "api_calls"): Tally(2, 2)},
    )
    _compare(report, Counter({("b", "api_calls"): 1}))
    assert (report.lost, report.duplicated) == (1, 1)
    assert not report.ok
    assert format_report(report).splitlines()[-1] == "lost: 1, duplicated: 1"


def test_the_verdict_counts_units_so_folded_events_compare_exactly() -> None:
    """Commet's ledger is compared by billed units (folded events carry several): units missing
    are lost, units nobody billed are duplicated, a fraction of a unit off is a mismatch."""
    report = _report(
        expected={("a", "ai_tokens"): Tally(3, 70), ("b", "api_calls"): Tally(40, 40)},
        recorded={
            ("a", "ai_tokens"): Tally(1, 60),
            ("a", "api_calls"): Tally(1, 1),
            ("b", "api_calls"): Tally(2, 40),
        },
    )
    _compare(report, Counter())
    assert (report.lost, report.duplicated) == (10, 1)
    assert report.mismatched == []
    fractional = _report(
        expected={("a", "ai_tokens"): Tally(1, 1.5)}, recorded={("a", "ai_tokens"): Tally(1, 1.25)}
    )
    _compare(fractional, Counter())
    assert fractional.mismatched == [("a", "ai_tokens")]
    assert "values differ for a/ai_tokens" in format_report(fractional)


def test_the_requests_table_has_a_column_per_outcome() -> None:
    """Rows per customer, the no-customer row last, one column per outcome."""
    report = _report(
        requests={
            NO_CUSTOMER: Counter({"2xx": 1, "401": 2}),
            "user_b": Counter({"2xx": 5, "402": 1}),
            "user_a": Counter({"5xx": 1}),
        }
    )
    lines = format_report(report).splitlines()
    assert lines[1].split() == ["customer", "sent", *" ".join(OUTCOMES).split()]
    assert [line.split()[0] for line in lines[3:5]] == ["user_a", "user_b"]
    assert lines[5].startswith(NO_CUSTOMER)
    assert lines[5].split()[2:5] == ["3", "1", "2"]


def test_options_are_checked() -> None:
    """Unknown apps and out-of-range numbers are refused before anything starts."""
    with pytest.raises(ValueError, match="app"):
        DemoOptions(app="django")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="customers"):
        DemoOptions(customers=0)
    with pytest.raises(ValueError, match="outage"):
        DemoOptions(duration=2, outage=3)


def test_demo_customers_are_stable_and_distinct() -> None:
    """The first two have the examples' API keys; any number are distinct."""
    assert demo_customers(2) == ["user_123", "user_free"]
    assert len(set(demo_customers(20))) == 20
