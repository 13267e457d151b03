"""One configuration model: every knob is a keyword, a settings field and a COMMET_* variable."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from commet_middleware import (
    CommetMiddleware,
    CommetSettings,
    CommetWSGIMiddleware,
    flush,
    metered,
)
from commet_middleware._settings import env_names, resolve_settings
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet

KEY = "ck_test_from_the_environment"
README = Path(__file__).resolve().parents[2] / "README.md"
# Fields that hold Python objects (a transport, a callable): keywords and settings only.
OBJECT_FIELDS = {"transport", "dead_letter"}


def _noop_app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("never called")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("COMMET_"):
            monkeypatch.delenv(name)


def test_settings_object_adds_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """settings=CommetSettings(aggregate_window=0.5) keeps the key and URL of the environment."""
    monkeypatch.setenv("COMMET_API_KEY", KEY)
    monkeypatch.setenv("COMMET_BASE_URL", "http://127.0.0.1:9")
    mw = CommetMiddleware(_noop_app, settings=CommetSettings(aggregate_window=0.5))
    assert mw.settings.api_key == KEY
    assert mw.settings.base_url == "http://127.0.0.1:9"
    assert mw.settings.aggregate_window == 0.5


@pytest.mark.server
def test_settings_object_with_the_environment_bills_through_a_served_emulator(
    monkeypatch: pytest.MonkeyPatch, fake_commet: FakeCommet, fake_commet_url: str
) -> None:
    """The issue's first row end to end: env key and URL plus settings= deliver to Commet."""
    monkeypatch.setenv("COMMET_API_KEY", KEY)
    monkeypatch.setenv("COMMET_BASE_URL", fake_commet_url)
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware,
        customer=from_header("X-Customer-ID"),
        settings=CommetSettings(aggregate_window=0.5),
    )

    @app.get("/search")
    @metered("api_calls")
    def search() -> dict[str, str]:
        return {}

    with TestClient(app) as client:
        for _ in range(3):
            assert client.get("/search", headers={"X-Customer-ID": "user_123"}).status_code == 200
        assert flush(10.0)
    assert fake_commet.usage_total("user_123", "api_calls") == 3


@pytest.mark.parametrize("middleware", [CommetMiddleware, CommetWSGIMiddleware])
def test_every_settings_field_is_a_middleware_keyword(middleware: type) -> None:
    """Both middlewares take each CommetSettings field as a keyword (aggregate_window= too)."""
    parameters = inspect.signature(middleware).parameters
    missing = [f.name for f in dataclasses.fields(CommetSettings) if f.name not in parameters]
    assert missing == []
    mw = middleware(_noop_app, aggregate_window=0.5, queue_limit=7, fold_when_behind=False)
    assert (mw.settings.aggregate_window, mw.settings.queue_limit) == (0.5, 7)
    assert mw.settings.fold_when_behind is False


def test_every_plain_field_has_its_variable() -> None:
    """Each field but the object-valued ones is read from COMMET_<FIELD NAME>."""
    names = env_names()
    plain = {f.name for f in dataclasses.fields(CommetSettings)} - OBJECT_FIELDS
    assert set(names) == plain
    for field, variables in names.items():
        assert variables[0] == "COMMET_" + field.upper()


@pytest.mark.parametrize(
    ("variable", "raw", "field", "value"),
    [
        ("COMMET_AGGREGATE_WINDOW", "0.5", "aggregate_window", 0.5),
        ("COMMET_QUEUE_LIMIT", "250", "queue_limit", 250),
        ("COMMET_FOLD_WHEN_BEHIND", "off", "fold_when_behind", False),
        ("COMMET_OVERFLOW", "spool", "overflow", "spool"),
        ("COMMET_VERIFY_ON_STARTUP", "raise", "verify_on_startup", "raise"),
        ("COMMET_VERIFY_ON_STARTUP", "yes", "verify_on_startup", True),
        ("COMMET_SPOOL", "/tmp/a.sqlite3", "spool_path", "/tmp/a.sqlite3"),
        ("COMMET_SPOOL_PATH", "/tmp/b.sqlite3", "spool_path", "/tmp/b.sqlite3"),
    ],
)
def test_variables_are_read_with_their_field_type(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, field: str, value: object
) -> None:
    """A variable is parsed as its field's type: number, flag, choice, path (COMMET_SPOOL too)."""
    monkeypatch.setenv(variable, raw)
    assert getattr(CommetMiddleware(_noop_app).settings, field) == value


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("COMMET_QUEUE_LIMIT", "lots"),
        ("COMMET_FOLD_WHEN_BEHIND", "maybe"),
        ("COMMET_OVERFLOW", "lose"),
        ("COMMET_TIMEOUT", "10s"),
    ],
)
def test_unreadable_variable_fails_at_build_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    """A variable that is not its field's type is a ValueError naming the variable."""
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ValueError, match=variable):
        CommetMiddleware(_noop_app)


def test_precedence_keyword_then_settings_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """keyword > settings object > environment > default, field by field."""
    monkeypatch.setenv("COMMET_TIMEOUT", "3")
    monkeypatch.setenv("COMMET_QUEUE_LIMIT", "30")
    monkeypatch.setenv("COMMET_BATCH_SIZE", "40")
    resolved = resolve_settings(
        CommetSettings(queue_limit=20, batch_size=10), {"batch_size": 5, "max_retries": None}
    )
    assert resolved.batch_size == 5  # keyword
    assert resolved.queue_limit == 20  # settings object over the environment
    assert resolved.timeout == 3  # environment under a settings field left at its default
    assert resolved.max_retries == 3  # default (a None keyword means "not given")


def test_unknown_setting_is_a_type_error() -> None:
    """A misspelt setting passed to resolve_settings fails loudly."""
    with pytest.raises(TypeError, match="aggregate_windo"):
        resolve_settings(None, {"aggregate_windo": 1.0})


def test_a_lazily_built_middleware_reads_the_environment_of_its_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Starlette builds its stack on the first request: the settings of that moment count."""
    app = FastAPI()
    app.add_middleware(CommetMiddleware)
    monkeypatch.setenv("COMMET_BASE_URL", "http://127.0.0.1:7")
    mw = app.build_middleware_stack()
    while not isinstance(mw, CommetMiddleware):
        mw = mw.app
    assert mw.settings.base_url == "http://127.0.0.1:7"


def test_readme_table_lists_every_knob() -> None:
    """The README's configuration table has one row per field, with its variable."""
    text = README.read_text(encoding="utf-8")
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `(\w+)=?` \| (`COMMET_\w+`|—)", text, re.MULTILINE)
    }
    for f in dataclasses.fields(CommetSettings):
        assert f.name in rows, f"README table lacks {f.name}"
        if f.name not in OBJECT_FIELDS:
            assert rows[f.name] == f"`{env_names()[f.name][0]}`"
