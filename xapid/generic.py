"""The generic messages every class gets, derived from its schema (wire.md 4.1).

Each ``make_*`` function returns the implementation of one generic message
for one class; :mod:`xapid.dispatch` decides which exist.  Implementations
take the :class:`~xapid.api.Call` followed by the wire arguments.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from xapid import query
from xapid.api import Call
from xapid.errors import ApiError
from xapid.record_cache import Encoded
from xapid.schema import NULL_REF, ClassDef, Field, Type
from xapid.store import Record, Transaction

Impl = Callable[..., Any]


def check_refs(tx: Transaction, fields: dict[str, Field], values: Record) -> None:
    """Every non-null ref value must name an existing object of its class (``HANDLE_INVALID``)."""
    for name, value in values.items():
        f = fields.get(name)
        if f is None:
            continue
        cls = f.type.name if f.type.kind == "ref" else None
        if cls and cls in tx.schema.classes and value != NULL_REF and tx.read(cls, value) is None:
            raise ApiError("HANDLE_INVALID", cls, value)


def get_record(cdef: ClassDef) -> Impl:
    def impl(call: Call, ref: str) -> Encoded:
        rec = call.store.get(cdef.name, ref)
        if rec is None:
            raise ApiError("HANDLE_INVALID", cdef.name, ref)
        return call.daemon.records.encoded(cdef.name, ref, rec)

    return impl


def get_by_uuid(cdef: ClassDef) -> Impl:
    def impl(call: Call, uuid: str) -> str:
        ref = call.store.by_uuid(cdef.name, uuid)
        if ref is None:
            raise ApiError("UUID_INVALID", cdef.name, uuid)
        return ref

    return impl


def get_by_name_label(cdef: ClassDef) -> Impl:
    def impl(call: Call, label: str) -> list[str]:
        return [r for r, rec in call.store.items(cdef.name) if rec.get("name_label") == label]

    return impl


def get_all(cdef: ClassDef) -> Impl:
    def impl(call: Call) -> list[str]:
        return call.store.refs(cdef.name)

    return impl


def get_all_records(cdef: ClassDef) -> Impl:
    def impl(call: Call) -> dict[str, Encoded]:
        encoded = call.daemon.records.encoded
        return {r: encoded(cdef.name, r, rec) for r, rec in call.store.items(cdef.name)}

    return impl


def matching(call: Call, cdef: ClassDef, expr: str) -> dict[str, Encoded]:
    """Records of ``cdef`` for which the filter expression holds (only matches are rendered)."""
    node = query.parse(expr)
    store = call.store
    out: dict[str, Encoded] = {}
    for ref, rec in store.items(cdef.name):

        def row(column: str, ref: str = ref, rec: Record = rec) -> str:
            f = cdef.column(column)
            if f is None:
                raise ApiError("INTERNAL_ERROR", "missing field", column, "")
            if f.derived_from:
                value = store.referrers(f.derived_from[0], f.derived_from[1], ref)
            else:
                value = rec[f.name] if f.name in rec else f.initial()
            return query.db_string(value, f.type)

        if query.evaluate(node, row):
            out[ref] = call.daemon.records.encoded(cdef.name, ref, rec)
    return out


def get_all_records_where(cdef: ClassDef) -> Impl:
    def impl(call: Call, expr: str) -> dict[str, Encoded]:
        return matching(call, cdef, expr)

    return impl


def get_all_where(cdef: ClassDef) -> Impl:
    def impl(call: Call, expr: str) -> list[str]:
        return list(matching(call, cdef, expr))

    return impl


def getter(cdef: ClassDef, f: Field) -> Impl:
    if f.removed:
        def removed(call: Call, ref: str) -> None:
            raise ApiError("MESSAGE_REMOVED")

        return removed

    def impl(call: Call, ref: str) -> Any:
        rec = call.store.get(cdef.name, ref)
        if rec is None:
            raise ApiError("HANDLE_INVALID", cdef.name, ref)
        if f.derived_from:
            return call.store.referrers(f.derived_from[0], f.derived_from[1], ref)
        return copy.deepcopy(rec.get(f.name, f.initial()))

    return impl


def setter(cdef: ClassDef, f: Field) -> Impl:
    def impl(call: Call, ref: str, value: Any) -> None:
        with call.store.transaction() as tx:
            check_refs(tx, cdef.fields, {f.name: value})
            tx.set_fields(cdef.name, ref, **{f.name: value})

    return impl


def map_add(cdef: ClassDef, f: Field) -> Impl:
    def impl(call: Call, ref: str, key: Any, value: Any) -> None:
        with call.store.transaction() as tx:
            rec = tx.get(cdef.name, ref)
            current = rec[f.name]
            if key in current:
                raise ApiError("MAP_DUPLICATE_KEY", cdef.name, f.name, ref, key)
            current[key] = value

    return impl


def map_remove(cdef: ClassDef, f: Field) -> Impl:
    def impl(call: Call, ref: str, key: Any) -> None:
        with call.store.transaction() as tx:
            tx.get(cdef.name, ref)[f.name].pop(key, None)

    return impl


def set_add(cdef: ClassDef, f: Field) -> Impl:
    def impl(call: Call, ref: str, value: Any) -> None:
        with call.store.transaction() as tx:
            current = tx.get(cdef.name, ref)[f.name]
            if value not in current:
                current.append(value)

    return impl


def set_remove(cdef: ClassDef, f: Field) -> Impl:
    def impl(call: Call, ref: str, value: Any) -> None:
        with call.store.transaction() as tx:
            current = tx.get(cdef.name, ref)[f.name]
            if value in current:
                current.remove(value)

    return impl


def constructor_fields(cdef: ClassDef) -> list[Field]:
    """The fields a generic ``create`` struct carries: every SRO and RW field."""
    return [f for f in cdef.fields.values() if f.qualifier in ("RW", "SRO") and f.derived_from is None]


def create_values(call: Call, cdef: ClassDef, args: dict[str, Any], coerce: Callable[[Any, Type], Any]) -> Record:
    """Turn a ``create`` struct into field values; a missing mandatory field is xapi's INTERNAL_ERROR."""
    values: Record = {}
    for f in constructor_fields(cdef):
        if f.name in args:
            values[f.name] = coerce(args[f.name], f.type)
        elif not f.has_default:
            raise ApiError("INTERNAL_ERROR", f'Server_helpers.Dispatcher_FieldNotFound("{f.name}")')
    return values


def create(cdef: ClassDef, coerce: Callable[[Any, Type], Any]) -> Impl:
    def impl(call: Call, args: dict[str, Any]) -> str:
        values = create_values(call, cdef, args, coerce)
        with call.store.transaction() as tx:
            check_refs(tx, cdef.fields, values)
            return tx.create(cdef.name, values)

    return impl


def destroy(cdef: ClassDef) -> Impl:
    def impl(call: Call, ref: str) -> None:
        with call.store.transaction() as tx:
            tx.delete(cdef.name, ref)

    return impl
