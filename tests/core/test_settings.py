"""Settings come from the environment, validate themselves, and never show the API key."""

from __future__ import annotations

import pytest

from commet_middleware import CommetSettings

SECRET = "ck_sandbox_3f9a1c0d5e7b2a4c6e8f"


def test_environment_fills_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMET_API_KEY, COMMET_BASE_URL and COMMET_SPOOL are read by from_env."""
    monkeypatch.setenv("COMMET_API_KEY", SECRET)
    monkeypatch.setenv("COMMET_BASE_URL", "http://127.0.0.1:9999")
    monkeypatch.setenv("COMMET_SPOOL", "/tmp/spool.sqlite3")
    settings = CommetSettings.from_env()
    assert settings.api_key == SECRET
    assert settings.base_url == "http://127.0.0.1:9999"
    assert settings.spool_path == "/tmp/spool.sqlite3"


def test_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyword given to from_env wins over the variable."""
    monkeypatch.setenv("COMMET_BASE_URL", "http://127.0.0.1:9999")
    assert CommetSettings.from_env(base_url="http://127.0.0.1:1").base_url == "http://127.0.0.1:1"


def test_default_base_url_is_commet(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set the base URL is Commet's."""
    monkeypatch.delenv("COMMET_BASE_URL", raising=False)
    assert CommetSettings.from_env().base_url == "https://commet.co"


def test_repr_and_str_never_show_the_key() -> None:
    """The key is masked in repr and str, and so in any log line that prints the settings."""
    settings = CommetSettings(api_key=SECRET)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET[8:] not in repr(settings)
    assert "api_key=" in repr(settings)


@pytest.mark.parametrize(
    ("field", "value"),
    [("dialect", "v2"), ("overflow", "lose"), ("queue_limit", 0), ("max_concurrency", 0)],
)
def test_bad_settings_are_refused(field: str, value: object) -> None:
    """Invalid settings fail at construction with a ValueError."""
    with pytest.raises(ValueError, match=field.split("_")[0]):
        CommetSettings(**{field: value})  # type: ignore[arg-type]


def test_replace_returns_a_changed_copy() -> None:
    """replace() leaves the original untouched."""
    base = CommetSettings(api_key=SECRET)
    changed = base.replace(dialect="legacy")
    assert (base.dialect, changed.dialect, changed.api_key) == ("v1", "legacy", SECRET)
