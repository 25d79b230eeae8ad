"""The fast path of the XML-RPC request decoder against the safe parser (xapid/wire.py).

The fast path may decline any body (it answers None and the safe parser decides); what it must
never do is accept a body the safe parser refuses, or read one differently.  Every test compares
both on the same bytes: generated calls, the same calls mutated with the constructs XML parsers
disagree on, and the hostile bodies the hardening tests send.
"""

from __future__ import annotations

import time
import xmlrpc.client
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xapid.wire import BadRequest, decode_xmlrpc, decode_xmlrpc_fast, decode_xmlrpc_safe


def outcome(decode: Any, body: bytes) -> tuple[str, Any]:
    """What ``decode`` makes of ``body``: ("ok", result) or ("bad", the BadRequest message)."""
    try:
        return "ok", decode(body)
    except BadRequest as e:
        return "bad", str(e)


def same_as_safe(body: bytes) -> tuple[str, Any]:
    """Assert the fast path agrees with the safe parser on ``body``; the safe parser's outcome."""
    safe = outcome(decode_xmlrpc_safe, body)
    fast = decode_xmlrpc_fast(body)
    if fast is not None:
        assert safe == ("ok", fast), (body, safe, fast)
    assert outcome(decode_xmlrpc, body) == safe, body
    return safe


# -- the usual calls are taken by the fast path ------------------------------------------------------

@pytest.mark.parametrize("params", [
    ("OpaqueRef:0b2d3e5c-1e8a-4a52-9d15-3f0a4d1b8c11", "OpaqueRef:5d0c"),
    (),
    ("",),
    ("a & b < c > d \" e ' f",),
    ("  spaces kept  ", "\ttab\nnewline"),
    ("unicode: é ü 中文 \U0001f600 \x7f \x85",),
])
def test_string_calls_from_python_go_through_the_fast_path(params: tuple[str, ...]) -> None:
    body = xmlrpc.client.dumps(params, "VM.get_record").encode()
    assert decode_xmlrpc_fast(body) == ("VM.get_record", list(params))
    assert same_as_safe(body) == ("ok", ("VM.get_record", list(params)))


@pytest.mark.parametrize("body", [
    b"<methodCall><methodName>m</methodName><params><param><value>x</value></param></params></methodCall>",
    b'<?xml version="1.0" encoding="UTF-8"?>\n<methodCall>\n  <methodName> session.logout </methodName>\n'
    b"  <params>\n    <param>\n      <value><string>r</string></value>\n    </param>\n  </params>\n</methodCall>\n",
    b"<methodCall><methodName>m</methodName><params><param><value></value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value>  </value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params></params></methodCall>",
    b"<methodCall><methodName>a&amp;b</methodName><params><param><value>&lt;&gt;&quot;&apos;&amp;amp;"
    b"</value></param></params></methodCall>",
])
def test_plain_variants_are_fast_and_read_as_the_safe_parser_reads_them(body: bytes) -> None:
    assert decode_xmlrpc_fast(body) is not None
    assert same_as_safe(body)[0] == "ok"


# -- what it must leave to the safe parser ------------------------------------------------------------

BASE = b"<methodCall><methodName>m</methodName><params><param><value>X</value></param></params></methodCall>"
HOSTILE = [
    # DTDs, entity declarations, entity bombs, external entities
    b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>' + BASE.replace(b"X", b"&b;"),
    b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>' + BASE.replace(b"X", b"&e;"),
    b"<!DOCTYPE methodCall>" + BASE,
    BASE.replace(b"X", b"&undefined;"),
    BASE.replace(b"X", b"&#60;"), BASE.replace(b"X", b"&#x3c;"), BASE.replace(b"X", b"&#0;"),
    BASE.replace(b"X", b"&amp"), BASE.replace(b"X", b"&"),
    # constructs the fast path does not read (some valid, some not)
    BASE.replace(b"X", b"<![CDATA[x]]>"), BASE.replace(b"X", b"<!-- c -->"), BASE.replace(b"X", b"<?pi x?>"),
    BASE.replace(b"X", b"a]]>b"), BASE.replace(b"<value>", b'<value a="1">'),
    BASE.replace(b"<methodCall>", b'<methodCall xmlns="urn:x">'), BASE.replace(b"<value>", b"<value >"),
    BASE.replace(b"<param>", b"<param/><param>"), BASE.replace(b"<params>", b"<params/><params>"),
    BASE.replace(b"X", b"<string>a</string><string>b</string>"), BASE.replace(b"X", b" <string>a</string> "),
    BASE.replace(b"X", b"<int>1</int>"), BASE.replace(b"X", b"<Value>x</Value>"),
    # characters XML forbids or rewrites, and bad UTF-8
    BASE.replace(b"X", b"a\x00b"), BASE.replace(b"X", b"a\x01b"), BASE.replace(b"X", b"a\x1fb"),
    BASE.replace(b"X", b"a\rb"), BASE.replace(b"X", b"a\r\nb"), BASE.replace(b"X", "\ufffe".encode()),
    BASE.replace(b"X", "\uffff".encode()), BASE.replace(b"X", b"\xff"), BASE.replace(b"X", b"\xc0\x80"),
    BASE.replace(b"X", b"\xed\xa0\x80"), BASE.replace(b"X", b"\xe2\x82"), "\ufeff".encode() + BASE,
    # declarations
    b' <?xml version="1.0"?>' + BASE, b'<?xml version="1.1"?>' + BASE,
    b'<?xml version="1.0" encoding="ISO-8859-1"?>' + BASE.replace(b"X", b"\xe9"),
    b'<?xml version="1.0" standalone="yes"?>' + BASE, b'<?xml version="1.0"?><?xml version="1.0"?>' + BASE,
    # framing of the document
    BASE + BASE, BASE + b"junk", b"junk" + BASE, BASE[:-1], BASE.replace(b"</methodName>", b"</methodname>"),
    b"<methodCall><methodName>m</methodName></methodCall>", b"<methodCall><params/></methodCall>",
    b"", b"not xml", b"<methodResponse><params/></methodResponse>",
]


@pytest.mark.parametrize("body", HOSTILE)
def test_hostile_and_unusual_bodies_get_exactly_the_safe_parsers_answer(body: bytes) -> None:
    same_as_safe(body)


@pytest.mark.parametrize("body", HOSTILE[:4])
def test_dtds_and_entities_are_never_taken_by_the_fast_path(body: bytes) -> None:
    assert decode_xmlrpc_fast(body) is None
    with pytest.raises(BadRequest):
        decode_xmlrpc(body)


def test_a_large_adversarial_body_is_matched_in_linear_time() -> None:
    params = "<param><value>" + "a" * 1000 + "</value></param>" + " " * 1000
    body = ("<methodCall><methodName>m</methodName><params>" + params * 150 + "  <param><value>x</value>"
            "</param" + " " * 20000).encode()
    started = time.process_time()
    assert decode_xmlrpc_fast(body) is None
    assert time.process_time() - started < 1.0


# -- properties ---------------------------------------------------------------------------------------

ANY_CHAR = st.characters(blacklist_categories=("Cs",))
TEXT = st.text(ANY_CHAR, max_size=10) | st.text(st.sampled_from("ab &<>'\"\t\n\r;#x]"), max_size=10)
SCALARS = st.none() | st.booleans() | st.integers(-(2**31), 2**31 - 1) | st.floats(allow_nan=False) | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=8)
# Fragments that XML parsers disagree on, or that the fast path must not take.
FRAGMENTS = st.sampled_from([
    "<", ">", "&", "&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#60;", "&#x41;", "&lol;", "]]>", "\r", "\r\n",
    "\x00", "\x01", "\x0b", "\x7f", "\ufeff", "\ufffe", "\uffff", " ", "\t", "\n", "<value>", "</value>",
    "<string>", "</string>", "<string/>", "<param>", "</param>", "<params>", "</params>", "<value/>",
    "<nil/>", "<int>", "</int>", "<!-- x -->", "<![CDATA[y]]>", "<?pi?>", "<!DOCTYPE m>",
    '<!DOCTYPE m [<!ENTITY lol "x">]>', "<?xml version='1.0'?>", ' a="b"', "<methodName>", "</methodName>",
    "<methodCall>", "</methodCall>", "\ud7ff", "\ue000", "\U0010ffff",
])
RAW_BYTES = st.sampled_from([b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80"])


def body_of(params: list[Any], method: str) -> bytes:
    return xmlrpc.client.dumps(tuple(params), method, allow_none=True).encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None)
@given(st.lists(VALUES, max_size=4), TEXT)
def test_generated_calls_are_read_alike(params: list[Any], method: str) -> None:
    same_as_safe(body_of(params, method))


@settings(max_examples=400, deadline=None)
@given(st.lists(TEXT, max_size=4), TEXT, st.booleans())
def test_generated_string_calls_are_read_alike(params: list[str], method: str, declared: bool) -> None:
    body = body_of(params, method)
    if not declared and body.startswith(b"<?xml"):
        body = body.split(b"?>", 1)[1]
    same_as_safe(body)


@settings(max_examples=1500, deadline=None)
@given(st.lists(TEXT, max_size=3), st.lists(st.tuples(st.integers(0, 10**6), FRAGMENTS | RAW_BYTES,
                                                       st.integers(0, 3)), min_size=1, max_size=4))
def test_mutated_calls_are_read_alike(params: list[str], edits: list[tuple[int, Any, int]]) -> None:
    body = bytearray(body_of(params, "VM.get_record"))
    for at, fragment, cut in edits:
        at %= len(body) + 1
        data = fragment if isinstance(fragment, bytes) else fragment.encode("utf-8", "surrogatepass")
        body[at:at + cut] = data  # replace ``cut`` bytes (0: insert)
    same_as_safe(bytes(body))
