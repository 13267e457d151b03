"""Idempotency key derivation."""

from __future__ import annotations

import re

from commet_middleware._keys import client_request_seed, derive_idempotency_key, new_request_id


def test_key_shape_is_prefixed_fixed_length_hex() -> None:
    """A key is ``cm_`` followed by 32 lowercase hex characters."""
    key = derive_idempotency_key("request\x1fabc", "api_calls", 1)
    assert re.fullmatch(r"cm_[0-9a-f]{32}", key)


def test_same_inputs_give_the_same_key() -> None:
    """Derivation is deterministic, so a retried delivery carries the same key."""
    assert derive_idempotency_key("s", "api_calls", 3) == derive_idempotency_key(
        "s", "api_calls", 3
    )


def test_seed_feature_and_ordinal_each_change_the_key() -> None:
    """Changing the request seed, the feature or the ordinal gives a different key."""
    base = derive_idempotency_key("s", "api_calls", 1)
    assert derive_idempotency_key("t", "api_calls", 1) != base
    assert derive_idempotency_key("s", "tokens", 1) != base
    assert derive_idempotency_key("s", "api_calls", 2) != base


def test_request_ids_are_distinct() -> None:
    """Every executed request gets its own id."""
    assert len({new_request_id() for _ in range(1000)}) == 1000


def test_client_request_seed_binds_the_whole_request() -> None:
    """A client key is scoped to its customer; its fingerprint covers method, path, query, body."""
    record, fingerprint, seed = client_request_seed("k1", "cus_1", "post", "/a", "x=1", b"{}")
    assert (record, fingerprint, seed) == client_request_seed(
        "k1", "cus_1", "POST", "/a", "x=1", b"{}"
    )
    assert client_request_seed("k1", "cus_2", "POST", "/a", "x=1", b"{}")[0] != record
    assert client_request_seed("k2", "cus_1", "POST", "/a", "x=1", b"{}")[0] != record
    others = [
        client_request_seed("k1", "cus_1", *request)
        for request in [
            ("PUT", "/a", "x=1", b"{}"),
            ("POST", "/b", "x=1", b"{}"),
            ("POST", "/a", "x=2", b"{}"),
            ("POST", "/a", "x=1", b"{ }"),
        ]
    ]
    assert {other[0] for other in others} == {record}
    assert fingerprint not in {other[1] for other in others}
    assert seed not in {other[2] for other in others}


def test_request_ids_have_a_fixed_hex_shape() -> None:
    """A request id is 32 lowercase hex characters, like the uuid4 hex it replaced."""
    assert re.fullmatch(r"[0-9a-f]{32}", new_request_id())


def test_a_forked_child_never_repeats_the_parents_request_ids() -> None:
    """The child draws a new nonce: ids from parent and child after the fork never collide."""
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send 100 ids to the parent, then leave without cleanup
        os.close(read)
        os.write(write, "\n".join(new_request_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    parent_ids = {new_request_id() for _ in range(100)}
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    child_ids = set(b"".join(chunks).decode().split("\n"))
    assert len(child_ids) == 100
    assert not parent_ids & child_ids
    assert {i[:16] for i in child_ids} != {i[:16] for i in parent_ids}
