"""XML-RPC and JSON-RPC codec and the XenAPI envelope.

Decoding turns a request body into ``(method, params)`` with plain Python
values (``XDateTime`` for ``dateTime.iso8601``).  Encoding is type-directed,
like xapi's rpclib: the declared datamodel type decides the wire form, so an
``int`` goes out as untyped digits and a ``datetime`` as a compact
``dateTime.iso8601`` with ``Z``.  The envelope helpers produce exactly the
single-line ``Status``/``Value`` and ``Status``/``ErrorDescription`` structs
of wire.md 2.2; no XML-RPC ``<fault>`` is ever produced.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from typing import Any
from xml.etree.ElementTree import Element

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from xapid.schema import Schema, Type

MAX_DEPTH = 64
# Most values one request may carry (params, array elements, struct members, counted from the
# syntax before parsing): parsing memory stays proportional to this, not to the body's shape.
MAX_ITEMS = 20_000
_XML_TAGS_PER_ITEM = 8  # <member><name>k</name><value><string>v</string></value></member>
# A JSON string (possessive: linear even when the closing quote is missing).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?')
# XML-RPC numbers: ASCII digits and an optional sign only (no "1_0", no other scripts' digits).
_XML_WS = " \t\r\n"
INT_TEXT = re.compile(r"[ \t\r\n]*[+-]?[0-9]+[ \t\r\n]*\Z")  # also for ints sent as strings
_INT = re.compile(r"[+-]?[0-9]+\Z")
_DOUBLE = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)\Z",
                     re.IGNORECASE)


class BadRequest(Exception):
    """The body could not be parsed; the HTTP layer answers 500 (as xapi does)."""


@dataclass(frozen=True)
class XDateTime:
    """A ``dateTime.iso8601`` value as received (text kept verbatim)."""

    value: str


@dataclass(frozen=True)
class I4:
    """An int xapi sends typed (``<i4>``): only ``event.from``'s ``valid_ref_counts``."""

    value: int


@dataclass(frozen=True)
class Typed:
    """A value inside a dynamically typed result that must be encoded by its declared type."""

    value: Any
    type: Type


# -- decoding ----------------------------------------------------------------------------------


def _text(el: Element) -> str:
    return el.text or ""


def parse_double(text: str) -> float:
    """``text`` as a float if it is an ASCII decimal (or nan/inf); else :class:`ValueError`."""
    text = text.strip(_XML_WS)
    if not _DOUBLE.match(text) or len(text) > 1000:
        raise ValueError(f"not a decimal number: {text[:100]!r}")
    return float(text)


def _decode_value(el: Element, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise BadRequest("value nesting too deep")
    children = list(el)
    if not children:
        return _text(el)
    if len(children) != 1:
        raise BadRequest("value with several children")
    v = children[0]
    tag = v.tag
    if tag in ("int", "i4", "i8"):
        text = _text(v).strip(_XML_WS)
        if not _INT.match(text) or len(text) > 40:  # int64 needs 20 characters at most
            raise BadRequest(f"bad int {_text(v)[:100]!r}")
        return int(text)
    if tag == "string":
        return _text(v)
    if tag == "boolean":
        return _text(v).strip() == "1"
    if tag == "double":
        try:
            return parse_double(_text(v))
        except ValueError:
            raise BadRequest(f"bad double {_text(v)[:100]!r}") from None
    if tag == "dateTime.iso8601":
        return XDateTime(_text(v).strip())
    if tag == "base64":
        try:
            return base64.b64decode(_text(v))
        except ValueError as e:
            raise BadRequest("bad base64") from e
    if tag == "nil":
        return None
    if tag == "array":
        data = v.find("data")
        if data is None:
            return []
        return [_decode_value(x, depth + 1) for x in data if x.tag == "value"]
    if tag == "struct":
        out: dict[str, Any] = {}
        for m in v:
            if m.tag != "member":
                continue
            name = m.find("name")
            val = m.find("value")
            if name is None or val is None:
                raise BadRequest("struct member without name or value")
            out[_text(name)] = _decode_value(val, depth + 1)
        return out
    raise BadRequest(f"unknown value type {tag}")


def decode_xmlrpc(body: bytes) -> tuple[str, list[Any]]:
    """Parse a ``methodCall``; any problem (including DTDs and entities) is :class:`BadRequest`.

    Bodies with more than about :data:`MAX_ITEMS` values are refused before parsing.  The usual
    shape is read by :func:`decode_xmlrpc_fast`; whatever it does not take goes through the safe
    parser (:func:`decode_xmlrpc_safe`), so both give the same answer to every body.
    """
    if body.count(b"<value") > MAX_ITEMS or body.count(b"<") > _XML_TAGS_PER_ITEM * MAX_ITEMS:
        raise BadRequest(f"too many values (at most {MAX_ITEMS})")
    fast = decode_xmlrpc_fast(body)
    if fast is not None:
        return fast
    return decode_xmlrpc_safe(body)


def decode_xmlrpc_safe(body: bytes) -> tuple[str, list[Any]]:
    """Parse a ``methodCall`` with defusedxml (no DTD, no entity declarations, no external
    references); any problem is :class:`BadRequest`.  The caller counts the values first."""
    try:
        root = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (DefusedXmlException, SyntaxError, ValueError) as e:
        raise BadRequest(f"{type(e).__name__}: {e}") from e
    if root.tag != "methodCall":
        raise BadRequest("root element is not methodCall")
    name_el = root.find("methodName")
    params_el = root.find("params")
    if name_el is None or params_el is None:
        raise BadRequest("methodName or params missing")
    params = []
    for p in params_el:
        if p.tag != "param":
            continue
        val = p.find("value")
        if val is None:
            raise BadRequest("param without value")
        params.append(_decode_value(val, 1))
    return _text(name_el).strip(), params


# -- the fast path: the usual methodCall, matched whole -------------------------------------------
#
# Most calls carry strings only (a session, refs, names).  Such a body, written plainly, is read
# with two regular expressions instead of a parser: UTF-8 text, an optional plain XML declaration,
# no CR (XML would normalise it), none of the characters XML forbids, no "]]>", no comment, CDATA,
# processing instruction or DTD, the five predefined entities only, and the XML-RPC elements bare
# (no attributes or namespaces) with whitespace between them.  Any other body, and any detail the
# safe parser might read differently, makes the fast path answer None and the safe parser decide,
# so what is accepted, what is refused and with which error do not depend on the path taken
# (tests/unit/test_wire_fast.py compares both on generated and hostile bodies).

_FAST_DECL = re.compile(r"""<\?xml version=(["'])1\.0\1(?: encoding=(["'])(?:utf-8|UTF-8)\2)?\?>""")
_FAST_AMP = re.compile(r"&(?!(?:amp|lt|gt|quot|apos);)")
_W = "[ \t\n]*"
_C = "[^<\x00-\x08\x0b\x0c\x0e-\x1f\r\ufffe\uffff]*"  # character data XML takes verbatim (CR aside)
# The whole body after the declaration: every character is in one of its classes, so a character
# XML forbids, or a CR, anywhere makes it fail.
_FAST_CALL = re.compile(
    f"{_W}<methodCall>{_W}<methodName>({_C})</methodName>{_W}<params>"
    f"((?:{_W}<param>{_W}<value>(?:<string>{_C}</string>|{_C})</value>{_W}</param>)*)"
    f"{_W}</params>{_W}</methodCall>{_W}")
_FAST_PARAM = re.compile("<value>(?:<string>([^<]*)</string>|([^<]*))</value>")  # within a _FAST_CALL match


def _fast_text(text: str) -> str | None:
    """Character data with its entities replaced; None if it holds any but the predefined five."""
    if "&" not in text:
        return text
    if _FAST_AMP.search(text):
        return None
    return (text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'")
            .replace("&amp;", "&"))


def decode_xmlrpc_fast(body: bytes) -> tuple[str, list[Any]] | None:
    """The ``methodCall`` whose parameters are all strings, read directly; None for any other
    body (the safe parser then reads it, or refuses it).  Never raises."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    m = _FAST_DECL.match(text)
    start = m.end() if m is not None else 0
    if "]]>" in text:  # not allowed in character data
        return None
    m = _FAST_CALL.fullmatch(text, start)
    if m is None:
        return None
    name = _fast_text(m.group(1))
    if name is None:
        return None
    params: list[Any] = []
    for typed, untyped in _FAST_PARAM.findall(m.group(2)):
        value = _fast_text(typed or untyped)
        if value is None:
            return None
        params.append(value)
    return name.strip(), params


@dataclass
class JsonCall:
    method: str
    params: list[Any]
    id: Any
    v2: bool


def decode_jsonrpc(body: bytes) -> JsonCall:
    """Parse a JSON-RPC v1 or v2 request (wire.md 3).

    Bodies with more than about :data:`MAX_ITEMS` values are refused before parsing; the ``id``
    must be an integer or a string, as rpclib requires.
    """
    bare = _JSON_STRING.sub(b"", body)
    if bare.count(b",") + bare.count(b"[") + bare.count(b"{") > MAX_ITEMS:
        raise BadRequest(f"too many values (at most {MAX_ITEMS})")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"bad JSON: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("method"), str):
        raise BadRequest("JSON-RPC request without method")
    if doc.get("id") is None:
        raise BadRequest("JSON-RPC request without id")
    if isinstance(doc["id"], bool) or not isinstance(doc["id"], (int, str)):
        raise BadRequest("Invalid field 'id' in request body")
    v2 = doc.get("jsonrpc") == "2.0"
    params = doc.get("params")
    if params is None and v2:
        params = []
    elif isinstance(params, dict) and v2:
        params = [params]
    if not isinstance(params, list):
        raise BadRequest("JSON-RPC params is not an array")
    if _too_deep(params, MAX_DEPTH + 1):  # the params array itself is one level more than XML's
        raise BadRequest("value nesting too deep")
    return JsonCall(doc["method"], params, doc["id"], v2)


def _too_deep(value: Any, limit: int) -> bool:
    """True if arrays/objects nest deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
    return False


# -- encoding ----------------------------------------------------------------------------------

# Characters XML 1.0 cannot carry (its Char production): control characters, surrogates, U+FFFE/U+FFFF.
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


_SPECIAL = re.compile('[&<>"' + _CTRL.pattern[1:])  # anything escape() would change
_STRINGY = frozenset({"string", "ref", "enum"})


def escape(text: str) -> str:
    """XML-escape ``text`` and drop what XML cannot carry (control characters ...), as xapi does."""
    if not _SPECIAL.search(text):
        return text  # the common case: nothing to do
    text = _CTRL.sub("", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def json_float(x: float) -> float | str:
    """A float as JSON can carry it: finite ones as numbers; NaN and the infinities as the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (xapi's yojson writes those tokens bare, which is not
    JSON; quoted, every JSON parser reads them and ``float()``/``Number()`` convert them back)."""
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def format_double(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return "%.16g" % x


class Preencoded:
    """A value whose wire forms are made elsewhere (:class:`xapid.record_cache.Encoded`): the
    encoders splice :meth:`xml` and :meth:`json` where they would encode it."""

    __slots__ = ()

    def xml(self) -> str:
        raise NotImplementedError

    def xml_bytes(self) -> bytes:
        """:meth:`xml` as UTF-8."""
        return self.xml().encode("utf-8")

    def json(self) -> str:
        raise NotImplementedError


class Encoder:
    """Type-directed XML-RPC value encoder bound to a schema (for records)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._layouts: dict[str, dict[str, tuple[str, Type]]] = {}

    def xml(self, value: Any, ty: Type | None) -> str:
        out: list[str] = []
        self._xml(value, ty, out)
        return "".join(out)

    def _xml(self, value: Any, ty: Type | None, out: list[str]) -> None:
        kind = ty.kind if ty is not None else None
        if kind in _STRINGY:
            out.append("<value>" + escape(str(value)) + "</value>")
        elif kind == "int":
            out.append(f"<value>{int(value)}</value>")
        elif kind == "bool":
            out.append("<value><boolean>1</boolean></value>" if value else "<value><boolean>0</boolean></value>")
        elif kind == "float":
            out.append(f"<value><double>{format_double(float(value))}</double></value>")
        elif kind == "datetime":
            out.append(f"<value><dateTime.iso8601>{escape(str(value))}</dateTime.iso8601></value>")
        elif kind == "void":
            out.append("<value></value>")
        elif kind == "set":
            assert ty is not None
            out.append("<value><array><data>")
            for v in value:
                self._xml(v, ty.elem, out)
            out.append("</data></array></value>")
        elif kind == "map":
            assert ty is not None
            out.append("<value><struct>")
            for k, v in value.items():
                out.append(f"<member><name>{escape(_key(k))}</name>")
                self._xml(v, ty.value, out)
                out.append("</member>")
            out.append("</struct></value>")
        elif isinstance(value, Preencoded):
            out.append(value.xml())
        elif kind == "record" and ty is not None and ty.name not in self.schema.classes:
            self._dyn(value, out)  # a struct type that is no class (data_source): its values say their types
        elif kind == "record":
            assert ty is not None
            layout = self._layout(ty.name)
            out.append("<value><struct>")
            for name, v in value.items():
                head, fty = layout.get(name) or (f"<member><name>{escape(name)}</name>", None)
                out.append(head)
                self._xml(v, fty, out)
                out.append("</member>")
            out.append("</struct></value>")
        else:
            self._dyn(value, out)

    def _layout(self, cls: str) -> dict[str, tuple[str, Type]]:
        """Per field of ``cls``: the opening of its struct member and its type (computed once)."""
        layout = self._layouts.get(cls)
        if layout is None:
            layout = {name: (f"<member><name>{escape(name)}</name>", f.type)
                      for name, f in self.schema.classes[cls].fields.items()}
            self._layouts[cls] = layout
        return layout

    def _dyn(self, value: Any, out: list[str]) -> None:
        if isinstance(value, Typed):
            self._xml(value.value, value.type, out)
        elif isinstance(value, I4):
            out.append(f"<value><i4>{value.value}</i4></value>")
        elif isinstance(value, bool):
            out.append(f"<value><boolean>{1 if value else 0}</boolean></value>")
        elif isinstance(value, int):
            out.append(f"<value>{value}</value>")
        elif isinstance(value, float):
            out.append(f"<value><double>{format_double(value)}</double></value>")
        elif isinstance(value, (list, tuple)):
            out.append("<value><array><data>")
            for v in value:
                self._dyn(v, out)
            out.append("</data></array></value>")
        elif isinstance(value, dict):
            out.append("<value><struct>")
            for k, v in value.items():
                out.append(f"<member><name>{escape(_key(k))}</name>")
                self._dyn(v, out)
                out.append("</member>")
            out.append("</struct></value>")
        elif value is None:
            out.append("<value></value>")
        else:
            out.append(f"<value>{escape(str(value))}</value>")

    def json(self, value: Any, ty: Type | None) -> Any:
        """The JSON-RPC form: like XML but with native numbers and booleans."""
        kind = ty.kind if ty is not None else None
        if kind == "int":
            return int(value)
        if kind == "float":
            return json_float(float(value))
        if kind == "bool":
            return bool(value)
        if kind in ("string", "ref", "enum", "datetime"):
            return str(value)
        if kind == "void":
            return ""
        if kind == "set":
            return [self.json(v, ty.elem) for v in value]
        if kind == "map":
            return {_key(k): self.json(v, ty.value) for k, v in value.items()}
        if isinstance(value, Preencoded):
            return value  # spliced by json_success
        if kind == "record" and ty.name in self.schema.classes:
            fields = self.schema.classes[ty.name].fields
            return {k: self.json(v, fields[k].type if k in fields else None) for k, v in value.items()}
        if isinstance(value, Typed):
            return self.json(value.value, value.type)
        if isinstance(value, I4):
            return value.value
        if isinstance(value, dict):
            return {_key(k): self.json(v, None) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.json(v, None) for v in value]
        if isinstance(value, float):
            return json_float(value)
        return value


def _key(k: Any) -> str:
    if isinstance(k, bool):
        return "true" if k else "false"
    return str(k)


XML_HEAD = '<?xml version="1.0"?><methodResponse><params><param>'
XML_TAIL = "</param></params></methodResponse>"


def xml_success(value_xml: str) -> bytes:
    return (
        XML_HEAD
        + "<value><struct><member><name>Status</name><value>Success</value></member>"
        + f"<member><name>Value</name>{value_xml}</member></struct></value>"
        + XML_TAIL
    ).encode("utf-8")


_OK_HEAD = (XML_HEAD + "<value><struct><member><name>Status</name><value>Success</value></member>"
            "<member><name>Value</name>").encode()
_OK_TAIL = ("</member></struct></value>" + XML_TAIL).encode()


def xml_success_parts(value: Any) -> list[bytes] | None:
    """The bytes of :func:`xml_success` as pieces, for a :class:`Preencoded` record or a non-empty
    map of them (``get_record``, ``get_all_records``): the cached records are spliced in as they
    are, never copied into one string.  None for any other value (encode it the usual way)."""
    if isinstance(value, Preencoded):
        return [_OK_HEAD, value.xml_bytes(), _OK_TAIL]
    if not isinstance(value, dict) or not value:
        return None
    parts = [_OK_HEAD + b"<value><struct>"]
    sep = b"<member><name>"
    for k, v in value.items():
        if not isinstance(v, Preencoded):
            return None
        parts.append(b"%b%b</name>" % (sep, escape(_key(k)).encode("utf-8")))
        parts.append(v.xml_bytes())
        sep = b"</member><member><name>"
    parts.append(b"</member></struct></value>" + _OK_TAIL)
    return parts


def xml_failure(description: list[str]) -> bytes:
    items = "".join(f"<value>{escape(d)}</value>" for d in description)
    return (
        XML_HEAD
        + "<value><struct><member><name>Status</name><value>Failure</value></member>"
        + f"<member><name>ErrorDescription</name><value><array><data>{items}</data></array></value></member>"
        + "</struct></value>"
        + XML_TAIL
    ).encode("utf-8")


def xml_bare(value_xml: str) -> bytes:
    """A response whose value is not wrapped in the envelope (``system.listMethods``)."""
    return (XML_HEAD + value_xml + XML_TAIL).encode("utf-8")


def dumps_value(value: Any) -> str:
    """Strict JSON text (never a bare ``NaN``/``Infinity``, whatever the value holds), with
    :class:`Preencoded` records (alone, or as the values of a map) spliced in."""
    if isinstance(value, Preencoded):
        return value.json()
    if isinstance(value, dict) and value and isinstance(next(iter(value.values())), Preencoded):
        return "{" + ", ".join(json.dumps(_key(k)) + ": " + dumps_value(v) for k, v in value.items()) + "}"
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _dumps(doc: dict[str, Any]) -> bytes:
    """A JSON-RPC envelope: its members in order, each value through :func:`dumps_value`."""
    return ("{" + ", ".join(json.dumps(k) + ": " + dumps_value(v) for k, v in doc.items()) + "}").encode("utf-8")


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return json_float(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def json_success(call: JsonCall, value: Any) -> bytes:
    if call.v2:
        doc: dict[str, Any] = {"jsonrpc": "2.0", "result": value, "id": call.id}
    else:
        doc = {"result": value, "error": None, "id": call.id}
    return _dumps(doc)


def json_failure(call: JsonCall, description: list[str]) -> bytes:
    if call.v2:
        doc: dict[str, Any] = {
            "jsonrpc": "2.0",
            "error": {"code": 1, "message": description[0], "data": description[1:]},
            "id": call.id,
        }
    else:
        doc = {"result": None, "error": description, "id": call.id}
    return _dumps(doc)
