"""Shared by the hardening tests: the known error codes, the methods a fuzzer must not call
blindly, well-typed dummy arguments, an in-process daemon and the pool invariants."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from xapid import config as config_mod
from xapid.daemon import Daemon
from xapid.errors import CATALOGUE
from xapid.schema import NULL_REF, Schema, Type

# Every code a failure may carry: the catalogue plus the xapi codes raised outside it (wire.md 4.3/4.4).
KNOWN_CODES = frozenset(CATALOGUE) | {
    "Fault", "EVENTS_LOST", "SESSION_NOT_REGISTERED", "REQUIRED_PIF_IS_UNPLUGGED", "SR_BACKEND_FAILURE",
}

# Calls that legitimately block, start processes or end the caller's own session.
UNSAFE = frozenset({
    "event.next", "pool.enable_ha", "pool.disable_ha", "host.emergency_ha_disable",
    "session.logout", "session.local_logout", "session.change_password", "task.cancel",
})

# Methods served without a session (wire.md 4.3; system.listMethods is outside the table).
SESSIONLESS = frozenset({
    "session.login_with_password", "session.slave_local_login", "session.slave_local_login_with_password",
    "session.slave_login",
})

REPO = Path(__file__).resolve().parents[3]


def dummy(schema: Schema, ty: Type) -> Any:
    """A value that passes the dispatcher's type check for ``ty`` (so later checks are reached)."""
    kind = ty.kind
    if kind == "enum":
        return schema.enums[ty.name][0]
    if kind == "ref":
        return NULL_REF
    if kind == "int":
        return "0"
    if kind == "float":
        return 0.0
    if kind == "bool":
        return False
    if kind == "datetime":
        return "20250101T00:00:00Z"
    if kind == "set":
        return []
    if kind in ("map", "record"):
        return {}
    return "x"


def write_conf(path: Path, stack_root: Path | None = None, **overrides: str) -> Path:
    """A config like tests/conftest.py's, without its imports (usable from unit tests)."""
    values = {
        "login-failure-delay": "0", "ha-monitor-interval": "0.5", "ha-script-timeout": "20",
        "sm-dir": str(REPO / "etc" / "sm.d"),
        "cluster-stack-root": str(stack_root or REPO / "scripts" / "cluster-stack"),
    }
    values.update(overrides)
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def in_process_daemon(state_parent: Path | None = None, **overrides: str) -> Daemon:
    """A real :class:`Daemon` (store, seed, sessions, dispatcher) without HTTP or background services."""
    parent = state_parent or Path(tempfile.mkdtemp(prefix="xapid-hardening-"))
    cfg = config_mod.load(write_conf(parent / "xapi.conf", **overrides))
    return Daemon(cfg, parent / "state", hosts=3)


def dangling_refs(schema: Schema, records: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Ref fields (refs, sets and map values of refs) of every record that name a missing object.

    ``records`` maps class name -> ref -> record for every class with ``get_all``; targets in
    classes without ``get_all`` (session) or outside the model are not checked.
    """
    problems = []

    def refs_in(value: Any, ty: Type) -> Iterable[tuple[str, str]]:
        if ty.kind == "ref" and isinstance(value, str):
            yield ty.name, value
        elif ty.kind == "set" and ty.elem is not None:
            for v in value:
                yield from refs_in(v, ty.elem)
        elif ty.kind == "map" and ty.key is not None and ty.value is not None:
            for k, v in value.items():
                yield from refs_in(k, ty.key)
                yield from refs_in(v, ty.value)

    for cls, table in records.items():
        fields = schema.classes[cls].fields
        for ref, rec in table.items():
            for name, value in rec.items():
                f = fields.get(name)
                if f is None:
                    continue
                for target_cls, target in refs_in(value, f.type):
                    if target == NULL_REF or target_cls not in records:
                        continue
                    if target not in records[target_cls]:
                        problems.append(f"{cls} {ref} field {name} -> missing {target_cls} {target}")
    return problems


def pool_invariants(schema: Schema, get_all_records: Callable[[str], Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The database invariants of issue 5, read through ``get_all_records(cls)``; [] when they hold."""
    records = {name: dict(get_all_records(name)) for name, c in schema.classes.items() if c.get_all and c.in_db}
    problems = []
    for ref, pbd in records["PBD"].items():
        if pbd["host"] not in records["host"]:
            problems.append(f"PBD {ref} on missing host {pbd['host']}")
        if pbd["SR"] not in records["SR"]:
            problems.append(f"PBD {ref} of missing SR {pbd['SR']}")
    for ref, vdi in records["VDI"].items():
        if vdi["SR"] not in records["SR"]:
            problems.append(f"VDI {ref} in missing SR {vdi['SR']}")
    for ref, pool in records["pool"].items():
        if pool["master"] not in records["host"]:
            problems.append(f"pool {ref} master {pool['master']} is not a host")
    return problems + dangling_refs(schema, records)
