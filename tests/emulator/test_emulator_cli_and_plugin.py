"""The command line (emulator, demo), the catalogue, the pytest fixture and the public names."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from emulator_helpers import HEADERS

import commet_middleware.testing
from commet_middleware.testing import FakeCommet, load_catalogue

CLI = [
    sys.executable,
    "-c",
    "import sys; from commet_middleware._cli import main; sys.exit(main())",
]


@pytest.mark.server
def test_cli_emulator_serves_a_config(tmp_path: Path) -> None:
    """`commet-middleware emulator --config` starts on an ephemeral port and answers."""
    config = tmp_path / "catalogue.toml"
    config.write_text(
        'api_keys = ["ck_cli"]\n[features.pages]\ntype = "metered"\n[[customers]]\nid = "acme"\n'
    )
    process = subprocess.Popen(  # noqa: S603 - a fixed argv, no outside input
        [*CLI, "emulator", "--host", "127.0.0.1", "--port", "0", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.split()[3]
        assert url.startswith("http://127.0.0.1:")
        body = {"featureCode": "pages", "customerId": "acme", "value": 3}
        # The socket listens before uvicorn is up; on a loaded machine the first answer waits
        # for the interpreter to finish starting, so the timeout is generous.
        ok = httpx.post(
            f"{url}/api/v1/usage/events", json=body, headers={"x-api-key": "ck_cli"}, timeout=60
        )
        assert ok.status_code == 201
        denied = httpx.post(f"{url}/api/v1/usage/events", json=body, headers=HEADERS)
        assert denied.status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=20)
        if process.stdout is not None:
            process.stdout.close()
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.server
def test_cli_demo_exits_zero() -> None:
    """`commet-middleware demo` serves the emulator, drives the app and finds nothing lost."""
    result = subprocess.run(  # noqa: S603 - a fixed argv, no outside input
        [*CLI, "demo", "--duration", "3", "--outage", "1", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dashboard: http://127.0.0.1:")
    assert lines[-1] == "lost: 0, duplicated: 0"


def test_cli_needs_a_subcommand() -> None:
    """Without a subcommand the CLI exits with a usage error."""
    result = subprocess.run(  # noqa: S603 - a fixed argv, no outside input
        CLI, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2


def test_demo_catalogue_loads() -> None:
    """The shipped catalogue has metered and quota features and three kinds of customer."""
    catalogue = load_catalogue()
    assert {f.code for f in catalogue.features if f.quota} == {
        "tasks",
        "whatsapp_numbers",
        "automations",
    }
    assert {c.customer_id for c in catalogue.customers} == {
        "user_123",
        "user_free",
        "user_unsubscribed",
    }
    assert catalogue.api_keys is None


@pytest.mark.parametrize(
    "text",
    [
        '[features.x]\ntype = "seats"\n',
        "[features.x]\nincluded = -1\n",
        '[features.x]\ncolour = "red"\n',
        "[[customers]]\nname = 'no id'\n",
        "customers = 3\n",
    ],
)
def test_bad_catalogue_is_a_clear_error(tmp_path: Path, text: str) -> None:
    """A malformed catalogue raises ValueError naming the file."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.toml"):
        load_catalogue(path)


def test_fake_commet_fixture(fake_commet: FakeCommet) -> None:
    """The plugin's fake_commet fixture is a fresh emulator with the demo catalogue."""
    with httpx.Client(transport=fake_commet.transport, base_url="https://c", headers=HEADERS) as c:
        body = {"featureCode": "api_calls", "customerId": "user_123"}
        assert c.post("/api/v1/usage/events", json=body).status_code == 201
    assert fake_commet.usage_total("user_123", "api_calls") == 1


@pytest.mark.server
def test_fake_commet_url_fixture(fake_commet: FakeCommet, fake_commet_url: str) -> None:
    """The plugin's fake_commet_url fixture serves that emulator over real HTTP."""
    response = httpx.get(
        f"{fake_commet_url}/api/v1/usage/quota/all",
        params={"customerId": "user_123"},
        headers=HEADERS,
    )
    assert response.status_code == 200
    assert len(fake_commet.requests) == 1


def test_plugin_fixture_in_a_user_suite(tmp_path: Path) -> None:
    """A user's test suite gets fake_commet from the installed plugin without any conftest."""
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
        import httpx

        def test_uses_fixture(fake_commet):
            client = httpx.Client(transport=fake_commet.transport, base_url="https://c")
            body = {"feature": "api_calls", "customerId": "user_123"}
            r = client.post("/api/usage/events", json=body, headers={"x-api-key": "ck_user"})
            assert r.status_code == 201
            assert fake_commet.events()[0].dialect == "legacy"
            """
        )
    )
    result = subprocess.run(  # noqa: S603 - a fixed argv, no outside input
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_public_names_are_pinned() -> None:
    """commet_middleware.testing exports exactly these names, sorted."""
    assert commet_middleware.testing.__all__ == [
        "LEGACY_SUNSET",
        "Catalogue",
        "CustomerSpec",
        "EmulatorTransport",
        "FakeCommet",
        "FaultDecision",
        "Faults",
        "FeatureSpec",
        "Hold",
        "Installation",
        "QuotaAllowance",
        "RecordedEvent",
        "RecordedQuotaEvent",
        "RecordedRequest",
        "RequestHandler",
        "Wait",
        "load_catalogue",
    ]
    # Sorted as ruff's RUF022 sorts: SCREAMING_CASE, then CamelCase, then the rest.
    names = commet_middleware.testing.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[:1].isupper(), n))


@pytest.mark.server
def test_serve_yields_a_local_url_and_shuts_down(fake: FakeCommet) -> None:
    """serve() answers on 127.0.0.1 while open and refuses connections after it exits."""
    with fake.serve() as url:
        assert url.startswith("http://127.0.0.1:")
        body = {"featureCode": "api_calls", "customerId": "user_123"}
        response = httpx.post(f"{url}/api/v1/usage/events", json=body, headers=HEADERS)
        assert response.status_code == 201
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/api/v1/usage/quota/all", headers=HEADERS, timeout=5)
