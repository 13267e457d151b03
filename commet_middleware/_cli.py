"""The ``commet-middleware`` command: the local Commet emulator, the demo, the spool tools."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import signal
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _fail(command: str, message: str, status: int = 2) -> int:
    """Say what went wrong in one line on stderr; return the exit status."""
    print(f"commet-middleware {command}: {message}", file=sys.stderr)
    return status


def _version() -> str:
    try:
        return importlib.metadata.version("commet-middleware")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare source tree
        return "unknown"


def _emulator(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("uvicorn") is None:
        return _fail(
            "emulator", "the emulator needs uvicorn: pip install 'commet-middleware[server]'"
        )
    from .testing import FakeCommet
    from .testing._server import bind_socket, run_forever

    try:
        fake = FakeCommet.from_catalogue(args.config, allowed_hosts=args.allow_host)
    except OSError as exc:
        return _fail("emulator", f"cannot read the catalogue {args.config}: {exc.strerror or exc}")
    except ValueError as exc:  # a TOML syntax error is a ValueError too
        return _fail("emulator", f"bad catalogue: {exc}")
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        return _fail(
            "emulator",
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
            "(another port: --port, or --port 0 for any free one)",
        )
    host, port = sock.getsockname()[:2]
    catalogue = args.config or "the demo catalogue"
    print(f"Commet emulator on http://{host}:{port} ({catalogue}); Ctrl+C stops it", flush=True)
    run_forever(fake.app, sock)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import DemoError, DemoOptions, DemoReport, format_report, run_demo

    try:
        options = DemoOptions(
            app=args.app,
            customers=args.customers,
            duration=args.duration,
            outage=min(args.outage, args.duration),
            spool=not args.no_spool,
            emulator_port=args.emulator_port,
            app_port=args.app_port,
            progress=False if args.no_progress else None,
        )
    except ValueError as exc:
        print(f"commet-middleware demo: {exc}", file=sys.stderr)
        return 2

    def serve_until(report: DemoReport) -> None:
        print(format_report(report), flush=True)
        print(f"\nserving until Ctrl+C:\n  dashboard  {report.dashboard_url}")
        print(f"  app        {report.app_url}")
        if report.app == "fastapi":
            print(f"  API docs   {report.app_url}/docs")
        print(f"  try: curl -H 'X-Customer-ID: user_123' '{report.app_url}/search?q=policy'")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
        print("\nstopping (the app flushes its queue) ...", file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM tears down like Ctrl+C: the app is stopped (and flushes), temporary files go.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        report = run_demo(options, serve_until=serve_until if args.serve else None)
    except DemoError as exc:
        print(f"commet-middleware demo: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port taken (--app-port, --emulator-port), a full disk
        return _fail("demo", f"{exc.strerror or exc}")
    except KeyboardInterrupt:
        print("\ncommet-middleware demo: interrupted", file=sys.stderr)
        return 130
    if not args.serve:
        print(format_report(report), flush=True)
    return 0 if report.ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="commet-middleware", description="Tools for commet-middleware."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    emulator = commands.add_parser(
        "emulator",
        help="run the local Commet emulator",
        description=(
            "Serve the emulated Commet API, and its dashboard at / (state and fault controls, "
            "no API key). It answers only requests whose Host header is a loopback name "
            "(localhost, *.localhost), a loopback address (127.0.0.1, ::1) or the address it is "
            "bound to; any other Host gets 403, so a web page open in your browser cannot reach "
            "it through a DNS name pointed at 127.0.0.1 (DNS rebinding). Add names with "
            "--allow-host. The fault controls also refuse cross-origin and non-JSON requests. "
            "It is a development tool: keep it on 127.0.0.1."
        ),
    )
    emulator.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    emulator.add_argument("--port", type=int, default=8787, help="port (8787; 0 picks one)")
    emulator.add_argument(
        "--config", default=None, help="TOML catalogue of features and customers (default: demo)"
    )
    emulator.add_argument(
        "--allow-host", action="append", default=[], metavar="NAME",
        help=(
            "also answer requests with Host NAME (repeatable), e.g. a name in /etc/hosts or a "
            "container's; '*' answers any Host and re-opens DNS rebinding"
        ),
    )  # fmt: skip
    emulator.set_defaults(run=_emulator)
    demo = commands.add_parser(
        "demo",
        help="bill an example app's traffic through a local emulator and check every event",
        description=(
            "Serve the Commet emulator, run an example app against it, drive a scripted load "
            "(metered calls, quotas up to 402, a release, no-customer and failing requests, "
            "a Commet outage and its recovery), stop the app and compare what was billed with "
            "what Commet recorded. Exit status 1 if an event was lost or duplicated."
        ),
    )
    demo.add_argument(
        "--app", choices=("fastapi", "flask", "starlette"), default="fastapi",
        help="which example app to run (default fastapi)",
    )  # fmt: skip
    demo.add_argument("--customers", type=int, default=3, help="customers sending load (3)")
    demo.add_argument("--duration", type=float, default=8.0, help="seconds of load (8)")
    demo.add_argument(
        "--outage", type=float, default=2.0,
        help="seconds the emulator answers 503 mid-run (2; 0: none)",
    )  # fmt: skip
    demo.add_argument(
        "--no-spool", action="store_true", help="run the app without the durable SQLite spool"
    )
    demo.add_argument(
        "--serve", action="store_true",
        help="keep the emulator and the app running after the load, until Ctrl+C",
    )  # fmt: skip
    demo.add_argument("--emulator-port", type=int, default=0, help="emulator port (0: any)")
    demo.add_argument("--app-port", type=int, default=0, help="app port (0: any)")
    demo.add_argument(
        "--no-progress", action="store_true", help="periodic lines instead of a progress bar"
    )
    demo.set_defaults(run=_demo)
    try:
        from ._spool_cli import add_spool_commands
    except ImportError:  # pragma: no cover - the spool commands ship with the spool
        pass
    else:
        add_spool_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
