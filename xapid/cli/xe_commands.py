"""The xe commands: per-class commands generated from the schema, plus the named ones.

:func:`registry` returns every command by name.  A command is a
:class:`Command` whose ``run(ctx, args)`` talks to the server through
``ctx.rpc`` (the session is added by the connection) and writes to
``ctx.out``.  Failures are raised, never printed: the server's as
:class:`~xapid.cli.xe_errors.ApiFailure`, the client's own as
:class:`~xapid.cli.xe_errors.XeError`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from xapid.schema import NULL_REF, Schema, Type

from . import xe_output as output
from .xe_errors import ApiFailure, ConnectFailure, XeError, failwith, usage_error
from .xe_fields import CliClass, CliField, Record

DANGEROUS = ("This operation is extremely dangerous and may cause data loss. "
             "This operation must be forced (use --force).")


class Rpc(Protocol):
    """A logged-in connection: ``call`` prepends the session and unwraps the envelope."""

    def call(self, method: str, *args: Any) -> Any:
        """The ``Value`` of a successful call; raises ApiFailure or ConnectFailure."""
        ...


# -- arguments -------------------------------------------------------------------------------------

TRUE_WORDS = ("true", "t", "yes", "y", "1", "on")
FALSE_WORDS = ("false", "f", "no", "n", "0", "off")


def parse_bool(text: str) -> bool:
    """xe's boolean spelling (``true``/``yes``/``1``/``on`` and their negations, any case)."""
    low = text.strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise XeError(f"Expected 'true','t','yes','y','1','false','f','no','n','0' got {text}")


_SIZE = re.compile(r"^\s*(\d+)\s*(kib|mib|gib|tib|k|m|g|t|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from ``<n>`` with an optional binary suffix (``KiB``..``TiB`` or ``K``..``T``)."""
    m = _SIZE.match(text)
    if not m:
        raise failwith(f"Failed to parse size: {text}")
    return int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]


@dataclass
class Args:
    """A command's ``key=value`` arguments in the order given (``--x`` already became ``x=true``)."""

    pairs: list[tuple[str, str]]

    @classmethod
    def parse(cls, tokens: list[str], bare: bool = False) -> Args:
        """Split each token at its first ``=``; a token without one is a syntax error unless ``bare``."""
        pairs = []
        for token in tokens:
            if token.startswith("--") and "=" not in token:
                pairs.append((token[2:], "true"))
            elif "=" in token:
                key, _, value = token.partition("=")
                pairs.append((key, value))
            elif bare:
                pairs.append((token, ""))
            else:
                raise usage_error(f"Syntax error: parameter '{token}' is not of the form key=value")
        return cls(pairs)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last value given for ``key``."""
        for k, v in reversed(self.pairs):
            if k == key:
                return v
        return default

    def require(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise usage_error(f"Required parameter not found: {key}")
        return value

    def flag(self, key: str) -> bool:
        value = self.get(key)
        return False if value is None else parse_bool(value)

    def map(self, name: str, legacy: bool = False) -> dict[str, str]:
        """The ``name:k=v`` arguments as a map (with ``legacy``, also xe's old ``name-k=v`` form)."""
        out = {}
        for k, v in self.pairs:
            if k.startswith(name + ":"):
                out[k[len(name) + 1:]] = v
            elif legacy and k.startswith(name + "-"):
                out[k[len(name) + 1:]] = v
        return out


# -- server objects ----------------------------------------------------------------------------------


class Database:
    """Records fetched from the server on demand, one ``get_all_records`` per class per command."""

    def __init__(self, rpc: Rpc, schema: Schema) -> None:
        self.rpc = rpc
        self.schema = schema
        self._tables: dict[str, dict[str, Record]] = {}

    def records(self, cls: str) -> Mapping[str, Record]:
        """Every record of ``cls`` keyed by ref (empty when the schema has no such class)."""
        if cls not in self._tables:
            cdef = self.schema.classes.get(cls)
            self._tables[cls] = self.rpc.call(f"{cls}.get_all_records") if cdef and cdef.get_all else {}
        return self._tables[cls]

    def record(self, cls: str, ref: str) -> Record | None:
        return self.records(cls).get(ref)

    def uuid_of(self, cls: str, ref: str) -> str | None:
        rec = self.record(cls, ref)
        return None if rec is None else rec.get("uuid")

    def ref_of(self, cls: str, uuid: str) -> str:
        """The ref of the object with ``uuid``; the server's UUID_INVALID when there is none."""
        return str(self.rpc.call(f"{cls}.get_by_uuid", uuid))

    def describe(self, label: str, ref: str) -> str:
        """``uuid (name-label)`` of any object (``uuid`` alone when nameless); ``ref`` when unknown."""
        guesses = [c for c in self.schema.classes if c.lower() == label.lower()]
        for cls in guesses + [c for c in self.schema.classes if c not in guesses]:
            try:
                rec = self.record(cls, ref)
            except ApiFailure:
                continue
            except ConnectFailure:
                break
            if rec is not None:
                name = rec.get("name_label")
                return f"{rec['uuid']} ({name})" if name is not None else str(rec["uuid"])
        return ref


@dataclass
class Context:
    """What a running command works with."""

    rpc: Rpc
    schema: Schema
    classes: dict[str, CliClass]
    db: Database
    out: TextIO


Run = Callable[[Context, Args], None]


@dataclass(frozen=True)
class Command:
    """One xe command: its runner and documented parameters.

    ``local`` commands never contact the server; ``bare`` ones also take
    arguments without ``=`` (``xe help vm-list``).  ``local_session`` ones log in with
    ``session.slave_local_login_with_password``, so they work on a slave (xapi's ``Neverforward``
    commands with a ``*_local_session`` implementation, cli_frontend.ml).
    """

    name: str
    run: Run
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    description: str = ""
    local: bool = False
    bare: bool = False
    local_session: bool = False

    def check(self, args: Args) -> None:
        """Raise xe's ``Required parameter not found`` for the first missing required parameter."""
        for key in self.required:
            args.require(key)


# -- field values ------------------------------------------------------------------------------------


def display(ctx: Context, f: CliField, ref: str, rec: Record) -> str:
    """The display string of field ``f`` of the object ``ref``."""
    if f.compute is not None:
        return f.compute(ref, rec, ctx.db)
    if f.source is not None:
        value = f.source(ref, rec, ctx.db)
        return output.NOT_IN_DATABASE if value is None else output.render(value, f.type, ctx.db.uuid_of, f.join)
    return output.render(rec.get(f.api or ""), f.type, ctx.db.uuid_of, f.join)


def to_wire(ctx: Context, ty: Type, text: str) -> Any:
    """The wire value for ``text`` typed by the user (refs given as uuids)."""
    if ty.kind == "bool":
        return parse_bool(text)
    if ty.kind == "ref":
        if text in ("", output.NOT_IN_DATABASE, NULL_REF):
            return NULL_REF
        return ctx.db.ref_of(ty.name, text)
    # Ints, floats, enums and datetimes travel as text; the server converts and validates them.
    return text


def field_of(view: CliClass, name: str) -> CliField:
    f = view.field(name)
    if f is None:
        raise XeError(f"Unknown field '{name}'")
    return f


def read_only(f: CliField) -> XeError:
    return XeError(f"Field '{f.name}' is read-only.")


def lookup(ctx: Context, view: CliClass, args: Args) -> tuple[str, Record]:
    """The ref and record of the object named by ``uuid=``."""
    ref = ctx.db.ref_of(view.api, args.require("uuid"))
    return ref, ctx.rpc.call(f"{view.api}.get_record", ref)


# -- generated per-class commands ----------------------------------------------------------------------


def _columns(view: CliClass, params: str | None) -> list[CliField]:
    """The fields a list shows, always in record order."""
    if params == "all":
        return list(view.fields)
    if params is not None:
        wanted = [p.strip() for p in params.split(",") if p.strip()]
        for name in wanted:
            field_of(view, name)
    elif view.default_columns:
        wanted = list(view.default_columns)
    elif view.has_name_label:
        wanted = ["uuid", "name-label", "name-description"]
    else:
        return list(view.fields)
    return [f for f in view.fields if f.name in wanted]


@dataclass(frozen=True)
class Filter:
    """One ``-list`` filter; it compares xe's display strings, as xe does."""

    field: CliField
    sub: str | None  # map key, "contains" for sets, None for a plain field
    value: str

    def matches(self, ctx: Context, ref: str, rec: Record) -> bool:
        f = self.field
        if self.sub is not None and f.kind == "map" and f.api is not None:
            assert f.type.value is not None
            entries = rec.get(f.api) or {}
            if self.sub not in entries:
                return False
            return output.render(entries[self.sub], f.type.value, ctx.db.uuid_of) == self.value
        if self.sub == "contains" and f.kind == "set" and f.api is not None:
            assert f.type.elem is not None
            return self.value in [output.render(v, f.type.elem, ctx.db.uuid_of) for v in rec.get(f.api) or []]
        shown = display(ctx, f, ref, rec)
        if f.kind in ("enum", "bool"):
            return shown.lower() == self.value.lower()
        return shown == self.value


def _filters(view: CliClass, args: Args, skip: tuple[str, ...]) -> list[Filter]:
    """The view's default filter overridden by every ``field=v``/``map:k=v``/``set:contains=v`` given."""
    given = {k: v for k, v in args.pairs if k not in skip}
    merged = {k: v for k, v in view.default_filter.items() if k not in given}
    merged.update(given)
    out = []
    for key, value in merged.items():
        name, sub = key, None
        if view.field(key) is None and ":" in key:
            name, sub = key.split(":", 1)
        out.append(Filter(field_of(view, name), sub, value))
    return out


def select(ctx: Context, view: CliClass, filters: list[Filter]) -> list[tuple[str, Record]]:
    """Every object of the view's class that passes all filters, in the server's order."""
    records = ctx.rpc.call(f"{view.api}.get_all_records_where", "true")
    return [(ref, rec) for ref, rec in records.items() if all(f.matches(ctx, ref, rec) for f in filters)]


def _list(view: CliClass) -> Run:
    def run(ctx: Context, args: Args) -> None:
        columns = _columns(view, args.get("params"))
        rows = select(ctx, view, _filters(view, args, ("params", "minimal")))
        if args.flag("minimal"):
            ctx.out.write(output.minimal_text(display(ctx, columns[0], ref, rec) for ref, rec in rows) if columns
                          else "\n")
            return
        for ref, rec in rows:
            ctx.out.write(output.record_text([(f.label, display(ctx, f, ref, rec)) for f in columns]))

    return run


def _param_list(view: CliClass) -> Run:
    def run(ctx: Context, args: Args) -> None:
        ref, rec = lookup(ctx, view, args)
        ctx.out.write(output.record_text([(f.label, display(ctx, f, ref, rec)) for f in view.fields]))

    return run


def _param_get(view: CliClass) -> Run:
    def run(ctx: Context, args: Args) -> None:
        name = args.require("param-name")
        f = view.field(name)
        if f is None:
            raise XeError("Error code: Missing parameter", f"Error parameters: {name}")
        ref, rec = lookup(ctx, view, args)
        key = args.get("param-key")
        if key is not None and f.kind == "map" and (f.api is not None or f.source is not None):
            assert f.type.value is not None
            entries = (rec.get(f.api) if f.api is not None else f.source(ref, rec, ctx.db)) or {}  # type: ignore[misc]
            if key not in entries:
                raise XeError(f"Key {key} not found in map")
            ctx.out.write(output.render(entries[key], f.type.value, ctx.db.uuid_of) + "\n")
            return
        ctx.out.write(display(ctx, f, ref, rec) + "\n")

    return run


def _put_map_entries(ctx: Context, f: CliField, ref: str, rec: Record, entries: dict[str, str]) -> None:
    """Set map keys of ``f``, replacing existing values (remove then add, as xe does)."""
    if f.map_add and f.map_remove:
        for k, v in entries.items():
            ctx.rpc.call(f.map_remove, ref, k)
            ctx.rpc.call(f.map_add, ref, k, v)
    elif f.setter and f.api:
        ctx.rpc.call(f.setter, ref, {**(rec.get(f.api) or {}), **entries})
    else:
        raise read_only(f)


def _param_set(view: CliClass) -> Run:
    def run(ctx: Context, args: Args) -> None:
        scalars: list[tuple[CliField, str]] = []
        maps: dict[str, tuple[CliField, dict[str, str]]] = {}
        for key, value in args.pairs:
            if key == "uuid":
                continue
            if view.field(key) is None and ":" in key:
                name, sub = key.split(":", 1)
                f = field_of(view, name)
                if f.kind != "map" or not (f.map_add or f.setter):
                    raise read_only(f)
                maps.setdefault(f.name, (f, {}))[1][sub] = value
                continue
            f = field_of(view, key)
            if f.setter is None or f.kind in ("map", "set"):
                raise read_only(f)
            scalars.append((f, value))
        ref, rec = lookup(ctx, view, args)
        for f, value in scalars:
            assert f.setter is not None
            ctx.rpc.call(f.setter, ref, to_wire(ctx, f.type, value))
        for f, entries in maps.values():
            _put_map_entries(ctx, f, ref, rec, entries)

    return run


def _collection(view: CliClass, args: Args) -> CliField:
    f = field_of(view, args.require("param-name"))
    if f.kind not in ("map", "set"):
        raise XeError(f"Field '{f.name}' is not a map or set.")
    return f


def _param_add(view: CliClass) -> Run:
    def run(ctx: Context, args: Args) -> None:
        f = _collection(view, args)
        if f.kind == "map":
            entries = {k: v for k, v in args.pairs if k not in ("uuid", "param-name", "param-key")}
            ref, rec = lookup(ctx, view, args)
            if f.map_add:
                for k, v in entries.items():
                    ctx.rpc.call(f.map_add, ref, k, v)
            else:
                _put_map_entries(ctx, f, ref, rec, entries)
            return
        assert f.type.elem is not None
        member = args.require("param-key")
        if not (f.set_add or f.setter):
            raise read_only(f)
        ref, rec = lookup(ctx, view, args)
        value = to_wire(ctx, f.type.elem, member)
        if f.set_add:
            ctx.rpc.call(f.set_add, ref, value)
        elif f.setter and f.api:
            current = list(rec.get(f.api) or [])
            ctx.rpc.call(f.setter, ref, current if value in current else [*current, value])

    return run


def _param_remove(view: CliClass) -> Run:
    def run(ctx: Context, args: Args) -> None:
        f = _collection(view, args)
        key = args.require("param-key")
        ref, rec = lookup(ctx, view, args)
        remove = f.map_remove if f.kind == "map" else f.set_remove
        if remove:
            value = key if f.kind == "map" or f.type.elem is None else to_wire(ctx, f.type.elem, key)
            ctx.rpc.call(remove, ref, value)
        elif f.setter and f.api:
            current = rec.get(f.api)
            if f.kind == "map":
                ctx.rpc.call(f.setter, ref, {k: v for k, v in (current or {}).items() if k != key})
            else:
                assert f.type.elem is not None
                value = to_wire(ctx, f.type.elem, key)
                ctx.rpc.call(f.setter, ref, [v for v in current or [] if v != value])
        else:
            raise read_only(f)

    return run


def _param_clear(view: CliClass) -> Run:
    def run(ctx: Context, args: Args) -> None:
        f = field_of(view, args.require("param-name"))
        if not f.writable:
            raise read_only(f)
        if f.kind not in ("map", "set", "string"):
            raise XeError(f"Field '{f.name}' is not a map or set.")
        ref, rec = lookup(ctx, view, args)
        current = rec.get(f.api or "")
        if f.setter:
            ctx.rpc.call(f.setter, ref, {} if f.kind == "map" else [] if f.kind == "set" else "")
        elif f.kind == "map" and f.map_remove:
            for k in current or {}:
                ctx.rpc.call(f.map_remove, ref, k)
        elif f.kind == "set" and f.set_remove:
            for v in current or []:
                ctx.rpc.call(f.set_remove, ref, v)
        else:
            raise read_only(f)

    return run


def class_commands(view: CliClass) -> list[Command]:
    """The seven generated commands of one xe class."""
    c = view.name
    return [
        Command(f"{c}-list", _list(view), (), ("params", "--minimal", "<field>=<value>"),
                f"Lists all the {c}s, with optional filtering."),
        Command(f"{c}-param-list", _param_list(view), ("uuid",), (), f"Lists all the parameters of a {c}."),
        Command(f"{c}-param-get", _param_get(view), ("uuid", "param-name"), ("param-key",),
                f"Gets the value of a parameter of a {c}."),
        Command(f"{c}-param-set", _param_set(view), ("uuid",), ("<field>=<value>", "<map>:<key>=<value>"),
                f"Sets parameters of a {c}."),
        Command(f"{c}-param-add", _param_add(view), ("uuid", "param-name"), ("param-key", "<key>=<value>"),
                f"Adds to a set or map parameter of a {c}."),
        Command(f"{c}-param-remove", _param_remove(view), ("uuid", "param-name", "param-key"), (),
                f"Removes a key from a map or a member from a set parameter of a {c}."),
        Command(f"{c}-param-clear", _param_clear(view), ("uuid", "param-name"), (),
                f"Clears a parameter of a {c}."),
    ]


# -- named commands --------------------------------------------------------------------------------------


def _print_uuid(ctx: Context, cls: str, ref: str) -> None:
    ctx.out.write(str(ctx.rpc.call(f"{cls}.get_uuid", ref)) + "\n")


def _master(ctx: Context) -> str:
    pool = ctx.rpc.call("pool.get_all")[0]
    return str(ctx.rpc.call("pool.get_master", pool))


FILENAME_SUFFIX = "-filename"


def device_config(args: Args) -> dict[str, str]:
    """``device-config:`` entries; a key ending in ``-filename`` names a local file whose content is the value."""
    out = {}
    for key, value in args.map("device-config").items():
        if key.endswith(FILENAME_SUFFIX) and len(key) > len(FILENAME_SUFFIX):
            try:
                out[key[: -len(FILENAME_SUFFIX)]] = Path(value).read_text()
            except OSError as e:
                raise failwith(f"Failed to read file {value}: {e.strerror}") from None
        else:
            out[key] = value
    return out


def sr_create(ctx: Context, args: Args) -> None:
    host_uuid = args.get("host-uuid")
    host = ctx.db.ref_of("host", host_uuid) if host_uuid else _master(ctx)
    size = parse_size(args.get("physical-size") or "0")
    config = device_config(args)
    ref = ctx.rpc.call(
        "SR.create", host, config, str(size), args.require("name-label"),
        args.get("name-description", ""), args.require("type"), args.get("content-type", ""),
        args.flag("shared"), args.map("sm-config"),
    )
    _print_uuid(ctx, "SR", ref)


def sr_introduce(ctx: Context, args: Args) -> None:
    ref = ctx.rpc.call(
        "SR.introduce", args.require("uuid"), args.require("name-label"), args.get("name-description", ""),
        args.require("type"), args.get("content-type", ""), args.flag("shared"), args.map("sm-config"),
    )
    _print_uuid(ctx, "SR", ref)


def _on_uuid(cls: str, method: str) -> Run:
    def run(ctx: Context, args: Args) -> None:
        ctx.rpc.call(f"{cls}.{method}", ctx.db.ref_of(cls, args.require("uuid")))

    return run


def pbd_create(ctx: Context, args: Args) -> None:
    host = ctx.db.ref_of("host", args.require("host-uuid"))
    sr = ctx.db.ref_of("SR", args.require("sr-uuid"))
    ref = ctx.rpc.call("PBD.create", {"host": host, "SR": sr, "device_config": args.map("device-config", True),
                                      "other_config": {}})
    _print_uuid(ctx, "PBD", ref)


def vdi_create(ctx: Context, args: Args) -> None:
    cdef = ctx.schema.classes["VDI"]
    values: dict[str, Any] = {
        f.name: f.type.zero() for f in cdef.fields.values()
        if f.qualifier in ("RW", "SRO") and not f.has_default and f.derived_from is None and not f.removed
    }
    values.update({
        "name_label": args.require("name-label"), "name_description": args.get("name-description", ""),
        "SR": ctx.db.ref_of("SR", args.require("sr-uuid")),
        "virtual_size": str(parse_size(args.require("virtual-size"))),
        "type": args.get("type", "user"), "sharable": args.flag("sharable"), "read_only": args.flag("read-only"),
        "other_config": {},
    })
    _print_uuid(ctx, "VDI", ctx.rpc.call("VDI.create", values))


VM_OP_KEYS = ("vm", "uuid", "force", "multiple", "minimal", "on", "paused")


def select_vms(ctx: Context, args: Args, skip: tuple[str, ...] = (), templates: bool = False) -> list[str]:
    """The VMs a vm-* operation acts on: ``uuid=``, ``vm=<name or uuid>`` and field selectors (the
    command's own parameters ``skip`` excluded; ``templates``: templates and snapshots may match too)."""
    uuid = args.get("uuid")
    if uuid is not None:
        return [ctx.db.ref_of("VM", uuid)]
    view = ctx.classes["vm"]
    if templates:
        view = CliClass(view.name, view.cdef, view.schema, view.default_columns, {})
    filters = _filters(view, Args([(k, v) for k, v in args.pairs if k not in VM_OP_KEYS + skip]), ())
    name = args.get("vm")
    refs = [ref for ref, rec in select(ctx, view, filters)
            if name is None or name in (rec.get("uuid"), rec.get("name_label"))]
    if not refs:
        raise failwith("No matching VMs found")
    if len(refs) > 1 and not args.flag("multiple"):
        raise failwith("Multiple matches VMs found. --multiple required to complete the operation")
    return refs


def host_named(ctx: Context, text: str) -> str:
    """The ref of the host whose uuid or name-label is ``text`` (``vm-start on=``)."""
    for ref, rec in ctx.db.records("host").items():
        if text in (rec.get("uuid"), rec.get("name_label")):
            return ref
    raise failwith(f"Host {text} not found")


def _vm_op(clean: str, forced: str | None = None) -> Run:
    """A vm-* power operation; with ``--multiple``, a failing VM is reported and the others still run."""

    def run(ctx: Context, args: Args) -> None:
        method = forced if forced and args.flag("force") else clean
        on = args.get("on")
        host = host_named(ctx, on) if method == "start" and on is not None else None
        failures: list[str] = []
        for vm in select_vms(ctx, args):
            try:
                if method == "start" and host is not None:
                    ctx.rpc.call("VM.start_on", vm, host, args.flag("paused"), args.flag("force"))
                elif method == "start":
                    ctx.rpc.call("VM.start", vm, args.flag("paused"), args.flag("force"))
                else:
                    ctx.rpc.call(f"VM.{method}", vm)
            except ApiFailure as e:
                if not args.flag("multiple"):
                    raise
                message = "; ".join(output.api_error_lines(e.code, e.params, ctx.db.describe))
                failures.append(f"operation failed on {ctx.db.uuid_of('VM', vm) or vm}: {message}")
        if failures:
            raise XeError(*failures)

    return run


def pool_ha_enable(ctx: Context, args: Args) -> None:
    uuids = [u for u in (args.get("heartbeat-sr-uuids") or "").split(",") if u]
    srs = [ctx.db.ref_of("SR", u) for u in uuids]
    stack = args.get("cluster-stack")
    extra = [] if stack is None else [stack]
    ctx.rpc.call("pool.enable_ha", srs, args.map("ha-config"), *extra)


def pool_ha_disable(ctx: Context, args: Args) -> None:
    ctx.rpc.call("pool.disable_ha")


def pool_ha_compute_max(ctx: Context, args: Args) -> None:
    ctx.out.write(f"{int(ctx.rpc.call('pool.ha_compute_max_host_failures_to_tolerate'))}\n")


def pool_ha_compute_hypothetical_max(ctx: Context, args: Args) -> None:
    """Pair the ``vm-uuid=`` and ``restart-priority=`` arguments in order and print the failures tolerated."""
    vms = [v for k, v in args.pairs if k == "vm-uuid"]
    priorities = [v for k, v in args.pairs if k == "restart-priority"]
    if len(vms) != len(priorities):
        raise failwith("Call requires an equal number of vm-uuid and restart-priority arguments")
    configuration = {ctx.db.ref_of("VM", uuid): priority for uuid, priority in zip(vms, priorities, strict=True)}
    result = ctx.rpc.call("pool.ha_compute_hypothetical_max_host_failures_to_tolerate", configuration)
    ctx.out.write(f"{int(result)}\n")


def pool_ha_compute_vm_failover_plan(ctx: Context, args: Args) -> None:
    """The failover plan for the non-dom0 VMs resident on the given hosts, as xe's cli_operations.ml
    prints it: one record, ``VM: Destination Host or Error`` then ``<vm uuid> (<name>): <host uuid>
    (<name>)`` or the error code per VM."""
    hosts = [ctx.db.ref_of("host", u) for u in (args.get("host-uuids") or "").split(",")]
    vms = [vm for h in hosts for vm in ctx.rpc.call("host.get_resident_VMs", h)
           if not ctx.rpc.call("VM.get_is_control_domain", vm)]
    plan = ctx.rpc.call("pool.ha_compute_vm_failover_plan", hosts, vms)
    rows = [("VM", "Destination Host or Error")]
    for vm, result in plan.items():
        if "host" in result:
            where = ctx.db.describe("host", result["host"])
        else:
            where = result.get("error_code", "UNKNOWN")
        rows.append((ctx.db.describe("VM", vm), where))
    ctx.out.write(output.record_text(rows))


HOST_SELECTOR_KEYS = ("host", "uuid", "multiple", "minimal", "force")


def select_hosts(ctx: Context, args: Args, extra: tuple[str, ...] = ()) -> list[str]:
    """The hosts a host-* operation acts on: ``uuid=``, ``host=<uuid, hostname or name-label>`` and field
    selectors (cli_operations.ml select_hosts); the command's own parameters in ``extra`` are not selectors."""
    uuid = args.get("uuid")
    if uuid is not None:
        return [ctx.db.ref_of("host", uuid)]
    view = ctx.classes["host"]
    skip = HOST_SELECTOR_KEYS + extra
    filters = _filters(view, Args([(k, v) for k, v in args.pairs if k not in skip]), ())
    name = args.get("host")
    return [ref for ref, rec in select(ctx, view, filters)
            if name is None or name in (rec.get("uuid"), rec.get("hostname"), rec.get("name_label"))]


def _host_op(method: str, extra: tuple[str, ...] = (), multiple: bool = True,
             arguments: Callable[[Context, Args], list[Any]] | None = None) -> Run:
    """A host-* operation on the selected hosts (cli_operations.ml do_host_op)."""

    def run(ctx: Context, args: Args) -> None:
        hosts = select_hosts(ctx, args, extra)
        if not hosts:
            raise failwith("No matching hosts found")
        if len(hosts) > 1 and not (multiple and args.flag("multiple")):
            raise failwith("Multiple matching hosts found. Operation can only be performed on one host at a time"
                           if not multiple else
                           "Multiple matching hosts found. --multiple required to complete the operation")
        more = arguments(ctx, args) if arguments is not None else []
        failures: list[str] = []
        for host in hosts:
            try:
                ctx.rpc.call(f"host.{method}", host, *more)
            except ApiFailure as e:
                if len(hosts) == 1:
                    raise
                message = "; ".join(output.api_error_lines(e.code, e.params, ctx.db.describe))
                failures.append(f"operation failed on {ctx.db.uuid_of('host', host) or host}: {message}")
        if failures:
            raise XeError(*failures)

    return run


def _disable_args(ctx: Context, args: Args) -> list[Any]:
    value = args.get("auto-enable")
    return [True if value is None else parse_bool(value)]


def _evacuate_args(ctx: Context, args: Args) -> list[Any]:
    network = args.get("network-uuid")
    batch = args.get("batch-size") or "0"
    if not batch.isdigit():
        raise failwith(f"Failed to parse batch-size: {batch}")
    return [ctx.db.ref_of("network", network) if network else NULL_REF, batch]


def host_get_vms_which_prevent_evacuation(ctx: Context, args: Args) -> None:
    """One record per VM: uuid, name-label and the reason (code and parameters joined by commas)."""
    host = ctx.db.ref_of("host", args.require("uuid"))
    for vm, reason in ctx.rpc.call("host.get_vms_which_prevent_evacuation", host).items():
        rec = ctx.db.record("VM", vm) or {}
        ctx.out.write(output.record_text([("uuid ( RO)", str(rec.get("uuid", vm))),
                                          ("name-label ( RW)", str(rec.get("name_label", ""))),
                                          ("reason ( RO)", ",".join(reason))]))


def pool_ha_prevent_restarts_for(ctx: Context, args: Args) -> None:
    seconds = args.require("seconds")
    try:
        int(seconds)
    except ValueError:
        raise failwith(f"int_of_string: {seconds}") from None
    ctx.rpc.call("pool.ha_prevent_restarts_for", seconds)


def host_ha_xapi_healthcheck(ctx: Context, args: Args) -> None:
    """``xapi is healthy.``; exit 2 when the call says false, 3 when it fails (cli_operations.ml)."""
    try:
        healthy = ctx.rpc.call("host.ha_xapi_healthcheck")
    except ApiFailure as e:
        raise XeError(f"Host.ha_xapi_healthcheck threw exception: {' '.join([e.code, *e.params])}",
                      status=3) from None
    if not healthy:
        raise XeError("Host.ha_xapi_healthcheck reports false", status=2)
    ctx.out.write("xapi is healthy.\n")


def host_emergency_ha_disable(ctx: Context, args: Args) -> None:
    if not args.flag("force"):
        raise failwith(DANGEROUS)
    ctx.rpc.call("host.emergency_ha_disable", args.flag("soft"))


FUSE_TIME = "10."  # xapi's Constants.fuse_time, as OCaml's string_of_float prints it


def _is_master(ctx: Context) -> bool:
    """Whether the host xe talks to is the master (the CLI server asks its Pool_role)."""
    try:
        me = ctx.rpc.call("session.get_this_host", ctx.rpc.session)  # type: ignore[attr-defined]
        pool = ctx.rpc.call("pool.get_all")[0]
        return bool(ctx.rpc.call("pool.get_master", pool) == me)
    except ApiFailure:
        return False


def pool_emergency_transition_to_master(ctx: Context, args: Args) -> None:
    """cli_operations.ml: ignored on the master unless --force."""
    if not args.flag("force") and _is_master(ctx):
        ctx.out.write("Host agent is already master. Use '--force' to execute the operation anyway.\n")
        return
    ctx.rpc.call("pool.emergency_transition_to_master")
    ctx.out.write(f"Host agent will restart and transition to master in {FUSE_TIME} seconds...\n")


def pool_emergency_reset_master(ctx: Context, args: Args) -> None:
    address = args.require("master-address")
    ctx.rpc.call("pool.emergency_reset_master", address)
    ctx.out.write(f"Host agent will restart and become slave of {address} in {FUSE_TIME} seconds...\n")


def pool_recover_slaves(ctx: Context, args: Args) -> None:
    """The uuids of the hosts that took the master's address, one a line."""
    for host in ctx.rpc.call("pool.recover_slaves"):
        ctx.out.write(f"{ctx.rpc.call('host.get_uuid', host)}\n")


def pool_designate_new_master(ctx: Context, args: Args) -> None:
    host = ctx.rpc.call("host.get_by_uuid", args.require("host-uuid"))
    ctx.rpc.call("pool.designate_new_master", host)


EVENT_WAIT_TIMEOUT = 30.0  # seconds per event.from call, as xe


def event_wait(ctx: Context, args: Args) -> None:
    """``event-wait class=C field=value field=/=value...`` (cli_operations.ml event_wait): return once an
    object of the class matches, checked now, then on every event of the class."""
    name = args.require("class")
    view = ctx.classes.get(name)
    if view is None:
        raise failwith(f"Cli listening for class '{name}' not currently implemented")
    conditions = []
    for key, value in args.pairs:
        if key == "class":
            continue
        f = view.field(key)
        if f is None:
            raise failwith(f"key missing: {key}")
        conditions.append((f, value[2:], False) if value.startswith("/=") else (f, value, True))

    def matches(ref: str, rec: Record) -> bool:
        return all((display(ctx, f, ref, rec) == value) == equal for f, value, equal in conditions)

    records = ctx.rpc.call(f"{view.api}.get_all_records")
    if any(matches(ref, rec) for ref, rec in records.items()):
        return
    token = ""
    while True:
        answer = ctx.rpc.call("event.from", [view.api.lower()], token, EVENT_WAIT_TIMEOUT)
        token = answer["token"]
        for event in answer["events"]:
            snapshot = event.get("snapshot")
            if snapshot and event.get("class", "").lower() == view.api.lower() and matches(event["ref"], snapshot):
                return


FORGET_WARNINGS = (
    "WARNING: A host should only be forgotten if it is physically unrecoverable;",
    "WARNING: if possible, Hosts should be 'ejected' from the Pool instead.",
    "WARNING: Once a host has been forgotten it will have to be re-installed.",
    "WARNING: This operation is irreversible.",
)
DECLARE_DEAD_WARNINGS = (
    "WARNING: A host should only be declared dead if it is verified offline.",
    "WARNING: Performing this operation if the host is still online and has any",
    "WARNING: running VMs may lead to possible data loss and/or corruption.",
)


def _careful_host_op(method: str, warnings: tuple[str, ...]) -> Run:
    """xe's ``host_careful_op`` (cli_operations.ml): without --force, print the warnings and go on
    only if the user types ``yes``."""

    def run(ctx: Context, args: Args) -> None:
        host = ctx.rpc.call("host.get_by_uuid", args.require("uuid"))
        if not args.flag("force"):
            ctx.out.write("".join(f"{w}\n" for w in warnings) + "Type 'yes' to continue\n")
            ctx.out.flush()
            if sys.stdin.readline().strip().lower() != "yes":
                return
        ctx.rpc.call(method, host)

    return run


def pool_eject(ctx: Context, args: Args) -> None:
    """cli_operations.ml pool_eject: without --force, warn about the VDIs of SRs only this host sees."""
    host = ctx.rpc.call("host.get_by_uuid", args.require("host-uuid"))
    if not args.flag("force"):
        lines = ["WARNING: Ejecting a host from the pool will reinitialise that host's local SRs.",
                 "WARNING: Any data contained with the local SRs will be lost."]
        doomed = []
        for pbd in ctx.rpc.call("host.get_PBDs", host):
            sr = ctx.rpc.call("PBD.get_SR", pbd)
            if all(ctx.rpc.call("PBD.get_host", other) == host for other in ctx.rpc.call("SR.get_PBDs", sr)):
                for vdi in ctx.rpc.call("SR.get_VDIs", sr):
                    uuid, name = ctx.rpc.call("VDI.get_uuid", vdi), ctx.rpc.call("VDI.get_name_label", vdi)
                    doomed.append(f"VDI: {uuid} ({name})")
        if doomed:
            lines += ["The following VDI objects will be destroyed:", *doomed]
        ctx.out.write("".join(f"{line}\n" for line in lines) + "Type 'yes' to continue\n")
        ctx.out.flush()
        if sys.stdin.readline().strip().lower() != "yes":
            return
    ctx.rpc.call("pool.eject", host)
    # OCaml's string_of_float 10. is "10."
    ctx.out.write("Specified host will attempt to restart as a master of a new pool in 10. seconds...\n")


def host_is_in_emergency_mode(ctx: Context, args: Args) -> None:
    ctx.out.write("true\n" if ctx.rpc.call("host.is_in_emergency_mode") else "false\n")


def named_commands() -> list[Command]:
    """The hand-written commands (wire.md 8.5, ha.md 8)."""
    from .xe_stats import data_source_commands  # it builds on this module

    return [
        Command("sr-create", sr_create, ("name-label", "type"),
                ("host-uuid", "name-description", "device-config:", "shared", "physical-size", "content-type",
                 "sm-config:"),
                "Creates an SR on the disk space specified (on the master for a shared SR); prints its uuid."),
        Command("sr-introduce", sr_introduce, ("uuid", "name-label", "type"),
                ("name-description", "content-type", "shared", "sm-config:"),
                "Introduces an SR record without creating the storage."),
        Command("sr-forget", _on_uuid("SR", "forget"), ("uuid",), (), "Forgets an SR (its PBDs and VDIs too)."),
        Command("sr-destroy", _on_uuid("SR", "destroy"), ("uuid",), (), "Destroys an SR and its storage."),
        Command("pbd-create", pbd_create, ("host-uuid", "sr-uuid"), ("device-config:",),
                "Creates a PBD connecting a host to an SR; prints its uuid."),
        Command("pbd-plug", _on_uuid("PBD", "plug"), ("uuid",), (), "Attempts to plug in the PBD."),
        Command("pbd-unplug", _on_uuid("PBD", "unplug"), ("uuid",), (), "Attempts to unplug the PBD."),
        Command("pbd-destroy", _on_uuid("PBD", "destroy"), ("uuid",), (), "Destroys the PBD."),
        Command("vdi-create", vdi_create, ("sr-uuid", "name-label", "virtual-size"),
                ("type", "sharable", "read-only", "name-description"), "Creates a VDI; prints its uuid."),
        Command("vdi-destroy", _on_uuid("VDI", "destroy"), ("uuid",), (), "Destroys a VDI."),
        Command("vm-start", _vm_op("start"), (), ("vm", "uuid", "force", "multiple", "on", "paused"),
                "Starts the selected VM(s), on host on= (name-label or uuid) if given, paused if paused=true."),
        Command("vm-shutdown", _vm_op("clean_shutdown", "hard_shutdown"), (), ("vm", "uuid", "force", "multiple"),
                "Shuts down the selected VM(s); --force hard-shuts them down."),
        Command("vm-reboot", _vm_op("clean_reboot", "hard_reboot"), (), ("vm", "uuid", "force", "multiple"),
                "Reboots the selected VM(s); --force hard-reboots them."),
        Command("pool-ha-enable", pool_ha_enable, (), ("heartbeat-sr-uuids", "ha-config:", "cluster-stack"),
                "Enables HA on the pool, with the given heartbeat SRs, configuration and cluster stack."),
        Command("pool-ha-disable", pool_ha_disable, (), (), "Disables HA on the pool."),
        Command("pool-ha-compute-max-host-failures-to-tolerate", pool_ha_compute_max, (), (),
                "Computes the maximum number of host failures the pool can tolerate with HA."),
        Command("pool-ha-compute-hypothetical-max-host-failures-to-tolerate", pool_ha_compute_hypothetical_max,
                (), ("vm-uuid", "restart-priority"),
                "Computes the host failures the pool could tolerate if the given VMs (repeated vm-uuid=, matched"
                " in order with repeated restart-priority=) had those restart priorities."),
        Command("pool-ha-compute-vm-failover-plan", pool_ha_compute_vm_failover_plan, ("host-uuids",), (),
                "Compute a VM failover plan assuming the given set of hosts fail."),
        Command("host-emergency-ha-disable", host_emergency_ha_disable, (), ("force", "soft"),
                "Disables HA on the local host in an emergency. Must be forced (--force).", local_session=True),
        Command("host-is-in-emergency-mode", host_is_in_emergency_mode, (), (),
                "Query the target host to discover if it is in emergency mode.", local_session=True),
        Command("pool-emergency-transition-to-master", pool_emergency_transition_to_master, (), ("force",),
                "Instruct slave to become pool master. The operation will be ignored if this host is already"
                " master; the optional parameter '--force' will force the operation.", local_session=True),
        Command("pool-emergency-reset-master", pool_emergency_reset_master, ("master-address",), (),
                "Instruct slave to reset master address.", local_session=True),
        Command("pool-recover-slaves", pool_recover_slaves, (), (),
                "Instruct master to try and reset master-address of all slaves currently running in"
                " emergency mode."),
        Command("pool-designate-new-master", pool_designate_new_master, ("host-uuid",), (),
                "Request an orderly handover of the role of master to another host."),
        Command("pool-ha-prevent-restarts-for", pool_ha_prevent_restarts_for, ("seconds",), (),
                "Prevent HA VM restarts for a given number of seconds."),
        Command("host-ha-xapi-healthcheck", host_ha_xapi_healthcheck, (), (),
                "Check that xapi on the local host is running satisfactorily.", local_session=True),
        Command("event-wait", event_wait, ("class",), ("<field>=<value>", "<field>=/=<value>"),
                "Wait for the event that satisfies the conditions given on the command line."),
        Command("pool-eject", pool_eject, ("host-uuid",), ("force",), "Instruct host to leave an existing pool."),
        Command("host-forget", _careful_host_op("host.destroy", FORGET_WARNINGS), ("uuid",), ("force",),
                "Forget about the host without contacting it explicitly. WARNING: this call is useful if the host"
                " to 'forget' is dead; however, if the host is live and part of the pool, you should consider"
                " using pool-eject instead."),
        Command("host-declare-dead", _careful_host_op("host.declare_dead", DECLARE_DEAD_WARNINGS), ("uuid",),
                ("force",), "Declare that the the host is dead without contacting it explicitly. WARNING: This"
                " call is dangerous and can cause data loss if the host is not actually dead"),
        Command("host-disable", _host_op("disable", ("auto-enable",), arguments=_disable_args), (),
                ("host", "uuid", "auto-enable", "multiple", "<field>=<value>"),
                "Disable the XE host. Setting auto-enable=false will keep the host persistently disabled until"
                " manually re-enabled with Host.enable."),
        Command("host-enable", _host_op("enable"), (), ("host", "uuid", "multiple", "<field>=<value>"),
                "Enable the XE host."),
        Command("host-evacuate", _host_op("evacuate", ("network-uuid", "batch-size"), multiple=False,
                                          arguments=_evacuate_args), (),
                ("host", "uuid", "network-uuid", "batch-size", "<field>=<value>"), "Migrate all VMs off a host."),
        Command("host-get-vms-which-prevent-evacuation", host_get_vms_which_prevent_evacuation, ("uuid",), (),
                "Return a list of VMs which prevent the evacuation of a specific host and display reasons for"
                " each one."),
        Command("host-shutdown", _host_op("shutdown"), (), ("host", "uuid", "multiple", "<field>=<value>"),
                "Shutdown the XE host."),
        Command("host-reboot", _host_op("reboot"), (), ("host", "uuid", "multiple", "<field>=<value>"),
                "Reboot the XE host."),
        Command("host-power-on", _host_op("power_on"), (), ("host", "uuid", "multiple", "<field>=<value>"),
                "Power on the XE host."),
        *data_source_commands(),
    ]


def _help(table: dict[str, Command]) -> Run:
    def run(ctx: Context, args: Args) -> None:
        names = [k for k, _v in args.pairs if k not in ("all", "minimal")]
        if not names:
            ctx.out.write(output.usage_text(sorted(table)))
            return
        for name in names:
            command = table.get(name)
            if command is None:
                raise usage_error(f"Unknown command: {name}")
            ctx.out.write(output.help_text(name, command.required, command.optional, command.description))

    return run


def registry(classes: dict[str, CliClass]) -> dict[str, Command]:
    """Every xe command by name: generated per class, then the named ones, then ``help``."""
    table: dict[str, Command] = {}
    for view in classes.values():
        for command in class_commands(view):
            table[command.name] = command
    from .xe_transfer import transfer_commands
    from .xe_vm_commands import vm_surface_commands

    for command in [*named_commands(), *vm_surface_commands(), *transfer_commands()]:
        table[command.name] = command
    table["help"] = Command("help", _help(table), (), ("<command>",), "Displays help on xe commands.",
                            local=True, bare=True)
    return table
