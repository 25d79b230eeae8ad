"""``xe`` end to end: the named storage and VM commands (wire.md 8.5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_xe_support import Xe, make_vm, values

GIB = 1024**3


# Every test here only adds objects (and removes its own), so the module shares one daemon.
@pytest.fixture
def api(shared_api: Any) -> Any:
    return shared_api


@pytest.fixture
def xe(shared_xapid: Any, tmp_path: Path) -> Xe:
    return Xe(tmp_path, shared_xapid)


def uuid_line(out: str) -> str:
    """The one uuid a creating command prints."""
    assert out.endswith("\n") and len(out.strip()) == 36 and out.count("\n") == 1, repr(out)
    return out.strip()


def test_sr_create(xe: Xe, api: Any) -> None:
    hosts = {api.host.get_name_label(h): h for h in api.host.get_all()}
    master = api.pool.get_master(api.pool.get_all()[0])
    shared = uuid_line(xe.ok("sr-create", "name-label=Shared", "type=nfs", "shared=true", "physical-size=2GiB",
                             "content-type=iso", "device-config:server=10.0.0.1", "device-config:serverpath=/e",
                             "sm-config:k=v", "name-description=a shared SR"))
    ref = api.SR.get_by_uuid(shared)
    rec = api.SR.get_record(ref)
    assert (rec["name_label"], rec["name_description"], rec["type"], rec["content_type"]) == \
        ("Shared", "a shared SR", "nfs", "iso")
    assert rec["shared"] is True and int(rec["physical_size"]) == 2 * GIB and rec["sm_config"] == {"k": "v"}
    pbds = [api.PBD.get_record(p) for p in rec["PBDs"]]
    assert {p["host"] for p in pbds} == set(hosts.values())
    assert all(p["device_config"] == {"server": "10.0.0.1", "serverpath": "/e"} for p in pbds)
    # Local: on host-uuid=, or on the master by default.
    local = uuid_line(xe.ok("sr-create", "name-label=L2", "type=ext", f"host-uuid={api.host.get_uuid(hosts['host2'])}",
                            "physical-size=512M"))
    rec = api.SR.get_record(api.SR.get_by_uuid(local))
    assert rec["shared"] is False and int(rec["physical_size"]) == 512 * 1024**2
    assert [api.PBD.get_host(p) for p in rec["PBDs"]] == [hosts["host2"]]
    # A device-config key ending in -filename takes its value from a local file.
    secret = xe.home / "chap-secret"
    secret.write_text("s3cret")
    iscsi = uuid_line(xe.ok("sr-create", "name-label=iscsi", "type=lvmoiscsi", "device-config:target=t",
                            f"device-config:chappassword-filename={secret}"))
    pbd = api.SR.get_PBDs(api.SR.get_by_uuid(iscsi))[0]
    assert api.PBD.get_device_config(pbd) == {"target": "t", "chappassword": "s3cret"}
    default = uuid_line(xe.ok("sr-create", "name-label=L1", "type=ext"))
    rec = api.SR.get_record(api.SR.get_by_uuid(default))
    assert [api.PBD.get_host(p) for p in rec["PBDs"]] == [master] and rec["physical_size"] == "0"
    for size, expected in (("1T", 1024**4), ("3KiB", 3 * 1024), ("7", 7), ("2TiB", 2 * 1024**4)):
        uuid = uuid_line(xe.ok("sr-create", f"name-label=s{size}", "type=ext", f"physical-size={size}"))
        assert int(api.SR.get_physical_size(api.SR.get_by_uuid(uuid))) == expected
    assert "Failed to parse size: 12parsecs" in xe.fail("sr-create", "name-label=x", "type=ext",
                                                        "physical-size=12parsecs")
    assert xe.fail("sr-create", "name-label=x", "type=nosuch") == "Error code: SR_UNKNOWN_DRIVER\n" \
        "Error parameters: nosuch\n"
    assert xe.fail("sr-create", "type=ext") == "Required parameter not found: name-label\nFor usage run: 'xe help'\n"
    assert [r["name-label"] for r in values(xe.ok("sr-list", f"uuid={shared}"))] == ["Shared"]


def test_sr_forget_and_destroy(xe: Xe, api: Any) -> None:
    sr = uuid_line(xe.ok("sr-create", "name-label=Doomed", "type=nfs", "shared=true"))
    assert xe.fail("sr-destroy", f"uuid={sr}") == \
        f"The SR is still connected to a host via a PBD. It cannot be destroyed or forgotten.\nsr: {sr} (Doomed)\n"
    for pbd in xe.ok("pbd-list", f"sr-uuid={sr}", "--minimal").strip().split(","):
        xe.ok("pbd-unplug", f"uuid={pbd}")
    assert xe.ok("pbd-list", f"sr-uuid={sr}", "params=currently-attached", "--minimal") == "false,false,false\n"
    assert xe.ok("sr-destroy", f"uuid={sr}") == ""
    assert xe.ok("sr-list", f"uuid={sr}") == ""
    assert xe.ok("pbd-list", f"sr-uuid={sr}") == ""
    other = uuid_line(xe.ok("sr-create", "name-label=Forgotten", "type=ext"))
    xe.ok("pbd-unplug", f"uuid={xe.ok('pbd-list', f'sr-uuid={other}', '--minimal').strip()}")
    assert xe.ok("sr-forget", f"uuid={other}") == ""
    assert other not in [rec["uuid"] for rec in api.SR.get_all_records().values()]
    assert xe.fail("sr-forget", f"uuid={other}") == f"The uuid you supplied was invalid.\ntype: SR\nuuid: {other}\n"


def test_pbd_lifecycle(xe: Xe, api: Any) -> None:
    host3 = api.host.get_by_name_label("host3")[0]
    sr = uuid_line(xe.ok("sr-create", "name-label=Local", "type=ext",
                         f"host-uuid={api.host.get_uuid(api.host.get_by_name_label('host1')[0])}"))
    pbd = uuid_line(xe.ok("pbd-create", f"host-uuid={api.host.get_uuid(host3)}", f"sr-uuid={sr}",
                          "device-config:device=/dev/sdb", "device-config:extra=a=b"))
    rec = api.PBD.get_record(api.PBD.get_by_uuid(pbd))
    assert rec["host"] == host3 and rec["device_config"] == {"device": "/dev/sdb", "extra": "a=b"}
    assert rec["currently_attached"] is False and rec["other_config"] == {}
    assert xe.get("pbd", pbd, "currently-attached") == "false"
    assert xe.ok("pbd-plug", f"uuid={pbd}") == ""
    assert xe.get("pbd", pbd, "currently-attached") == "true"
    assert xe.get("pbd", pbd, "device-config", "extra") == "a=b"
    assert xe.fail("pbd-destroy", f"uuid={pbd}") == \
        "Error code: OPERATION_NOT_ALLOWED\nError parameters: PBD is currently attached\n"
    assert xe.ok("pbd-unplug", f"uuid={pbd}") == ""
    assert xe.get("pbd", pbd, "currently-attached") == "false"
    assert xe.ok("pbd-destroy", f"uuid={pbd}") == ""
    assert xe.ok("pbd-list", f"uuid={pbd}") == ""
    # xe's old device-config-<key>=<value> form.
    again = uuid_line(xe.ok("pbd-create", f"host-uuid={api.host.get_uuid(host3)}", f"sr-uuid={sr}",
                            "device-config-device=/dev/sdc"))
    assert api.PBD.get_device_config(api.PBD.get_by_uuid(again)) == {"device": "/dev/sdc"}
    err = xe.fail("pbd-create", f"host-uuid={api.host.get_uuid(host3)}", f"sr-uuid={sr}")
    assert err.startswith("Error code: PBD_EXISTS\nError parameters: OpaqueRef:")
    assert xe.fail("pbd-plug", "uuid=nope") == "The uuid you supplied was invalid.\ntype: PBD\nuuid: nope\n"


def test_vdi_create_and_destroy(xe: Xe, api: Any) -> None:
    sr = api.SR.get_uuid(api.pool.get_default_SR(api.pool.get_all()[0]))
    vdi = uuid_line(xe.ok("vdi-create", f"sr-uuid={sr}", "name-label=data", "virtual-size=1GiB"))
    rec = api.VDI.get_record(api.VDI.get_by_uuid(vdi))
    assert (rec["name_label"], rec["type"], rec["sharable"], rec["read_only"]) == ("data", "user", False, False)
    assert int(rec["virtual_size"]) == GIB
    shared = uuid_line(xe.ok("vdi-create", f"sr-uuid={sr}", "name-label=ro", "virtual-size=10M", "type=user",
                             "sharable=true", "read-only=true"))
    assert values(xe.ok("vdi-list", f"uuid={shared}")) == [{
        "uuid": shared, "name-label": "ro", "name-description": "", "sr-uuid": sr,
        "virtual-size": str(10 * 1024**2), "sharable": "true", "read-only": "true"}]
    assert set(xe.ok("vdi-list", f"sr-uuid={sr}", "--minimal").strip().split(",")) == {vdi, shared}
    assert xe.ok("vdi-destroy", f"uuid={vdi}") == ""
    assert xe.fail("vdi-param-list", f"uuid={vdi}") == f"The uuid you supplied was invalid.\ntype: VDI\nuuid: {vdi}\n"
    assert xe.fail("vdi-create", f"sr-uuid={sr}", "name-label=x") == \
        "Required parameter not found: virtual-size\nFor usage run: 'xe help'\n"


def test_vm_power_commands(xe: Xe, api: Any) -> None:
    vm = make_vm(api, "web")
    uuid = api.VM.get_uuid(vm)
    assert xe.ok("vm-start", f"uuid={uuid}") == ""
    assert xe.get("vm", uuid, "power-state") == "running"
    assert xe.fail("vm-start", "vm=web") == (
        "You attempted an operation on a VM that was not in an appropriate power state at the time; for example,"
        " you attempted to start a VM that was already running.  The parameters returned are the VM's handle,"
        " and the expected and actual VM state at the time of the call.\n"
        f"vm: {uuid} (web)\nexpected: halted\nactual: running\n"
    )
    assert xe.ok("vm-reboot", "vm=web") == ""
    assert xe.ok("vm-reboot", f"vm={uuid}", "--force") == ""
    assert xe.ok("vm-shutdown", "vm=web") == ""
    assert xe.get("vm", uuid, "power-state") == "halted"
    assert xe.ok("vm-start", "vm=web") == ""
    assert xe.ok("vm-shutdown", f"uuid={uuid}", "--force") == ""
    assert xe.get("vm", uuid, "power-state") == "halted"
    methods = [line.split('"method": "')[1].split('"')[0] for line in xe.daemon.log().splitlines()
               if '"method": "VM.' in line and '"Success"' in line]
    assert [m for m in methods if m.split(".")[1] in ("start", "clean_reboot", "hard_reboot", "clean_shutdown",
                                                       "hard_shutdown")] == \
        ["VM.start", "VM.clean_reboot", "VM.hard_reboot", "VM.clean_shutdown", "VM.start", "VM.hard_shutdown"]
    internal = ("The server failed to handle your request, due to an internal error. The given message may give"
                " details useful for debugging the problem.\n")
    assert xe.fail("vm-start", "vm=nothing") == internal + "message: Failure: No matching VMs found\n"
    make_vm(api, "web")
    assert "--multiple" in xe.fail("vm-start", "vm=web")
    assert xe.fail("vm-start", "uuid=zzz") == "The uuid you supplied was invalid.\ntype: VM\nuuid: zzz\n"


def test_vm_multiple_start_on_and_paused(xe: Xe, api: Any) -> None:
    """``--multiple`` reports each failing VM and goes on; ``on=`` uses VM.start_on; ``paused=true``."""
    vms = [make_vm(api, "batch") for _ in range(3)]
    uuids = [api.VM.get_uuid(vm) for vm in vms]
    assert xe.ok("vm-start", f"uuid={uuids[0]}") == ""
    r = xe("vm-start", "name-label=batch", "--multiple")
    assert (r.rc, r.out) == (1, "")
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"operation failed on {uuids[0]}: You attempted an operation on a VM that was not in an appropriate power")
    assert "actual: running" in lines[0]
    assert [api.VM.get_power_state(vm) for vm in vms] == ["Running"] * 3
    assert xe.ok("vm-shutdown", "name-label=batch", "power-state=running", "--multiple") == ""
    assert [api.VM.get_power_state(vm) for vm in vms] == ["Halted"] * 3
    r = xe("vm-reboot", "name-label=batch", "--multiple")
    assert r.rc == 1 and sorted(line.split(":")[0] for line in r.err.splitlines()) == \
        sorted(f"operation failed on {u}" for u in uuids)
    host2 = api.host.get_by_name_label("host2")[0]
    assert xe.ok("vm-start", f"uuid={uuids[1]}", "on=host2", "paused=true") == ""
    assert api.VM.get_resident_on(vms[1]) == host2 and api.VM.get_power_state(vms[1]) == "Paused"
    host3 = api.host.get_by_name_label("host3")[0]
    assert xe.ok("vm-start", f"uuid={uuids[2]}", f"on={api.host.get_uuid(host3)}") == ""
    assert api.VM.get_resident_on(vms[2]) == host3 and api.VM.get_power_state(vms[2]) == "Running"
    assert "VM.start_on" in xe.daemon.log()
    assert xe.fail("vm-start", f"uuid={uuids[0]}", "on=nosuch").endswith("message: Failure: Host nosuch not found\n")
    assert xe.ok("vm-shutdown", "name-label=batch", "power-state=running", "--multiple", "--force") == ""
    assert api.VM.get_power_state(vms[0]) == "Halted" and api.VM.get_power_state(vms[2]) == "Halted"
