"""The emulator's listening socket is set up so real-server tests are not slowed by Nagle."""

from __future__ import annotations

import socket

from commet_middleware.testing._server import bind_socket


def test_listening_socket_names_tcp_so_asyncio_sets_nodelay() -> None:
    """Accepted connections inherit IPPROTO_TCP, which is when asyncio turns on TCP_NODELAY."""
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname(), timeout=5)
        accepted, _ = sock.accept()
        with client, accepted:
            assert accepted.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
