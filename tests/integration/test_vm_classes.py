"""Every class a client enumerates answers, and the behaviour of the newly served ones
(role, console, VM_appliance, VLAN, network.destroy; xapi_vlan.ml, xapi_network.ml, xapi_vm_appliance.ml)."""

from __future__ import annotations

from typing import Any

from tests.integration.vmkit import failure, install, new_vif

ENUMERATED = ("VLAN", "Bond", "console", "VM_appliance", "role", "PCI", "VBD_metrics", "VIF_metrics", "PGPU",
              "GPU_group", "host_crashdump", "pool_update", "pool_patch", "subject", "secret", "blob", "tunnel",
              "network_sriov", "Feature", "Certificate", "Repository", "Observer", "DR_task", "VTPM", "USB_group",
              "PUSB", "VUSB", "VGPU", "VGPU_type", "VMPP", "VMSS", "VM_group", "SDN_controller")


def test_every_schema_class_answers_get_all_records_with_every_published_field(shared_api: Any, schema: Any) -> None:
    for name in ENUMERATED:
        assert name in schema.classes, name
    for name, cdef in schema.classes.items():
        if not cdef.get_all or not cdef.in_db:
            continue
        records = getattr(shared_api, name).get_all_records()
        assert isinstance(records, dict), name
        published = {f for f, field in cdef.fields.items() if not field.removed}
        for ref, rec in records.items():
            assert published <= set(rec), (name, ref, published - set(rec))


def test_roles_are_records_with_their_permissions(shared_api: Any) -> None:
    roles = {rec["name_label"]: ref for ref, rec in shared_api.role.get_all_records().items()}
    assert set(roles) == {"pool-admin", "pool-operator", "vm-power-admin", "vm-admin", "vm-operator", "read-only"}
    admin = shared_api.role.get_permissions_name_label(roles["pool-admin"])
    ro = shared_api.role.get_permissions_name_label(roles["read-only"])
    assert "vm.start" in admin and "pool.enable_ha" in admin and "vm.start" not in ro
    assert set(ro) < set(admin)
    holders = set(shared_api.role.get_by_permission_name_label("vm.clone"))
    assert holders == {roles[r] for r in ("pool-admin", "pool-operator", "vm-power-admin", "vm-admin")}


def test_a_running_vm_has_one_console(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    vm = api.VM.create(vm_args("console"))
    assert api.VM.get_consoles(vm) == []
    api.VM.start(vm, False, False)
    (console,) = api.VM.get_consoles(vm)
    rec = api.console.get_record(console)
    host = api.VM.get_resident_on(vm)
    assert rec["VM"] == vm and rec["protocol"] == "rfb"
    assert rec["location"] == f"https://{api.host.get_address(host)}/console?uuid={rec['uuid']}"
    api.VM.hard_shutdown(vm)
    assert api.VM.get_consoles(vm) == [] and console not in api.console.get_all()


def test_vm_appliance_starts_in_order_and_stops_in_reverse(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    app = api.VM_appliance.create({"name_label": "stack", "name_description": ""})
    vms = [api.VM.create(vm_args(f"tier{i}", order=str(order))) for i, order in enumerate((2, 0, 1))]
    for vm in vms:
        api.VM.set_appliance(vm, app)
    assert set(api.VM_appliance.get_VMs(app)) == set(vms)
    token = api.event_from(["vm"], "", 0.0)["token"]
    api.VM_appliance.start(app, False)
    assert all(api.VM.get_power_state(vm) == "Running" for vm in vms)
    started = [e["ref"] for e in api.event_from(["vm"], token, 1.0)["events"]
               if e["ref"] in vms and e["snapshot"]["power_state"] == "Running"]
    assert list(dict.fromkeys(started)) == [vms[1], vms[2], vms[0]]      # order 0, 1, 2
    api.VM_appliance.hard_shutdown(app)
    assert all(api.VM.get_power_state(vm) == "Halted" for vm in vms)
    assert "make_into_template" not in api.VM.get_allowed_operations(vms[0])
    assert failure(api.VM.set_is_a_template, vms[0], True) == ["VM_IS_PART_OF_AN_APPLIANCE", vms[0], app]


def test_vlan_create_and_destroy(shared_api: Any) -> None:
    api = shared_api
    network = api.network.create({"name_label": "vlan 42", "name_description": "", "MTU": "1500",
                                  "other_config": {}})
    host = api.host.get_all()[0]
    eth0 = next(p for p in api.host.get_PIFs(host) if api.PIF.get_device(p) == "eth0")
    vlan = api.VLAN.create(eth0, "42", network)
    rec = api.VLAN.get_record(vlan)
    untagged = api.PIF.get_record(rec["untagged_PIF"])
    assert rec["tag"] == "42" and rec["tagged_PIF"] == eth0 and vlan in api.PIF.get_VLAN_slave_of(eth0)
    assert (untagged["VLAN"], untagged["network"], untagged["VLAN_master_of"]) == ("42", network, vlan)
    spare = api.network.create({"name_label": "bad", "name_description": "", "MTU": "1500", "other_config": {}})
    assert failure(api.VLAN.create, eth0, "5000", spare) == ["VLAN_TAG_INVALID", "5000"]
    assert failure(api.network.destroy, network) == ["NETWORK_CONTAINS_PIF", rec["untagged_PIF"]]
    api.VLAN.destroy(vlan)
    assert vlan not in api.VLAN.get_all() and api.network.get_PIFs(network) == []
    api.network.destroy(network)
    assert network not in api.network.get_all()


def test_network_with_an_attached_vif_cannot_be_destroyed(shared_api: Any) -> None:
    api = shared_api
    network = api.network.create({"name_label": "private", "name_description": "", "MTU": "1500",
                                  "other_config": {}})
    vm = install(api, "Other install media", "on private")
    vif = new_vif(api, vm, network=network)
    api.VM.start(vm, False, False)
    assert failure(api.network.destroy, network) == ["NETWORK_CONTAINS_VIF", vif]
    api.VM.hard_shutdown(vm)
    api.network.destroy(network)
    assert vif not in api.VIF.get_all()


def test_sr_allowed_operations_follow_its_driver_and_pbds(shared_api: Any) -> None:
    """xapi_sr_operations.ml: driver features decide the vdi_* operations; destroy and forget wait for unplug."""
    api = shared_api
    host = api.host.get_all()[0]
    sr = api.SR.create(host, {"device": "/dev/sdz"}, "0", "ops", "", "ext", "user", False, {})
    allowed = set(api.SR.get_allowed_operations(sr))
    assert {"vdi_create", "vdi_destroy", "vdi_snapshot", "vdi_resize", "plug", "unplug", "scan"} <= allowed
    assert not {"destroy", "forget", "vdi_mirror", "vdi_enable_cbt"} & allowed
    iso = api.SR.create(host, {"location": "/srv/ops-iso"}, "0", "ops iso", "", "iso", "iso", False, {})
    assert not {"vdi_snapshot", "vdi_resize"} & set(api.SR.get_allowed_operations(iso))
    (pbd,) = api.SR.get_PBDs(sr)
    api.PBD.unplug(pbd)
    assert {"destroy", "forget"} <= set(api.SR.get_allowed_operations(sr))
    api.SR.destroy(sr)
