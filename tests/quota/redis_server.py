"""A throwaway Debian redis-server on a free 127.0.0.1 port, for the Redis quota store tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

__all__ = ["RedisServer", "redis_server_or_skip"]

READY_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary() -> str:
    """Return redis-server's path; skip without it, but fail in CI (CI=true) where it must be."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    reason = "redis-server is not installed (scripts/ensure-redis installs Debian's package)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + "; CI must run the Redis tests")
    pytest.skip(reason)


class RedisServer:
    """One redis-server process (no persistence) that can be stopped and started again."""

    def __init__(self, binary: str, directory: str) -> None:
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server on its port and wait until it answers PING."""
        self.process = subprocess.Popen(  # noqa: S603 - a fixed command line
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                self.directory,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"redis-server not ready after {READY_TIMEOUT}s")

    def stop(self) -> None:
        """Kill the server (its data is gone: no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextmanager
def redis_server_or_skip() -> Iterator[RedisServer]:
    """Run a redis-server for the block; skip (fail in CI) when none is installed."""
    binary = _binary()
    with tempfile.TemporaryDirectory(prefix="commet-redis-") as directory:
        server = RedisServer(binary, directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()
