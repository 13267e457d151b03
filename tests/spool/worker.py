"""A separate process for the spool tests: crash with spooled work, or drain a shared spool.

python worker.py crash SPOOL N          enqueue N events whose sends hang, then SIGKILL itself
python worker.py drain SPOOL OUT PREFIX N
                                        enqueue N own events, deliver everything it can
                                        claim, write each attempted key to OUT
python worker.py serve-asgi|serve-wsgi SPOOL [KILL_AT_GROUP]
                                        serve GET /hello on 127.0.0.1 (uvicorn / wsgiref,
                                        threaded), billing the X-Customer-Id header's customer
                                        with the spool on and sends that hang; print the port.
                                        With KILL_AT_GROUP, SIGKILL itself when the spool writer
                                        is about to commit that group (1-based)
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from commet_middleware import CommetMiddleware, CommetSettings, CommetWSGIMiddleware, UsageEvent
from commet_middleware._models import Operation
from commet_middleware._spool import NewRow, Spool
from commet_middleware.customers import from_header
from commet_middleware.delivery import DeliveryQueue


class HangingSender:
    async def send_once(self, operation: Operation, *, request_body: bytes | None = None) -> None:
        await asyncio.sleep(3600)


class FileSender:
    def __init__(self, out: str) -> None:
        self.out = open(out, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    async def send_once(self, operation: Operation, *, request_body: bytes | None = None) -> None:
        # Written when the attempt starts: a second attempt anywhere would show as a repeat.
        self.out.write(operation.idempotency_key + "\n")
        await asyncio.sleep(0.002)


class KillingSpool(Spool):
    """A spool whose process dies (SIGKILL) as the writer is about to commit group ``kill_at``."""

    def __init__(self, path: str, kill_at: int) -> None:
        super().__init__(path)
        self.kill_at = kill_at
        self.groups = 0

    def add_many(self, entries: Sequence[NewRow]) -> list[int]:
        self.groups += 1
        if self.groups == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().add_many(entries)


def serve(mode: str, path: str, kill_at: int) -> None:
    spool = KillingSpool(path, kill_at) if kill_at else Spool(path)
    queue = DeliveryQueue(
        CommetSettings(api_key="ck_test", spool_path=path),
        sender_factory=lambda settings: HangingSender(),
        spool=spool,
    )
    options: dict[str, Any] = {"meter": "api_calls", "customer": from_header("X-Customer-Id")}
    if mode == "serve-asgi":
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        # Listening before the port is told: a client that connects before uvicorn has started
        # waits in the backlog instead of being refused.
        sock.listen(128)
        print(sock.getsockname()[1], flush=True)

        async def hello(scope: Any, receive: Any, send: Any) -> None:
            body = b"hello"
            headers = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        app = CommetMiddleware(hello, sink=queue, **options)
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
        return
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Threaded(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    def wsgi_hello(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hello"]

    server = Threaded(("127.0.0.1", 0), Quiet)
    print(server.server_address[1], flush=True)
    server.set_app(CommetWSGIMiddleware(wsgi_hello, sink=queue, **options))
    server.serve_forever()


def main(argv: list[str]) -> int:
    mode, path = argv[0], argv[1]
    if mode.startswith("serve-"):
        serve(mode, path, int(argv[2]) if len(argv) > 2 else 0)
        return 0
    if mode == "crash":
        queue = DeliveryQueue(
            CommetSettings(api_key="ck_test", spool_path=path, fold_when_behind=False),
            sender_factory=lambda settings: HangingSender(),
        )
        for i in range(int(argv[2])):
            queue.enqueue(UsageEvent.create("cus_1", "api_calls", 1, idempotency_key=f"crash-{i}"))
        time.sleep(0.2)  # let the sender take them: they are claimed and in flight
        os.kill(os.getpid(), signal.SIGKILL)
    out, prefix, count = argv[2], argv[3], int(argv[4])
    sender = FileSender(out)
    queue = DeliveryQueue(
        CommetSettings(
            api_key="ck_test",
            spool_path=path,
            max_concurrency=4,
            batch_size=5,
            fold_when_behind=False,  # each event checked by its own key
        ),
        sender_factory=lambda settings: sender,
    )
    queue.start()
    for i in range(count):
        queue.enqueue(UsageEvent.create("cus_2", "api_calls", 1, idempotency_key=f"{prefix}-{i}"))
    ok = queue.close(60)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
