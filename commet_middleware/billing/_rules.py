"""Zero-code metering rules: which requests a middleware bills by itself, and which statuses."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeAlias

from commet_middleware._models import validate_feature_code

__all__ = ["DEFAULT_EXCLUDE", "MeterSpec", "MeteringRules"]

logger = logging.getLogger("commet_middleware")

MeterSpec: TypeAlias = "str | Mapping[str, str] | Callable[[Mapping[str, Any]], str | None] | None"
"""Zero-code metering: one feature for every request, a table, or a function of the scope."""

DEFAULT_EXCLUDE: tuple[str, ...] = (
    "/health",
    "/healthz",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/favicon.ico",
)


def _default_bill_status(status: int) -> bool:
    return status < 400


class MeteringRules:
    """What a middleware bills and how: shared by the ASGI and the WSGI middleware."""

    def __init__(
        self,
        *,
        meter: MeterSpec,
        exclude: Iterable[str],
        bill_status: Callable[[int], bool] | None,
        on_missing_customer: Literal["serve", "reject"],
    ) -> None:
        if on_missing_customer not in ("serve", "reject"):
            raise ValueError(
                f"on_missing_customer must be 'serve' or 'reject', got {on_missing_customer!r}"
            )
        if isinstance(meter, str):
            validate_feature_code(meter)
        elif isinstance(meter, Mapping):
            for feature in meter.values():
                validate_feature_code(feature)
        elif meter is not None and not callable(meter):
            raise TypeError("meter must be a feature code, a mapping or a callable")
        self.meter = meter
        # meter="api_calls": the one feature every (non-excluded) request is billed to.
        self.single_feature = meter if isinstance(meter, str) else None
        self.exclude = tuple(exclude)
        # A plain pattern excludes its path and everything under it; a glob what it matches.
        plain = [pattern for pattern in self.exclude if "*" not in pattern]
        self._excluded_paths = frozenset(plain)
        self._excluded_prefixes = tuple(pattern.rstrip("/") + "/" for pattern in plain)
        self._excluded_globs = tuple(pattern for pattern in self.exclude if "*" in pattern)
        self.bill_status = bill_status or _default_bill_status
        # status < 400, checked inline by the middlewares (no hook to call and guard).
        self.default_bill_status = bill_status is None
        self.reject_missing_customer = on_missing_customer == "reject"

    def is_excluded(self, method: str, path: str, preflight: bool) -> bool:
        """Return True when zero-code metering skips this request (health checks, docs, CORS)."""
        return (method == "OPTIONS" and preflight) or self.excludes_path(path)

    def excludes_path(self, path: str) -> bool:
        """Return True when ``exclude`` names ``path`` (or a path above it, or a matching glob)."""
        if path in self._excluded_paths or path.startswith(self._excluded_prefixes):
            return True
        globs = self._excluded_globs
        return bool(globs) and any(fnmatch.fnmatchcase(path, glob) for glob in globs)

    def zero_code_feature(
        self,
        source: Mapping[str, Any],
        method: str,
        path: str,
        route: str | None,
        preflight: bool,
    ) -> str | None:
        """Return the feature the middleware itself bills for this request, if any.

        A mapping is looked up as ``"METHOD pattern"``, then ``"pattern"``, then ``"METHOD"``,
        where a pattern is the route template (``/items/{item_id}``), the path, or a glob
        (``/api/*``) matched against the path.
        """
        if self.meter is None or self.is_excluded(method, path, preflight):
            return None
        if isinstance(self.meter, str):
            return self.meter
        if isinstance(self.meter, Mapping):
            return _lookup(self.meter, method, path, route)
        try:
            feature = self.meter(source)
        except Exception:
            logger.exception("commet: the meter= function failed; request not metered")
            return None
        if feature is None:
            return None
        try:
            return validate_feature_code(feature)
        except ValueError:
            logger.exception("commet: the meter= function returned an invalid feature code")
            return None

    def billable_status(self, status: int | None) -> bool:
        """Return True when a response with ``status`` is billed; a failing hook says no."""
        if status is None:
            return False
        if self.bill_status is _default_bill_status:
            return status < 400
        try:
            return bool(self.bill_status(status))
        except Exception:
            logger.exception("commet: bill_status hook failed for %s; not billed", status)
            return False


def _lookup(table: Mapping[str, str], method: str, path: str, route: str | None) -> str | None:
    candidates = [p for p in (route, path) if p]
    for prefix in (method + " ", ""):
        for candidate in candidates:
            found = table.get(prefix + candidate)
            if found is not None:
                return found
        for key, feature in table.items():
            if "*" not in key or not key.startswith(prefix):
                continue
            pattern = key[len(prefix) :]
            if pattern.startswith("/") and fnmatch.fnmatchcase(path, pattern):
                return feature
    return table.get(method)
