"""Fail fast, loudly, once: verify_on_startup and the missing-key warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flask import Flask

from commet_middleware import CommetMiddleware, CommetStartupError, CommetWSGIMiddleware
from commet_middleware.testing import FakeCommet

GOOD_KEY = "ck_test_the_right_key_1234"
BAD_KEY = "ck_test_a_wrong_key_98765"


@pytest.fixture
def fake() -> FakeCommet:
    """An emulator that knows one key only."""
    return FakeCommet.from_catalogue(api_keys={GOOD_KEY})


def _fastapi(fake: FakeCommet, key: str, check: bool | str = True, **extra: object) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware,
        api_key=key,
        transport=fake.transport,
        verify_on_startup=check,  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
    )

    @app.get("/")
    def home() -> dict[str, str]:
        return {}

    return app


def _startup_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("commet_middleware") and r.levelno >= logging.ERROR
    ]


@pytest.mark.usefixtures("allow_commet_errors")
def test_wrong_key_is_one_error_at_startup_naming_the_fix(
    fake: FakeCommet, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused key is one ERROR at lifespan startup naming COMMET_API_KEY, never the key."""
    with TestClient(_fastapi(fake, BAD_KEY)) as client:
        assert _startup_errors(caplog)  # logged before the first request
        for _ in range(3):
            client.get("/")
    errors = _startup_errors(caplog)
    assert len(errors) == 1
    assert "COMMET_API_KEY" in errors[0].getMessage()
    assert BAD_KEY not in caplog.text


def test_raise_mode_refuses_to_start(fake: FakeCommet) -> None:
    """verify_on_startup="raise" makes the lifespan startup fail with the fix in the message."""
    with (
        pytest.raises(CommetStartupError, match="COMMET_API_KEY"),
        TestClient(_fastapi(fake, BAD_KEY, "raise")),
    ):
        pass


def test_right_key_passes_quietly(fake: FakeCommet, caplog: pytest.LogCaptureFixture) -> None:
    """A key Commet accepts logs no warning or error at startup."""
    with TestClient(_fastapi(fake, GOOD_KEY, "raise")) as client:
        assert client.get("/").status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.usefixtures("allow_commet_errors")
def test_unreachable_url_is_one_error_naming_the_base_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A base URL nothing answers on (a closed port on 127.0.0.1) is one ERROR naming it."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware, api_key=GOOD_KEY, base_url="http://127.0.0.1:9", verify_on_startup=True
    )
    with TestClient(app):
        pass
    errors = _startup_errors(caplog)
    assert len(errors) == 1
    assert "COMMET_BASE_URL" in errors[0].getMessage()


@pytest.mark.usefixtures("allow_commet_errors")
def test_wsgi_checks_when_built(fake: FakeCommet, caplog: pytest.LogCaptureFixture) -> None:
    """The WSGI middleware checks as it is built (the worker's start), and raises on request."""
    app = Flask(__name__)
    CommetWSGIMiddleware(
        app.wsgi_app, api_key=BAD_KEY, transport=fake.transport, verify_on_startup=True
    )
    assert len(_startup_errors(caplog)) == 1
    with pytest.raises(CommetStartupError, match="COMMET_API_KEY"):
        CommetWSGIMiddleware(
            app.wsgi_app, api_key=BAD_KEY, transport=fake.transport, verify_on_startup="raise"
        )


def test_check_is_off_by_default(fake: FakeCommet, caplog: pytest.LogCaptureFixture) -> None:
    """Without verify_on_startup nothing is read from Commet at start."""
    with TestClient(_fastapi(fake, BAD_KEY, False)):
        pass
    assert fake.requests == []


def test_missing_key_outside_tests_is_one_warning() -> None:
    """A process (not pytest) that builds apps with no key logs one WARNING, once."""
    code = textwrap.dedent(
        """
        import logging, os
        for name in list(os.environ):
            if name.startswith("COMMET_"):
                del os.environ[name]
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from commet_middleware import CommetWSGIMiddleware
        def app(environ, start_response):
            return []
        CommetWSGIMiddleware(app)
        CommetWSGIMiddleware(app)
        """
    )
    result = subprocess.run(  # noqa: S603 - a fixed argv, no outside input
        [sys.executable, "-c", code],
        env={k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "COMMET_API_KEY" in warnings[0]
