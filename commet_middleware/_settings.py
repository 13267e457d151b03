"""Every knob of the toolkit in one immutable object, with defaults from the environment."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

if TYPE_CHECKING:
    from ._errors import CommetError
    from ._models import Operation

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_BASE_URL",
    "ENV_ALIASES",
    "SETTING_FIELDS",
    "CommetSettings",
    "DeadLetterHook",
    "Dialect",
    "OverflowPolicy",
    "StartupCheck",
    "describe_store_url",
    "env_name",
    "env_names",
    "from_config",
    "resolve_settings",
    "validate_store_url",
]

DEFAULT_BASE_URL = "https://commet.co"
DEFAULT_API_VERSION = "2026-08-27"

Dialect = Literal["v1", "legacy"]
# What enqueue does when the in-memory queue is full; see the delivery module for the reasoning.
OverflowPolicy = Literal["block", "spool", "drop"]
DeadLetterHook = Callable[["Operation", "CommetError | Exception"], None]
# verify_on_startup: off, on (one ERROR naming the fix), or "raise" (the app does not start).
StartupCheck = bool | Literal["raise"]

# Older names that keep working: COMMET_SPOOL predates the one-name-per-field rule.
ENV_ALIASES: dict[str, tuple[str, ...]] = {"spool_path": ("COMMET_SPOOL",)}


def _mask(key: str) -> str:
    # Enough to tell two keys apart in a repr, never enough to use one.
    if not key:
        return "''"
    return f"'{key[:3]}…({len(key)} chars)'"


@dataclass(frozen=True)
class CommetSettings:
    """Configuration shared by the client, the delivery pipeline and the middlewares.

    Every field with a plain type (text, number, flag, choice) has an environment variable:
    ``COMMET_`` and the field's name in capitals (``aggregate_window`` is
    ``COMMET_AGGREGATE_WINDOW``; the spool path also answers to ``COMMET_SPOOL``). Build it
    with :meth:`from_env` to read them; keyword arguments override them. The middlewares
    resolve their settings with :func:`resolve_settings`: keyword > settings object >
    environment > default.
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
    # One authenticated read when a middleware starts: a wrong key or URL is one ERROR naming
    # the fix at start, instead of events dead-lettered one by one later; "raise" refuses to
    # start. Off by default: it costs a request to Commet per process start.
    verify_on_startup: StartupCheck = False

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
        if self.verify_on_startup not in (True, False, "raise"):
            raise ValueError(
                f"verify_on_startup must be True, False or 'raise', got {self.verify_on_startup!r}"
            )

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        store = describe_store_url(self.quota_store)
        return f"CommetSettings(api_key={_mask(self.api_key)}, {shown}, quota_store={store!r})"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, /, **overrides: Any
    ) -> CommetSettings:
        """Return settings from the environment, with ``overrides`` (not None) taking precedence.

        A variable that is set but cannot be read as its field's type is a ``ValueError``
        naming the variable: a typo fails at start, not with the first bill.
        """
        values = _read_environment(os.environ if environ is None else environ)
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


# The names a middleware accepts as settings keywords.
SETTING_FIELDS = frozenset(f.name for f in dataclasses.fields(CommetSettings))


def env_name(field_name: str) -> str:
    """Return the environment variable of a settings field: ``COMMET_`` + its name in capitals."""
    return "COMMET_" + field_name.upper()


def env_names() -> dict[str, tuple[str, ...]]:
    """Return each settings field read from the environment, with its variables in order."""
    return {name: _variables(name) for name in _parsers()}


def resolve_settings(
    settings: CommetSettings | None,
    keywords: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> CommetSettings:
    """Return the settings a middleware runs with: keyword > settings object > env > default.

    ``keywords`` None means "not given". A field of ``settings`` left at its default defers to
    the environment, so ``settings=CommetSettings(aggregate_window=0.5)`` adds a window to
    the key and URL the environment names instead of replacing them with empty defaults.
    """
    unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(CommetSettings)})
    if unknown:
        raise TypeError(f"unknown Commet setting(s): {', '.join(unknown)}")
    values = _read_environment(os.environ if environ is None else environ)
    if settings is not None:
        for f in dataclasses.fields(settings):
            value = getattr(settings, f.name)
            if not f.init:
                continue
            if f.name not in values or not _is_default(f, value):
                values[f.name] = value
    values.update({key: value for key, value in keywords.items() if value is not None})
    return CommetSettings(**values)


def from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the settings a framework's config mapping names with ``COMMET_*`` keys.

    Text is parsed like the environment (``"100"`` for ``queue_limit``); other values are
    taken as they are, so object-valued fields (``COMMET_TRANSPORT``) work too. A key that
    is set to None counts as not set.
    """
    parsers = _parsers()
    values: dict[str, Any] = {}
    for name in SETTING_FIELDS:
        for key in _variables(name):
            if key not in config or config[key] is None:
                continue
            value = config[key]
            parse = parsers.get(name)
            if isinstance(value, str) and parse is not None:
                value = value.strip()
                if not value:
                    continue
                value = parse(key, value)
            values[name] = value
            break
    return values


def _is_default(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


def _variables(name: str) -> tuple[str, ...]:
    return (env_name(name), *ENV_ALIASES.get(name, ()))


def _read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, parse in _parsers().items():
        for variable in _variables(name):
            raw = environ.get(variable, "").strip()
            if raw:
                values[name] = parse(variable, raw)
                break
    return values


_Parser = Callable[[str, str], Any]
_parser_cache: dict[str, _Parser] = {}


def _parsers() -> dict[str, _Parser]:
    """Each field whose type the environment can spell, with its parser (built once)."""
    if not _parser_cache:
        namespace = dict(globals())
        for f in dataclasses.fields(CommetSettings):
            try:
                hint = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 - our own annotations
            except Exception:  # noqa: S112 - a type the environment cannot spell has no variable
                continue
            parse = _parser_for(hint)
            if parse is not None:
                _parser_cache[f.name] = parse
    return _parser_cache


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parser_for(hint: Any) -> _Parser | None:
    """A parser for ``hint`` (bool, int, float, str, a Literal, or a union of them), or None."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = len(members) < len(typing.get_args(hint))
        parsers = [_parser_for(member) for member in members]
        if not parsers or any(p is None for p in parsers):
            return None
        return _union_parser([p for p in parsers if p is not None], optional)
    if origin is Literal:
        choices = typing.get_args(hint)
        return _literal_parser(choices)
    if hint is bool:
        return _parse_bool
    if hint is int:
        return _number_parser(int, "a whole number")
    if hint is float:
        return _number_parser(float, "a number")
    if hint is str:
        return lambda variable, raw: raw
    return None


def _parse_bool(variable: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{variable} must be true or false (1/0, yes/no, on/off), got {raw!r}")


def _number_parser(kind: type[int] | type[float], what: str) -> _Parser:
    def parse(variable: str, raw: str) -> Any:
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{variable} must be {what}, got {raw!r}") from None

    return parse


def _literal_parser(choices: tuple[Any, ...]) -> _Parser:
    def parse(variable: str, raw: str) -> Any:
        for choice in choices:
            if isinstance(choice, bool):
                continue  # True/False members are read by the bool parser of a union
            if str(choice) == raw:
                return choice
        shown = ", ".join(repr(c) for c in choices if not isinstance(c, bool))
        raise ValueError(f"{variable} must be one of {shown}, got {raw!r}")

    return parse


def _union_parser(parsers: list[_Parser], optional: bool) -> _Parser:
    def parse(variable: str, raw: str) -> Any:
        if optional and raw.lower() == "none":
            return None
        errors = []
        for member in parsers:
            try:
                return member(variable, raw)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(" or ".join(errors))

    return parse
