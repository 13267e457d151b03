"""The Flask extension: Commet(app) and init_app read app.config["COMMET_*"]."""

from __future__ import annotations

import pytest
from flask import Flask

from commet_middleware import CommetSettings, CommetWSGIMiddleware, metered
from commet_middleware.flask import Commet
from commet_middleware.testing import FakeCommet

HEADERS = {"X-Customer-ID": "user_123"}


def _app(**config: object) -> Flask:
    app = Flask(__name__)
    app.config.update(config)

    @app.get("/search")
    @metered("api_calls")
    def search() -> dict[str, str]:
        return {}

    return app


def test_commet_app_bills_from_config(fake_commet: FakeCommet) -> None:
    """Commet(app) with key, transport and customer header in app.config bills the request."""
    app = _app(
        COMMET_API_KEY="ck_test_flask_config",
        COMMET_TRANSPORT=fake_commet.transport,
        COMMET_CUSTOMER_HEADER="X-Customer-ID",
    )
    commet = Commet(app)
    client = app.test_client()
    for _ in range(2):
        assert client.get("/search", headers=HEADERS).status_code == 200
    with app.app_context():
        assert commet.middleware().settings.api_key == "ck_test_flask_config"
    assert fake_commet.settle()
    assert fake_commet.usage_total("user_123", "api_calls") == 2


def test_init_app_factory_pattern_reads_text_config(fake_commet: FakeCommet) -> None:
    """commet.init_app(app) in a factory; text values are parsed like the environment."""
    commet = Commet(customer=lambda environ: environ.get("HTTP_X_CUSTOMER_ID"))

    def create_app() -> Flask:
        app = _app(COMMET_QUEUE_LIMIT="250", COMMET_FOLD_WHEN_BEHIND="off", COMMET_API_KEY="ck_t")
        app.config["COMMET_TRANSPORT"] = fake_commet.transport
        commet.init_app(app)
        return app

    first, second = create_app(), create_app()
    settings = commet.middleware(first).settings
    assert (settings.queue_limit, settings.fold_when_behind) == (250, False)
    assert commet.middleware(second) is not commet.middleware(first)
    assert second.test_client().get("/search", headers=HEADERS).status_code == 200
    assert fake_commet.settle()
    assert fake_commet.usage_total("user_123", "api_calls") == 1


def test_precedence_keyword_then_config_then_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keyword given to Commet beats app.config, which beats settings= and COMMET_* vars."""
    monkeypatch.setenv("COMMET_API_KEY", "ck_test_from_env")
    monkeypatch.setenv("COMMET_TIMEOUT", "4")
    app = _app(COMMET_QUEUE_LIMIT=77, COMMET_BATCH_SIZE="9")
    commet = Commet(app, batch_size=5, settings=CommetSettings(queue_limit=3, max_retries=1))
    settings = commet.middleware(app).settings
    assert settings.batch_size == 5
    assert settings.queue_limit == 77
    assert settings.max_retries == 1
    assert settings.timeout == 4
    assert settings.api_key == "ck_test_from_env"


def test_bad_config_value_names_the_key() -> None:
    """A config value of the wrong type is a ValueError naming the config key."""
    with pytest.raises(ValueError, match="COMMET_QUEUE_LIMIT"):
        Commet(_app(COMMET_QUEUE_LIMIT="many"))


def test_wrapping_wsgi_app_by_hand_still_works(fake_commet: FakeCommet) -> None:
    """The extension is optional: app.wsgi_app = CommetWSGIMiddleware(...) as before."""
    app = _app()
    app.wsgi_app = CommetWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        customer=lambda environ: environ.get("HTTP_X_CUSTOMER_ID"),
        api_key="ck_test_by_hand",
        transport=fake_commet.transport,
    )
    assert app.test_client().get("/search", headers=HEADERS).status_code == 200
    assert fake_commet.settle()
    assert fake_commet.usage_total("user_123", "api_calls") == 1


def test_twice_on_one_app_is_refused() -> None:
    """A second init_app on the same app raises instead of billing every request twice."""
    app = _app()
    Commet(app)
    with pytest.raises(RuntimeError, match="already"):
        Commet(app)


def test_extension_module_exports_commet_only() -> None:
    """commet_middleware.flask's public surface is the Commet extension."""
    import commet_middleware.flask

    assert commet_middleware.flask.__all__ == ["Commet"]
