"""Every knob of the toolkit in one immutable object, with defaults from the environment."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._errors import CommetError
    from ._models import Operation

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_BASE_URL",
    "CommetSettings",
    "DeadLetterHook",
    "Dialect",
    "OverflowPolicy",
    "describe_store_url",
    "validate_store_url",
]

DEFAULT_BASE_URL = "https://commet.co"
DEFAULT_API_VERSION = "2026-08-27"

Dialect = Literal["v1", "legacy"]
# What enqueue does when the in-memory queue is full; see the delivery module for the reasoning.
OverflowPolicy = Literal["block", "spool", "drop"]
DeadLetterHook = Callable[["Operation", "CommetError | Exception"], None]


def _mask(key: str) -> str:
    # Enough to tell two keys apart in a repr, never enough to use one.
    if not key:
        return "''"
    return f"'{key[:3]}…({len(key)} chars)'"


@dataclass(frozen=True)
class CommetSettings:
    """Configuration shared by the client, the delivery pipeline and the middlewares.

    Build it with :meth:`from_env` to take ``COMMET_API_KEY``, ``COMMET_BASE_URL``,
    ``COMMET_SPOOL`` and ``COMMET_QUOTA_STORE`` from the environment; keyword arguments
    override them.
    """

    api_key: str = field(default="", repr=False)
    base_url: str = DEFAULT_BASE_URL
    dialect: Dialect = "v1"
    api_version: str = DEFAULT_API_VERSION
    # Direct calls (a quota read on the request path wants a tight one; see quota_timeout).
    timeout: float = 10.0
    connect_timeout: float = 5.0
    quota_timeout: float = 1.0
    # An httpx transport (sync, async, or an object that is both) replaces the network: the seam
    # tests and the emulator use.
    transport: Any = field(default=None, repr=False, compare=False)
    # Retries inside one client call: attempts after the first.
    max_retries: int = 3
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    retry_after_cap: float = 30.0
    # Background delivery.
    queue_limit: int = 10_000
    overflow: OverflowPolicy = "block"
    overflow_block_timeout: float = 0.05
    max_concurrency: int = 8
    batch_size: int = 100
    shutdown_timeout: float = 10.0
    dead_letter: DeadLetterHook | None = field(default=None, repr=False, compare=False)
    # Durable spool (SQLite file); None keeps events in memory only.
    spool_path: str | None = None
    # Seconds over which usage events of one (customer, feature, properties) are summed into one
    # event before sending (see ``delivery._aggregation``); None sends every event as it is.
    aggregate_window: float | None = None
    # Without a window: usage events (and, without a spool, quota adds) that wait while the
    # sender is behind fold into one exact event per group (see ``delivery._folding``), so the
    # queue never refuses one for want of room. False sends every event as it is.
    fold_when_behind: bool = True
    # Where quota state lives (see ``commet_middleware.quota``): "memory" (this process),
    # "sqlite:///PATH" (every process of one host), "redis://HOST:PORT/DB" (every host).
    quota_store: str = field(default="memory", repr=False)
    # How long one call to a shared quota store may take before it counts as an outage.
    quota_store_timeout: float = 0.05
    # How long a reservation holds its units if its request never settles (a killed worker).
    quota_lease: float = 60.0
    # How long a succeeded request's Idempotency-Key (and stored answer) is remembered.
    idempotency_ttl: float = 86_400.0

    def __post_init__(self) -> None:
        if self.dialect not in ("v1", "legacy"):
            raise ValueError(f"dialect must be 'v1' or 'legacy', got {self.dialect!r}")
        if self.overflow not in ("block", "spool", "drop"):
            raise ValueError(f"overflow must be 'block', 'spool' or 'drop', got {self.overflow!r}")
        if self.queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.aggregate_window is not None and not self.aggregate_window > 0:
            raise ValueError("aggregate_window must be a positive number of seconds, or None")
        validate_store_url(self.quota_store)
        for name in ("quota_store_timeout", "quota_lease", "idempotency_ttl"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        store = describe_store_url(self.quota_store)
        return f"CommetSettings(api_key={_mask(self.api_key)}, {shown}, quota_store={store!r})"

    @classmethod
    def from_env(cls, **overrides: Any) -> CommetSettings:
        """Return settings from the environment, with ``overrides`` taking precedence."""
        values: dict[str, Any] = {
            "api_key": os.environ.get("COMMET_API_KEY", ""),
            "base_url": os.environ.get("COMMET_BASE_URL") or DEFAULT_BASE_URL,
            "spool_path": os.environ.get("COMMET_SPOOL") or None,
            "quota_store": os.environ.get("COMMET_QUOTA_STORE") or "memory",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> CommetSettings:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def validate_store_url(url: str) -> str:
    """Return ``url`` if it names a quota store this package knows, else raise ValueError."""
    if not isinstance(url, str):
        raise ValueError(f"quota_store must be a URL string, got {type(url).__name__}")
    if url == "memory":
        return url
    if url.startswith("sqlite://") and len(url) > len("sqlite://"):
        return url
    if url.startswith(("redis://", "rediss://", "unix://")):
        return url
    raise ValueError(
        f"quota_store must be 'memory', 'sqlite:///PATH' or 'redis://HOST:PORT/DB', got "
        f"{describe_store_url(url)!r}"
    )


def describe_store_url(url: str) -> str:
    """Return ``url`` with any password masked, for logs and reprs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user}:***@{host}"
