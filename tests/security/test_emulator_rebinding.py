"""Threat: a web page in the developer's browser drives the local emulator by DNS rebinding.

The page is served from ``evil.example``, whose DNS the attacker then points at 127.0.0.1:
the browser treats the emulator as the page's own origin, so the same-origin and JSON checks
of the fault controls no longer help. What stops it is the ``Host`` allow-list.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from commet_middleware._cli import main
from commet_middleware.testing import FakeCommet
from commet_middleware.testing._app import host_allowed

EVIL = {"host": "evil.example", "origin": "http://evil.example"}
KEY = {"x-api-key": "ck_attacker"}
USAGE = {"customerId": "user_123", "featureCode": "api_calls", "value": 1000}


@pytest.fixture
def fake() -> FakeCommet:
    """The emulator with the demo catalogue and default settings."""
    return FakeCommet.from_catalogue()


@pytest.fixture
def served(fake: FakeCommet) -> Iterator[httpx.Client]:
    """A client of ``fake`` served by uvicorn on 127.0.0.1, as `commet-middleware emulator` is."""
    with fake.serve() as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.mark.server
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/", None),
        ("GET", "/_emulator/state", None),
        ("GET", "/_emulator/faults", None),
        ("GET", "/_emulator/stream", None),
        ("POST", "/_emulator/faults/fail-next", {"n": 5}),
        ("POST", "/_emulator/faults/clear", {}),
        ("GET", "/api/v1/usage/quota/all?customerId=user_123", None),
        ("POST", "/api/v1/usage/events", USAGE),
    ],
)
def test_rebound_host_is_refused_everywhere(
    served: httpx.Client, fake: FakeCommet, method: str, path: str, body: object
) -> None:
    """Host and Origin evil.example get 403 on the page, state, stream, faults and API alike."""
    response = served.request(method, path, json=body, headers={**EVIL, **KEY})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "host_not_allowed"
    assert fake.faults.pending()["fail_next"] == []
    assert fake.events() == []
    assert fake.requests == []  # refused before the API's request log


@pytest.mark.server
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "app.localhost", "LOCALHOST."])
def test_loopback_hosts_still_reach_dashboard_and_api(
    served: httpx.Client, fake: FakeCommet, host: str
) -> None:
    """Loopback names and addresses (any port) reach the state, the fault controls and the API."""
    port = served.base_url.port
    headers = {"host": f"{host}:{port}", "origin": f"http://{host}:{port}"}
    assert served.get("/_emulator/state", headers=headers).status_code == 200
    control = served.post("/_emulator/faults/drop-next", json={"n": 1}, headers=headers)
    assert control.status_code == 200
    fake.faults.clear()
    assert served.post("/api/v1/usage/events", json=USAGE, headers={**headers, **KEY}).is_success


@pytest.mark.server
def test_allowed_hosts_adds_a_name() -> None:
    """A name passed in allowed_hosts (--allow-host) is answered; others still are not."""
    named = FakeCommet.from_catalogue(allowed_hosts=["emulator.internal"])
    with named.serve() as url, httpx.Client(base_url=url, timeout=10) as client:
        ok = client.get("/_emulator/state", headers={"host": "emulator.internal:8787"})
        refused = client.get("/_emulator/state", headers={"host": "evil.example"})
    assert (ok.status_code, refused.status_code) == (200, 403)


@pytest.mark.parametrize(
    ("host", "bound", "allowed"),
    [
        ("127.0.0.1:8787", None, True),
        ("127.0.0.2", None, True),  # all of 127.0.0.0/8 is loopback
        ("[::1]:8787", None, True),
        ("testserver", None, True),  # Starlette's TestClient, in-process only
        ("192.168.1.20:8787", "192.168.1.20", True),  # the address it was bound to
        ("192.168.1.21:8787", "192.168.1.20", False),
        ("evil.example", "evil.example", False),  # a name is never trusted as "bound"
        ("evil.example:8787", None, False),
        ("localhost.evil.example", None, False),
        ("127.0.0.1.nip.io", None, False),  # resolves to 127.0.0.1: exactly the attack
        ("", None, False),
    ],
)
def test_host_allow_list_rules(host: str, bound: str | None, allowed: bool) -> None:
    """The allow-list: loopback names and addresses and the bound address, never other names."""
    assert host_allowed(host, frozenset(), bound) is allowed


def test_host_allow_list_is_documented_in_the_emulator_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`commet-middleware emulator --help` explains the Host check and the --allow-host flag."""
    with pytest.raises(SystemExit):
        main(["emulator", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--allow-host NAME" in text
    assert "DNS rebinding" in text
