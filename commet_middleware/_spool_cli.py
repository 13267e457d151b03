"""The ``commet-middleware spool`` commands: inspect a spool file and revive dead letters."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

__all__ = ["add_spool_commands", "main", "run_spool_command"]


def add_spool_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``spool stats|dead|retry [--path FILE]`` to an ``add_subparsers()`` object.

    The parser's ``run`` (the convention of ``_cli``) and ``handler`` defaults are
    :func:`run_spool_command`, so a main that calls ``args.run(args)`` needs no other wiring.
    """
    spool: argparse.ArgumentParser = subparsers.add_parser(
        "spool", help="inspect the durable delivery spool (pending, claimed, dead letters)"
    )
    spool.set_defaults(run=run_spool_command, handler=run_spool_command)
    actions = spool.add_subparsers(dest="spool_action", required=True)

    def path_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--path",
            default=os.environ.get("COMMET_SPOOL"),
            help="the spool file (default: $COMMET_SPOOL)",
        )

    path_option(actions.add_parser("stats", help="count pending, claimed and dead rows"))
    dead = actions.add_parser("dead", help="list dead-lettered operations with their reasons")
    path_option(dead)
    dead.add_argument("--limit", type=int, default=None, help="show at most this many")
    dead.add_argument("--json", action="store_true", help="one JSON object per line")
    retry = actions.add_parser("retry", help="move dead-lettered operations back to pending")
    path_option(retry)
    retry.add_argument("ids", nargs="*", type=int, help="dead row ids (default: all of them)")
    return spool


def run_spool_command(args: argparse.Namespace) -> int:
    """Run the ``spool`` action in ``args``; return the exit status."""
    from ._spool import Spool

    path = args.path
    if not path:
        print("commet-middleware spool: give --path FILE or set COMMET_SPOOL", file=sys.stderr)
        return 2
    if not os.path.exists(path):
        print(f"commet-middleware spool: no spool file at {path}", file=sys.stderr)
        return 1
    spool = Spool(path)
    try:
        if args.spool_action == "stats":
            stats = spool.stats()
            print(f"pending {stats.pending}")
            print(f"claimed {stats.claimed}")
            print(f"dead    {stats.dead}")
        elif args.spool_action == "dead":
            for row in spool.dead(args.limit):
                failed = datetime.fromtimestamp(row.failed_at, timezone.utc).isoformat(
                    timespec="seconds"
                )
                if args.json:
                    record = {
                        "id": row.row_id,
                        "idempotency_key": row.idempotency_key,
                        "kind": row.kind,
                        "operation": json.loads(row.operation),
                        "attempts": row.attempts,
                        "failed_at": failed,
                        "reason": row.reason,
                    }
                    print(json.dumps(record, sort_keys=True))
                else:
                    print(f"{row.row_id}\t{failed}\t{row.idempotency_key}\t{row.reason}")
        else:
            if args.ids:
                known = {row.row_id for row in spool.dead(None)}
                unknown = [row_id for row_id in args.ids if row_id not in known]
                if unknown:
                    listed = ", ".join(str(row_id) for row_id in unknown)
                    print(
                        f"commet-middleware spool: no dead row with id {listed} "
                        "(`spool dead` lists them); nothing moved",
                        file=sys.stderr,
                    )
                    return 1
            moved = spool.retry_dead(args.ids or None)
            print(f"moved {moved} dead operations back to pending")
    finally:
        spool.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``commet-middleware spool ...`` on its own (``argv`` starts with ``spool``)."""
    parser = argparse.ArgumentParser(prog="commet-middleware")
    add_spool_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_spool_command(args)


if __name__ == "__main__":
    sys.exit(main())
