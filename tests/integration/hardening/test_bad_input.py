"""Hostile request bodies over raw HTTP: each is refused quickly with a clean HTTP error, memory
stays bounded, and the daemon keeps serving (a normal SDK call works right after).

What the wire tests already prove for well-meant malformed input (tests/integration/test_wire_protocol.py,
tests/unit/test_wire.py) is proved here for attacks: XML bombs, external entities, DTDs,
invalid UTF-8, deep nesting, bodies that lie about their length, and bodies that never end.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from tests.conftest import Xapid
from tests.integration.hardening.conftest import (
    address,
    clean_log,
    daemon_alive,
    post,
    raw_exchange,
    rss_kib,
    xml_call,
)

LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<methodCall><methodName>VM.get_by_name_label</methodName><params><param><value>&lol9;</value></param>
</params></methodCall>"""

# Quadratic blow-up: one 50 kB entity referenced 50 000 times (2.5 GB if expanded), body ~ 350 kB.
QUADRATIC = (b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "' + b"x" * 50_000 + b'">]>'
             b"<methodCall><methodName>VM.get_by_name_label</methodName><params><param><value>"
             + b"&a;" * 50_000 + b"</value></param></params></methodCall>")

EXTERNAL = b"""<?xml version="1.0"?><!DOCTYPE m [<!ENTITY e SYSTEM "file:///etc/passwd">]>
<methodCall><methodName>VM.get_by_name_label</methodName><params><param><value>&e;</value></param>
</params></methodCall>"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?><!DOCTYPE m [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>
<methodCall><methodName>system.listMethods</methodName><params/></methodCall>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?><!DOCTYPE methodCall SYSTEM "http://127.0.0.1:9/evil.dtd">
<methodCall><methodName>system.listMethods</methodName><params/></methodCall>"""

DEPTH = 50_000  # 100 kB of JSON, and 5 000 levels (215 kB) of XML: under the 300 KiB cap
DEEP_XML = xml_call("VM.get_by_name_label", "<value><array><data>" * 5_000 + "</data></array></value>" * 5_000)
DEEP_JSON = b'{"jsonrpc": "2.0", "id": 1, "method": "VM.get_all", "params": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"
BAD_UTF8_XML = xml_call("VM.get_by_name_label", "<value><string>\xff</string></value>").replace(
    "\xff".encode(), b"\xff\xfe")
BAD_UTF8_JSON = b'{"method": "VM.get_by_name_label", "params": ["\xff\xfe"], "id": 1}'
MANY_PARAMS = xml_call("VM.get_all", *["<value/>"] * 12_000)  # 276 kB: just under the 300 KiB cap

HOSTILE = [
    ("billion laughs", "/", LAUGHS),
    ("quadratic blow-up", "/", QUADRATIC),
    ("external entity", "/", EXTERNAL),
    ("parameter entity", "/", PARAMETER_ENTITY),
    ("external DTD", "/", EXTERNAL_DTD),
    ("deeply nested XML", "/", DEEP_XML),
    ("deeply nested JSON", "/jsonrpc", DEEP_JSON),
    ("invalid UTF-8 in XML", "/", BAD_UTF8_XML),
    ("invalid UTF-8 in JSON", "/jsonrpc", BAD_UTF8_JSON),
    ("not XML at all", "/RPC2", b"\x00\x01\x02garbage"),
    ("empty body", "/", b""),
    ("wrong root element", "/", b"<methodResponse><params/></methodResponse>"),
    ("JSON that is a list", "/jsonrpc", b"[1, 2, 3]"),
]


def still_serving(xapid: Xapid) -> None:
    """The daemon answers a normal SDK call and is alive."""
    s = xapid.session()
    assert s.xenapi.pool.get_all()
    s.xenapi.session.logout()
    assert daemon_alive(xapid)


@pytest.mark.parametrize(("name", "path", "body"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_is_a_quick_http_500_and_the_daemon_keeps_serving(
    shared_xapid: Xapid, name: str, path: str, body: bytes
) -> None:
    assert shared_xapid.proc is not None
    before = rss_kib(shared_xapid.proc.pid)
    resp = post(shared_xapid.url, path, body)
    assert resp.status == 500, (name, resp.body[:200])
    assert resp.headers["content-type"] == "text/html"
    assert resp.seconds < 2.0, f"{name} took {resp.seconds:.2f} s"
    assert b"root:" not in resp.body  # no file content leaks back
    assert rss_kib(shared_xapid.proc.pid) - before < 200 * 1024, "memory grew by more than 200 MiB"
    still_serving(shared_xapid)
    clean_log(shared_xapid)


def test_twelve_thousand_params_are_answered_quickly(shared_xapid: Xapid) -> None:
    assert len(MANY_PARAMS) < 300 * 1024
    resp = post(shared_xapid.url, "/", MANY_PARAMS)
    assert resp.status == 200 and resp.seconds < 2.0
    assert b"MESSAGE_PARAMETER_COUNT_MISMATCH" in resp.body
    still_serving(shared_xapid)


@pytest.mark.parametrize(("header", "status"), [
    ("content-length: 999999999999", b" 413 "),   # over the cap: refused from the header, body never read
    ("content-length: 307201", b" 413 "),         # one byte over xapi's 300 KiB
    ("content-length: -5", b" 400 "),             # RFC 9112 6.3: an invalid length is a framing error
    ("content-length: lots", b" 400 "),
    ("content-length: +5", b" 400 "),
    ("content-length: 5, 5", b" 400 "),
    ("content-length: 5\r\ncontent-length: 5", b" 400 "),
    ("transfer-encoding: chunked", b" 411 "),      # xapi reads bodies by content-length only
    ("", b" 411 "),
])
def test_lying_or_missing_length_is_refused_from_the_header(shared_xapid: Xapid, header: str, status: bytes) -> None:
    host, port = address(shared_xapid.url)
    request = f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: text/xml\r\n{header}\r\n\r\n".encode()
    start = time.monotonic()
    answer = raw_exchange(shared_xapid.url, request, half_close=False)
    assert status in answer.split(b"\r\n", 1)[0], answer[:200]
    assert time.monotonic() - start < 2.0
    still_serving(shared_xapid)


def test_truncated_body_closes_that_connection_only(shared_xapid: Xapid) -> None:
    """content-length larger than what is sent: the server gives up on that connection when the client
    half-closes, without an answer and without harm."""
    host, port = address(shared_xapid.url)
    body = xml_call("system.listMethods")
    request = (f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {len(body) + 1000}\r\n\r\n").encode() + body
    start = time.monotonic()
    assert raw_exchange(shared_xapid.url, request) == b""
    assert time.monotonic() - start < 2.0
    still_serving(shared_xapid)
    clean_log(shared_xapid)


def test_a_stalled_body_does_not_block_other_clients(shared_xapid: Xapid) -> None:
    """Slow or stuck senders hold their own connection, never the daemon."""
    host, port = address(shared_xapid.url)
    stalled = []
    try:
        for _ in range(8):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(f"POST / HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: 5000\r\n\r\n<methodCall>".encode())
            stalled.append(s)
        start = time.monotonic()
        still_serving(shared_xapid)
        assert time.monotonic() - start < 5.0
    finally:
        for s in stalled:
            s.close()
    still_serving(shared_xapid)


def test_every_hostile_body_in_a_row_then_a_normal_session(shared_xapid: Xapid, call_raw: Any) -> None:
    """The whole catalogue back to back on fresh connections: nothing accumulates."""
    for _name, path, body in HOSTILE:
        assert post(shared_xapid.url, path, body).status == 500
    s = shared_xapid.session()
    pool = s.xenapi.pool.get_all()[0]
    label = s.xenapi.pool.get_name_label(pool)
    s.xenapi.pool.set_name_label(pool, label + " (after the bombs)")
    assert s.xenapi.pool.get_name_label(pool) == label + " (after the bombs)"
    s.xenapi.pool.set_name_label(pool, label)
    s.xenapi.session.logout()
    clean_log(shared_xapid)
