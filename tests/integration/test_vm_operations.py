"""allowed_operations in every power state, kept current by the write path and visible in events
(xapi_vm_lifecycle.ml, xapi_vbd_helpers.ml, xapi_vif_helpers.ml, xapi_vdi.ml)."""

from __future__ import annotations

from typing import Any

from tests.integration.vmkit import disks_of, failure, install, new_cd, new_vif, ops, wait_for

HALTED = {"start", "start_on", "clone", "copy", "snapshot", "destroy", "export", "make_into_template",
          "changing_dynamic_range", "changing_static_range", "metadata_export", "migrate_send"}


def test_halted_vm_advertises_what_a_halted_vm_may_do(shared_api: Any, vm_args: Any) -> None:
    vm = shared_api.VM.create(vm_args("halted ops"))
    allowed = ops(shared_api, "VM", vm)
    assert HALTED <= allowed
    assert not allowed & {"clean_shutdown", "hard_shutdown", "suspend", "resume", "pause", "unpause", "provision",
                          "revert", "pool_migrate", "shutdown", "changing_memory_limits"}  # ignored_ops never show


def test_hvm_guest_without_agent_lacks_guest_assisted_operations(shared_api: Any, vm_args: Any) -> None:
    """check_op_for_feature: an HVM guest without PV drivers does not advertise clean shutdown/reboot,
    suspend or migration; the calls themselves are still accepted (non-strict)."""
    api = shared_api
    vm = api.VM.create(vm_args("no agent"))
    api.VM.start(vm, False, False)
    allowed = ops(api, "VM", vm)
    assert {"hard_shutdown", "hard_reboot", "pause", "snapshot", "changing_dynamic_range"} <= allowed
    assert not allowed & {"clean_shutdown", "clean_reboot", "suspend", "checkpoint", "pool_migrate", "start",
                          "destroy"}
    api.VM.clean_reboot(vm)
    api.VM.pause(vm)
    assert ops(api, "VM", vm) >= {"unpause", "hard_shutdown", "hard_reboot"} and "pause" not in ops(api, "VM", vm)
    api.VM.unpause(vm)
    api.VM.clean_shutdown(vm)
    assert HALTED <= ops(api, "VM", vm)


def test_linux_guest_agent_reports_and_unlocks_guest_operations(shared_api: Any) -> None:
    api = shared_api
    vm = install(api, "Debian Bookworm 12", "agent")
    vif = new_vif(api, vm)
    api.VM.start(vm, False, False)
    wanted = {"clean_shutdown", "clean_reboot", "suspend", "checkpoint", "pool_migrate"}
    wait_for(lambda: wanted <= ops(api, "VM", vm), what="the agent's features")
    gm = api.VM_guest_metrics.get_record(api.VM.get_guest_metrics(vm))
    assert gm["PV_drivers_up_to_date"] and gm["PV_drivers_detected"] and gm["os_version"]["distro"] == "debian"
    assert gm["networks"]["0/ip"].startswith("127.0.2.") and api.VIF.get_currently_attached(vif)
    assert gm["other"]["feature-suspend"] == "1"
    api.VM.hard_shutdown(vm)
    assert api.VM.get_guest_metrics(vm) == "OpaqueRef:NULL"                 # a halt forgets the agent


def test_suspended_template_and_snapshot_operations(shared_api: Any) -> None:
    api = shared_api
    vm = install(api, "Debian Bookworm 12", "states")
    api.VM.start(vm, False, False)
    wait_for(lambda: "suspend" in ops(api, "VM", vm), what="suspend")
    api.VM.suspend(vm)
    assert {"resume", "resume_on", "hard_shutdown", "checkpoint", "snapshot", "destroy"} <= ops(api, "VM", vm)
    assert not ops(api, "VM", vm) & {"start", "clean_shutdown", "clone", "suspend"}
    api.VM.hard_shutdown(vm)
    snap = api.VM.snapshot(vm, "s")
    assert ops(api, "VM", snap) == {"revert", "clone", "copy", "destroy", "export", "metadata_export"} | (
        ops(api, "VM", snap) & {"hard_shutdown"})
    assert failure(api.VM.start, snap, False, False) == ["VM_IS_SNAPSHOT", snap, "start"]


def test_refusals_carry_xapi_parameters(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    vm = api.VM.create(vm_args("refusals", blocked_operations={"start": "maintenance"}))
    assert failure(api.VM.start, vm, False, False) == ["OPERATION_BLOCKED", vm, "maintenance"]
    assert "start" not in ops(api, "VM", vm)
    api.VM.remove_from_blocked_operations(vm, "start")
    assert "start" in ops(api, "VM", vm)
    assert failure(api.VM.suspend, vm) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    assert failure(api.VM.resume, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "suspended", "halted"]
    assert failure(api.VM.provision, vm) == ["ONLY_PROVISION_TEMPLATE"]
    assert failure(api.VM.snapshot_with_quiesce, vm, "q") == ["MESSAGE_REMOVED"]  # VSS support is gone
    api.VM.start(vm, False, False)
    assert "snapshot_with_quiesce" not in ops(api, "VM", vm)
    dom0 = next(r for r, rec in api.VM.get_all_records().items() if rec["is_control_domain"])
    assert failure(api.VM.suspend, dom0)[0] == "OPERATION_NOT_ALLOWED"


def test_vbd_vif_and_vdi_operations_follow_the_vm(shared_api: Any) -> None:
    api = shared_api
    vm = install(api, "Debian Bookworm 12", "devices ops")
    (disk_vbd,) = api.VM.get_VBDs(vm)
    cd = new_cd(api, vm)
    vif = new_vif(api, vm)
    (disk,) = disks_of(api, vm)
    assert ops(api, "VBD", disk_vbd) == {"attach"} and ops(api, "VBD", cd) == {"attach", "insert"}
    assert ops(api, "VIF", vif) == {"attach"}
    assert {"clone", "copy", "resize", "snapshot", "destroy", "forget", "update"} <= ops(api, "VDI", disk)
    api.VM.start(vm, False, False)
    wait_for(lambda: api.VM.get_guest_metrics(vm) != "OpaqueRef:NULL", what="the agent")
    # The provisioned system disk is not unpluggable (xapi_templates.ml: unpluggable = type <> system).
    assert ops(api, "VBD", disk_vbd) == {"attach", "pause", "unpause"}
    assert failure(api.VBD.unplug, disk_vbd) == ["VBD_NOT_UNPLUGGABLE", disk_vbd]
    assert ops(api, "VBD", cd) >= {"insert"} and "eject" not in ops(api, "VBD", cd)
    assert ops(api, "VIF", vif) == {"attach", "unplug"}
    assert "destroy" not in ops(api, "VDI", disk) and "resize" not in ops(api, "VDI", disk)
    assert {"clone", "snapshot"} <= ops(api, "VDI", disk)


def test_allowed_operations_travel_in_the_events_of_the_change(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    vm = api.VM.create(vm_args("evented"))
    token = api.event_from(["vm"], "", 0.0)["token"]
    api.VM.start(vm, False, False)
    batch = api.event_from([f"vm/{vm}"], token, 5.0)
    snaps = [e["snapshot"] for e in batch["events"] if e["ref"] == vm]
    assert snaps and snaps[-1]["power_state"] == "Running" and "hard_shutdown" in snaps[-1]["allowed_operations"]
    assert "start" not in snaps[-1]["allowed_operations"]
