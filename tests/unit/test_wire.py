"""The XML-RPC/JSON-RPC codec and the XenAPI envelope (wire.md 1.5, 2.1-2.3, 3)."""

from __future__ import annotations

import xmlrpc.client
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xapid import schema as schema_mod
from xapid.schema import Type, parse_type
from xapid.wire import (
    MAX_DEPTH,
    BadRequest,
    Encoder,
    XDateTime,
    decode_jsonrpc,
    decode_xmlrpc,
    escape,
    format_double,
    json_failure,
    json_success,
    xml_bare,
    xml_failure,
    xml_success,
)


@pytest.fixture(scope="module")
def enc() -> Encoder:
    return Encoder(schema_mod.load())


def call(params_xml: str, method: str = "m") -> bytes:
    return f"<methodCall><methodName>{method}</methodName><params>{params_xml}</params></methodCall>".encode()


def one(value_xml: str) -> Any:
    """Decode a single-parameter call whose parameter is ``value_xml``."""
    _name, params = decode_xmlrpc(call(f"<param>{value_xml}</param>"))
    assert len(params) == 1
    return params[0]


# -- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("xml", "expected"), [
    ("<value><int>42</int></value>", 42),
    ("<value><i4>-7</i4></value>", -7),
    ("<value><i8>4294967296</i8></value>", 4294967296),
    ("<value><boolean>1</boolean></value>", True),
    ("<value><boolean>0</boolean></value>", False),
    ("<value><double>0.25</double></value>", 0.25),
    ("<value><string>a &amp; b</string></value>", "a & b"),
    ("<value><string/></value>", ""),
    ("<value><base64>aGVsbG8=</base64></value>", b"hello"),
    ("<value><nil/></value>", None),
    ("<value><array><data><value>a</value><value><int>1</int></value></data></array></value>", ["a", 1]),
    ("<value><array><data></data></array></value>", []),
    ("<value><struct><member><name>k</name><value>v</value></member></struct></value>", {"k": "v"}),
    ("<value><struct></struct></value>", {}),
])
def test_decode_every_xmlrpc_type(xml: str, expected: Any) -> None:
    got = one(xml)
    assert got == expected
    assert type(got) is type(expected)


def test_decode_datetime_keeps_text_verbatim() -> None:
    assert one("<value><dateTime.iso8601>20250319T04:16:24Z</dateTime.iso8601></value>") == XDateTime(
        "20250319T04:16:24Z")


def test_decode_boolean_is_true_only_for_text_1() -> None:
    """wire.md 2.1: anything but ``1`` (including ``true``) is false."""
    assert one("<value><boolean>true</boolean></value>") is False
    assert one("<value><boolean>1</boolean></value>") is True


def test_decode_untyped_text_is_a_string() -> None:
    assert one("<value>abc</value>") == "abc"
    assert one("<value>42</value>") == "42"


@pytest.mark.parametrize("xml", ["<value/>", "<value></value>"])
def test_decode_empty_value_is_the_empty_string(xml: str) -> None:
    """wire.md 2.1: ``<value/>`` and ``<value></value>`` are ``""``."""
    assert one(xml) == ""


def test_decode_what_python_xmlrpc_client_sends() -> None:
    """wire.md 1.5: the stdlib's requests (with newlines between tags) round-trip."""
    params = ("OpaqueRef:abc", 5, True, 1.5, ["x", "y"], {"a": {"b": [1, 2]}}, None,
              xmlrpc.client.DateTime("20250101T00:00:00"))
    body = xmlrpc.client.dumps(params, "VM.get_record", allow_none=True).encode()
    name, got = decode_xmlrpc(body)
    assert name == "VM.get_record"
    assert got[:7] == list(params[:4]) + [["x", "y"], {"a": {"b": [1, 2]}}, None]
    assert got[7] == XDateTime("20250101T00:00:00")


def test_decode_accepts_xml_declaration_and_whitespace() -> None:
    body = b'<?xml version="1.0"?>\n<methodCall>\n <methodName> session.logout </methodName>\n <params>\n' \
           b'  <param>\n   <value><string>r</string></value>\n  </param>\n </params>\n</methodCall>\n'
    assert decode_xmlrpc(body) == ("session.logout", ["r"])


def test_decode_zero_params() -> None:
    assert decode_xmlrpc(call("")) == ("m", [])


@pytest.mark.parametrize("body", [
    b"<methodCall><methodName>m</methodName></methodCall>",            # params missing (wire.md 2.1)
    b"<methodCall><params/></methodCall>",                              # methodName missing
    b"<methodResponse><params/></methodResponse>",                      # wrong root
    b"<methodCall><methodName>m</methodName><params>",                  # truncated
    b"not xml at all",
    b"",
    b"<methodCall><methodName>m</methodName><params><param/></params></methodCall>",  # param w/o value
    b"<methodCall><methodName>m</methodName><params><param><value><int>x</int></value></param></params>"
    b"</methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><double>x</double></value></param>"
    b"</params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><foo>1</foo></value></param></params>"
    b"</methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><struct><member><name>k</name></member>"
    b"</struct></value></param></params></methodCall>",
])
def test_decode_malformed_requests_are_bad_requests(body: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_xmlrpc(body)


def test_decode_refuses_entity_expansion_bomb() -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
            b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
            b"<methodCall><methodName>m</methodName><params><param><value>&lol3;</value></param></params>"
            b"</methodCall>")
    with pytest.raises(BadRequest):
        decode_xmlrpc(bomb)


def test_decode_refuses_external_entities() -> None:
    xxe = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
           b"<methodCall><methodName>m</methodName><params><param><value>&e;</value></param></params>"
           b"</methodCall>")
    with pytest.raises(BadRequest):
        decode_xmlrpc(xxe)


def test_decode_refuses_any_dtd() -> None:
    body = b'<!DOCTYPE methodCall><methodCall><methodName>m</methodName><params/></methodCall>'
    with pytest.raises(BadRequest):
        decode_xmlrpc(body)


def nested_arrays(depth: int) -> str:
    return "<value><array><data>" * depth + "<value>x</value>" + "</data></array></value>" * depth


def test_decode_accepts_moderate_nesting() -> None:
    got = one(nested_arrays(MAX_DEPTH - 2))
    for _ in range(MAX_DEPTH - 2):
        assert isinstance(got, list) and len(got) == 1
        got = got[0]
    assert got == "x"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 10_000])
def test_decode_refuses_deep_nesting(depth: int) -> None:
    with pytest.raises(BadRequest):
        one(nested_arrays(depth))


def test_decode_refuses_deeply_nested_structs() -> None:
    xml = "<value><struct><member><name>k</name>" * 200 + "<value>x</value>" + "</member></struct></value>" * 200
    with pytest.raises(BadRequest):
        one(xml)


# -- JSON-RPC requests ---------------------------------------------------------------------------


def test_jsonrpc_v1_request() -> None:
    c = decode_jsonrpc(b'{"method": "VM.get_all", "params": ["OpaqueRef:s"], "id": 7}')
    assert (c.method, c.params, c.id, c.v2) == ("VM.get_all", ["OpaqueRef:s"], 7, False)


def test_jsonrpc_v2_params_omitted_or_object() -> None:
    """wire.md 3: v2 params may be omitted/null; an object is one struct argument."""
    c = decode_jsonrpc(b'{"jsonrpc": "2.0", "method": "system.listMethods", "id": "a"}')
    assert (c.params, c.v2, c.id) == ([], True, "a")
    c = decode_jsonrpc(b'{"jsonrpc": "2.0", "method": "m", "params": {"k": 1}, "id": 1}')
    assert c.params == [{"k": 1}]


@pytest.mark.parametrize("body", [
    b"{not json",
    b'{"params": [], "id": 1}',                         # no method
    b'{"method": "m", "params": []}',                   # no id
    b'{"method": "m", "params": [], "id": null}',       # null id
    b'{"method": "m", "id": 1}',                        # v1 needs params
    b'{"method": "m", "params": "x", "id": 1}',         # params wrong type
    b'[1, 2]',
    b"\xff\xfe",
])
def test_jsonrpc_malformed_requests_are_bad_requests(body: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_jsonrpc(body)


def json_nested(depth: int) -> bytes:
    return b'{"method": "m", "params": [' + b"[" * depth + b'"x"' + b"]" * depth + b'], "id": 1}'


def test_jsonrpc_accepts_the_same_nesting_as_xml() -> None:
    c = decode_jsonrpc(json_nested(MAX_DEPTH - 1))
    assert len(c.params) == 1


@pytest.mark.parametrize("depth", [MAX_DEPTH, 900, 100_000])
def test_jsonrpc_deep_nesting_is_a_bad_request_not_a_crash(depth: int) -> None:
    with pytest.raises(BadRequest):
        decode_jsonrpc(json_nested(depth))


# -- encoding ----------------------------------------------------------------------------------


def test_ints_are_untyped_digits(enc: Encoder) -> None:
    """wire.md 2.3: int64 goes out untyped, so XML-RPC clients read a string."""
    assert enc.xml(4294967296, Type("int")) == "<value>4294967296</value>"
    assert enc.xml(-1, Type("int")) == "<value>-1</value>"


@pytest.mark.parametrize(("x", "text"), [
    (1.0, "1"), (0.25, "0.25"), (0.1, "0.1"), (1e20, "1e+20"), (1 / 3, "0.3333333333333333"),
    (float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf"), (-2.5, "-2.5"),
])
def test_doubles_use_percent_16g(enc: Encoder, x: float, text: str) -> None:
    assert format_double(x) == text
    assert enc.xml(x, Type("float")) == f"<value><double>{text}</double></value>"


def test_booleans(enc: Encoder) -> None:
    assert enc.xml(True, Type("bool")) == "<value><boolean>1</boolean></value>"
    assert enc.xml(False, Type("bool")) == "<value><boolean>0</boolean></value>"


def test_datetimes_keep_their_z(enc: Encoder) -> None:
    assert enc.xml("20250319T04:16:24Z", Type("datetime")) == \
        "<value><dateTime.iso8601>20250319T04:16:24Z</dateTime.iso8601></value>"
    value, _ = xmlrpc.client.loads(xml_success(enc.xml("19700101T00:00:00Z", Type("datetime"))).decode())
    dt = value[0]["Value"]
    assert isinstance(dt, xmlrpc.client.DateTime) and dt.value == "19700101T00:00:00Z"


def test_void_is_the_empty_value(enc: Encoder) -> None:
    assert enc.xml(None, Type("void")) == "<value></value>"


def test_strings_refs_and_enums_are_untyped_and_escaped(enc: Encoder) -> None:
    assert enc.xml('a<b>&"c"', Type("string")) == "<value>a&lt;b&gt;&amp;&quot;c&quot;</value>"
    assert enc.xml("OpaqueRef:NULL", parse_type("VM ref")) == "<value>OpaqueRef:NULL</value>"
    assert enc.xml("Running", parse_type("enum vm_power_state")) == "<value>Running</value>"


def test_control_characters_are_dropped_but_tab_lf_cr_and_utf8_kept() -> None:
    """wire.md 2.3: bytes 0x00-0x1F other than TAB/LF/CR are dropped; UTF-8 passes."""
    dropped = "".join(chr(c) for c in range(0x20) if c not in (9, 10, 13))
    assert escape(f"a{dropped}b\t\n\rc é✓") == "ab\t\n\rc é✓"


def test_sets_and_maps(enc: Encoder) -> None:
    assert enc.xml([1, 2], parse_type("int set")) == "<value><array><data><value>1</value><value>2</value>" \
        "</data></array></value>"
    assert enc.xml([], parse_type("string set")) == "<value><array><data></data></array></value>"
    assert enc.xml({}, parse_type("(string -> string) map")) == "<value><struct></struct></value>"
    assert enc.xml({"a&b": 1}, parse_type("(string -> int) map")) == \
        "<value><struct><member><name>a&amp;b</name><value>1</value></member></struct></value>"


def test_records_are_encoded_by_field_type(enc: Encoder) -> None:
    rec = {"uuid": "u", "live": True, "memory_total": 17, "last_updated": "20250101T00:00:00Z"}
    xml = enc.xml(rec, Type("record", name="host_metrics"))
    assert xml == (
        "<value><struct><member><name>uuid</name><value>u</value></member>"
        "<member><name>live</name><value><boolean>1</boolean></value></member>"
        "<member><name>memory_total</name><value>17</value></member>"
        "<member><name>last_updated</name><value><dateTime.iso8601>20250101T00:00:00Z</dateTime.iso8601>"
        "</value></member></struct></value>"
    )


def test_json_encoding_uses_native_numbers(enc: Encoder) -> None:
    """wire.md 3: ints are JSON integers, floats numbers, datetimes strings."""
    assert enc.json("12", Type("int")) == 12
    assert enc.json(1, Type("float")) == 1.0 and isinstance(enc.json(1, Type("float")), float)
    assert enc.json({"k": 5}, parse_type("(string -> int) map")) == {"k": 5}
    assert enc.json(None, Type("void")) == ""


# -- envelopes ---------------------------------------------------------------------------------


def test_success_envelope_is_exactly_xapis_single_line() -> None:
    """wire.md 2.2, byte for byte."""
    ref = "OpaqueRef:5b4c0a8e-2a1f-4d0e-9b6e-3f2d7c1a9e10"
    assert xml_success(f"<value>{ref}</value>") == (
        b'<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name>'
        b'<value>Success</value></member><member><name>Value</name><value>OpaqueRef:5b4c0a8e-2a1f-4d0e-9b6e-'
        b'3f2d7c1a9e10</value></member></struct></value></param></params></methodResponse>'
    )


def test_failure_envelope_is_exactly_xapis_single_line() -> None:
    """wire.md 2.2, byte for byte."""
    assert xml_failure(["HANDLE_INVALID", "VM", "OpaqueRef:NULL"]) == (
        b'<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name>'
        b'<value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>'
        b'HANDLE_INVALID</value><value>VM</value><value>OpaqueRef:NULL</value></data></array></value></member>'
        b'</struct></value></param></params></methodResponse>'
    )


def test_void_success_reads_as_empty_string_in_python(enc: Encoder) -> None:
    (value,), _ = xmlrpc.client.loads(xml_success(enc.xml(None, Type("void"))).decode())
    assert value == {"Status": "Success", "Value": ""}


def test_envelopes_never_contain_a_fault_and_parse_in_python() -> None:
    body = xml_failure(["INTERNAL_ERROR", "<oops> & \x01"]).decode()
    assert "<fault>" not in body and "\n" not in body
    (value,), _ = xmlrpc.client.loads(body)
    assert value == {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", "<oops> & "]}


def test_bare_response_is_not_wrapped(enc: Encoder) -> None:
    """wire.md 2.7: ``system.listMethods`` returns the array itself."""
    body = xml_bare(enc.xml(["a.b"], parse_type("string set")))
    (value,), _ = xmlrpc.client.loads(body.decode())
    assert value == ["a.b"]


def test_jsonrpc_v1_and_v2_response_shapes() -> None:
    """wire.md 3: member order and error forms for both versions."""
    import json

    v1 = decode_jsonrpc(b'{"method": "m", "params": [], "id": 3}')
    v2 = decode_jsonrpc(b'{"jsonrpc": "2.0", "method": "m", "params": [], "id": "x"}')
    ok1 = json.loads(json_success(v1, "r"))
    assert list(ok1.items()) == [("result", "r"), ("error", None), ("id", 3)]
    bad1 = json.loads(json_failure(v1, ["CODE", "p1"]))
    assert list(bad1.items()) == [("result", None), ("error", ["CODE", "p1"]), ("id", 3)]
    ok2 = json.loads(json_success(v2, 5))
    assert list(ok2.items()) == [("jsonrpc", "2.0"), ("result", 5), ("id", "x")]
    bad2 = json.loads(json_failure(v2, ["CODE", "p1", "p2"]))
    assert list(bad2.items()) == [
        ("jsonrpc", "2.0"), ("error", {"code": 1, "message": "CODE", "data": ["p1", "p2"]}), ("id", "x")]


# -- properties --------------------------------------------------------------------------------------

XML_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters=(
    [chr(c) for c in range(0x20) if c not in (0x09, 0x0A)] + ["\ufffe", "\uffff"]))
TEXT = st.text(XML_CHARS, max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-(2**31), 2**31 - 1) | \
    st.floats(allow_nan=False, allow_infinity=False) | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                      max_leaves=16)


@settings(max_examples=200, deadline=None)
@given(st.lists(VALUES, max_size=4))
def test_decode_round_trips_whatever_python_xmlrpc_sends(params: list[Any]) -> None:
    body = xmlrpc.client.dumps(tuple(params), "Class.method", allow_none=True).encode()
    assert decode_xmlrpc(body) == ("Class.method", params)


def as_xapi_client_sees(v: Any) -> Any:
    """What a Python client reads back from an untyped encoding (wire.md 1.5)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, float):
        return float(format_double(v))          # %.16g, like xapi: may round the last digit
    if isinstance(v, int):
        return str(v)
    if v is None:
        return ""
    if isinstance(v, list):
        return [as_xapi_client_sees(x) for x in v]
    if isinstance(v, dict):
        return {k: as_xapi_client_sees(x) for k, x in v.items()}
    return v


@settings(max_examples=200, deadline=None)
@given(VALUES)
def test_untyped_encoding_parses_in_python_as_xapi_output_does(enc: Encoder, value: Any) -> None:
    body = xml_success(enc.xml(value, None)).decode()
    assert "<fault>" not in body
    (got,), _ = xmlrpc.client.loads(body)
    assert got == {"Status": "Success", "Value": as_xapi_client_sees(value)}


# -- strictness (issue 17, finding 7) ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["1_0", "\u0661\u0660", "1 0", "0x10", "1e3", "", "+", "--1", "\uff11", "1.0",
                                  "9" * 41])
@pytest.mark.parametrize("tag", ["int", "i4", "i8"])
def test_xmlrpc_ints_are_a_sign_and_ascii_digits_only(tag: str, text: str) -> None:
    with pytest.raises(BadRequest):
        one(f"<value><{tag}>{text}</{tag}></value>")


@pytest.mark.parametrize(("text", "expected"), [("10", 10), ("+10", 10), ("-10", -10), (" 10\n", 10),
                                                ("007", 7), (str(2**63), 2**63)])
def test_xmlrpc_ints_that_are_well_formed(text: str, expected: int) -> None:
    assert one(f"<value><i8>{text}</i8></value>") == expected


@pytest.mark.parametrize("text", ["1_0.5", "\u0661.5", "1 .5", "0x1p3", "", ".", "e5", "nanny", "\uff11.0"])
def test_xmlrpc_doubles_are_ascii_decimals(text: str) -> None:
    with pytest.raises(BadRequest):
        one(f"<value><double>{text}</double></value>")


def test_json_never_carries_bare_nan_or_infinity(enc: Encoder) -> None:
    import json
    import math

    from xapid.wire import JsonCall, json_float

    assert [json_float(x) for x in (1.5, math.nan, math.inf, -math.inf)] == [1.5, "NaN", "Infinity", "-Infinity"]
    call_ = JsonCall("m", [], 1, True)
    value = {"typed": enc.json(math.nan, Type("float")), "untyped": [math.inf, {"x": -math.inf}]}
    out = json_success(call_, enc.json(value, None))

    def refuse(token: str) -> Any:
        raise AssertionError(token)

    assert json.loads(out, parse_constant=refuse)["result"] == {"typed": "NaN",
                                                                 "untyped": ["Infinity", {"x": "-Infinity"}]}
    # Even a value that bypassed the encoder goes out as strict JSON.
    assert json.loads(json_success(call_, [math.nan]), parse_constant=refuse)["result"] == ["NaN"]


@pytest.mark.parametrize("ident", [b"1.5", b"true", b"[1]", b"{}", b"NaN"])
def test_jsonrpc_ids_are_integers_or_strings(ident: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_jsonrpc(b'{"method": "m", "params": [], "id": ' + ident + b"}")
    assert decode_jsonrpc(b'{"method": "m", "params": [], "id": "a"}').id == "a"


def test_bodies_over_the_value_count_are_refused_before_parsing() -> None:
    from xapid.wire import MAX_ITEMS

    fits = b'{"method": "m", "params": [' + b"1," * (MAX_ITEMS - 10) + b"1], \"id\": 1}"
    assert len(decode_jsonrpc(fits).params) == MAX_ITEMS - 9
    with pytest.raises(BadRequest, match="too many values"):
        decode_jsonrpc(b'{"method": "m", "params": [' + b"[]," * (2 * MAX_ITEMS) + b"[]], \"id\": 1}")
    # Commas and brackets inside strings are not values.
    text = '"' + ",[{" * MAX_ITEMS + '"'
    assert decode_jsonrpc(b'{"method": "m", "params": [' + text.encode() + b'], "id": 1}').params == [text[1:-1]]
    with pytest.raises(BadRequest, match="too many values"):
        decode_xmlrpc(call("<param><value><array><data>" + "<value/>" * (4 * MAX_ITEMS) + "</data></array></value>"
                           "</param>"))


def test_an_unterminated_json_string_is_counted_in_linear_time() -> None:
    import time

    body = b'{"method": "m", "params": ["' + b'\\"' * 200_000
    start = time.monotonic()
    with pytest.raises(BadRequest):
        decode_jsonrpc(body)
    assert time.monotonic() - start < 1.0
