"""A separate process for the spool tests: crash with spooled work, or drain a shared spool.

python worker.py crash SPOOL N          enqueue N events whose sends hang, then SIGKILL itself
python worker.py drain SPOOL OUT PREFIX N
                                        enqueue N own events, deliver everything it can
                                        claim, write each attempted key to OUT
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from commet_middleware import CommetSettings, UsageEvent
from commet_middleware._models import Operation
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


def main(argv: list[str]) -> int:
    mode, path = argv[0], argv[1]
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
