"""xe's text output (wire.md 8.4 and 8.6): value rendering, record layout, --minimal, error text.

Pure functions over plain values: nothing here talks to the server.  Ref
resolution is passed in as a callable so the same rendering serves records
and error parameters.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from xapid.errors import CATALOGUE, DESCRIPTIONS
from xapid.schema import NULL_REF, Type

from .xe_errors import USAGE_HINT

NOT_IN_DATABASE = "<not in database>"

# (class, ref) -> the target's uuid, or None when it does not exist.
UuidOf = Callable[[str, str], str | None]


def render(value: Any, ty: Type, uuid_of: UuidOf, join: str = "; ") -> str:
    """The display string of ``value`` of type ``ty`` as xe prints it.

    Refs become the target's uuid (``<not in database>`` when null or
    dangling), bools ``true``/``false``, enums lowercase, floats ``%.3f``,
    datetimes the compact ISO text, sets ``a; b`` (or ``join``), maps
    ``k1: v1; k2: v2``.
    """
    kind = ty.kind
    if kind == "ref":
        if not isinstance(value, str) or value == NULL_REF:
            return NOT_IN_DATABASE
        uuid = uuid_of(ty.name, value)
        return NOT_IN_DATABASE if uuid is None else uuid
    if kind == "set":
        assert ty.elem is not None
        return join.join(render(v, ty.elem, uuid_of) for v in value or [])
    if kind == "map":
        assert ty.key is not None and ty.value is not None
        return "; ".join(
            f"{render(k, ty.key, uuid_of)}: {render(v, ty.value, uuid_of)}" for k, v in (value or {}).items()
        )
    if kind == "bool":
        return "true" if value is True or str(value).lower() in ("true", "1") else "false"
    if kind == "enum":
        return str(value).lower()
    if kind == "float":
        try:
            return f"{float(value):.3f}"
        except (TypeError, ValueError):
            return str(value)
    if kind == "datetime":
        return str(getattr(value, "value", value))
    return "" if value is None else str(value)


def record_text(rows: Sequence[tuple[str, str]]) -> str:
    """One record: ``label: value`` lines, then the blank line that ends a record.

    With w = 4 + the longest label, the first label is left-aligned and
    padded to w, every other label right-aligned to w.
    """
    if not rows:
        return ""
    width = 4 + max(len(label) for label, _v in rows)
    lines = [f"{rows[0][0].ljust(width)}: {rows[0][1]}"]
    lines.extend(f"{label.rjust(width)}: {value}" for label, value in rows[1:])
    return "\n".join(lines) + "\n\n"


def minimal_text(values: Iterable[str]) -> str:
    """``--minimal``: the values comma-joined on one line, commas and backslashes escaped."""
    return ",".join(v.replace("\\", "\\\\").replace(",", "\\,") for v in values) + "\n"


def api_error_lines(code: str, params: Sequence[str], describe_ref: Callable[[str, str], str]) -> list[str]:
    """stderr lines for an API failure (wire.md 8.6).

    A code with a description prints it, then ``label: value`` per parameter
    with the datamodel's labels (``describe_ref(label, ref)`` turns refs into
    ``uuid (name-label)``); any other code prints ``Error code:`` /
    ``Error parameters:``.
    """
    if code == "SESSION_AUTHENTICATION_FAILED":
        username = params[0] if params else ""
        first = "Authentication failed" if username else "Username/password must be specified"
        return [first, USAGE_HINT]
    description = DESCRIPTIONS.get(code)
    if description is None:
        return [f"Error code: {code}", f"Error parameters: {', '.join(params)}"]
    labels = CATALOGUE.get(code, ())
    lines = [description]
    for label, value in zip(labels, params, strict=False):
        shown = describe_ref(label, value) if value.startswith("OpaqueRef:") and value != NULL_REF else value
        lines.append(f"{label}: {shown}")
    if len(params) > len(labels):
        lines.append(f"Error parameters: {', '.join(params[len(labels):])}")
    return lines


def help_text(name: str, required: Sequence[str], optional: Sequence[str], description: str) -> str:
    """``xe help <command>``: name, parameters and description in xe's layout."""
    return (
        f"command name            : {name}\n"
        f"        reqd params     : {', '.join(required)}\n"
        f"        optional params : {', '.join(optional)}\n"
        f"        description     : {description}\n"
    )


def usage_text(commands: Iterable[str]) -> str:
    """``xe help``/``xe --help``: the usage line then every command, comma-separated, wrapped."""
    head = (
        "Usage: xe <cmd> [-s server] [-p port] ([-u username] [-pw password] or [-pwf <password file>])"
        " [--nossl] <other arguments>\n\n"
        "To get help on a specific command: xe help <cmd>\n\n"
        "Command list\n------------\n"
    )
    body = textwrap.fill(", ".join(commands), width=78, break_on_hyphens=False)
    return head + body + "\n"
