"""The package's import direction: lower layers never import higher ones; adapters stay apart.

Read from the source with ``ast`` (every import, including those inside functions and under
``TYPE_CHECKING``), so a lazy import that crosses a layer is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "commet_middleware"

# Lowest first. A module belongs to the first entry whose prefix names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "_errors",
            "_settings",
            "_models",
            "_keys",
            "_results",
            "_files",
            "_live",
            "customers",
        ),
    ),
    ("client", ("_wire", "_retry", "_http11", "_client", "_startup", "_spool")),
    ("quota", ("quota",)),
    ("delivery", ("delivery",)),
    ("billing", ("billing",)),
    ("decorators", ("_metered", "_guard")),
    ("middleware", ("middleware", "django", "flask")),
    ("top", ("__init__", "prometheus", "testing", "_cli", "_spool_cli", "_demo")),
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}
# Layers that sit side by side: neither may import the other.
SIBLINGS = {frozenset({"quota", "delivery"}), frozenset({"decorators", "middleware"})}
# The framework adapters: none imports another (flask.py is the Flask face of the WSGI one).
ADAPTERS = {
    "middleware._asgi": "asgi",
    "middleware._wsgi": "wsgi",
    "flask": "wsgi",
    "middleware._django": "django",
    "middleware._django_config": "django",
    "middleware._django_users": "django",
    "django": "django",
}


def layer_of(module: str) -> str:
    """Return the layer of ``module`` (dotted, relative to the package)."""
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return name
    raise AssertionError(f"commet_middleware.{module} is in no layer: add it to LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(module: str, path: Path) -> set[str]:
    """Return the package modules ``module`` imports (dotted, relative to the package)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                if node.module is None:  # ``from . import _http11``: the modules named
                    targets.update(".".join([*base, alias.name]) for alias in node.names)
                    continue
                name = ".".join([*base, node.module])
            elif node.module and node.module.startswith("commet_middleware"):
                name = node.module.removeprefix("commet_middleware").lstrip(".")
            else:
                continue
            targets.add(name or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("commet_middleware."):
                    targets.add(alias.name.removeprefix("commet_middleware."))
    return targets


EDGES = [
    (source, target) for source, path in modules().items() for target in imported(source, path)
]


def test_every_module_has_a_layer() -> None:
    """Every module of the package is placed in a layer, so the checks below see it."""
    for module in modules():
        layer_of(module)


@pytest.mark.parametrize(("source", "target"), EDGES, ids=[f"{s}->{t}" for s, t in EDGES])
def test_imports_point_down(source: str, target: str) -> None:
    """A module imports only its own layer or lower ones, never a sibling layer."""
    here, there = layer_of(source), layer_of(target)
    assert RANK[there] <= RANK[here] or here == "top", (
        f"{source} ({here}) imports {target} ({there}), a higher layer"
    )
    assert frozenset({here, there}) not in SIBLINGS or here == there, (
        f"{source} ({here}) imports {target} ({there}), a sibling layer"
    )


def test_billing_imports_no_framework() -> None:
    """The billing core is framework-neutral: no starlette, werkzeug, flask or django import
    (outside the refusal's optional werkzeug base)."""
    for module, path in modules().items():
        if layer_of(module) != "billing":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                root = name.split(".")[0]
                if root == "werkzeug" and module == "billing._refusals":
                    continue
                assert root not in {"starlette", "werkzeug", "flask", "django", "fastapi"}, (
                    f"{module} imports {name}"
                )


def test_adapters_never_import_each_other() -> None:
    """ASGI, WSGI and Django adapters share only the billing core."""
    for source, target in EDGES:
        mine, theirs = ADAPTERS.get(source), ADAPTERS.get(target)
        if mine is not None and theirs is not None:
            assert mine == theirs, f"adapter {source} imports adapter {target}"
