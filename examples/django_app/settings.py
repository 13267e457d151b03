"""Settings of the Django example: ``CommetMiddleware`` in ``MIDDLEWARE``, options in ``COMMET``.

Commet's key and URL come from the environment (``COMMET_API_KEY``, ``COMMET_BASE_URL``) like
every ``CommetSettings`` field; anything in ``COMMET`` wins over the environment.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-key-for-the-example-only")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "examples.django_app.urls"
# No database: the customer comes from an API key or a gateway header (see views.py). A project
# with django.contrib.auth bills request.user.pk by default, with no "customer" key at all.
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

MIDDLEWARE = [
    # After AuthenticationMiddleware when you have one: it reads request.user.
    "commet_middleware.django.CommetMiddleware",
]

COMMET = {
    # Who pays: a function of the request, here by its dotted path.
    "customer": "examples.django_app.views.customer_of",
    # Zero-code metering would be one line, e.g. {"GET /documents/<str:doc_id>": "api_calls"}:
    # this example meters with decorators instead (views.py).
}

# Errors (the failing /reports/usage) on the console, as a server log shows them.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
