"""The CLI's view of the datamodel: xe class and field names, tags and write methods.

Everything here is derived from :func:`xapid.schema.load`: a CLI class per
API class that has ``get_all`` (name lowercased, ``_`` → ``-``), a CLI field
per published field (name with ``_`` → ``-``), with the wire methods that
write it worked out exactly as the daemon's dispatcher derives them.  The
only hand-written parts are data: xe's default ``-list`` columns and
filters (wire.md 8.3), xe's derived fields (``host-uuid`` on pbd, ...) and
the few fields xe renders specially.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from xapid.schema import NULL_REF, ClassDef, Field, Schema, Type

from .xe_output import NOT_IN_DATABASE

Record = dict[str, Any]


class Records(Protocol):
    """Read access to the server's objects, as derived fields need it."""

    def record(self, cls: str, ref: str) -> Record | None:
        """The record of ``ref`` in ``cls``, or None when it does not exist (or ``cls`` is not served)."""
        ...

    def records(self, cls: str) -> Mapping[str, Record]:
        """Every record of ``cls`` keyed by ref (empty when the class is not served)."""
        ...


Compute = Callable[[str, Record, Records], str]
Source = Callable[[str, Record, Records], Any]


@dataclass(frozen=True)
class CliField:
    """One field as xe shows it.

    ``api`` is the record member it reads (None for a computed field);
    ``compute(ref, record, db)`` returns the display string of a computed field; the method
    names are the wire methods that write it (None when there is none).
    """

    name: str
    type: Type
    api: str | None = None
    deprecated: bool = False
    setter: str | None = None
    map_add: str | None = None
    map_remove: str | None = None
    set_add: str | None = None
    set_remove: str | None = None
    join: str = "; "
    compute: Compute | None = None
    # A field read through a ref field (``Source``): its raw value, rendered by type.
    source: Source | None = None

    @property
    def kind(self) -> str:
        return self.type.kind

    @property
    def writable(self) -> bool:
        """Whether any write method exists (the ``W`` of the tag)."""
        return any((self.setter, self.map_add, self.map_remove, self.set_add, self.set_remove))

    @property
    def tag(self) -> str:
        """xe's access tag: `` RO``/`` RW`` for scalars, ``MRO``/``MRW`` maps, ``SRO``/``SRW`` sets."""
        prefix = {"map": "M", "set": "S"}.get(self.kind, " ")
        return f"{prefix}{'RW' if self.writable else 'RO'}"

    @property
    def label(self) -> str:
        """``name (tag)`` plus `` [DEPRECATED]`` for deprecated fields."""
        return f"{self.name} ({self.tag})" + (" [DEPRECATED]" if self.deprecated else "")


@dataclass
class CliClass:
    """An xe object class (``vm``, ``sr``, ... or a filtered view such as ``template``).

    Its fields are worked out on first use: one xe run touches one or two classes.
    """

    name: str
    cdef: ClassDef
    schema: Schema
    default_columns: tuple[str, ...] = ()
    default_filter: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        """The API class name."""
        return self.cdef.name

    @cached_property
    def fields(self) -> list[CliField]:
        """Every field in record order (see :func:`class_fields`)."""
        return class_fields(self.cdef, self.schema)

    @cached_property
    def _by_name(self) -> dict[str, CliField]:
        return {f.name: f for f in self.fields}

    def field(self, name: str) -> CliField | None:
        """The field called ``name`` in xe's spelling, or None."""
        return self._by_name.get(name)

    @property
    def has_name_label(self) -> bool:
        return "name_label" in self.cdef.fields


def cli_name(api_name: str) -> str:
    """xe's spelling of an API class or field name."""
    return api_name.replace("_", "-")


# -- data: what xe adds to or changes in the plain schema view -------------------------------------

# Default columns of ``<class>-list`` (wire.md 8.3), by CLI class name.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "pool": ("uuid", "name-label", "name-description", "master", "default-SR"),
    "host": ("uuid", "name-label", "name-description"),
    "vm": ("name-label", "uuid", "power-state"),
    "template": ("name-label", "name-description", "uuid"),
    "snapshot": ("uuid", "name-label", "name-description"),
    "sr": ("uuid", "name-label", "name-description", "host", "type", "content-type"),
    "sm": ("uuid", "type", "name-label", "name-description", "vendor", "copyright", "configuration"),
    "pbd": ("uuid", "host-uuid", "sr-uuid", "device-config", "currently-attached"),
    "vdi": ("uuid", "name-label", "name-description", "virtual-size", "read-only", "sharable", "sr-uuid"),
    "vbd": ("uuid", "vm-uuid", "vm-name-label", "vdi-uuid", "device", "empty"),
    "network": ("uuid", "name-label", "name-description", "bridge"),
    "pif": ("uuid", "device", "VLAN", "MAC", "network-uuid", "currently-attached", "host-uuid"),
    "vif": ("uuid", "device", "vm-uuid", "network-uuid"),
    "task": ("uuid", "name-label", "name-description", "status", "progress"),
    "message": ("uuid", "name", "priority", "cls", "obj-uuid", "timestamp", "body"),
}

# Filtered views of one API class: CLI name -> (API class, default filter).
VIEWS: dict[str, tuple[str, dict[str, str]]] = {
    "vm": ("VM", {"is-a-template": "false"}),
    "template": ("VM", {"is-a-template": "true", "is-a-snapshot": "false"}),
    "snapshot": ("VM", {"is-a-snapshot": "true"}),
}

# Fields xe derives from a ref field: API class -> (CLI name, ref field, member of the target).
DERIVED: dict[str, tuple[tuple[str, str, str], ...]] = {
    "VM": (("suspend-VDI-uuid", "suspend_VDI", "uuid"),),
    "PBD": (("host-uuid", "host", "uuid"), ("sr-uuid", "SR", "uuid")),
    "VDI": (("sr-uuid", "SR", "uuid"),),
    "VBD": (("vm-uuid", "VM", "uuid"), ("vm-name-label", "VM", "name_label"), ("vdi-uuid", "VDI", "uuid")),
    "PIF": (("network-uuid", "network", "uuid"), ("host-uuid", "host", "uuid")),
    "VIF": (("vm-uuid", "VM", "uuid"), ("network-uuid", "network", "uuid")),
    "VTPM": (("vm-uuid", "VM", "uuid"), ("vm-name-label", "VM", "name_label")),
}

# Fields xe spells otherwise than with dashes (records.ml vtpm_record keeps the underscores).
CLI_NAMES: dict[tuple[str, str], str] = {
    ("VTPM", "is_unique"): "is_unique",
    ("VTPM", "is_protected"): "is_protected",
}

# String fields that hold refs of another class (xe prints the target's uuid).
REF_STRINGS: dict[tuple[str, str], str] = {
    ("pool", "ha_statefiles"): "VDI",
    ("host", "ha_statefiles"): "VDI",
}

# Sets xe joins with something other than "; ".
JOINS: dict[tuple[str, str], str] = {
    ("SM", "required_cluster_stack"): ",",
}

def _through(ref_field: str, target_cls: str, member: str) -> Compute:
    def compute(_ref: str, rec: Record, db: Records) -> str:
        ref = rec.get(ref_field, NULL_REF)
        target = db.record(target_cls, ref) if ref != NULL_REF else None
        return NOT_IN_DATABASE if target is None else str(target.get(member, ""))

    return compute


def _sr_host(ref: str, rec: Record, db: Records) -> str:
    """xe's ``host`` column of sr-list: ``<shared>``, or the name of the one host that has a PBD."""
    if rec.get("shared"):
        return "<shared>"
    hosts = [p["host"] for p in db.records("PBD").values() if p.get("SR") == ref]
    host = db.record("host", hosts[0]) if len(hosts) == 1 else None
    return NOT_IN_DATABASE if host is None else str(host.get("name_label", ""))


# Fields xe reads from the object a ref field names, typed as there (records.ml vm_record reads the
# guest metrics): API class -> ref field -> (CLI name, member, deprecated).
THROUGH: dict[str, dict[str, tuple[tuple[str, str, bool], ...]]] = {
    "VM": {"guest_metrics": (
        ("os-version", "os_version", False), ("netbios-name", "netbios_name", False),
        ("PV-drivers-version", "PV_drivers_version", False), ("PV-drivers-up-to-date", "PV_drivers_up_to_date", True),
        ("memory", "memory", False), ("disks", "disks", False), ("networks", "networks", False),
        ("services", "services", False), ("PV-drivers-detected", "PV_drivers_detected", False),
        ("other", "other", False), ("live", "live", False), ("guest-metrics-last-updated", "last_updated", False),
        ("can-use-hotplug-vbd", "can_use_hotplug_vbd", False), ("can-use-hotplug-vif", "can_use_hotplug_vif", False),
    )},
}


def _member(ref_field: str, target_cls: str, member: str) -> Source:
    def source(_ref: str, rec: Record, db: Records) -> Any:
        ref = rec.get(ref_field, NULL_REF)
        target = db.record(target_cls, ref) if ref != NULL_REF else None
        return None if target is None else target.get(member)

    return source


# Computed fields with no ref field to derive from: API class -> (CLI name, compute, insert after).
COMPUTED: dict[str, tuple[tuple[str, Compute, str], ...]] = {
    "SR": (("host", _sr_host, "name_description"),),
}


def _wire_methods(c: ClassDef, f: Field) -> dict[str, str | None]:
    """The write methods of one field, as the daemon's dispatcher derives them (``ClassDef.write_messages``)."""
    found = c.write_messages(f)
    kinds = ["setter"] + (["map_add", "map_remove"] if f.type.kind == "map" else []) + (
        ["set_add", "set_remove"] if f.type.kind == "set" else [])
    return {k: f"{c.name}.{found[k]}" if k in found else None for k in kinds}


def class_fields(c: ClassDef, schema: Schema) -> list[CliField]:
    """Every field xe shows for API class ``c``, in record order, derived fields after their source."""
    derived: dict[str, list[CliField]] = {src: [] for _n, src, _m in DERIVED.get(c.name, ())}
    for cli, src, member in DERIVED.get(c.name, ()):
        target = c.fields[src].type.name
        derived[src].append(CliField(cli, Type("string"), compute=_through(src, target, member)))
    computed: dict[str, list[CliField]] = {}
    for cli, fn, after in COMPUTED.get(c.name, ()):
        computed.setdefault(after, []).append(CliField(cli, Type("string"), compute=fn))
    for src, members in THROUGH.get(c.name, {}).items():
        target = c.fields[src].type.name
        for cli, member, deprecated in members:
            ty = schema.classes[target].fields[member].type
            computed.setdefault(src, []).append(CliField(cli, ty, deprecated=deprecated,
                                                         source=_member(src, target, member)))
    out: list[CliField] = []
    for f in c.fields.values():
        if f.removed:
            continue
        ty = f.type
        if (c.name, f.name) in REF_STRINGS:
            target = Type("ref", name=REF_STRINGS[(c.name, f.name)])
            ty = Type("set", elem=target) if ty.kind == "set" else target
        methods = _wire_methods(c, f)
        out.append(CliField(
            name=CLI_NAMES.get((c.name, f.name), cli_name(f.name)), type=ty, api=f.name, deprecated=f.deprecated,
            join=JOINS.get((c.name, f.name), "; "), **methods,
        ))
        out.extend(derived.get(f.name, ()))
        out.extend(computed.get(f.name, ()))
    return out


def build(schema: Schema) -> dict[str, CliClass]:
    """Every xe class of the schema keyed by CLI name, views (``template``, ...) included."""
    out: dict[str, CliClass] = {}
    for c in schema.classes.values():
        if c.get_all and "uuid" in c.fields:
            name = cli_name(c.name).lower()
            out[name] = CliClass(name, c, schema, DEFAULT_COLUMNS.get(name, ()))
    for name, (api, default_filter) in VIEWS.items():
        if api in schema.classes:
            out[name] = CliClass(name, schema.classes[api], schema, DEFAULT_COLUMNS.get(name, ()),
                                 dict(default_filter))
    return out
