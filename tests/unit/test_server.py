"""The server's pure parts: routing, connection caps and eviction, limits from the config."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from xapid import config
from xapid.server import (
    BUSY,
    IDLE,
    READING,
    ApiServer,
    Conn,
    Limits,
    Registry,
    Route,
    UnixXapiServer,
    XapiServer,
    find_route,
)


class Pair:
    """A connected socket pair: the server's end goes into a Conn, the client's end sees the cut."""

    def __init__(self) -> None:
        self.server, self.client = socket.socketpair()
        self.client.settimeout(0.2)

    def was_cut(self) -> bool:
        try:
            return self.client.recv(1) == b""
        except TimeoutError:
            return False


PAIRS: list[Pair] = []


@pytest.fixture(autouse=True)
def close_pairs() -> Iterator[None]:
    yield
    for pair in PAIRS:
        pair.server.close()
        pair.client.close()
    PAIRS.clear()


def conn(ip: str, state: str = IDLE, served: int = 0, since: float = 0.0) -> Conn:
    pair = Pair()
    PAIRS.append(pair)
    c = Conn(pair.server, ip)
    c.state, c.served, c.since = state, served, since
    return c


def was_cut(c: Conn) -> bool:
    return next(p for p in PAIRS if p.server is c.sock).was_cut()


def test_the_longest_prefix_wins_and_exact_routes_match_only_themselves() -> None:
    routes = object.__new__(XapiServer).routes()  # the route table needs no socket
    assert find_route(routes, "POST", "/").handler is ApiServer.xmlrpc  # type: ignore[union-attr]
    assert find_route(routes, "POST", "/RPC2").handler is ApiServer.xmlrpc  # type: ignore[union-attr]
    assert find_route(routes, "POST", "/jsonrpc").handler is ApiServer.jsonrpc  # type: ignore[union-attr]
    # Over TCP the fault endpoint is the console's authenticated form; every GET goes to the console.
    assert find_route(routes, "POST", "/xapid/fault").handler is ApiServer.console_fault  # type: ignore[union-attr]
    assert find_route(routes, "POST", "/xapid/fault/x").handler is ApiServer.xmlrpc  # type: ignore[union-attr]
    assert find_route(routes, "GET", "/console/static/x.js").handler is ApiServer.console_get  # type: ignore
    assert find_route(routes, "PUT", "/") is None
    local = object.__new__(UnixXapiServer).routes()
    assert find_route(local, "POST", "/xapid/fault").handler is ApiServer.fault  # type: ignore[union-attr]
    assert find_route(local, "POST", "/xapid/fault/x").handler is ApiServer.xmlrpc  # type: ignore[union-attr]
    upload = Route("PUT", "/import", ApiServer.fault, body_cap="max_upload_size")
    assert find_route([upload], "PUT", "/import/raw") is upload


def test_a_full_address_makes_room_by_closing_its_never_used_connections_first() -> None:
    reg = Registry(total=10, per_ip=3)
    old_served = conn("a", IDLE, served=5, since=1.0)
    fresh_idle = conn("a", IDLE, since=3.0)
    slow_head = conn("a", READING, since=2.0)
    for c in (old_served, fresh_idle, slow_head):
        assert reg.admit(c)
    assert reg.admit(conn("a", since=10.0))
    assert was_cut(slow_head)  # never served, oldest
    assert reg.admit(conn("a", since=11.0))
    assert was_cut(fresh_idle)
    assert not was_cut(old_served)
    assert reg.by_ip == {"a": 3} and reg.evicted == 2
    assert reg.admit(conn("b"))  # another address is not affected


def test_when_every_connection_is_busy_the_newcomer_is_refused() -> None:
    reg = Registry(total=2, per_ip=2)
    busy = [conn("a", BUSY), conn("b", BUSY)]
    for c in busy:
        assert reg.admit(c)
    assert not reg.admit(conn("c"))
    assert reg.refused == 1 and not any(was_cut(c) for c in busy)
    reg.remove(busy[0])
    reg.remove(busy[0])  # removing twice is harmless
    assert reg.admit(conn("c")) and reg.by_ip == {"b": 1, "c": 1}


def limits_of(tmp_path: Path, text: str) -> Limits:
    path = tmp_path / "x.conf"
    path.write_text(text)
    return Limits.from_config(config.load(path))


def test_limits_come_from_the_config_with_xapis_rpc_cap_by_default(tmp_path: Path) -> None:
    lim = limits_of(tmp_path, "")
    assert lim.max_request_size == 300 * 1024  # ocaml/xapi-consts/constants.ml http_limit_max_rpc_size
    assert lim.max_upload_size > lim.max_request_size
    assert limits_of(tmp_path, "header-timeout = 2.5\nmax-connections = 9\n").header_timeout == 2.5


@pytest.mark.parametrize("line", ["max-connections = 0", "header-timeout = -1", "max-header-size = 100"])
def test_limits_out_of_range_stop_start_up(tmp_path: Path, line: str) -> None:
    with pytest.raises(config.ConfigError):
        limits_of(tmp_path, line + "\n")


def test_every_limit_has_a_documented_config_key() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shipped = (Path(__file__).resolve().parents[2] / "etc" / "xapi.conf").read_text()
    for name in Limits.__dataclass_fields__:
        key = name.replace("_", "-")
        assert key in config.DEFAULTS
        assert f"`{key}`" in readme, key
        assert key in shipped, key
