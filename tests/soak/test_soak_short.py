"""The short soak: a real app SIGKILLed twice under load with Commet faulty loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.server


def test_short_soak_loses_and_duplicates_nothing() -> None:
    """800 requests, 2 SIGKILLs, 5xx/429/drops/outage: every 2xx billed once, nothing extra."""
    command = [sys.executable, "-m", "bench", "soak", "--requests", "800", "--kills", "2"]
    done = subprocess.run(  # noqa: S603 - this interpreter running our own benchmark
        [*command, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(figures, indent=2))
    assert figures["kills"] == 2
    assert figures["successes"] > 0
    # CommetMiddleware spools before forwarding the end of a response: a SIGKILL right after a
    # client got its 2xx loses nothing either (lost_at_kill would say it did).
    assert figures["lost"] == 0, (figures["lost_at_kill"], figures["lost_keys"])
    assert figures["duplicated"] == 0, figures["duplicated_keys"]
    assert figures["unknown"] == 0
    assert figures["spool_at_end"] == {"pending": 0, "claimed": 0, "dead": 0}
    assert set(figures["faults_injected"]) >= {"error_rate", "rate_limit_next", "drop_next"}
    assert done.returncode == 0, done.stderr
