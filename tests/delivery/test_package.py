"""The delivery package's public names."""

from __future__ import annotations

import commet_middleware.delivery as delivery


def test_delivery_exports_exactly_its_public_names() -> None:
    """commet_middleware.delivery exports these names, each importable, in ruff's sorted order."""
    assert delivery.__all__ == [
        "BACKOFF_CAP",
        "MAX_CLIENT_ATTEMPTS",
        "MAX_UNEXPECTED_ATTEMPTS",
        "AggregationStats",
        "DeliveryListener",
        "DeliveryQueue",
        "DeliveryStats",
        "Encoder",
        "OperationSender",
        "SenderFactory",
        "UndeliveredError",
        "aflush",
        "close_default_queues",
        "default_queue",
        "flush",
        "retry_delay",
    ]
    for name in delivery.__all__:
        assert hasattr(delivery, name)
