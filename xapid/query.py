"""The ``get_all_records_where`` expression language (wire.md 4.6).

Grammar::

    expr  := value "=" value | expr "and" expr | expr "or" expr | "not" expr
           | "true" | "false" | "(" expr ")"
    value := "field" QUOTED | QUOTED

``and``/``or`` share one precedence and associate to the left; ``not`` binds
tightest.  ``field "x"`` reads the database column of the row serialised the
way xapi's database stores it (:func:`db_string`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xapid.errors import ApiError
from xapid.schema import Type

Row = Callable[[str], str]  # column name -> stored string (raises for an unknown column)


class ParseError(Exception):
    pass


@dataclass(frozen=True)
class Lit:
    text: str
    is_field: bool


@dataclass(frozen=True)
class Node:
    op: str  # eq, and, or, not, true, false
    args: tuple[Any, ...] = ()


_TOKEN = re.compile(r'\s*(?:(")([^"]*)"|(\()|(\))|(=)|([A-Za-z_]+))')


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError("Stdlib.Parsing.Parse_error")
        pos = m.end()
        if m.group(1):
            out.append(("str", m.group(2)))
        elif m.group(3):
            out.append(("(", "("))
        elif m.group(4):
            out.append((")", ")"))
        elif m.group(5):
            out.append(("=", "="))
        else:
            word = m.group(6)
            if word not in ("field", "and", "or", "not", "true", "false"):
                raise ParseError("Stdlib.Parsing.Parse_error")
            out.append((word, word))
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.t[self.i][0] if self.i < len(self.t) else None

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            raise ParseError("Stdlib.Parsing.Parse_error")
        v = self.t[self.i][1]
        self.i += 1
        return v

    def expr(self) -> Node:
        left = self.unary()
        while self.peek() in ("and", "or"):
            op = self.take(self.peek() or "")
            right = self.unary()
            left = Node(op, (left, right))
        return left

    def unary(self) -> Node:
        k = self.peek()
        if k == "not":
            self.take("not")
            return Node("not", (self.unary(),))
        if k in ("true", "false"):
            self.take(k)
            return Node(k)
        if k == "(":
            self.take("(")
            e = self.expr()
            self.take(")")
            return e
        a = self.value()
        self.take("=")
        b = self.value()
        return Node("eq", (a, b))

    def value(self) -> Lit:
        if self.peek() == "field":
            self.take("field")
            return Lit(self.take("str"), True)
        return Lit(self.take("str"), False)


def parse(text: str) -> Node:
    """Parse ``text``; a syntax error is ``INVALID_VALUE [text, reason]``."""
    try:
        p = _Parser(_tokens(text))
        node = p.expr()
        if p.peek() is not None:
            raise ParseError("Stdlib.Parsing.Parse_error")
        return node
    except ParseError as e:
        raise ApiError("INVALID_VALUE", text, str(e)) from None
    except RecursionError:
        raise ApiError("INVALID_VALUE", text, "expression too deeply nested") from None


def evaluate(node: Node, row: Row) -> bool:
    if node.op == "true":
        return True
    if node.op == "false":
        return False
    if node.op == "not":
        return not evaluate(node.args[0], row)
    if node.op == "and":
        return evaluate(node.args[0], row) and evaluate(node.args[1], row)
    if node.op == "or":
        return evaluate(node.args[0], row) or evaluate(node.args[1], row)
    a, b = node.args
    return _val(a, row) == _val(b, row)


def _val(lit: Lit, row: Row) -> str:
    return row(lit.text) if lit.is_field else lit.text


def _sexp_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def db_string(value: Any, ty: Type) -> str:
    """The string xapi's database holds for ``value`` of type ``ty``."""
    k = ty.kind
    if k == "bool":
        return "true" if value else "false"
    if k == "int":
        return str(int(value))
    if k == "float":
        return "%0.18g" % float(value)
    if k == "set":
        assert ty.elem is not None
        return "(" + " ".join(_sexp_str(db_string(v, ty.elem)) for v in value) + ")"
    if k == "map":
        assert ty.key is not None and ty.value is not None
        return "(" + " ".join(
            "(" + _sexp_str(db_string(kk, ty.key)) + " " + _sexp_str(db_string(vv, ty.value)) + ")"
            for kk, vv in value.items()
        ) + ")"
    return str(value)
