"""The datamodel (``schema/``) loaded into classes, fields, types and messages.

The schema files are data: one JSON document per class plus ``enums.json``.
Everything generic in the daemon (records, getters, setters, constructors,
the filter language, xe's field tables) is derived from what is loaded here.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

NULL_REF = "OpaqueRef:NULL"
EPOCH = "19700101T00:00:00Z"

SCALARS = ("string", "int", "float", "bool", "datetime")


@dataclass(frozen=True)
class Type:
    """A datamodel type: scalar, ``ref``/``enum`` (with ``name``), ``set`` or ``map``."""

    kind: str
    name: str = ""
    elem: Type | None = None
    key: Type | None = None
    value: Type | None = None

    def __str__(self) -> str:
        if self.kind == "ref":
            return f"{self.name} ref"
        if self.kind == "enum":
            return f"enum {self.name}"
        if self.kind == "set":
            return f"{self.elem} set"
        if self.kind == "map":
            return f"({self.key} -> {self.value}) map"
        if self.kind == "record":
            return f"{self.name} record"
        return self.kind

    def zero(self) -> Any:
        """The value xapi uses for this type when nothing better is known."""
        if self.kind == "set":
            return []
        if self.kind == "map":
            return {}
        if self.kind == "ref":
            return NULL_REF
        return {"string": "", "int": 0, "float": 0.0, "bool": False, "datetime": EPOCH}.get(self.kind, "")


def _split_top(text: str, sep: str) -> tuple[str, str]:
    depth = 0
    for i in range(len(text) - len(sep) + 1):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            return text[:i], text[i + len(sep):]
    raise ValueError(f"no {sep!r} in {text!r}")


@cache
def parse_type(text: str) -> Type:
    """Parse xapi's type notation (``(string -> VM ref) map``, ``enum vm_power_state``, ...)."""
    t = text.strip()
    if t.endswith(" set"):
        return Type("set", elem=parse_type(t[:-4]))
    if t.endswith(" map") and t.startswith("("):
        inner = t[: -len(" map")].strip()
        assert inner.startswith("(") and inner.endswith(")"), text
        k, v = _split_top(inner[1:-1], "->")
        return Type("map", key=parse_type(k), value=parse_type(v))
    if t.endswith(" ref"):
        return Type("ref", name=t[:-4].strip())
    if t.endswith(" record"):
        return Type("record", name=t[:-7].strip())
    if t.startswith("enum "):
        return Type("enum", name=t[5:].strip())
    if t in SCALARS:
        return Type(t)
    if t == "any":
        return Type("any")  # dynamically typed results (event.from): encoded from the Python value
    if t in ("void", "SecretString"):
        return Type("string") if t == "SecretString" else Type("void")
    # Types the emulator does not model precisely travel as strings.
    return Type("string")


@dataclass(frozen=True)
class Field:
    """One published field of a class."""

    name: str
    type: Type
    qualifier: str  # RW, SRO or DRO
    has_default: bool
    default: Any
    lifecycle: str = "published"
    derived_from: tuple[str, str] | None = None  # (class, ref field) of the "one" side

    @property
    def removed(self) -> bool:
        return self.lifecycle == "removed"

    @property
    def deprecated(self) -> bool:
        return self.lifecycle in ("deprecated", "removed")

    def initial(self) -> Any:
        """A fresh copy of the field's default (or the type's zero value)."""
        value = self.default if self.has_default else self.type.zero()
        return copy.deepcopy(value) if isinstance(value, (dict, list)) else value


@dataclass(frozen=True)
class Param:
    name: str
    type: Type
    has_default: bool = False
    default: Any = None


@dataclass(frozen=True)
class Message:
    """An explicit (non-generic) message declared for a class."""

    cls: str
    name: str
    params: tuple[Param, ...]
    result: Type
    session: bool
    is_async: bool
    roles: tuple[str, ...]
    hidden: bool = False
    lifecycle: str = "published"


@dataclass
class ClassDef:
    name: str
    persist: bool
    get_all: bool
    constructor: bool
    fields: dict[str, Field]
    messages: dict[str, Message]
    generic_roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    in_db: bool = True  # false for event: no record methods
    # Stored but never on the wire (xapi's internal_only fields that a published relation derives from,
    # such as task.session behind session.tasks): no getter, not in records.
    internal: dict[str, Field] = field(default_factory=dict)

    def stored_fields(self) -> list[Field]:
        """Every field a record holds: the published ones not derived from a relation, then the internal ones."""
        return [f for f in self.fields.values() if f.derived_from is None] + list(self.internal.values())

    @property
    def has_name_label(self) -> bool:
        return "name_label" in self.fields

    def write_messages(self, f: Field) -> dict[str, str]:
        """The generic write messages field ``f`` has on the wire, by kind.

        Kinds: ``setter``, ``map_add``, ``map_remove``, ``set_add``, ``set_remove``.  RW fields get
        the generic family; SRO/DRO fields get a member only where xapi has a hand-written message
        of the generic name (declared in the schema, or listed among the class's generic messages
        in the API docs; wire.md 4.1 and 11 #13).
        """
        writable = f.qualifier == "RW" and f.derived_from is None and not f.removed
        stored = f.derived_from is None and not f.removed

        def declared(msg: str) -> bool:
            return msg in self.messages or (stored and msg in self.generic_roles)

        n, ty = f.name, f.type
        out: dict[str, str] = {}
        if writable or declared(f"set_{n}"):
            out["setter"] = f"set_{n}"
        if ty.kind == "map":
            has = writable or declared(f"add_to_{n}")
            if has:
                out["map_add"] = f"add_to_{n}"
            if has or declared(f"remove_from_{n}"):
                out["map_remove"] = f"remove_from_{n}"
        if ty.kind == "set":
            plain = writable and ty.elem is not None and ty.elem.kind != "ref"
            if plain or declared(f"add_{n}"):
                out["set_add"] = f"add_{n}"
            if plain or declared(f"remove_{n}"):
                out["set_remove"] = f"remove_{n}"
        return out

    def column(self, name: str) -> Field | None:
        """Resolve a database column name of the filter language (``name__label``) to a field."""
        f = self.fields.get(name) or self.fields.get(name.replace("__", "_"))
        return f


@dataclass
class Schema:
    classes: dict[str, ClassDef]
    enums: dict[str, list[str]]

    def cls(self, name: str) -> ClassDef:
        return self.classes[name]

    def enum_value(self, enum: str, text: str) -> str | None:
        """The declared spelling of ``text`` in ``enum`` (xapi matches case-insensitively)."""
        low = text.lower()
        for v in self.enums.get(enum, []):
            if v.lower() == low:
                return v
        return None

    def relations(self) -> list[tuple[str, str, str, str]]:
        """Every derived set field as (class, field, source class, source ref field)."""
        out = []
        for c in self.classes.values():
            for f in c.fields.values():
                if f.derived_from:
                    out.append((c.name, f.name, f.derived_from[0], f.derived_from[1]))
        return out


def default_schema_dir() -> Path:
    """The schema shipped with the package (``xapid/data/schema`` in a wheel, ``schema/`` in a checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "data" / "schema", here.parent / "schema"):
        if (candidate / "enums.json").is_file():
            return candidate
    raise FileNotFoundError("xapid schema directory not found")


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load(directory: Path | None = None) -> Schema:
    """Load every class file and the enums from ``directory``."""
    directory = directory or default_schema_dir()
    enums = json.loads((directory / "enums.json").read_text())
    classes: dict[str, ClassDef] = {}
    for path in sorted((directory / "classes").glob("*.json")):
        doc = json.loads(path.read_text())
        assert _NAME.match(doc["name"]), path
        fields = {}
        internal = {}
        for f in doc.get("internal_fields", []):
            internal[f["name"]] = Field(name=f["name"], type=parse_type(f["type"]), qualifier=f["qualifier"],
                                        has_default="default" in f, default=f.get("default"))
        for f in doc["fields"]:
            derived = None
            if "derived_from" in f:
                src_cls, src_field = f["derived_from"].split(".")
                derived = (src_cls, src_field)
            fields[f["name"]] = Field(
                name=f["name"], type=parse_type(f["type"]), qualifier=f["qualifier"],
                has_default="default" in f, default=f.get("default"),
                lifecycle=f.get("lifecycle", "published"), derived_from=derived,
            )
        messages = {}
        for m in doc["messages"]:
            params = tuple(
                Param(p["name"], parse_type(p["type"]), "default" in p, p.get("default")) for p in m["params"]
            )
            messages[m["name"]] = Message(
                cls=doc["name"], name=m["name"], params=params, result=parse_type(m["result"]),
                session=m["session"], is_async=m["async"], roles=tuple(m["roles"]),
                hidden=m.get("hidden", False), lifecycle=m.get("lifecycle", "published"),
            )
        classes[doc["name"]] = ClassDef(
            name=doc["name"], persist=doc["persist"], get_all=doc["get_all"], constructor=doc["constructor"],
            fields=fields, messages=messages,
            generic_roles={k: tuple(v) for k, v in doc.get("generic_roles", {}).items()},
            in_db=doc.get("in_db", True), internal=internal,
        )
    # Relations whose source class is not modelled stay plain (always empty) sets.
    for c in classes.values():
        for name, f in list(c.fields.items()):
            if f.derived_from and f.derived_from[0] not in classes:
                c.fields[name] = Field(f.name, f.type, f.qualifier, f.has_default, f.default, f.lifecycle, None)
    return Schema(classes=classes, enums=enums)
