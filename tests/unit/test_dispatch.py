"""Argument unmarshalling (wire.md 2.3) and the schema-derived method table (wire.md 2.6, 4.1)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from xapid import schema as schema_mod
from xapid.dispatch import Coercer, Dispatcher, normalise_datetime, rpc_repr
from xapid.errors import ApiError
from xapid.schema import Schema, parse_type
from xapid.wire import XDateTime


@pytest.fixture(scope="module")
def schema() -> Schema:
    return schema_mod.load()


@pytest.fixture(scope="module")
def coerce(schema: Schema) -> Coercer:
    return Coercer(schema)


@pytest.fixture(scope="module")
def table(schema: Schema) -> Dispatcher:
    """The method table only: building it needs nothing of a daemon but the schema."""
    return Dispatcher(SimpleNamespace(schema=schema))  # type: ignore[arg-type]


# -- leniencies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "ty", "expected"), [
    ("abc", "string", "abc"),
    ("", "string", ""),
    ("anything at all", "VM ref", "anything at all"),       # a ref accepts any string (wire.md 2.4)
    (5, "int", 5),
    ("4294967296", "int", 4294967296),                       # Python sends big ints as strings
    ("-12", "int", -12),
    (str(2**63 - 1), "int", 2**63 - 1),
    (2.5, "float", 2.5),
    (3, "float", 3.0),
    ("0.25", "float", 0.25),
    (True, "bool", True),
    (False, "bool", False),
    ("running", "enum vm_power_state", "Running"),          # case-insensitive in, declared spelling out
    ("HALTED", "enum vm_power_state", "Halted"),
    (XDateTime("20250319T04:16:24Z"), "datetime", "20250319T04:16:24Z"),
    (XDateTime("20250319T04:16:24"), "datetime", "20250319T04:16:24Z"),   # zone-less is UTC
    ("2025-03-19T04:16:24Z", "datetime", "20250319T04:16:24Z"),            # RFC 3339 with dashes
    ("20250319T04:16:24+00:00", "datetime", "20250319T04:16:24Z"),
    ("20250319T04:16:24+02:00", "datetime", "20250319T04:16:24+02:00"),
    (["a", "b"], "string set", ["a", "b"]),
    ([], "VM ref set", []),
    (["1", 2], "int set", [1, 2]),
    ({"k": "v"}, "(string -> string) map", {"k": "v"}),
    ({"k": "7"}, "(string -> int) map", {"k": 7}),
    ({"k": "running"}, "(string -> enum vm_power_state) map", {"k": "Running"}),
])
def test_accepted(coerce: Coercer, value: Any, ty: str, expected: Any) -> None:
    got = coerce(value, parse_type(ty))
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(("value", "ty", "shown"), [
    (5, "string", "I(5)"),                   # strings do not accept ints
    (True, "string", "B(true)"),
    ([], "string", "[]"),                    # the one public report: Expected string, got '[]'
    (None, "string", "N"),                   # <nil/> from allow_none=True
    ({"a": 1}, "VM ref", "{a: I(1)}"),
    ("true", "bool", "S(true)"),             # bools do not accept strings
    (1, "bool", "I(1)"),
    ("abc", "int", "S(abc)"),
    ("1.5", "int", "S(1.5)"),
    (1.5, "int", "F(1.5)"),
    (True, "int", "B(true)"),
    (str(2**63), "int", "I(9223372036854775808)"),
    ("abc", "float", "S(abc)"),
    (False, "float", "B(false)"),
    ("yesterday", "datetime", "S(yesterday)"),
    (5, "datetime", "I(5)"),
    ("a", "string set", "S(a)"),
    ([5], "string set", "I(5)"),
    (["a"], "(string -> string) map", "[S(a)]"),
    ({"k": 1}, "(string -> string) map", "I(1)"),
    (5, "enum vm_power_state", "I(5)"),
])
def test_rejected_as_internal_error(coerce: Coercer, value: Any, ty: str, shown: str) -> None:
    """wire.md 4.3 step 6: type mismatches are INTERNAL_ERROR with rpclib's rendering, not FIELD_TYPE_ERROR."""
    with pytest.raises(ApiError) as e:
        coerce(value, parse_type(ty))
    assert e.value.code == "INTERNAL_ERROR"
    assert len(e.value.params) == 1
    assert e.value.params[0].startswith('(Failure "Expected ')
    assert f"'{shown}'" in e.value.params[0]


def test_string_type_error_text_matches_xapi(coerce: Coercer) -> None:
    with pytest.raises(ApiError) as e:
        coerce(42, parse_type("string"))
    assert e.value.description == ["INTERNAL_ERROR", '(Failure "Expected string, got \'I(42)\'")']


def test_bad_enum_is_an_unhandled_variant(coerce: Coercer) -> None:
    with pytest.raises(ApiError) as e:
        coerce("Exploded", parse_type("enum vm_power_state"))
    assert e.value.code == "INTERNAL_ERROR"
    assert "Unhandled pattern when unmarshalling variant type" in e.value.params[0]


def test_every_enum_the_schema_uses_has_values(schema: Schema) -> None:
    assert [name for name, values in schema.enums.items() if not values] == []
    assert "clean_shutdown" in schema.enums["vm_operations"]
    assert schema.enums["task_allowed_operations"] == ["cancel", "destroy"]


def test_rpc_repr_of_nested_values() -> None:
    assert rpc_repr([1, "a", [True], {"k": 0.5}, None]) == "[I(1), S(a), [B(true)], {k: F(0.5)}, N]"


@pytest.mark.parametrize(("text", "out"), [
    ("20250101T00:00:00Z", "20250101T00:00:00Z"),
    ("2025-01-01T00:00:00.123Z", "20250101T00:00:00Z"),
    ("20250101T00:00:00-05:00", "20250101T00:00:00-05:00"),
])
def test_normalise_datetime(text: str, out: str) -> None:
    assert normalise_datetime(text) == out


# -- the method table ------------------------------------------------------------------------------


def test_rw_fields_get_setters_and_sro_dro_fields_do_not(table: Dispatcher) -> None:
    m = table.resolve("VM.set_name_label")
    assert m is not None and [p.name for p in m.params] == ["self", "value"] and m.session
    assert table.resolve("VM.set_uuid") is None              # wire.md 4.5: just an unknown method
    assert table.resolve("VM.set_power_state") is None
    assert table.resolve("VM.set_resident_on") is None
    assert table.resolve("VM.get_uuid") is not None


def test_custom_setters_of_generic_names_exist_for_sro_and_dro_maps(table: Dispatcher) -> None:
    """wire.md 4.1 and 11 #13: VM.other_config/platform (SRO) and task.other_config (DRO) keep setters."""
    for name in ("VM.set_other_config", "VM.add_to_other_config", "VM.remove_from_other_config",
                 "VM.set_platform", "VM.add_to_platform", "VM.remove_from_platform",
                 "VM.set_blocked_operations", "VM.add_to_blocked_operations",
                 "task.set_other_config", "task.add_to_other_config", "task.remove_from_other_config"):
        assert table.resolve(name) is not None, name
        assert name in table.list_methods(), name


def test_map_and_set_field_families(table: Dispatcher, schema: Schema) -> None:
    add = table.resolve("pool.add_to_other_config")
    assert add is not None and [p.name for p in add.params] == ["self", "key", "value"]
    assert table.resolve("pool.remove_from_other_config") is not None
    tags = table.resolve("VM.add_tags")
    assert tags is not None and str(tags.params[1].type) == "string"
    assert table.resolve("VM.remove_tags") is not None
    # The "many" side of a relation gets only a getter.
    assert table.resolve("VM.get_VBDs") is not None
    assert table.resolve("VM.add_VBDs") is None and table.resolve("VM.set_VBDs") is None
    assert table.resolve("SR.set_PBDs") is None


def test_generic_object_messages_follow_the_class_flags(table: Dispatcher, schema: Schema) -> None:
    for cdef in schema.classes.values():
        n = cdef.name
        if not cdef.in_db:  # event: explicit messages only (wire.md 6)
            assert table.resolve(f"{n}.get_record") is None
            continue
        assert table.resolve(f"{n}.get_record") is not None
        assert table.resolve(f"{n}.get_by_uuid") is not None
        assert (table.resolve(f"{n}.get_by_name_label") is not None) == cdef.has_name_label, n
        for msg in ("get_all", "get_all_records", "get_all_records_where", "get_all_where"):
            assert (table.resolve(f"{n}.{msg}") is not None) == cdef.get_all, (n, msg)
        assert (table.resolve(f"{n}.create") is not None) == (cdef.constructor or "create" in cdef.messages), n
        for f in cdef.fields.values():
            assert table.resolve(f"{n}.get_{f.name}") is not None, (n, f.name)


def test_session_pbd_and_task_specifics(table: Dispatcher) -> None:
    """wire.md 4.1: no session.get_all*; no get_by_name_label on PBD or session; task has get_all."""
    assert table.resolve("session.get_all") is None
    assert table.resolve("session.get_all_records") is None
    assert table.resolve("session.get_by_name_label") is None
    assert table.resolve("PBD.get_by_name_label") is None
    assert table.resolve("task.get_all") is not None
    assert table.resolve("VM.get_by_name_label") is not None


def test_constructor_takes_one_struct_and_is_async(table: Dispatcher) -> None:
    m = table.resolve("VM.create")
    assert m is not None and len(m.params) == 1 and m.params[0].type.kind == "record"
    assert m.is_async and m.mandatory == 1
    get = table.resolve("VM.get_record")
    assert get is not None and not get.is_async                 # getters have no Async form


def test_login_counts_two_mandatory_of_four(table: Dispatcher) -> None:
    m = table.resolve("session.login_with_password")
    assert m is not None and not m.session
    assert len(m.params) == 4 and m.mandatory == 2


def test_underscore_alias_resolves_to_the_same_method(table: Dispatcher) -> None:
    """wire.md 2.6: ``Class_method`` is accepted for every message."""
    assert table.resolve("VM_get_record") is table.resolve("VM.get_record")
    assert table.resolve("host_metrics_get_live") is table.resolve("host_metrics.get_live")
    assert table.resolve("session_logout") is table.resolve("session.logout")
    assert table.resolve("vm.get_record") is None                  # class names are case-sensitive
    assert table.resolve("Async.VM.start") is None                 # the prefix is the dispatcher's job


def test_removed_field_getters_are_marked_removed(table: Dispatcher) -> None:
    """wire.md 2.5: removed fields stay in records but their getters answer MESSAGE_REMOVED."""
    m = table.resolve("host_metrics.get_memory_free")
    assert m is not None and m.removed
    assert "host_metrics.get_memory_free" in table.list_methods()


def test_list_methods_is_sorted_sync_names_with_implementations(table: Dispatcher) -> None:
    names = table.list_methods()
    assert names == sorted(names) and len(names) == len(set(names))
    assert "VM.get_all_records" in names and "session.login_with_password" in names
    assert not any(n.startswith("Async.") for n in names)
    assert all(table.table[n].impl is not None or table.table[n].removed for n in names)
