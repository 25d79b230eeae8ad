"""The server's fast paths (xapid/server.py) against the paths they shortcut.

The whole-head parse must give what the line-by-line reader gives (the same request, the same
refusal, the same bytes left for the body); the route cache what the route search gives; the
call slots must bound their holders; ``send_parts`` must deliver every byte in order, also when
the client reads slowly, and give up at its deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xapid.server import (
    MAX_HEADER_LINES,
    ApiServer,
    Closed,
    Conn,
    Limits,
    Listener,
    Refused,
    RouteTable,
    Slots,
    XapiServer,
    find_route,
)

LIMITS = Limits(max_connections=8, max_connections_per_ip=8, header_timeout=0.2, body_timeout=0.2,
                keepalive_timeout=0.2, max_header_size=1024, max_request_size=4096, max_upload_size=1 << 20,
                worker_threads=2, login_threads=2, max_waiting_calls=2, max_waiting_calls_per_user=2,
                shutdown_timeout=0.2)


@pytest.fixture(scope="module")
def routes() -> RouteTable:
    return RouteTable(object.__new__(XapiServer).routes())


def server() -> ApiServer:
    s = object.__new__(ApiServer)  # parsing needs only the limits
    s.limits = LIMITS
    return s


def parse(head: bytes, routes: RouteTable, fast: bool) -> tuple[str, Any, bytes]:
    """What ``_read_head`` makes of ``head`` already received (the client then closes):
    ("ok", request fields, bytes left) or the refusal."""
    a, b = socket.socketpair()
    b.close()
    conn = Conn(a, "127.0.0.1")
    conn.buf = bytearray(head)
    srv = server()
    if not fast:
        srv._whole_head = lambda _conn: None  # type: ignore[method-assign]
    listener = object.__new__(Listener)
    try:
        request, route, length = srv._read_head(conn, listener, routes)
        got: tuple[str, Any, bytes] = ("ok", (request.method, request.path, request.query, request.version,
                                              request.headers, request.close, route, length), bytes(conn.buf))
    except Refused as e:
        got = ("refused", (e.status, str(e)), b"")
    except Closed:
        got = ("closed", None, b"")
    finally:
        a.close()
    return got


def same(head: bytes, routes: RouteTable) -> tuple[str, Any, bytes]:
    fast, slow = parse(head, routes, True), parse(head, routes, False)
    assert fast == slow, head
    return fast


def test_a_plain_head_is_taken_whole(routes: RouteTable) -> None:
    head = b"POST /jsonrpc?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    a, _b = socket.socketpair()
    conn = Conn(a, "local")
    conn.buf = bytearray(head)
    assert server()._whole_head(conn) == ["POST /jsonrpc?x=1 HTTP/1.1", "Host: h", "Content-Length: 3",
                                          "Connection: close"]
    assert conn.buf == b"abc"
    kind, (method, path, query, version, headers, close, route, length), rest = same(head, routes)
    assert (kind, method, path, query, version, close, length, rest) == \
        ("ok", "POST", "/jsonrpc", "x=1", (1, 1), True, 3, b"abc")
    assert route.handler is ApiServer.jsonrpc and headers["content-length"] == ["3"]
    a.close()
    _b.close()


LINES = st.sampled_from([
    "Host: h", "host: h2", "Content-Length: 5", "content-length: 0", "Content-Length: 99999", "Content-Length: x",
    "Transfer-Encoding: chunked", "Connection: close", "Connection: keep-alive", "Expect: 100-continue",
    " folded", "\tfolded", "No-Colon", "Bad Name: v", "X-A: b\x00c", "X-A: b\rc", "X-Long: " + "v" * 700, "",
    "X-Empty:", "User-Agent: t",
])
REQUEST_LINES = st.sampled_from([
    "POST / HTTP/1.1", "POST /RPC2 HTTP/1.0", "GET /console HTTP/1.1", "PUT /import HTTP/1.1",
    "POST http://h/jsonrpc HTTP/1.1", "POST /a#f HTTP/1.1", "POST / HTTP/2.0", "POST / HTTP/1.x", "POST  / HTTP/1.1",
    "P@ST / HTTP/1.1", "POST /", "",
])
ENDINGS = st.sampled_from(["\r\n", "\n", "\r\n", "\r\n"])


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 2), REQUEST_LINES, st.lists(st.tuples(LINES, ENDINGS), max_size=6),
       st.sampled_from(["\r\n", "\n", ""]), st.binary(max_size=8))
def test_whole_head_and_line_reader_agree(routes: RouteTable, blank: int, first: str,
                                          lines: list[tuple[str, str]], end: str, body: bytes) -> None:
    text = "\r\n" * blank + first + "\r\n" + "".join(line + ending for line, ending in lines) + end
    same(text.encode("latin-1") + body, routes)


@pytest.mark.parametrize("count", [MAX_HEADER_LINES - 2, MAX_HEADER_LINES - 1, MAX_HEADER_LINES,
                                   MAX_HEADER_LINES + 1])
def test_the_line_cap_is_the_same_on_both_paths(routes: RouteTable, count: int) -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n" + b"X: y\r\n" * count + b"\r\n"
    assert same(head, routes)[0] == ("ok" if count + 3 <= MAX_HEADER_LINES + 1 else "refused")


@pytest.mark.parametrize("size", [LIMITS.max_header_size - 1, LIMITS.max_header_size, LIMITS.max_header_size + 1])
def test_the_size_cap_is_the_same_on_both_paths(routes: RouteTable, size: int) -> None:
    start = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nX: "
    head = start + b"v" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    assert same(head, routes)[0] == ("ok" if size <= LIMITS.max_header_size else "refused")


def test_the_route_cache_answers_as_the_search_and_stays_bounded(routes: RouteTable) -> None:
    for method, path in [("POST", "/"), ("POST", "/jsonrpc"), ("GET", "/console/x"), ("PUT", "/"),
                         ("POST", "/xapid/fault"), ("POST", "/xapid/fault/x"), ("POST", "/jsonrpc")]:
        assert routes.find(method, path) is find_route(routes, method, path)
    table = RouteTable(routes)
    for i in range(3000):
        assert table.find("GET", f"/p{i}") is find_route(routes, "GET", f"/p{i}")
    assert len(table._found) <= 1024


def test_slots_bound_their_holders() -> None:
    slots = Slots(3)
    inside, most = [0], [0]
    lock = threading.Lock()

    def work() -> None:
        with slots:
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.01)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 3 and slots.free() == 3


@pytest.fixture()
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    yield a, b
    a.close()
    b.close()


def test_send_parts_delivers_every_byte_in_order_to_a_slow_reader(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    parts = [bytes([i % 251]) * (i * 37 % 5000) for i in range(3000)]  # more pieces than one sendmsg takes
    got = bytearray()

    def read() -> None:
        while True:
            chunk = b.recv(65536)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.0005)

    reader = threading.Thread(target=read)
    reader.start()
    assert Conn(a, "local").send_parts(parts, 30.0)
    a.shutdown(socket.SHUT_WR)
    reader.join()
    assert got == b"".join(parts)


def test_send_parts_gives_up_at_its_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    started = time.monotonic()
    assert not Conn(a, "local").send_parts([b"x" * (1 << 20)] * 8, 0.3)  # nobody reads
    assert 0.25 < time.monotonic() - started < 3.0


def test_reads_wait_for_data_and_keep_the_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    conn = Conn(a, "local")
    threading.Timer(0.05, lambda: b.sendall(b"GET / HTTP/1.1\r\n\r\nrest")).start()
    assert conn.readline(time.monotonic() + 2.0, 1024) == b"GET / HTTP/1.1\r\n"
    assert conn.read(6, time.monotonic() + 2.0) == b"\r\nrest"
    started = time.monotonic()
    with pytest.raises(Exception) as e:  # noqa: PT011 - Deadline is the server's own
        conn.read(1, time.monotonic() + 0.2)
    assert type(e.value).__name__ == "Deadline" and time.monotonic() - started >= 0.19
    b.close()
    with pytest.raises(Closed):
        conn.read(1, time.monotonic() + 1.0)
