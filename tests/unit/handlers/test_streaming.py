"""Streamed bodies through the real server: answers piece by piece, request bodies read as they arrive.

A served ApiServer (in-process daemon, a listener on 127.0.0.1:0) with two test routes; raw sockets
play the client, so framing (content-length, chunked, a client that leaves) is what goes on the wire.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.unit.hardening.support import in_process_daemon
from xapid.daemon import Daemon
from xapid.server import ApiServer, ClientGone, Limits, Request, Response, Route, XapiServer, bind_tcp

EVENTS: list[str] = []


def upload(server: ApiServer, request: Request) -> Response:
    """Hash the streamed body; answer its size and digest."""
    reader = request.reader
    assert reader is not None
    digest = hashlib.sha256()
    try:
        while True:
            piece = reader.read(4096)
            if not piece:
                break
            digest.update(piece)
    except ClientGone:
        EVENTS.append(f"gone after {reader.received}")
        raise
    return Response(200, f"{reader.received} {digest.hexdigest()}".encode())


def download(server: ApiServer, request: Request) -> Response:
    n = int(request.query or "3")

    def pieces() -> Iterator[bytes]:
        try:
            for i in range(n):
                yield bytes([65 + i % 26]) * 65536
            EVENTS.append("stream done")
        finally:
            EVENTS.append("stream closed")

    return Response(200, b"", "application/octet-stream", stream=pieces(),
                    length=None if request.header("x-chunked") else n * 65536)


class StreamingListener(XapiServer):
    def routes(self) -> list[Route]:
        return [*super().routes(), Route("PUT", "/up", upload, exact=True, stream=True, body_cap="max_upload_size"),
                Route("GET", "/down", download, exact=True)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    daemon: Daemon = in_process_daemon(tmp_path_factory.mktemp("stream"), **{"body-timeout": "1"})
    server = ApiServer(daemon, Limits.from_config(daemon.config))
    listener = StreamingListener(bind_tcp("127.0.0.1", 0))
    server.serve(listener)
    server.start()
    yield listener.server_address
    server.stop()
    daemon.stop()


def exchange(address: tuple[str, int], data: bytes, close_after: bool = False) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(data)
        if close_after:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            got = s.recv(65536)
            if not got:
                return out
            out += got


def head_and_body(raw: bytes) -> tuple[str, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def test_a_content_length_body_is_read_as_it_arrives(served: tuple[str, int]) -> None:
    body = bytes(range(256)) * 1000
    raw = exchange(served, b"PUT /up HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%b"
                   % (len(body), body))
    head, answer = head_and_body(raw)
    assert head.startswith("HTTP/1.1 200") and answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def test_a_chunked_body_is_accepted_on_a_streaming_route(served: tuple[str, int]) -> None:
    parts = [b"hello ", b"x" * 70000, b" world"]
    chunked = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\ntrailer: y\r\n\r\n"
    with socket.create_connection(served, timeout=10) as s:
        s.sendall(b"PUT /up HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n"
                  b"expect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # asked before the body is sent
        s.sendall(chunked)
        raw = b""
        while got := s.recv(65536):
            raw += got
    whole = b"".join(parts)
    head, answer = head_and_body(raw)
    assert head.startswith("HTTP/1.1 200") and answer == f"{len(whole)} {hashlib.sha256(whole).hexdigest()}".encode()
    # chunked stays refused where the route does not stream
    assert exchange(served, b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n").startswith(
        b"HTTP/1.1 411")


def test_a_client_that_leaves_mid_body_ends_the_handler(served: tuple[str, int]) -> None:
    EVENTS.clear()
    exchange(served, b"PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n" + b"z" * 5000, close_after=True)
    deadline = time.monotonic() + 5
    while not EVENTS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert EVENTS == ["gone after 5000"]


def test_streamed_answers_with_a_length_and_chunked(served: tuple[str, int]) -> None:
    EVENTS.clear()
    head, body = head_and_body(exchange(served, b"GET /down?4 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"))
    assert "content-length: 262144" in head and body == b"".join(bytes([65 + i]) * 65536 for i in range(4))
    assert EVENTS == ["stream done", "stream closed"]
    head, body = head_and_body(exchange(served, b"GET /down?2 HTTP/1.1\r\nhost: x\r\nx-chunked: 1\r\n"
                                        b"connection: close\r\n\r\n"))
    assert "transfer-encoding: chunked" in head
    assert body == b"10000\r\n" + b"A" * 65536 + b"\r\n10000\r\n" + b"B" * 65536 + b"\r\n0\r\n\r\n"


def test_a_client_that_leaves_mid_answer_closes_the_stream(served: tuple[str, int]) -> None:
    EVENTS.clear()
    with socket.create_connection(served, timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /down?2000 HTTP/1.1\r\nhost: x\r\n\r\n")
        s.recv(1000)
    done = threading.Event()
    deadline = time.monotonic() + 10
    while "stream closed" not in EVENTS and time.monotonic() < deadline:
        done.wait(0.05)
    assert EVENTS == ["stream closed"]  # closed early: never ran to its end
