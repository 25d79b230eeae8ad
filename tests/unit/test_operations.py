"""The VM/VBD/VDI operation tables on an in-memory store (xapi_vm_lifecycle.ml, xapi_vbd_helpers.ml, xapi_vdi.ml)."""

from __future__ import annotations

from typing import Any

import pytest

from xapid import operations
from xapid import schema as schema_mod
from xapid.schema import NULL_REF
from xapid.store import Store


@pytest.fixture
def store() -> Store:
    s = Store(schema_mod.load(), None)
    operations.install(s)
    with s.transaction() as tx:
        tx.create("pool", {"name_label": "p"})
        tx.create("SM", {"type": "ext", "features": {"VDI_CREATE": 1, "VDI_DELETE": 1, "VDI_CLONE": 1,
                                                      "VDI_SNAPSHOT": 1, "VDI_RESIZE": 1}})
    return s


def vm(store: Store, **values: Any) -> str:
    with store.transaction() as tx:
        base = {"name_label": "v", "power_state": "Halted", "HVM_boot_policy": "BIOS order", "domid": -1}
        return tx.create("VM", {**base, **values})


def test_power_states_of_operations_are_xapis() -> None:
    rec: dict[str, Any] = {"is_control_domain": False, "is_a_snapshot": False}
    assert operations.allowed_power_states(rec, "destroy") == ("Halted", "Suspended")
    assert operations.allowed_power_states(rec, "hard_shutdown") == ("Paused", "Suspended", "Running")
    assert operations.allowed_power_states(rec, "clone") == ("Halted",)
    assert operations.allowed_power_states({**rec, "is_a_snapshot": True}, "clone") == ("Halted", "Suspended")
    assert operations.allowed_power_states({**rec, "is_control_domain": True}, "changing_VCPUs") == (
        "Halted", "Running")


def test_concurrency_groups() -> None:
    assert operations._concurrently_ok("copy", ["clone"])
    assert operations._concurrently_ok("checkpoint", ["snapshot"])
    assert not operations._concurrently_ok("start", ["clone"])
    assert operations._concurrently_ok("hard_shutdown", ["clean_shutdown"])
    assert not operations._concurrently_ok("hard_shutdown", ["hard_shutdown"])
    assert operations._concurrently_ok("clean_shutdown", ["migrate_send"])


def test_lists_are_recomputed_in_the_commit_that_changes_the_state(store: Store) -> None:
    ref = vm(store)
    assert "start" in store.get("VM", ref)["allowed_operations"]
    with store.transaction() as tx:
        tx.update("VM", ref, power_state="Running", domid=3, current_operations={"t1": "clone"})
    allowed = store.get("VM", ref)["allowed_operations"]
    assert "start" not in allowed and "hard_shutdown" in allowed


def test_busy_vm_refuses_with_other_operation_in_progress(store: Store) -> None:
    ref = vm(store, current_operations={"OpaqueRef:task": "clone"})
    with store.transaction() as tx, pytest.raises(Exception) as info:
        operations.assert_vm(tx, ref, "start")
    assert info.value.args == ("OTHER_OPERATION_IN_PROGRESS", "VM", ref, "clone", "OpaqueRef:task")


def test_vdi_attached_to_a_running_vm(store: Store) -> None:
    with store.transaction() as tx:
        sr = tx.create("SR", {"type": "ext"})
        tx.create("PBD", {"SR": sr, "currently_attached": True, "host": NULL_REF})
        vdi = tx.create("VDI", {"SR": sr, "type": "user", "managed": True})
    ref = vm(store, power_state="Running", domid=4)
    with store.transaction() as tx:
        tx.create("VBD", {"VM": ref, "VDI": vdi, "currently_attached": True, "type": "Disk", "mode": "RW",
                          "userdevice": "0"})
    allowed = store.get("VDI", vdi)["allowed_operations"]
    assert {"clone", "snapshot"} <= set(allowed) and not {"destroy", "resize", "copy"} & set(allowed)
    with store.transaction() as tx:
        assert operations.vdi_error(tx, vdi, tx.get("VDI", vdi), "destroy").args == ("VDI_IN_USE", vdi, "destroy")


def test_operations_left_by_a_killed_daemon_are_cleared_at_start() -> None:
    """Tasks do not survive a restart, so neither do the operations they were running."""
    s = Store(schema_mod.load(), None)
    with s.transaction() as tx:
        tx.create("pool", {"name_label": "p"})
        ref = tx.create("VM", {"name_label": "v", "power_state": "Halted", "HVM_boot_policy": "BIOS order",
                               "domid": -1, "current_operations": {"OpaqueRef:gone": "clone"}})
    operations.install(s)
    rec = s.get("VM", ref)
    assert rec["current_operations"] == {} and "start" in rec["allowed_operations"]


def test_the_fields_the_rules_read_are_known() -> None:
    """READ_NAMES over-estimates what the rules read: every field named in this module's code."""
    for name in ("power_state", "current_operations", "blocked_operations", "other_config", "platform", "domid",
                 "guest_metrics", "metrics", "HVM_boot_policy", "domain_type", "currently_attached", "on_boot",
                 "sm_config", "features", "ha_enabled", "allowed_operations", "VM", "VDI", "SR"):
        assert name in operations.READ_NAMES, name
    for name in ("name_label", "name_description", "tags", "xenstore_data", "VCPUs_max", "memory_static_max"):
        assert name not in operations.READ_NAMES, name


def test_a_write_of_fields_no_rule_reads_keeps_the_lists(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = vm(store)
    before = store.get("VM", ref)["allowed_operations"]
    computed: list[str] = []
    real = operations.vm_allowed
    monkeypatch.setattr(operations, "vm_allowed", lambda tx, r, *a: computed.append(r) or real(tx, r, *a))
    with store.transaction() as tx:
        tx.set_fields("VM", ref, name_label="renamed", tags=["t"])
    assert computed == [] and store.get("VM", ref)["allowed_operations"] == before
    assert store.get("VM", ref)["name_label"] == "renamed"
    # A field a rule reads, written the same way, moves the list in the same commit.
    with store.transaction() as tx:
        tx.set_fields("VM", ref, name_label="again", power_state="Running", domid=3)
    allowed = store.get("VM", ref)["allowed_operations"]
    assert computed == [ref] and "start" not in allowed and "hard_shutdown" in allowed
    # So does any record taken whole (the rules may read anything it changed).
    with store.transaction() as tx:
        tx.get("VM", ref)["name_label"] = "taken"
    assert computed == [ref, ref]
