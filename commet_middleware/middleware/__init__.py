"""The framework adapters of the billing core: ASGI and WSGI (Django: ``commet_middleware.django``).

Each adapter translates its own protocol's events into :class:`~commet_middleware.billing.
BillingCall`; adapters never import each other.
"""

from __future__ import annotations

from ._asgi import CommetMiddleware
from ._wsgi import CommetWSGIMiddleware

__all__ = ["CommetMiddleware", "CommetWSGIMiddleware"]
