"""The ``get_all_records_where`` expression language (wire.md 4.6).

Grammar (xapi's ``ocaml/database/db_filter_parse.mly`` and ``db_filter_lex.mll``)::

    expr  := value "=" value | expr "and" expr | expr "or" expr | "not" expr
           | "true" | "false" | "(" expr ")"
    value := "field" QUOTED | QUOTED

``and``/``or`` share one precedence and associate to the left.  ``not`` has the
*lowest* precedence (the .mly declares ``%right LNOT`` before ``%left LAND LOR``,
and later yacc declarations bind tighter), so ``not a and b`` is ``not (a and b)``:
a ``not`` reaches to the end of its parenthesised group.  The lexer knows only
the keywords, ``=``, parentheses, double-quoted strings and the blanks space, tab
and newline; anything else is ``Failure("lexing: empty token")``, a grammar error
``Stdlib.Parsing.Parse_error``, both as ``INVALID_VALUE [expr, reason]``
(``ocaml/xapi/exnHelper.ml``, ``Db_filter.Expression_error``).

Work is linear in the length of the expression and nothing recurses: one regular
expression scan tokenizes, an explicit stack parses, and :func:`evaluate` walks the
tree with a stack too, so a 2,000-term chain or 20,000 nested parentheses cost
what their length costs.  Expressions longer than :data:`MAX_LENGTH` characters
are refused before any work (xapi has no such limit; its 300 KiB RPC body cap
bounds it instead).  ``field "x"`` reads the database column of the row
serialised the way xapi's database stores it (:func:`db_string`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xapid.errors import ApiError
from xapid.schema import Type

Row = Callable[[str], str]  # column name -> stored string (raises for an unknown column)

MAX_LENGTH = 256 * 1024  # characters; a 2,000-term chain of real comparisons is about 70,000
PARSE_ERROR = "Stdlib.Parsing.Parse_error"
LEX_ERROR = 'Failure("lexing: empty token")'
_ECHO = 200  # characters of a refused over-long expression quoted back in the error


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
    depth: int = field(default=1, compare=False, repr=False)  # levels of the tree below and at this node


# One token per match, anchored at the position reached: the scan never looks at a character twice
# (an unterminated quote is read once, to the end, and fails).  Only space, tab and newline are blank.
_TOKEN = re.compile(r'[ \t\n]*(?:"([^"]*)"|(true|false|field|and|or|not)|([=()]))')
_BLANK = re.compile(r"[ \t\n]*")
Token = tuple[str, str]


def _tokens(text: str) -> list[Token]:
    """Every token of ``text``, then ``("eof", "")``, or ``("lexerror", "")`` where lexing fails.

    The error token lets the parser report whichever error xapi's parser meets first: a grammar error
    before the unlexable character, or the lexing failure when the parser reaches it.
    """
    out: list[Token] = []
    pos, end = 0, len(text)
    match = _TOKEN.match
    while True:
        m = match(text, pos)
        if m is None:
            blank_end = _BLANK.match(text, pos).end()  # type: ignore[union-attr]  # always matches
            out.append(("eof", "") if blank_end == end else ("lexerror", ""))
            return out
        pos = m.end()
        string, word, sym = m.groups()
        if string is not None:
            out.append(("str", string))
        elif word is not None:
            out.append((word, word))
        else:
            out.append((sym, sym))


@dataclass
class _Frame:
    """One open group while parsing: the whole text, a parenthesis, or the reach of a ``not``."""

    kind: str  # top, paren, not
    left: Node | None = None
    op: str | None = field(default=None)

    def take(self, operand: Node) -> None:
        if self.op is None:
            self.left = operand
        else:
            assert self.left is not None
            self.left = Node(self.op, (self.left, operand), max(self.left.depth, operand.depth) + 1)
        self.op = None


def _parse(tokens: list[Token]) -> Node:
    i = 0

    def next_token() -> Token:
        nonlocal i
        tok = tokens[i]
        if tok[0] == "lexerror":
            raise ParseError(LEX_ERROR)
        if tok[0] != "eof":
            i += 1
        return tok

    def value(tok: Token) -> Lit:
        if tok[0] == "field":
            name = next_token()
            if name[0] != "str":
                raise ParseError(PARSE_ERROR)
            return Lit(name[1], True)
        if tok[0] == "str":
            return Lit(tok[1], False)
        raise ParseError(PARSE_ERROR)

    stack = [_Frame("top")]
    want_operand = True
    while True:
        kind, text = next_token()
        if want_operand:
            if kind in ("not", "("):
                stack.append(_Frame("not" if kind == "not" else "paren"))
                continue
            if kind in ("true", "false"):
                operand = Node(kind)
            else:
                a = value((kind, text))
                if next_token()[0] != "=":
                    raise ParseError(PARSE_ERROR)
                operand = Node("eq", (a, value(next_token())))
            stack[-1].take(operand)
            want_operand = False
            continue
        if kind in ("and", "or"):
            stack[-1].op = kind
            want_operand = True
            continue
        if kind not in (")", "eof"):
            raise ParseError(PARSE_ERROR)
        while stack[-1].kind == "not":  # a group's end closes every `not` opened inside it
            closed = stack.pop()
            assert closed.left is not None
            stack[-1].take(Node("not", (closed.left,), closed.left.depth + 1))
        group = stack[-1]
        if kind == "eof":
            if group.kind != "top":
                raise ParseError(PARSE_ERROR)
            assert group.left is not None
            return group.left
        if group.kind != "paren":
            raise ParseError(PARSE_ERROR)
        stack.pop()
        assert group.left is not None
        stack[-1].take(group.left)


def parse(text: str) -> Node:
    """Parse ``text``; a syntax error is ``INVALID_VALUE [text, reason]``.

    Longer than :data:`MAX_LENGTH`: ``INVALID_VALUE [the first 200 characters..., reason]``, refused
    before any scanning.
    """
    if len(text) > MAX_LENGTH:
        raise ApiError("INVALID_VALUE", text[:_ECHO] + "...",
                       f"filter expression of {len(text)} characters; at most {MAX_LENGTH} are accepted")
    try:
        return _parse(_tokens(text))
    except ParseError as e:
        raise ApiError("INVALID_VALUE", text, str(e)) from None


RECURSIVE_DEPTH = 100  # shallower trees (every real-world one) take the faster recursive walk


def evaluate(node: Node, row: Row) -> bool:
    """Whether ``node`` holds for ``row``, evaluated left to right with xapi's short-circuit.

    An operand that is not reached never reads its columns (so it cannot fail on a missing one).
    Trees deeper than :data:`RECURSIVE_DEPTH` are walked with an explicit stack (no recursion), reading
    each column from ``row`` at most once.
    """
    if node.depth <= RECURSIVE_DEPTH:
        return _evaluate(node, row)
    return _evaluate_deep(node, row)


def _evaluate(node: Node, row: Row) -> bool:
    op = node.op
    if op == "eq":
        a, b = node.args
        return (row(a.text) if a.is_field else a.text) == (row(b.text) if b.is_field else b.text)
    if op == "and":
        return _evaluate(node.args[0], row) and _evaluate(node.args[1], row)
    if op == "or":
        return _evaluate(node.args[0], row) or _evaluate(node.args[1], row)
    if op == "not":
        return not _evaluate(node.args[0], row)
    return op == "true"


def _evaluate_deep(node: Node, row: Row) -> bool:
    columns: dict[str, str] = {}

    def val(lit: Lit) -> str:
        if not lit.is_field:
            return lit.text
        v = columns.get(lit.text)
        if v is None:
            v = columns[lit.text] = row(lit.text)
        return v

    result = False
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        n, visited = stack.pop()
        op = n.op
        if op == "eq":
            result = val(n.args[0]) == val(n.args[1])
        elif op in ("true", "false"):
            result = op == "true"
        elif op == "not":
            if visited:
                result = not result
            else:
                stack.append((n, True))
                stack.append((n.args[0], False))
        elif not visited:  # and / or: the left side first
            stack.append((n, True))
            stack.append((n.args[0], False))
        elif result == (op == "and"):  # the left side did not decide: the right side's value is the answer
            stack.append((n.args[1], False))
    return result


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
