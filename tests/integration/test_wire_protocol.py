"""HTTP transport, envelopes and dispatch order as raw HTTP sees them (wire.md 1, 2, 3, 4.3, 4.5)."""

from __future__ import annotations

import json
import xmlrpc.client
from collections.abc import Callable
from typing import Any

import pytest
import requests
import XenAPI

XML_PATHS = ["/", "/RPC2", "/xmlrpc", "/json", "/anything/else"]


def body(method: str, *params: Any) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


def post(url: str, method: str, *params: Any, path: str = "/") -> requests.Response:
    return requests.post(url.rstrip("/") + path, data=body(method, *params), timeout=10)


def value_of(resp: requests.Response) -> Any:
    (value,), _ = xmlrpc.client.loads(resp.text)
    return value


def login(url: str, password: str) -> str:
    v = value_of(post(url, "session.login_with_password", "root", password))
    assert v["Status"] == "Success", v
    return str(v["Value"])


def jsonrpc(url: str, doc: dict[str, Any] | bytes, path: str = "/jsonrpc") -> requests.Response:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return requests.post(url.rstrip("/") + path, data=data, timeout=10)


# -- transport -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", XML_PATHS)
def test_every_post_path_but_jsonrpc_speaks_xmlrpc(shared_xapid: Any, path: str) -> None:
    """wire.md 1.1: longest-prefix fallback to ``/`` — ``/json`` included."""
    resp = post(shared_xapid.url, "session.login_with_password", "root", shared_xapid.password, path=path)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/xml"
    v = value_of(resp)
    assert v["Status"] == "Success" and v["Value"].startswith("OpaqueRef:")


def test_success_headers(shared_xapid: Any) -> None:
    """wire.md 1.2: exact content-type, content-length, keep-alive, no-cache, CORS."""
    resp = post(shared_xapid.url, "session.login_with_password", "root", shared_xapid.password)
    h = resp.headers
    assert h["content-type"] == "text/xml"
    assert int(h["content-length"]) == len(resp.content)
    assert h["connection"] == "keep-alive"
    assert h["cache-control"] == "no-cache, no-store"
    assert h["Access-Control-Allow-Origin"] == "*"
    assert h["Access-Control-Allow-Headers"] == "X-Requested-With"
    assert "transfer-encoding" not in h


def test_connection_close_is_honoured(shared_xapid: Any) -> None:
    resp = requests.post(shared_xapid.url, data=body("system.listMethods"), headers={"Connection": "close"}, timeout=10)
    assert resp.status_code == 200 and resp.headers["connection"] == "close"


def test_sdk_reuses_one_keepalive_connection_for_many_calls(shared_xapid: Any) -> None:
    """wire.md 1.2: xmlrpc.client keeps its HTTP/1.1 socket; the server must not close it."""
    s = shared_xapid.session()
    transport = s._ServerProxy__transport  # the SDK's stdlib Transport
    host, conn = transport._connection
    sock = conn.sock
    assert sock is not None
    for _ in range(5):
        assert s.xenapi.pool.get_all()
        assert transport._connection[1] is conn and conn.sock is sock
    s.xenapi.session.logout()


@pytest.mark.parametrize("payload", [
    b"<methodCall><methodName>x</methodName><params>",                 # truncated
    b"this is not xml",
    b"<methodCall><methodName>session.logout</methodName></methodCall>",  # <params> missing
    b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
    b"<methodCall><methodName>x</methodName><params><param><value>&b;</value></param></params></methodCall>",
])
def test_malformed_xml_is_http_500_html_and_closes(shared_xapid: Any, payload: bytes) -> None:
    """wire.md 1.2: unparsable requests get HTTP 500, text/html, connection: close."""
    resp = requests.post(shared_xapid.url, data=payload, timeout=10)
    assert resp.status_code == 500
    assert resp.headers["content-type"] == "text/html"
    assert resp.headers["connection"] == "close"
    assert "Additional information" in resp.text


def test_body_over_the_cap_is_413(xapid_factory: Callable[..., Any]) -> None:
    d = xapid_factory(**{"max-request-size": "1000"})
    small = requests.post(d.url, data=body("system.listMethods"), timeout=10)
    assert small.status_code == 200
    big = requests.post(d.url, data=body("session.login_with_password", "root", "x" * 2000), timeout=10)
    assert big.status_code == 413
    # The daemon is still healthy afterwards.
    assert requests.post(d.url, data=body("system.listMethods"), timeout=10).status_code == 200


@pytest.mark.parametrize("path", ["/", "/json", "/jsonrpc"])
def test_options_is_a_cors_preflight(shared_xapid: Any, path: str) -> None:
    """wire.md 1.1: 200, empty, allow-origin *, requested headers + X-Requested-With, methods PUT."""
    resp = requests.options(shared_xapid.url.rstrip("/") + path,
                            headers={"Access-Control-Request-Headers": "content-type"}, timeout=10)
    assert resp.status_code == 200 and resp.content == b""
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert resp.headers["Access-Control-Allow-Headers"] == "content-type, X-Requested-With"
    assert resp.headers["Access-Control-Allow-Methods"] == "PUT"


# -- envelope ---------------------------------------------------------------------------------------


def test_success_envelope_is_the_exact_single_line(shared_xapid: Any) -> None:
    """wire.md 2.2, byte for byte (a ref value)."""
    ref = login(shared_xapid.url, shared_xapid.password)
    resp = post(shared_xapid.url, "session.get_this_host", ref, ref)
    host = value_of(resp)["Value"]
    assert resp.content == (
        '<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name>'
        '<value>Success</value></member><member><name>Value</name><value>' + host + '</value></member>'
        '</struct></value></param></params></methodResponse>'
    ).encode()


def test_failure_envelope_is_the_exact_single_line(shared_xapid: Any) -> None:
    """wire.md 2.2, byte for byte: HANDLE_INVALID VM OpaqueRef:NULL."""
    ref = login(shared_xapid.url, shared_xapid.password)
    resp = post(shared_xapid.url, "VM.get_record", ref, "OpaqueRef:NULL")
    assert resp.content == (
        b'<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name>'
        b'<value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>'
        b'HANDLE_INVALID</value><value>VM</value><value>OpaqueRef:NULL</value></data></array></value></member>'
        b'</struct></value></param></params></methodResponse>'
    )


def test_void_result_is_the_empty_value(shared_xapid: Any) -> None:
    ref = login(shared_xapid.url, shared_xapid.password)
    pool = value_of(post(shared_xapid.url, "pool.get_all", ref))["Value"][0]
    resp = post(shared_xapid.url, "pool.set_name_description", ref, pool, "d")
    assert b"<member><name>Value</name><value></value></member>" in resp.content
    assert value_of(resp) == {"Status": "Success", "Value": ""}


def test_api_errors_are_never_faults_or_http_errors(shared_xapid: Any) -> None:
    """wire.md 1.2: every API-level error is HTTP 200 with a Status: Failure struct."""
    ref = login(shared_xapid.url, shared_xapid.password)
    calls: list[tuple[Any, ...]] = [
        ("Foo.bar", ref), ("Foo.bar",), ("Foo.bar", "bogus"), ("VM.get_record", ref),
        ("VM.get_record", ref, 42), ("VM.get_by_uuid", ref, "nope"), ("Async.VM.get_record", ref, "x"),
        ("session.login_with_password", "root"), ("session.login_with_password", "root", "wrong"),
        ("VM.get_all_records_where", ref, "not an expression ("), ("VM.get_all", "OpaqueRef:bogus"),
        ("VM.get_record", None, None),
    ]
    for c in calls:
        resp = post(shared_xapid.url, *c)
        assert resp.status_code == 200, c
        assert b"<fault>" not in resp.content, c
        v = value_of(resp)
        assert v["Status"] == "Failure" and isinstance(v["ErrorDescription"], list), c
        assert all(isinstance(x, str) for x in v["ErrorDescription"]), c


def test_ints_and_strings_are_untyped_on_the_wire(shared_xapid: Any) -> None:
    """wire.md 2.3: no <string>, no <int>/<i4>; so Python sees ints as strings."""
    ref = login(shared_xapid.url, shared_xapid.password)
    host = value_of(post(shared_xapid.url, "session.get_this_host", ref, ref))["Value"]
    resp = post(shared_xapid.url, "host.get_record", ref, host)
    assert b"<string>" not in resp.content and b"<int>" not in resp.content and b"<i4>" not in resp.content
    assert b"<member><name>API_version_major</name><value>2</value></member>" in resp.content
    assert b"\n" not in resp.content


# -- system.* ---------------------------------------------------------------------------------------


def test_list_methods_is_a_bare_array(shared_xapid: Any) -> None:
    """wire.md 2.7: not wrapped in Status/Value, no session needed."""
    resp = post(shared_xapid.url, "system.listMethods")
    assert resp.content.startswith(b'<?xml version="1.0"?><methodResponse><params><param><value><array>')
    names = value_of(resp)
    assert isinstance(names, list)
    assert "VM.get_all_records" in names and "session.login_with_password" in names
    assert "session.get_all_records" not in names
    assert not any(n.startswith("Async.") for n in names)


def test_list_methods_through_the_sdk_serverproxy(shared_xapid: Any) -> None:
    s = XenAPI.Session(shared_xapid.url)
    names = s.system.listMethods()
    assert "pool.get_all_records" in names and "host.get_API_version_major" in names


def test_is_alive_echoes_its_first_parameter(shared_xapid: Any) -> None:
    """wire.md 2.6: ``system.isAlive:<anything>`` answers success with the first parameter."""
    assert value_of(post(shared_xapid.url, "system.isAlive:probe", "hello")) == {"Status": "Success", "Value": "hello"}


# -- dispatch order seen from the wire -------------------------------------------------------------------


def test_unknown_method_error_matrix(shared_xapid: Any) -> None:
    """wire.md 4.3 step 4 and 4.5."""
    ref = login(shared_xapid.url, shared_xapid.password)
    assert value_of(post(shared_xapid.url, "Foo.bar", ref))["ErrorDescription"] == ["MESSAGE_METHOD_UNKNOWN", "Foo.bar"]
    assert value_of(post(shared_xapid.url, "Foo.bar", "bogus"))["ErrorDescription"] == ["SESSION_INVALID", "bogus"]
    assert value_of(post(shared_xapid.url, "Foo.bar"))["ErrorDescription"] == ["MESSAGE_METHOD_UNKNOWN", "Foo.bar"]
    assert value_of(post(shared_xapid.url, "VM.set_uuid", ref, "OpaqueRef:NULL", "x"))["ErrorDescription"] == [
        "MESSAGE_METHOD_UNKNOWN", "VM.set_uuid"]
    assert value_of(post(shared_xapid.url, "vm.get_all", ref))["ErrorDescription"] == [
        "MESSAGE_METHOD_UNKNOWN", "vm.get_all"]
    assert value_of(post(shared_xapid.url, "Async.Foo.bar", ref))["ErrorDescription"] == [
        "MESSAGE_METHOD_UNKNOWN", "Foo.bar"]


def test_underscore_alias_is_served(shared_xapid: Any) -> None:
    """wire.md 2.6: ``Class_message`` works like ``Class.message``."""
    ref = login(shared_xapid.url, shared_xapid.password)
    url = shared_xapid.url
    assert value_of(post(url, "pool_get_all", ref)) == value_of(post(url, "pool.get_all", ref))


def test_invalid_utf8_parameter_is_invalid_value(shared_xapid: Any) -> None:
    """wire.md 4.3 step 2: every parameter is checked for UTF-8 before the name is looked up."""
    resp = jsonrpc(shared_xapid.url, b'{"method": "Foo.bar", "params": ["\\udc80x"], "id": 1}')
    doc = resp.json()
    assert doc["error"][:1] == ["INVALID_VALUE"] and doc["error"][1] == "Invalid UTF-8 string in parameter"


# -- JSON-RPC ------------------------------------------------------------------------------------------


def test_jsonrpc_v1_shapes(shared_xapid: Any) -> None:
    """wire.md 3: ``result, error, id`` in that order; errors as a plain array."""
    resp = jsonrpc(shared_xapid.url, {"method": "session.login_with_password",
                                      "params": ["root", shared_xapid.password], "id": 17})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert list(doc) == ["result", "error", "id"]
    assert doc["error"] is None and doc["id"] == 17 and doc["result"].startswith("OpaqueRef:")
    bad = jsonrpc(shared_xapid.url, {"method": "VM.get_record", "params": [doc["result"], "OpaqueRef:NULL"], "id": "x"})
    assert list(bad.json().items()) == [("result", None), ("error", ["HANDLE_INVALID", "VM", "OpaqueRef:NULL"]),
                                        ("id", "x")]


def test_jsonrpc_v2_shapes_and_native_numbers(shared_xapid: Any) -> None:
    """wire.md 3: ``jsonrpc, result|error, id``; error object with code 1; ints are JSON integers."""
    login_doc = {"jsonrpc": "2.0", "method": "session.login_with_password", "params": ["root", shared_xapid.password],
                 "id": 1}
    ok = jsonrpc(shared_xapid.url, login_doc).json()
    assert list(ok) == ["jsonrpc", "result", "id"]
    ref = ok["result"]
    host = jsonrpc(shared_xapid.url, {"jsonrpc": "2.0", "method": "session.get_this_host", "params": [ref, ref],
                               "id": 2}).json()["result"]
    major = jsonrpc(shared_xapid.url, {"jsonrpc": "2.0", "method": "host.get_API_version_major", "params": [ref, host],
                                "id": 3}).json()["result"]
    assert major == 2 and isinstance(major, int)
    err = jsonrpc(shared_xapid.url, {"jsonrpc": "2.0", "method": "VM.get_record", "params": [ref, "OpaqueRef:NULL"],
                              "id": 4}).json()
    assert list(err.items()) == [
        ("jsonrpc", "2.0"), ("error", {"code": 1, "message": "HANDLE_INVALID", "data": ["VM", "OpaqueRef:NULL"]}),
        ("id", 4)]


def test_sessions_are_shared_between_xml_and_json(shared_xapid: Any) -> None:
    ref = login(shared_xapid.url, shared_xapid.password)
    doc = jsonrpc(shared_xapid.url, {"method": "pool.get_all", "params": [ref], "id": 1}).json()
    assert doc["error"] is None and len(doc["result"]) == 1


@pytest.mark.parametrize("payload", [
    b'{"method": "system.listMethods", "params": []}',             # no id
    b'{"method": "system.listMethods", "params": [], "id": null}',
    b'{"params": [], "id": 1}',                                      # no method
    b"{broken",
    b'{"method": "Foo.bar", "params": ' + b"[" * 100_000 + b"]" * 100_000 + b', "id": 1}',   # nesting bomb
    b"<methodCall><methodName>system.listMethods</methodName><params/></methodCall>",
])
def test_malformed_jsonrpc_is_http_500_html(shared_xapid: Any, payload: bytes) -> None:
    resp = jsonrpc(shared_xapid.url, payload)
    assert resp.status_code == 500 and resp.headers["content-type"] == "text/html"
    assert post(shared_xapid.url, "system.listMethods").status_code == 200


def test_jsonrpc_list_methods_is_the_bare_array(shared_xapid: Any) -> None:
    doc = jsonrpc(shared_xapid.url, {"jsonrpc": "2.0", "method": "system.listMethods", "id": 9}).json()
    assert isinstance(doc["result"], list) and "VM.get_record" in doc["result"]
