"""HTTP framing (RFC 9112), strict JSON out and strict XML-RPC numbers in (issue 17, finding 7).

Every request here is raw bytes on a socket: the attacks are about how the server frames what it
reads.  A framing error is a 400 and the end of the connection, so nothing that follows the
ambiguous request is ever read as a request of its own.
"""

from __future__ import annotations

import json
import math
import socket
import time
from typing import Any

import pytest

from tests.conftest import Xapid
from tests.integration.hardening.conftest import address, clean_log, post, raw_exchange, xml_call


def login(d: Xapid) -> str:
    resp = post(d.url, "/jsonrpc", json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.login_with_password",
                                               "params": ["root", d.password, "2.21", "pytest"]}).encode())
    return str(json.loads(resp.body)["result"])


def jsonrpc(d: Xapid, method: str, *params: Any) -> Any:
    resp = post(d.url, "/jsonrpc", json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                               "params": list(params)}).encode(), "application/json")
    assert resp.status == 200
    return strict_json(resp.body)


def strict_json(body: bytes) -> Any:
    """Parse as RFC 8259 JSON: bare NaN/Infinity are refused."""
    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")
    return json.loads(body, parse_constant=refuse)


def responses(data: bytes) -> list[bytes]:
    """The status lines of every HTTP response in ``data``."""
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def smuggled_write(d: Xapid, session: str, pool: str) -> bytes:
    """A complete second request that would change the pool's description if it ever ran."""
    host, port = address(d.url)
    body = xml_call("pool.set_name_description", f"<value>{session}</value>", f"<value>{pool}</value>",
                    "<value>smuggled</value>")
    return (f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


# -- framing ------------------------------------------------------------------------------------------


def test_transfer_encoding_with_content_length_is_400_and_nothing_is_smuggled(shared_xapid: Xapid) -> None:
    d = shared_xapid
    session = login(d)
    pool = jsonrpc(d, "pool.get_all", session)["result"][0]
    before = jsonrpc(d, "pool.get_name_description", session, pool)["result"]
    host, port = address(d.url)
    first = xml_call("system.listMethods")
    # Framed by content-length, `first` is the whole body and the write is a second request; framed
    # by transfer-encoding (as a proxy in front might), everything is one chunked body.
    request = (f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\ntransfer-encoding: chunked\r\n"
               f"content-length: {len(first)}\r\n\r\n").encode() + first + smuggled_write(d, session, pool)
    answer = raw_exchange(d.url, request, half_close=False)
    assert responses(answer) == [b"HTTP/1.1 400 Bad Request"], answer[:300]
    assert b"connection: close" in answer
    assert jsonrpc(d, "pool.get_name_description", session, pool)["result"] == before
    clean_log(d)


@pytest.mark.parametrize("lengths", [("10", "20"), ("10", "10"), ("10, 20",), ("10,10",)],
                         ids=["conflicting", "duplicate", "list", "repeated in one field"])
def test_several_content_lengths_are_400_and_close(shared_xapid: Xapid, lengths: tuple[str, ...]) -> None:
    d = shared_xapid
    session = login(d)
    pool = jsonrpc(d, "pool.get_all", session)["result"][0]
    before = jsonrpc(d, "pool.get_name_description", session, pool)["result"]
    host, port = address(d.url)
    fields = "".join(f"content-length: {v}\r\n" for v in lengths)
    request = f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\n{fields}\r\n".encode() + b"x" * 10
    answer = raw_exchange(d.url, request + smuggled_write(d, session, pool), half_close=False)
    assert responses(answer) == [b"HTTP/1.1 400 Bad Request"], answer[:300]
    assert jsonrpc(d, "pool.get_name_description", session, pool)["result"] == before


@pytest.mark.parametrize("head", [
    "POST / HTTP/1.1\r\nhost: x\r\ncontent-length : 5\r\n\r\n",          # space before the colon
    "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n folded\r\n\r\n",  # obsolete line folding
    "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n",                        # HTTP/1.1 without host
    "POST / HTTP/1.1\r\nhost: a\r\nhost: b\r\ncontent-length: 5\r\n\r\n",  # two hosts
    "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",               # chunked in HTTP/1.0
    "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, gzip\r\n\r\n",  # chunked not last
    "POST /  HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n",            # two spaces in the request line
    "POST / HTTP/1.1\r\nhost: x\rcontent-length: 5\r\n\r\n",               # bare CR
])
def test_malformed_heads_are_400_and_close(shared_xapid: Xapid, head: str) -> None:
    answer = raw_exchange(shared_xapid.url, head.encode() + b"hello", half_close=False)
    assert responses(answer) == [b"HTTP/1.1 400 Bad Request"], answer[:300]


def test_chunked_bodies_are_refused_cleanly_with_411(shared_xapid: Xapid) -> None:
    """xapi reads request bodies by content-length only (http_svr.ml read_body); so does xapid."""
    host, port = address(shared_xapid.url)
    body = xml_call("system.listMethods")
    request = (f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\ntransfer-encoding: chunked\r\n\r\n"
               f"{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"
    answer = raw_exchange(shared_xapid.url, request, half_close=False)
    assert responses(answer) == [b"HTTP/1.1 411 Length Required"], answer[:300]
    assert b"connection: close" in answer


def exchange_keeping_open(d: Xapid, request: bytes) -> tuple[bytes, bool]:
    """Send one request; return the answer and whether the server kept the connection open."""
    with socket.create_connection(address(d.url), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length:")))
        while len(rest) < length:
            rest += s.recv(65536)
        s.settimeout(0.5)
        try:
            open_after = s.recv(1) != b""
        except TimeoutError:
            open_after = True
        return head, open_after


def test_http_1_0_closes_unless_keep_alive_is_asked(shared_xapid: Xapid) -> None:
    body = xml_call("system.listMethods")
    plain = b"POST / HTTP/1.0\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    head, open_after = exchange_keeping_open(shared_xapid, plain)
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head and not open_after
    kept = b"POST / HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    head, open_after = exchange_keeping_open(shared_xapid, kept)
    assert b"connection: keep-alive" in head and open_after
    host, port = address(shared_xapid.url)
    http11 = f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    head, open_after = exchange_keeping_open(shared_xapid, http11)
    assert b"connection: keep-alive" in head and open_after


def test_an_answer_that_ends_the_connection_arrives_whole(shared_xapid: Xapid) -> None:
    """Closing after the answer waits for it to leave: a large answer is never cut short."""
    d = shared_xapid
    session = login(d)
    vms = jsonrpc(d, "VM.get_all", session)["result"][:6]
    for vm in vms:  # the seeded VMs: about 250 kB each in the answer
        jsonrpc(d, "VM.set_name_description", session, vm, "d" * 250_000)
    body = xml_call("VM.get_all_records", f"<value>{session}</value>")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer cannot all sit in the kernel
        s.settimeout(10)
        s.connect(address(d.url))
        s.sendall(b"POST / HTTP/1.0\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := s.recv(4096):  # a slow reader: the end of the answer waits in the server
            data += chunk
            time.sleep(0.002)
    head, _, answer = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    assert length > 500_000
    assert len(answer) == length and answer.endswith(b"</methodResponse>")
    for vm in vms:
        jsonrpc(d, "VM.set_name_description", session, vm, "")


def test_expect_100_continue_gets_the_interim_answer(shared_xapid: Xapid) -> None:
    """curl sends ``expect: 100-continue`` before bodies over 1 KiB and waits for the go-ahead."""
    host, port = address(shared_xapid.url)
    body = xml_call("system.listMethods")
    with socket.create_connection(address(shared_xapid.url), timeout=5) as s:
        s.sendall(f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\nexpect: 100-continue\r\n"
                  f"content-length: {len(body)}\r\n\r\n".encode())
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        assert s.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")


# -- JSON out ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "read"), [("nan", "NaN"), ("inf", "Infinity"), ("-inf", "-Infinity")])
def test_jsonrpc_answers_are_valid_json_for_non_finite_floats(shared_xapid: Xapid, sent: str, read: str) -> None:
    """xapi's yojson writes bare NaN/Infinity (not JSON); xapid sends them as strings."""
    d = shared_xapid
    session = login(d)
    task = jsonrpc(d, "task.create", session, "nan", "")["result"]
    resp = post(d.url, "/", xml_call("task.set_progress", f"<value>{session}</value>", f"<value>{task}</value>",
                                     f"<value><double>{sent}</double></value>"))
    assert b"Success" in resp.body, resp.body[:300]
    assert jsonrpc(d, "task.get_progress", session, task)["result"] == read
    record = jsonrpc(d, "task.get_record", session, task)["result"]
    assert record["progress"] == read and math.isnan(float(read)) == (sent == "nan")
    v1 = post(d.url, "/jsonrpc", json.dumps({"method": "task.get_all_records", "params": [session],
                                             "id": "x"}).encode())
    assert strict_json(v1.body)["result"][task]["progress"] == read
    jsonrpc(d, "task.destroy", session, task)


def test_jsonrpc_ids_that_rpclib_refuses_are_malformed(shared_xapid: Xapid) -> None:
    for ident in (b"NaN", b"1.5", b"true", b"[1]", b"{}"):
        resp = post(shared_xapid.url, "/jsonrpc", b'{"method": "system.listMethods", "params": [], "id": ' + ident
                    + b"}")
        assert resp.status == 500 and resp.headers["content-type"] == "text/html", ident


# -- strict XML-RPC numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["<int>1_0</int>", "<i4>\u0661\u0660</i4>", "<i8>1 0</i8>", "<int>0x10</int>",
                                   "<int>1e3</int>", "<int></int>", "<int>--1</int>", "<i4>\uff11</i4>",
                                   "<double>1_0.5</double>", "<double>\u0661.5</double>", "<double>1 .5</double>"])
def test_malformed_xmlrpc_numbers_are_malformed_bodies(shared_xapid: Xapid, value: str) -> None:
    resp = post(shared_xapid.url, "/", xml_call("VM.get_all", f"<value>{value}</value>"))
    assert resp.status == 500 and resp.headers["content-type"] == "text/html", resp.body[:200]


@pytest.mark.parametrize("value", ["<int>10</int>", "<i4>-10</i4>", "<i8>+10</i8>", "<int> 10\n</int>",
                                   "<double>-1.5e3</double>", "<double>nan</double>"])
def test_well_formed_xmlrpc_numbers_reach_the_dispatcher(shared_xapid: Xapid, value: str) -> None:
    resp = post(shared_xapid.url, "/", xml_call("VM.get_all", "<value>s</value>", f"<value>{value}</value>"))
    assert resp.status == 200 and b"MESSAGE_PARAMETER_COUNT_MISMATCH" in resp.body


@pytest.mark.parametrize("text", ["1\u0660", "1_0", "\uff11"])
def test_numbers_sent_as_strings_are_ascii_too(shared_xapid: Xapid, text: str) -> None:
    """Python clients send ints as strings; a string of other scripts' digits is not a number."""
    d = shared_xapid
    session = login(d)
    vm = jsonrpc(d, "VM.get_all", session)["result"][0]
    resp = post(d.url, "/", xml_call("VM.set_memory_static_max", f"<value>{session}</value>",
                                     f"<value>{vm}</value>", f"<value>{text}</value>"))
    assert b"INTERNAL_ERROR" in resp.body and b"Expected int" in resp.body, resp.body[:300]
    task = jsonrpc(d, "task.create", session, "x", "")["result"]
    resp = post(d.url, "/", xml_call("task.set_progress", f"<value>{session}</value>", f"<value>{task}</value>",
                                     f"<value>{text}.5</value>"))
    assert b"INTERNAL_ERROR" in resp.body and b"Expected float" in resp.body, resp.body[:300]


# -- timing -------------------------------------------------------------------------------------------------
