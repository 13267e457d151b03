"""The Flask example for ``gunicorn --preload``, forked while the master's sender is importing.

A request served in the master starts the delivery sender thread there. A finder slows the
master's import of httpcore (httpx imports it lazily), as a slow disk or a busy machine does by
chance. When the sender thread did that import while building its client, gunicorn forked its
workers mid-import: each inherited a half-built module and an import lock held by a thread that
does not exist in it, and never delivered. Now the thread starting the sender imports the HTTP
stack first, and the master's sender thread is stopped before each fork.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType

MASTER_PID = os.getpid()
SLOW_IMPORT_SECONDS = 2.0
_importing = threading.Event()


class _SlowLoader(Loader):
    """Runs the real loader, after a pause with the module already in ``sys.modules``."""

    def __init__(self, real: Loader) -> None:
        self._real = real

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        _importing.set()
        time.sleep(SLOW_IMPORT_SECONDS)
        self._real.exec_module(module)


class _SlowImport(MetaPathFinder):
    """Slows the master's import of httpcore, whichever thread does it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "httpcore" or os.getpid() != MASTER_PID:
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _SlowLoader(spec.loader)
        return spec


# Once httpcore is imported eagerly (before any sender thread exists) there is no race left:
# the app is then served as is, and the test shows the workers deliver.
lazy = "httpcore" not in sys.modules
if lazy:
    sys.meta_path.insert(0, _SlowImport())

from examples.flask_app import app  # noqa: E402 - after the finder is in place

assert app.test_client().get("/health").status_code == 200
if lazy:
    # Return (and let gunicorn fork) only once somebody is inside the import: the sender
    # thread today; the main thread, which then finishes it first, once the bug is fixed.
    assert _importing.wait(timeout=10), "nothing imported httpcore"

__all__ = ["app"]
