"""The ``get_all_records_where`` filter language (wire.md 4.6)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xapid.errors import ApiError
from xapid.query import Node, db_string, evaluate, parse
from xapid.schema import Type, parse_type


class MissingColumn(Exception):
    """What the test's row function raises for a column it does not have."""


ROW = {"name__label": "vm1", "power_state": "Running", "is_a_template": "false", "empty": ""}


def row(column: str) -> str:
    if column not in ROW:
        raise MissingColumn(column)
    return ROW[column]


def holds(expr: str) -> bool:
    return evaluate(parse(expr), row)


@pytest.mark.parametrize(("expr", "expected"), [
    ('field "name__label" = "vm1"', True),
    ('field "name__label" = "vm2"', False),
    ('"vm1" = field "name__label"', True),
    ('"a" = "a"', True),
    ('"a" = "b"', False),
    ('field "empty" = ""', True),
    ("true", True),
    ("false", False),
    ("not true", False),
    ("not false", True),
    ('not field "power_state" = "Halted"', True),
    ('field "power_state" = "Running" and field "is_a_template" = "false"', True),
    ('field "power_state" = "Running" and field "is_a_template" = "true"', False),
    ('field "power_state" = "Halted" or field "name__label" = "vm1"', True),
    ('(field "power_state" = "Running")', True),
    ('((true))', True),
    ('  \t\ntrue\n ', True),
    ('field "power_state"="Running"', True),
])
def test_expressions(expr: str, expected: bool) -> None:
    assert holds(expr) is expected


def test_and_or_share_precedence_and_associate_left() -> None:
    """``true or true and false`` is ``(true or true) and false`` = false.

    With the usual precedence (and tighter than or) it would be true.
    """
    assert holds("true or true and false") is False
    assert holds("false and true or true") is True
    node = parse("true or false and true")
    assert node.op == "and" and node.args[0].op == "or"


def test_parentheses_override_left_association() -> None:
    assert holds("true or (true and false)") is True


def test_not_reaches_to_the_end_of_its_group() -> None:
    """xapi's db_filter_parse.mly declares ``%right LNOT`` before ``%left LAND LOR``: in yacc a later
    declaration binds tighter, so ``not`` has the lowest precedence and ``not a and b`` is ``not (a and b)``
    (checked against xapi's own ocamlyacc/ocamllex sources)."""
    assert holds("not false and false") is True
    assert holds("(not false) and false") is False
    assert parse("not true or true") == Node("not", (Node("or", (Node("true"), Node("true"))),))
    assert parse("true and not false or true") == Node(
        "and", (Node("true"), Node("not", (Node("or", (Node("false"), Node("true"))),))))
    # A closing parenthesis ends the reach of every `not` opened inside it.
    assert parse("(not true) or true") == Node("or", (Node("not", (Node("true"),)), Node("true")))
    assert parse("not not true and false") == Node("not", (Node("not", (Node("and", (Node("true"), Node("false"))),)),))


def test_short_circuit_skips_missing_columns() -> None:
    assert holds('false and field "nope" = "x"') is False
    with pytest.raises(MissingColumn):
        holds('true and field "nope" = "x"')


@pytest.mark.parametrize("expr", [
    "",
    "   ",
    "TRUE",                            # keywords are lowercase only
    'field "a" AND field "b"',
    'field "a"',                       # no comparison
    'field "a" != "b"',                # only = exists
    'field "a" <> "b"',
    'field "a" = "b" and',
    "(true",
    "true)",
    "true false",
    'field name = "x"',                # unquoted
    'field "a = "b"',                  # unterminated
    "'a' = 'b'",                       # single quotes are not strings
    "not",
    "true = true",
])
def test_parse_errors_are_invalid_value_with_expr_and_reason(expr: str) -> None:
    with pytest.raises(ApiError) as e:
        parse(expr)
    assert e.value.code == "INVALID_VALUE"
    assert e.value.params[0] == expr
    assert e.value.params[1]  # a reason (xapi: the OCaml exception text)


def test_parse_error_reason_is_ocamls_parse_error() -> None:
    with pytest.raises(ApiError) as e:
        parse('field "a" ==')
    assert e.value.description == ["INVALID_VALUE", 'field "a" ==', "Stdlib.Parsing.Parse_error"]


def test_deep_nesting_within_the_length_limit_parses_without_recursion() -> None:
    """xapi's table-driven parser takes any depth; so does xapid's explicit stack (no RecursionError)."""
    assert holds("(" * 100_000 + "true" + ")" * 100_000) is True
    assert holds("not " * 60_000 + "true") is True  # an even number of nots
    with pytest.raises(ApiError) as e:
        parse("(" * 100_000 + "true" + ")" * 99_999)
    assert e.value.params[1] == "Stdlib.Parsing.Parse_error"


def test_quoted_strings_may_hold_keywords_and_spaces() -> None:
    ROW["name__label"] = "not and or ( )"
    try:
        assert holds('field "name__label" = "not and or ( )"') is True
    finally:
        ROW["name__label"] = "vm1"


# -- stored-string serialisation ---------------------------------------------------------------


@pytest.mark.parametrize(("value", "ty", "text"), [
    (True, "bool", "true"),
    (False, "bool", "false"),
    (42, "int", "42"),
    (-1, "int", "-1"),
    (4294967296, "int", "4294967296"),
    (0.5, "float", "0.5"),
    (1.0, "float", "1"),
    ("Running", "enum vm_power_state", "Running"),
    ("OpaqueRef:NULL", "VM ref", "OpaqueRef:NULL"),
    ("20250319T04:16:24Z", "datetime", "20250319T04:16:24Z"),
    ("plain", "string", "plain"),
    (["a", "b"], "string set", "('a' 'b')"),
    ([], "string set", "()"),
    ({"k1": "v1", "k2": "v2"}, "(string -> string) map", "(('k1' 'v1') ('k2' 'v2'))"),
    ({}, "(string -> string) map", "()"),
    ([1, 2], "int set", "('1' '2')"),
    ({"k": True}, "(string -> bool) map", "(('k' 'true'))"),
])
def test_db_string(value: object, ty: str, text: str) -> None:
    """wire.md 4.6: comparisons are against the database's stored serialisation."""
    assert db_string(value, parse_type(ty)) == text


def test_db_string_float_uses_percent_018g() -> None:
    assert db_string(0.1, Type("float")) == "%0.18g" % 0.1 == "0.100000000000000006"


# A bare `not` would reach over the rest of the chain, so the atoms parenthesise theirs.
ATOMS = {"true": True, "false": False, "(not true)": False, "(not false)": True,
         '"a" = "a"': True, '"a" = "b"': False, 'field "power_state" = "Running"': True,
         '(not field "name__label" = "vm1")': False, "(true)": True, "(false or false)": False}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(ATOMS))), st.sampled_from(sorted(ATOMS)), st.data())
def test_unparenthesised_chains_fold_from_the_left(rest: list[str], first: str, data: st.DataObject) -> None:
    """and/or chains evaluate strictly left to right, whatever the mix of operators."""
    ops = [data.draw(st.sampled_from(["and", "or"])) for _ in rest]
    text = " ".join([first] + [f"{op} {atom}" for op, atom in zip(ops, rest, strict=True)])
    expected = ATOMS[first]
    for op, atom in zip(ops, rest, strict=True):
        expected = (expected and ATOMS[atom]) if op == "and" else (expected or ATOMS[atom])
    assert holds(text) is expected
