"""Users' own suites, written as the README says, pass in their own pytest runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(("project", "tests"), [("fastapi_project", 6), ("flask_project", 3)])
def test_users_suite_passes(project: str, tests: int) -> None:
    """The project's suite passes in a pytest of its own (the plugin from its entry point)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMMET_", "PYTEST_"))}
    env["PYTHONPATH"] = str(HERE / project)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=HERE / project,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{tests} passed" in result.stdout, result.stdout
