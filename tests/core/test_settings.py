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


def test_quota_store_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMET_QUOTA_STORE names the quota store; unset, it is the per-process memory store."""
    monkeypatch.delenv("COMMET_QUOTA_STORE", raising=False)
    assert CommetSettings.from_env().quota_store == "memory"
    monkeypatch.setenv("COMMET_QUOTA_STORE", "redis://127.0.0.1:6390/2")
    assert CommetSettings.from_env().quota_store == "redis://127.0.0.1:6390/2"
    assert CommetSettings.from_env(quota_store="memory").quota_store == "memory"


@pytest.mark.parametrize("url", ["", "mysql://db/quota", "sqlite://", "/var/quota.db"])
def test_an_unknown_quota_store_is_refused_clearly(url: str) -> None:
    """A quota store URL of no known kind raises ValueError naming the accepted forms."""
    with pytest.raises(ValueError, match="sqlite:///PATH"):
        CommetSettings(quota_store=url)


def test_a_quota_store_password_is_masked() -> None:
    """The repr shows the Redis URL with its password masked."""
    shown = repr(CommetSettings(quota_store="redis://app:hunter2-secret@10.0.0.5:6379/0"))
    assert "hunter2-secret" not in shown
    assert "redis://app:***@10.0.0.5:6379/0" in shown
