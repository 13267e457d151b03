"""A local Commet for tests and development: ``FakeCommet``, its faults, and a pytest fixture.

Choices the emulator makes where Commet's reference is silent (clients may rely on them):

- A recorded usage event answers 201; quota add, remove and set answer 200; reads 200.
- Usage events on a quota feature, or quota calls on a metered feature, answer 400
  ``validation_error`` with ``param`` naming the feature field.
- Checks run in this order: faults, ``x-api-key``, route and method (404 ``not_found``,
  405 ``method_not_allowed``), JSON and fields (all field errors in ``details``, unknown
  fields included, so a body in the wrong dialect is rejected rather than half-read),
  ``Idempotency-Key``, then customer, feature, subscription, plan, feature kind.
- ``count`` accepts an integral float (``2.0``), as a JavaScript server would.
- ``Idempotency-Key`` is honoured on ``/api/v1`` mutations only (legacy paths dedupe by the
  body's ``idempotencyKey``). Answers of requests that reached the ledger are stored, business
  errors included; auth and validation errors and injected faults are not. A replay carries
  ``Idempotent-Replayed: true`` and a fresh ``x-request-id``.
- Customers can be named by their own id or the ``cus_`` id ``add_customer`` returns.
- The ``fake_commet`` pytest fixture is loaded with the shipped demo catalogue
  (``demo_catalogue.toml``); ``fake_commet_url`` serves it on 127.0.0.1.
- A served emulator has a live dashboard at ``/`` (customers, usage totals, quota bars, a
  live feed of events, the request log, and fault controls). It and its endpoints under
  ``/_emulator/`` need no API key and bypass faults and the request log; the API does not.
- The ASGI ``app`` (dashboard and API) answers 403 ``host_not_allowed`` to a ``Host`` that is
  not a loopback name or address or its bound address (``allowed_hosts=`` /
  ``--allow-host`` add names): a browser page cannot reach it through DNS rebinding. The
  in-process ``transport`` has no Host to check.
"""

from __future__ import annotations

from ._app import LEGACY_SUNSET, RequestHandler
from ._catalogue import Catalogue, CustomerSpec, FeatureSpec, load_catalogue
from ._fake import FakeCommet
from ._faults import FaultDecision, Faults, Hold, Wait
from ._install import Installation
from ._ledger import QuotaAllowance, RecordedEvent, RecordedQuotaEvent, RecordedRequest
from ._transport import EmulatorTransport

__all__ = [
    "LEGACY_SUNSET",
    "Catalogue",
    "CustomerSpec",
    "EmulatorTransport",
    "FakeCommet",
    "FaultDecision",
    "Faults",
    "FeatureSpec",
    "Hold",
    "Installation",
    "QuotaAllowance",
    "RecordedEvent",
    "RecordedQuotaEvent",
    "RecordedRequest",
    "RequestHandler",
    "Wait",
    "load_catalogue",
]
