"""Run one benchmark by name: ``python -m bench NAME [options]`` (names below)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "delivery": "bench.delivery",
    "http": "bench.http",
    "request_path": "bench.request_path",
    "sender_cost": "bench.sender_cost",
    "sender_http": "bench.sender_http",
    "soak": "bench.soak",
    "spool_cost": "bench.spool_cost",
    "worker_modes": "bench.worker_modes",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: python -m bench {" + ",".join(sorted(BENCHMARKS)) + "} [options]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
