"""Memory and VCPU settings, suspend/resume with a suspend VDI, migration inside the pool
(xapi_vm.ml, xapi_vm_memory_constraints.ml, xapi_vm_migrate.ml, xapi_vm_helpers.ml assert_can_boot_here)."""

from __future__ import annotations

import os
from typing import Any

from tests.integration.vmkit import (
    GIB,
    MIB,
    NULL,
    default_sr,
    failure,
    install,
    new_vbd,
    new_vdi,
    new_vif,
    vdi_file,
    wait_for,
)


def free(api: Any, host: str) -> int:
    return int(api.host_metrics.get_record(api.host.get_metrics(host))["memory_free"])  # the getter is removed


def test_memory_limits_and_their_constraint_errors(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    vm = api.VM.create(vm_args("memory"))
    api.VM.set_memory_limits(vm, str(256 * MIB), str(4 * GIB), str(GIB), str(2 * GIB))
    rec = api.VM.get_record(vm)
    assert (rec["memory_static_min"], rec["memory_static_max"]) == (str(256 * MIB), str(4 * GIB))
    assert (rec["memory_dynamic_min"], rec["memory_dynamic_max"]) == (str(GIB), str(2 * GIB))
    assert failure(api.VM.set_memory_limits, vm, str(GIB), str(2 * GIB), str(4 * GIB), str(2 * GIB)) == [
        "MEMORY_CONSTRAINT_VIOLATION_ORDER"]
    api.VM.set_memory(vm, str(3 * GIB))
    rec = api.VM.get_record(vm)
    assert {rec[k] for k in ("memory_static_max", "memory_dynamic_max", "memory_dynamic_min")} == {str(3 * GIB)}
    api.VM.set_memory_static_max(vm, str(6 * GIB))
    api.VM.set_memory_dynamic_range(vm, str(2 * GIB), str(5 * GIB))
    assert api.VM.get_memory_dynamic_max(vm) == str(5 * GIB) and api.VM.get_memory_target(vm) == str(2 * GIB)
    api.VM.set_VCPUs_max(vm, "4")
    api.VM.set_VCPUs_at_startup(vm, "3")
    rule = "VCPU values must satisfy: 0 < VCPUs_at_startup ≤ VCPUs_max"
    assert failure(api.VM.set_VCPUs_at_startup, vm, "5") == ["INVALID_VALUE", rule, "5"]
    assert failure(api.VM.set_VCPUs_max, vm, "2") == ["INVALID_VALUE", rule, "2"]
    host = api.host.get_all()[0]
    api.VM.start_on(vm, host, False, False)
    assert failure(api.VM.set_memory_limits, vm, str(GIB), str(2 * GIB), str(GIB), str(2 * GIB)) == [
        "VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert failure(api.VM.set_VCPUs_max, vm, "8") == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    before = free(api, host)
    api.VM.set_memory_dynamic_range(vm, str(2 * GIB), str(3 * GIB))   # live: the host gets memory back
    assert free(api, host) == before + 2 * GIB
    dom0 = api.host.get_control_domain(host)
    assert failure(api.VM.set_memory_dynamic_range, dom0, str(GIB), str(GIB)) == [
        "MEMORY_CONSTRAINT_VIOLATION_MAXPIN", "control domain"]


def test_suspend_writes_an_image_and_resume_removes_it(shared_xapid: Any) -> None:
    api = shared_xapid.session().xenapi
    vm = install(api, "Debian Bookworm 12", "sleeper")
    host = api.host.get_all()[1]
    api.VM.start_on(vm, host, False, False)
    running_free = free(api, host)
    api.VM.suspend(vm)
    rec = api.VM.get_record(vm)
    image = rec["suspend_VDI"]
    assert rec["power_state"] == "Suspended" and rec["resident_on"] == NULL and image != NULL
    image_rec = api.VDI.get_record(image)
    assert image_rec["type"] == "suspend" and image_rec["SR"] == api.pool.get_suspend_image_SR(api.pool.get_all()[0])
    path = vdi_file(shared_xapid.state_dir, api, image)
    assert os.path.getsize(path) >= int(rec["memory_static_max"])
    with open(path, "rb") as f:
        assert f.read(30).startswith(b"xapid memory image of VM")
    assert free(api, host) == running_free + int(rec["memory_dynamic_max"])
    api.VM.resume_on(vm, host, False, False)
    assert api.VM.get_power_state(vm) == "Running" and api.VM.get_resident_on(vm) == host
    assert api.VM.get_suspend_VDI(vm) == NULL and not path.exists()
    assert failure(api.VDI.get_record, image)[0] == "HANDLE_INVALID"
    assert free(api, host) == running_free


def test_start_that_does_not_fit_fails_with_host_not_enough_free_memory(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    host = api.host.get_all()[2]
    big = str(200 * GIB)
    vm = api.VM.create(vm_args("too big", memory_static_max=big, memory_dynamic_max=big, memory_dynamic_min=big))
    err = failure(api.VM.start_on, vm, host, False, False)
    assert err[0] == "HOST_NOT_ENOUGH_FREE_MEMORY" and int(err[1]) >= 200 * GIB and int(err[2]) < int(err[1])
    assert failure(api.VM.assert_can_boot_here, vm, host)[0] == "HOST_NOT_ENOUGH_FREE_MEMORY"
    assert api.VM.get_possible_hosts(vm) == []


def test_pool_migrate_moves_residency_and_memory(shared_api: Any) -> None:
    api = shared_api
    vm = install(api, "Debian Bookworm 12", "mover")
    new_vif(api, vm)
    a, b = api.host.get_all()[:2]
    api.VM.start_on(vm, a, False, False)
    wait_for(lambda: "pool_migrate" in api.VM.get_allowed_operations(vm), what="pool_migrate")
    assert set(api.VM.get_possible_hosts(vm)) == set(api.host.get_all())
    free_a, free_b = free(api, a), free(api, b)
    domid = api.VM.get_domid(vm)
    api.VM.pool_migrate(vm, b, {})
    assert api.VM.get_resident_on(vm) == b and api.VM.get_power_state(vm) == "Running"
    assert api.VM.get_domid(vm) != domid and api.VM.get_current_operations(vm) == {}
    need = int(api.VM.get_memory_dynamic_max(vm))
    assert free(api, a) == free_a + need and free(api, b) == free_b - need
    console = api.VM.get_consoles(vm)[0]
    assert api.console.get_location(console).startswith(f"https://{api.host.get_address(b)}/console?uuid=")
    api.host.disable(a)
    assert failure(api.VM.pool_migrate, vm, a, {}) == ["HOST_DISABLED", a]
    api.host.enable(a)


def test_migrate_send_within_the_pool_moves_disks_between_srs(shared_xapid: Any) -> None:
    api = shared_xapid.session().xenapi
    vm = install(api, "Other install media", "storage motion")
    data = new_vdi(api, default_sr(api), GIB, "data")
    new_vbd(api, vm, data)
    with open(vdi_file(shared_xapid.state_dir, api, data), "r+b") as f:
        f.write(b"moved bytes")
    host = api.host.get_all()[0]
    local = next(s for s in api.SR.get_all() if api.SR.get_type(s) == "ext"
                 and api.PBD.get_host(api.SR.get_PBDs(s)[0]) == host)
    dest = api.host.migrate_receive(host, api.network.get_all()[0], {})
    assert dest["host"] == host
    api.VM.assert_can_migrate(vm, dest, True, {data: local}, {}, {}, {})
    assert api.VM.migrate_send(vm, dest, True, {data: local}, {}, {}, {}, {}) == vm
    moved = [api.VBD.get_VDI(b) for b in api.VM.get_VBDs(vm) if api.VDI.get_name_label(api.VBD.get_VDI(b)) == "data"]
    assert len(moved) == 1 and api.VDI.get_SR(moved[0]) == local
    with open(vdi_file(shared_xapid.state_dir, api, moved[0]), "rb") as f:
        assert f.read(11) == b"moved bytes"
    assert failure(api.VDI.get_record, data)[0] == "HANDLE_INVALID"
    assert failure(api.VM.migrate_send, vm, {"host": "OpaqueRef:elsewhere"}, True, {}, {}, {}, {}, {}) == [
        "VM_MIGRATE_CONTACT_REMOTE_SERVICE_FAILED"]


def test_pbd_unplug_reports_every_vdi_in_use(shared_api: Any) -> None:
    """xapi_pbd.ml: VDI_IN_USE lists the active VDIs of the SR on that host, nothing else."""
    api = shared_api
    host = api.host.get_all()[0]
    vm = install(api, "Other install media", "pinning")
    extra = new_vdi(api, default_sr(api), GIB, "extra")
    new_vbd(api, vm, extra)
    api.VM.start_on(vm, host, False, False)
    pbd = next(p for p in api.SR.get_PBDs(default_sr(api)) if api.PBD.get_host(p) == host)
    err = failure(api.PBD.unplug, pbd)
    mine = {api.VBD.get_VDI(b) for b in api.VM.get_VBDs(vm)}
    assert err[0] == "VDI_IN_USE" and mine <= set(err[1:]) and len(err[1:]) == len(set(err[1:]))
    assert all(api.VDI.get_SR(v) == default_sr(api) for v in err[1:])
    assert api.PBD.get_currently_attached(pbd)


def test_host_free_memory_and_plugins(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    host = api.host.get_all()[2]
    before = int(api.host.compute_free_memory(host))
    vm = api.VM.create(vm_args("occupant"))
    api.VM.start_on(vm, host, False, False)
    assert int(api.host.compute_free_memory(host)) == before - int(api.VM.get_memory_dynamic_min(vm))
    assert failure(api.host.call_plugin, host, "nope.py", "main", {}) == ["XENAPI_MISSING_PLUGIN", "nope.py"]
    api.VM.hard_shutdown(vm)


def test_start_needs_the_vms_storage_on_the_host(shared_api: Any) -> None:
    """assert_can_boot_here: a VM whose disk is on host1's local SR only starts there."""
    api = shared_api
    hosts = api.host.get_all()
    local = next(s for s in api.SR.get_all() if api.SR.get_type(s) == "ext"
                 and api.PBD.get_host(api.SR.get_PBDs(s)[0]) == hosts[0])
    vm = install(api, "Other install media", "pinned", local)
    (disk,) = [api.VBD.get_VDI(b) for b in api.VM.get_VBDs(vm)]
    assert failure(api.VM.start_on, vm, hosts[1], False, False) == ["VM_REQUIRES_SR", vm, local]
    assert api.VM.get_possible_hosts(vm) == [hosts[0]]
    api.VM.set_affinity(vm, hosts[1])
    api.VM.start(vm, False, False)                      # the affinity host cannot see it: the master can
    assert api.VM.get_resident_on(vm) == hosts[0] and disk
    api.VM.hard_shutdown(vm)


def test_each_host_has_its_own_lasting_server_certificate(shared_api: Any, tmp_path: Any) -> None:
    """host.get_server_certificate (certificates.ml): a real PEM certificate per host, the same on every call."""
    import ssl
    import subprocess

    hosts = shared_api.host.get_all()
    pems = [shared_api.host.get_server_certificate(h) for h in hosts]
    assert len(set(pems)) == len(hosts)
    assert pems[0] == shared_api.host.get_server_certificate(hosts[0])
    for host, pem in zip(hosts, pems, strict=True):
        assert pem.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE KEY" not in pem
        ssl.PEM_cert_to_DER_cert(pem)
        path = tmp_path / "c.pem"
        path.write_text(pem)
        subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in", str(path)],
                                 capture_output=True, text=True, timeout=30).stdout
        assert shared_api.host.get_hostname(host) in subject
    assert failure(shared_api.host.get_server_certificate, NULL) == ["HANDLE_INVALID", "host", NULL]
