"""ASGI entry point: ``uvicorn examples.django_app.asgi:application``.

Django's ASGI app refuses the lifespan protocol: the middleware starts its delivery sender on
the first request anyway. ``with_lifespan`` adds the lifespan Commet needs at the other end:
the server's shutdown flushes the usage still queued before the process exits (uvicorn ends a
process it stopped by re-raising the signal, so exit hooks never run there).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from commet_middleware.django import with_lifespan

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

django_application = get_asgi_application()
application = with_lifespan(django_application)
