"""Read the emulator's catalogue of features and customers from a TOML file."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["Catalogue", "CustomerSpec", "FeatureSpec", "load_catalogue"]


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of the catalogue: metered (usage events) or quota (a balance)."""

    code: str
    quota: bool = False
    included: int = 0
    unlimited: bool = False
    overage: bool = False


@dataclass(frozen=True)
class CustomerSpec:
    """One customer of the catalogue; ``features`` None means every feature."""

    customer_id: str
    features: tuple[str, ...] | None = None
    subscribed: bool = True


@dataclass(frozen=True)
class Catalogue:
    """Features, customers and (optionally) the accepted API keys of an emulator."""

    features: tuple[FeatureSpec, ...] = ()
    customers: tuple[CustomerSpec, ...] = ()
    api_keys: frozenset[str] | None = field(default=None)


def _read_text(path: str | Path | None) -> tuple[str, str]:
    if path is None:
        ref = resources.files("commet_middleware.testing").joinpath("demo_catalogue.toml")
        return ref.read_text(encoding="utf-8"), "demo_catalogue.toml"
    return Path(path).read_text(encoding="utf-8"), str(path)


def _parse_feature(code: str, raw: Any, where: str) -> FeatureSpec:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: [features.{code}] must be a table")
    kind = raw.get("type", "metered")
    if kind not in ("metered", "quota"):
        raise ValueError(f"{where}: features.{code}.type must be 'metered' or 'quota'")
    unknown = set(raw) - {"type", "included", "unlimited", "overage"}
    if unknown:
        raise ValueError(f"{where}: features.{code} has unknown keys {sorted(unknown)}")
    included = raw.get("included", 0)
    if isinstance(included, bool) or not isinstance(included, int) or included < 0:
        raise ValueError(f"{where}: features.{code}.included must be a whole number >= 0")
    return FeatureSpec(
        code=code,
        quota=kind == "quota",
        included=included,
        unlimited=bool(raw.get("unlimited", False)),
        overage=bool(raw.get("overage", False)),
    )


def _parse_customer(raw: Any, where: str) -> CustomerSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        raise ValueError(f"{where}: every [[customers]] entry needs a string id")
    features = raw.get("features")
    if features is not None and (
        not isinstance(features, list) or not all(isinstance(f, str) for f in features)
    ):
        raise ValueError(f"{where}: customers.features must be a list of feature codes")
    return CustomerSpec(
        customer_id=raw["id"],
        features=None if features is None else tuple(features),
        subscribed=bool(raw.get("subscribed", True)),
    )


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """Return the catalogue in the TOML file ``path``; None reads the shipped demo catalogue."""
    text, where = _read_text(path)
    data = tomllib.loads(text)
    features_raw = data.get("features", {})
    if not isinstance(features_raw, dict):
        raise ValueError(f"{where}: 'features' must be a table of tables")
    features = tuple(_parse_feature(code, raw, where) for code, raw in features_raw.items())
    customers_raw = data.get("customers", [])
    if not isinstance(customers_raw, list):
        raise ValueError(f"{where}: 'customers' must be an array of tables ([[customers]])")
    customers = tuple(_parse_customer(raw, where) for raw in customers_raw)
    keys_raw = data.get("api_keys")
    api_keys = None if keys_raw is None else frozenset(str(k) for k in keys_raw)
    return Catalogue(features=features, customers=customers, api_keys=api_keys)
