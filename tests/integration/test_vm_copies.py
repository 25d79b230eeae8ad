"""Default templates, VM.clone/copy/provision/snapshot/checkpoint/revert and VDI copies on real sparse files
(xapi_vm_clone.ml, xapi_vm_snapshot.ml, xapi_templates.ml, xapi_vdi.ml)."""

from __future__ import annotations

import os
from typing import Any

from tests.integration.vmkit import (
    GIB,
    MIB,
    NULL,
    default_sr,
    disks_of,
    failure,
    install,
    new_vdi,
    new_vif,
    template,
    vdi_file,
)

TEMPLATES = ("Other install media", "Debian Bookworm 12", "Ubuntu Jammy Jellyfish 22.04", "Rocky Linux 9",
             "Windows Server 2022 (64-bit)", "Windows 10 (64-bit)", "Windows 11")


def test_seeded_pool_ships_default_templates_with_install_keys(shared_api: Any) -> None:
    for name in TEMPLATES:
        rec = shared_api.VM.get_record(template(shared_api, name))
        assert rec["is_a_template"] and rec["is_default_template"], name
        assert rec["power_state"] == "Halted" and rec["other_config"]["default_template"] == "true"
        assert rec["other_config"]["disks"].startswith("<provision><disk device=\"0\"")
        assert "install-methods" in rec["other_config"] and rec["recommendations"].startswith("<restrictions>")
    debian = shared_api.VM.get_record(template(shared_api, "Debian Bookworm 12"))
    assert debian["other_config"]["linux_template"] == "true"
    assert "linux_template" not in shared_api.VM.get_other_config(template(shared_api, "Windows 10 (64-bit)"))
    # A default template may be cloned or provisioned, never started or destroyed (check_template).
    tpl = template(shared_api, "Other install media")
    assert {"clone", "copy", "provision"} <= set(shared_api.VM.get_allowed_operations(tpl))
    assert not {"start", "destroy"} & set(shared_api.VM.get_allowed_operations(tpl))
    assert failure(shared_api.VM.destroy, tpl) == ["VM_IS_TEMPLATE", tpl, "destroy"]


def test_existing_pool_gets_missing_templates_at_start(xapid: Any) -> None:
    api = xapid.session().xenapi
    tpl = template(api, "Rocky Linux 9")
    api.VM.set_name_label(tpl, "my renamed template")
    xapid.restart()
    api = xapid.session().xenapi
    assert api.VM.get_name_label(tpl) == "my renamed template"          # nothing of the user's is lost
    assert template(api, "Rocky Linux 9") != tpl                          # the missing one came back


def test_clone_then_provision_creates_the_template_disks(shared_api: Any) -> None:
    """Ansible's xenserver_guest deploy: VM.clone(template), rewrite sr="" in other_config:disks, VM.provision."""
    api = shared_api
    tpl = template(api, "Debian Bookworm 12")
    vm = api.VM.clone(tpl, "deployed")
    rec = api.VM.get_record(vm)
    assert rec["is_a_template"] and not rec["is_default_template"]          # a clone of a template is one
    assert rec["other_config"]["base_template_name"] == "Debian Bookworm 12"
    assert rec["other_config"]["mac_seed"] != api.VM.get_other_config(tpl).get("mac_seed")
    assert "default_template" not in rec["other_config"]
    # xapi_templates.ml: sr="" is no SR, so provisioning the unmodified XML fails and creates nothing.
    assert failure(api.VM.provision, vm) == ["UUID_INVALID", "sr", ""]
    assert api.VM.get_VBDs(vm) == []
    sr = default_sr(api)
    other = api.VM.get_other_config(vm)
    other["disks"] = other["disks"].replace('sr=""', f'sr="{api.SR.get_uuid(sr)}"')
    api.VM.set_other_config(vm, other)
    api.VM.provision(vm)
    rec = api.VM.get_record(vm)
    assert not rec["is_a_template"] and "disks" not in rec["other_config"]
    (vbd,) = rec["VBDs"]
    vbd_rec = api.VBD.get_record(vbd)
    assert (vbd_rec["userdevice"], vbd_rec["type"], vbd_rec["mode"], vbd_rec["bootable"]) == ("0", "Disk", "RW", True)
    vdi = api.VDI.get_record(vbd_rec["VDI"])
    assert vdi["virtual_size"] == str(10 * GIB) and vdi["SR"] == sr and vdi["name_label"] == "0"
    assert vdi["name_description"] == "Created by template provisioner" and vdi["type"] == "system"
    assert "start" in api.VM.get_allowed_operations(vm)
    assert failure(api.VM.provision, vm) == ["ONLY_PROVISION_TEMPLATE"]


def test_copy_writes_full_copies_of_the_bytes_and_keeps_them_sparse(shared_xapid: Any) -> None:
    api = shared_xapid.session().xenapi
    vm = install(api, "Debian Bookworm 12", "with data")
    (disk,) = disks_of(api, vm)
    path = vdi_file(shared_xapid.state_dir, api, disk)
    with open(path, "r+b") as f:
        f.seek(3 * GIB)
        f.write(b"xapid" * 1000)
    local = [s for s in api.SR.get_all() if api.SR.get_type(s) == "ext"][0]
    copy = api.VM.copy(vm, "copied", local)
    (copied,) = disks_of(api, copy)
    assert api.VDI.get_SR(copied) == local and copied != disk
    copy_path = vdi_file(shared_xapid.state_dir, api, copied)
    assert os.path.getsize(copy_path) == 10 * GIB
    with open(copy_path, "rb") as f:
        f.seek(3 * GIB)
        assert f.read(5000) == b"xapid" * 1000
    assert os.stat(copy_path).st_blocks * 512 < 1 * MIB                     # holes stayed holes
    assert int(api.VDI.get_physical_utilisation(copied)) == os.stat(copy_path).st_blocks * 512
    assert int(api.SR.get_virtual_allocation(local)) >= 10 * GIB
    assert api.VM.get_is_a_template(copy) is False and api.VM.get_power_state(copy) == "Halted"


def test_clone_snapshot_and_revert(shared_xapid: Any) -> None:
    api = shared_xapid.session().xenapi
    vm = install(api, "Debian Bookworm 12", "snappy")
    mac = api.VIF.get_MAC(new_vif(api, vm))
    (disk,) = disks_of(api, vm)
    path = vdi_file(shared_xapid.state_dir, api, disk)
    with open(path, "r+b") as f:
        f.write(b"before")
    snap = api.VM.snapshot(vm, "snap")
    rec = api.VM.get_record(snap)
    assert rec["is_a_snapshot"] and rec["is_a_template"] and rec["snapshot_of"] == vm
    assert snap in api.VM.get_snapshots(vm) and api.VM.get_parent(vm) == snap
    assert rec["snapshot_info"]["power-state-at-snapshot"] == "Halted"
    (snap_disk,) = disks_of(api, snap)
    assert api.VDI.get_snapshot_of(snap_disk) == disk and api.VDI.get_is_a_snapshot(snap_disk)
    (snap_vif,) = rec["VIFs"]
    assert api.VIF.get_MAC(snap_vif) == mac                # snapshots keep MACs
    assert set(api.VM.get_allowed_operations(snap)) >= {"revert", "clone", "copy", "destroy"}
    assert "start" not in api.VM.get_allowed_operations(snap)
    with open(path, "r+b") as f:
        f.write(b"after!")
    api.VM.revert(snap)
    (reverted,) = disks_of(api, vm)
    assert reverted != disk and api.VDI.get_by_uuid(api.VDI.get_uuid(reverted))
    assert failure(api.VDI.get_record, disk)[0] == "HANDLE_INVALID"          # the covered disk was replaced
    with open(vdi_file(shared_xapid.state_dir, api, reverted), "rb") as f:
        assert f.read(6) == b"before"
    (reverted_vif,) = api.VM.get_VIFs(vm)
    assert api.VIF.get_MAC(reverted_vif) == mac
    assert failure(api.VM.revert, vm) == ["ONLY_REVERT_SNAPSHOT"]
    second = api.VM.snapshot(vm, "second")
    assert api.VM.get_parent(second) == snap and api.VM.get_parent(vm) == second
    api.VM.destroy(second)                                 # xapi_vm.ml destroy rebases the children
    assert api.VM.get_parent(vm) == snap
    clone = api.VM.clone(vm, "clone")
    (clone_vif,) = api.VM.get_VIFs(clone)
    assert api.VIF.get_MAC(clone_vif) != api.VIF.get_MAC(reverted_vif) and api.VIF.get_MAC_autogenerated(clone_vif)


def test_checkpoint_of_a_running_vm_holds_its_memory_image(shared_api: Any) -> None:
    api = shared_api
    vm = install(api, "Other install media", "checkpointed")
    api.VM.start(vm, False, False)
    cp = api.VM.checkpoint(vm, "cp")
    rec = api.VM.get_record(cp)
    assert rec["power_state"] == "Suspended" and rec["suspend_VDI"] != NULL
    assert api.VDI.get_type(rec["suspend_VDI"]) == "suspend"
    assert rec["snapshot_info"]["power-state-at-snapshot"] == "Running"
    assert api.VM.get_power_state(vm) == "Running"                           # the VM goes on running
    api.VM.hard_shutdown(vm)
    api.VM.revert(cp)
    assert api.VM.get_power_state(vm) == "Suspended" and api.VM.get_suspend_VDI(vm) not in (NULL, rec["suspend_VDI"])
    api.VM.resume(vm, False, False)
    assert api.VM.get_power_state(vm) == "Running"


def test_vdi_clone_snapshot_copy_resize(shared_xapid: Any) -> None:
    api = shared_xapid.session().xenapi
    sr = default_sr(api)
    vdi = new_vdi(api, sr, 64 * MIB, "source")
    with open(vdi_file(shared_xapid.state_dir, api, vdi), "r+b") as f:
        f.seek(MIB)
        f.write(b"payload")
    for made in (api.VDI.clone(vdi, {}), api.VDI.snapshot(vdi, {}), api.VDI.copy(vdi, sr, NULL, NULL)):
        assert api.VDI.get_virtual_size(made) == str(64 * MIB) and api.VDI.get_name_label(made) == "source"
        with open(vdi_file(shared_xapid.state_dir, api, made), "rb") as f:
            f.seek(MIB)
            assert f.read(7) == b"payload"
    before = int(api.SR.get_virtual_allocation(sr))
    api.VDI.resize(vdi, str(128 * MIB))
    assert api.VDI.get_virtual_size(vdi) == str(128 * MIB)
    assert os.path.getsize(vdi_file(shared_xapid.state_dir, api, vdi)) == 128 * MIB
    assert int(api.SR.get_virtual_allocation(sr)) == before + 64 * MIB
    assert failure(api.VDI.resize, vdi, str(MIB))[0] == "SR_BACKEND_FAILURE_79"
    assert api.VDI.get_virtual_size(vdi) == str(128 * MIB)


def test_vdi_destroy_of_an_attached_disk_is_refused(shared_api: Any) -> None:
    api = shared_api
    vm = install(api, "Debian Bookworm 12", "attached")
    (disk,) = disks_of(api, vm)
    api.VM.start(vm, False, False)
    assert failure(api.VDI.destroy, disk) == ["VDI_IN_USE", disk, "destroy"]
    assert "destroy" not in api.VDI.get_allowed_operations(disk)
    assert failure(api.VDI.resize, disk, str(40 * GIB)) == ["VDI_IN_USE", disk, "resize"]
    assert failure(api.VDI.resize_online, disk, str(40 * GIB)) == ["MESSAGE_REMOVED"]  # gone from the datamodel
    assert api.VDI.get_virtual_size(disk) == str(10 * GIB)
    api.VM.hard_shutdown(vm)
    assert "destroy" in api.VDI.get_allowed_operations(disk)


def test_copy_to_an_iso_sr_is_refused(shared_api: Any) -> None:
    api = shared_api
    host = api.host.get_all()[0]
    iso = api.SR.create(host, {"location": "/srv/iso"}, "0", "ISOs", "", "iso", "iso", False, {})
    vm = install(api, "Other install media", "no iso copy")
    assert failure(api.VM.copy, vm, "x", iso) == ["OPERATION_NOT_ALLOWED", "Cannot copy a VM's disks to an ISO SR"]
    assert len(api.VM.get_by_name_label("x")) == 0


def test_a_daemon_killed_during_a_copy_restarts_consistent(xapid: Any) -> None:
    """SIGKILL while VM.copy writes its disks: after the restart the source is usable (no stale
    current_operations), the copy exists whole or not at all, and no file is left that no VDI owns."""
    api = xapid.session().xenapi
    vm = install(api, "Other install media", "big")
    (disk,) = disks_of(api, vm)
    with open(vdi_file(xapid.state_dir, api, disk), "r+b") as f:
        for i in range(64):
            f.seek(i * 64 * MIB)
            f.write(os.urandom(4 * MIB))
    api.Async.VM.copy(vm, "big copy", default_sr(api))
    xapid.kill()
    xapid.start()
    api = xapid.session().xenapi
    assert api.VM.get_current_operations(vm) == {} and "start" in api.VM.get_allowed_operations(vm)
    for copy in api.VM.get_by_name_label("big copy"):
        (copied,) = disks_of(api, copy)
        assert os.path.getsize(vdi_file(xapid.state_dir, api, copied)) == 32 * GIB
    owned = {vdi_file(xapid.state_dir, api, v).name for v in api.VDI.get_all()}
    for sr_dir in (xapid.state_dir / "sr").iterdir():
        assert {p.name for p in sr_dir.iterdir()} <= owned
