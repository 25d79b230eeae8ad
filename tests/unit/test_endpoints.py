"""xapid.endpoints: one port free on the pool's address and on every host's address."""

from __future__ import annotations

import socket

import pytest

from xapid.endpoints import bind_all, wildcard


def test_port_zero_skips_a_port_busy_on_one_host_address() -> None:
    first = socket.create_server(("127.0.0.1", 0))
    busy_port = first.getsockname()[1]
    squatter = socket.create_server(("127.0.1.2", busy_port))
    try:
        pool, hosts = bind_all("127.0.0.1", 0, ["127.0.1.1", "127.0.1.2"], first=first)
        try:
            port = pool.getsockname()[1]
            assert port != busy_port
            assert {a: s.getsockname() for a, s in hosts.items()} == {
                "127.0.1.1": ("127.0.1.1", port), "127.0.1.2": ("127.0.1.2", port)}
        finally:
            pool.close()
            for s in hosts.values():
                s.close()
    finally:
        squatter.close()


def test_a_fixed_port_busy_on_a_host_address_names_it() -> None:
    squatter = socket.create_server(("127.0.1.3", 0))
    port = squatter.getsockname()[1]
    try:
        with pytest.raises(OSError) as e:
            bind_all("127.0.0.1", port, ["127.0.1.3"])
        assert f"127.0.1.3:{port}" in str(e.value)
    finally:
        squatter.close()
    # Nothing is left bound: the same port can be taken again at once.
    socket.create_server(("127.0.0.1", port)).close()


def test_wildcards() -> None:
    assert wildcard("0.0.0.0") and wildcard("::") and wildcard("")
    assert not wildcard("127.0.0.1") and not wildcard("localhost")
