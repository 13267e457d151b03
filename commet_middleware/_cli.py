"""The ``commet-middleware`` command: run the local Commet emulator, or a short demo of it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

DEMO_API_KEY = "ck_sandbox_demo"


def _emulator(args: argparse.Namespace) -> int:
    from .testing import FakeCommet
    from .testing._server import bind_socket, run_forever

    fake = FakeCommet.from_catalogue(args.config)
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    catalogue = args.config or "the demo catalogue"
    print(f"Commet emulator on http://{host}:{port} ({catalogue}); Ctrl+C stops it", flush=True)
    run_forever(fake.app, sock)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import httpx

    from .testing import FakeCommet

    fake = FakeCommet.from_catalogue()
    with (
        fake.serve() as url,
        httpx.Client(base_url=url, headers={"x-api-key": DEMO_API_KEY}, timeout=10) as client,
    ):
        calls: list[tuple[str, str, dict[str, object] | None]] = [
            (
                "POST",
                "/api/v1/usage/events",
                {"featureCode": "api_calls", "customerId": "user_123", "eventId": "evt-1"},
            ),
            (
                "POST",
                "/api/v1/usage/events",
                {"featureCode": "api_calls", "customerId": "user_123", "eventId": "evt-1"},
            ),
            (
                "POST",
                "/api/usage/events",
                {
                    "feature": "ai_tokens",
                    "customerId": "user_123",
                    "value": 1500,
                    "idempotencyKey": "req-2",
                    "properties": {"model": "small"},
                },
            ),
            (
                "POST",
                "/api/v1/usage/quota",
                {"featureCode": "tasks", "customerId": "user_123", "count": 12},
            ),
            (
                "DELETE",
                "/api/usage/quota",
                {"featureCode": "tasks", "customerId": "user_123", "count": 4},
            ),
            ("GET", "/api/v1/usage/quota?customerId=user_123&featureCode=tasks", None),
            (
                "POST",
                "/api/v1/usage/quota",
                {"featureCode": "whatsapp_numbers", "customerId": "user_123", "count": 5},
            ),
        ]
        print(f"emulator at {url}\n")
        print(f"{'request':<64} {'status':>6}  answer")
        for method, path, body in calls:
            response = client.request(method, path, json=body)
            payload = response.json()
            error = payload.get("error") if isinstance(payload, dict) else None
            note = f"{error['type']}/{error['code']}" if error else payload.get("object", "")
            if response.headers.get("deprecation") == "true":
                note += "  (legacy: Deprecation: true)"
            print(f"{method + ' ' + path:<64} {response.status_code:>6}  {note}")
    print("\nrecorded usage events:")
    print(f"  {'customer':<10} {'feature':<10} {'value':>6}  {'key':<8} dialect")
    for event in fake.events():
        print(
            f"  {event.customer_id:<10} {event.feature:<10} {event.value:>6}  "
            f"{event.idempotency_key or '-':<8} {event.dialect}"
        )
    allowance = fake.quota("user_123", "tasks")
    print(
        f"\nquota user_123/tasks: current={allowance.current} included={allowance.included} "
        f"remaining={allowance.remaining} billed={allowance.billed_quantity}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="commet-middleware", description="Tools for commet-middleware."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    emulator = commands.add_parser("emulator", help="run the local Commet emulator")
    emulator.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    emulator.add_argument("--port", type=int, default=8787, help="port (8787; 0 picks one)")
    emulator.add_argument(
        "--config", default=None, help="TOML catalogue of features and customers (default: demo)"
    )
    emulator.set_defaults(run=_emulator)
    demo = commands.add_parser("demo", help="send a few requests to an emulator and show them")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
