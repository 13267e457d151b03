"""Django for these tests, configured here rather than through DJANGO_SETTINGS_MODULE.

Settings are configured when pytest collects this directory (alone or with the whole suite),
so pytest-django finds Django set up for these tests and stays idle in runs that never collect
them. The test project's URLs and views are ``urls.py`` and ``views.py`` beside this file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from django.conf import settings as django_settings

SETTINGS: dict[str, Any] = {
    "DEBUG": False,
    "SECRET_KEY": "commet-middleware-tests-only",
    "ALLOWED_HOSTS": ["testserver", "127.0.0.1", "localhost"],
    "ROOT_URLCONF": "integration.django.urls",
    "INSTALLED_APPS": [
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "rest_framework",
    ],
    "MIDDLEWARE": [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "commet_middleware.django.CommetMiddleware",
    ],
    "DATABASES": {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    "DEFAULT_AUTO_FIELD": "django.db.models.AutoField",
    "USE_TZ": True,
    # A test that forgets to set COMMET must not reach a real Commet.
    "COMMET": {"api_key": "ck_test_django", "base_url": "http://127.0.0.1:9"},
    "REST_FRAMEWORK": {"DEFAULT_PERMISSION_CLASSES": [], "UNAUTHENTICATED_USER": None},
}

if not django_settings.configured:
    django_settings.configure(**SETTINGS)
    django.setup()

# Imported once Django is set up: they import Django's models.
from commet_middleware.django import billing  # noqa: E402

from . import views  # noqa: E402
from .support import STACKS, Stack  # noqa: E402

CUSTOMER = {"X-Customer-ID": "user_123"}


@pytest.fixture(autouse=True)
def _forget_ran_views() -> Iterator[None]:
    views.RAN.clear()
    yield
    views.RAN.clear()


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest) -> Stack:
    """Django's sync Client, then its AsyncClient (the middleware in its async mode)."""
    return Stack(request.param, raise_request_exception=False)


@pytest.fixture
def commet_config(settings: Any) -> Callable[..., Any]:
    """Set ``settings.COMMET`` for this test (pytest-django puts it back); return its billing."""

    def configure(**config: Any) -> Any:
        settings.COMMET = config
        return billing(config)

    return configure


def django_error_records(records: list[Any]) -> list[Any]:
    """The records Django logs for a server error (ERROR, or any with a traceback)."""
    return [r for r in records if r.name.startswith("django") and (r.levelno >= 40 or r.exc_info)]
