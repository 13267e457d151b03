"""Tell when the app runs under several worker processes while quota state is per process."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

__all__ = ["server_workers", "warn_if_per_process"]

logger = logging.getLogger("commet_middleware.quota")


def server_workers(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, int] | None:
    """Return (server, worker count) when gunicorn or uvicorn runs this process, else None.

    Read from what both servers leave behind: their command line (a gunicorn worker is forked
    from it, a uvicorn worker is spawned with it), ``GUNICORN_CMD_ARGS``, and
    ``WEB_CONCURRENCY`` (the default worker count of both). A count set only in a gunicorn
    config file is not seen.
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    program = argv[0].lower() if argv else ""
    if "gunicorn" in program:
        server = "gunicorn"
        args = shlex.split(environ.get("GUNICORN_CMD_ARGS", "")) + list(argv[1:])
        names: tuple[str, ...] = ("-w", "--workers")
    elif "uvicorn" in program:
        server = "uvicorn"
        args = list(argv[1:])
        names = ("--workers",)
    else:
        return None
    count: int | None = None
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                value = args[index + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
            elif name == "-w" and arg.startswith("-w") and arg[2:].isdigit():
                value = arg[2:]
            else:
                continue
            if value.isdigit():
                count = int(value)
    if count is None:
        concurrency = environ.get("WEB_CONCURRENCY", "")
        count = int(concurrency) if concurrency.isdigit() else 1
    return server, count


def warn_if_per_process(store_url: str) -> bool:
    """Log one WARNING when several workers each keep their own quota state; True if warned."""
    found = server_workers()
    if found is None or found[1] < 2:
        return False
    server, count = found
    logger.warning(
        "commet: %s runs %d workers but the quota store is %r, one per process: each worker "
        "lets the whole allowance through, so @quota_guard is not exact. Set "
        "COMMET_QUOTA_STORE=sqlite:///PATH (every worker of one host) or "
        "redis://HOST:PORT/DB (several hosts), or quota_store= on the middleware",
        server,
        count,
        store_url,
    )
    return True
