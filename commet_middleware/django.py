"""Django: ``CommetMiddleware`` in ``MIDDLEWARE``, configured by the ``COMMET`` settings dict.

Put it after ``AuthenticationMiddleware``::

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "commet_middleware.django.CommetMiddleware",
        ...,
    ]
    COMMET = {"api_key": env("COMMET_API_KEY"), "meter": {"GET /api/search/": "api_calls"}}

Each request is billed to the authenticated ``request.user.pk`` (as a string) unless
``COMMET["customer"]`` says otherwise; a quota refusal is an ordinary response (402, 401, 503),
never an error Django logs with a traceback. Only this module needs Django.
"""

from __future__ import annotations

from .middleware._django import CommetMiddleware, response_data
from .middleware._django_config import DjangoBilling, billing, with_lifespan

__all__ = ["CommetMiddleware", "DjangoBilling", "billing", "response_data", "with_lifespan"]
