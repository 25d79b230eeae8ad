"""A dead host leaves the pool without HA: ``host.declare_dead`` and ``host.destroy`` (xapi_host.ml
declare_dead, destroy, precheck_destroy_declare_dead), their hooks (xapi_hooks.ml) and ``xe host-forget`` /
``xe host-declare-dead`` (cli_operations.ml host_careful_op)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.integration.ha.conftest import vm_record
from tests.integration.test_xe_support import REPO, Xe, xe_argv0
from xapid.hw.faults import FaultClient


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def hosts(api: Any) -> dict[str, str]:
    return {api.host.get_name_label(h): h for h in api.host.get_all()}


def hook(state_dir: Path, name: str, log: Path, status: int = 0) -> None:
    script = state_dir / "hooks" / name / "10-record"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(f'#!/bin/sh\necho "{name} $@" >> {log}\necho said-so\nexit {status}\n')
    script.chmod(0o755)


def running_vm(api: Any, name: str, host: str) -> str:
    vm = api.VM.create(vm_record(name, 1))
    api.VM.start_on(vm, host, False, False)
    return vm


def test_declare_dead_resets_the_vms_of_a_dead_host_and_runs_the_hooks(api: Any, xapid: Any,
                                                                        tmp_path: Path) -> None:
    h = hosts(api)
    master = api.pool.get_master(api.pool.get_all()[0])
    vm = running_vm(api, "web", h["host2"])
    # Still answering, or the master: refused, nothing changes.
    assert failure(api.host.declare_dead, h["host2"]) == ["HOST_IS_LIVE", h["host2"]]
    assert failure(api.host.declare_dead, master) == ["HOST_IS_LIVE", master]
    assert api.VM.get_power_state(vm) == "Running"

    log = tmp_path / "hooks.log"
    hook(xapid.state_dir, "host-pre-declare-dead", log, status=2)
    FaultClient(xapid.state_dir).crash("host2")
    uuid = api.host.get_uuid(h["host2"])
    # A hook failing with a status other than 0 or 1 aborts the call: nothing is reset.
    assert failure(api.host.declare_dead, h["host2"]) == [
        "XAPI_HOOK_FAILED", "host-pre-declare-dead/10-record", "user", "said-so\n", "2"]
    assert api.VM.get_power_state(vm) == "Running" and api.host.get_enabled(h["host2"]) is True

    hook(xapid.state_dir, "host-pre-declare-dead", log, status=1)  # 1: logged, carry on
    hook(xapid.state_dir, "host-post-declare-dead", log)
    api.host.declare_dead(h["host2"])
    assert api.VM.get_power_state(vm) == "Halted"
    assert api.VM.get_resident_on(vm) == "OpaqueRef:NULL"
    assert api.host.get_enabled(h["host2"]) is False
    assert h["host2"] not in [api.VM.get_resident_on(v) for v in api.VM.get_all()
                              if not api.VM.get_is_control_domain(v)]
    assert log.read_text().splitlines() == [
        f"host-pre-declare-dead -hostuuid {uuid} -reason user",
        f"host-pre-declare-dead -hostuuid {uuid} -reason user",
        f"host-post-declare-dead -hostuuid {uuid} -reason user",
    ]
    # The VM can run elsewhere now.
    api.VM.start_on(vm, h["host3"], False, False)
    assert api.VM.get_resident_on(vm) == h["host3"]


def test_destroy_forgets_a_dead_host_and_everything_it_owned(api: Any, xapid: Any, tmp_path: Path) -> None:
    h = hosts(api)
    victim = h["host3"]
    uuid = api.host.get_uuid(victim)
    vm = running_vm(api, "db", victim)
    owned = {cls: [r for r in getattr(api, cls).get_all() if getattr(api, cls).get_host(r) == victim]
             for cls in ("PBD", "PIF")}
    assert all(owned.values())
    dom0 = [v for v in api.host.get_resident_VMs(victim) if api.VM.get_is_control_domain(v)]
    metrics = api.host.get_metrics(victim)
    assert failure(api.host.destroy, victim) == ["HOST_IS_LIVE", victim]

    fault = FaultClient(xapid.state_dir)
    fault.crash("host3")
    assert failure(api.host.destroy, victim) == ["HOST_HAS_RESIDENT_VMS", victim]
    log = tmp_path / "hooks.log"
    hook(xapid.state_dir, "host-pre-declare-dead", log)
    api.host.declare_dead(victim)
    api.host.destroy(victim)

    assert sorted(hosts(api)) == ["host1", "host2"]
    assert failure(api.host.get_record, victim)[0] == "HANDLE_INVALID"
    for cls, refs in owned.items():
        remaining = set(getattr(api, cls).get_all())
        assert not remaining & set(refs), cls
    assert not set(api.VM.get_all()) & set(dom0)
    assert failure(api.host_metrics.get_record, metrics)[0] == "HANDLE_INVALID"
    assert api.VM.get_power_state(vm) == "Halted"  # user VMs stay in the pool
    assert log.read_text().splitlines()[-1] == f"host-pre-declare-dead -hostuuid {uuid} -reason dbdestroy"
    # The emulated machine goes with it.
    assert [line.split()[0] for line in fault.status()] == ["host1", "host2"]
    assert not (xapid.state_dir / "hosts" / uuid).exists()
    # And it stays forgotten across a restart.
    xapid.restart()
    api2 = xapid.session().xenapi
    assert sorted(hosts(api2)) == ["host1", "host2"]


def test_destroy_is_refused_while_ha_is_on(api: Any, xapid: Any) -> None:
    h = hosts(api)
    api.pool.enable_ha([], {"timeout": "10"})
    try:
        FaultClient(xapid.state_dir).crash("host3")
        # HA notices the loss and marks it dead: still, a pool with HA on never forgets a host (CA-23732).
        assert failure(api.host.destroy, h["host3"]) == ["HA_IS_ENABLED"]
        assert failure(api.pool.eject, h["host2"]) == ["HA_IS_ENABLED"]
    finally:
        api.pool.disable_ha()
    assert "host3" in hosts(api)


def xe_with_input(xe: Xe, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*xe_argv0(), "-s", "127.0.0.1", "-p", xe.port, "-u", "root", "-pwf", str(xe.pwf),
                           "--nossl", *args], input=text, capture_output=True, text=True, env=xe.env(), timeout=60,
                          cwd=REPO)


def test_xe_host_forget_and_declare_dead_ask_first(api: Any, xapid: Any, tmp_path: Path) -> None:
    xe = Xe(tmp_path, xapid)
    h = hosts(api)
    uuid = api.host.get_uuid(h["host2"])
    FaultClient(xapid.state_dir).crash("host2")
    no = xe_with_input(xe, "no\n", "host-declare-dead", f"uuid={uuid}")
    assert no.returncode == 0 and no.stderr == ""
    assert no.stdout.splitlines() == [
        "WARNING: A host should only be declared dead if it is verified offline.",
        "WARNING: Performing this operation if the host is still online and has any",
        "WARNING: running VMs may lead to possible data loss and/or corruption.",
        "Type 'yes' to continue",
    ]
    assert api.host.get_enabled(h["host2"]) is True
    yes = xe_with_input(xe, "yes\n", "host-declare-dead", f"uuid={uuid}")
    assert yes.returncode == 0, yes.stderr
    assert api.host.get_enabled(h["host2"]) is False
    assert xe.ok("host-forget", f"uuid={uuid}", "--force") == ""
    assert sorted(hosts(api)) == ["host1", "host3"]
    err = xe.fail("host-forget", f"uuid={api.host.get_uuid(h['host3'])}", "--force")
    assert "still live" in err


def test_pool_eject_sends_a_live_slave_away(api: Any, xapid: Any, tmp_path: Path) -> None:
    """xapi_pool.ml eject / eject_self: HA off, not the master, no running VM; the host's PBDs are
    unplugged, its records go, the pool-eject hook runs, and it reboots into a pool of its own."""
    h = hosts(api)
    master = api.pool.get_master(api.pool.get_all()[0])
    assert failure(api.pool.eject, master) == ["INTERNAL_ERROR", "Xapi_pool.Cannot_eject_master"]
    vm = running_vm(api, "busy", h["host3"])
    assert failure(api.pool.eject, h["host3"]) == ["OPERATION_NOT_ALLOWED", "VM resident on host"]
    api.VM.hard_shutdown(vm)
    log = tmp_path / "hooks.log"
    hook(xapid.state_dir, "pool-eject", log)
    xe = Xe(tmp_path, xapid)
    uuid = api.host.get_uuid(h["host3"])
    local = [api.PBD.get_SR(p) for p in api.host.get_PBDs(h["host3"]) if len(api.SR.get_PBDs(api.PBD.get_SR(p))) == 1]
    vdi = api.VDI.create({"name_label": "doomed", "name_description": "", "SR": local[0], "virtual_size": "1048576",
                          "type": "user", "sharable": False, "read_only": False, "other_config": {},
                          "xenstore_data": {}, "sm_config": {}, "tags": []})
    no = xe_with_input(xe, "no\n", "pool-eject", f"host-uuid={uuid}")
    assert no.returncode == 0 and no.stdout.splitlines() == [
        "WARNING: Ejecting a host from the pool will reinitialise that host's local SRs.",
        "WARNING: Any data contained with the local SRs will be lost.",
        "The following VDI objects will be destroyed:",
        f"VDI: {api.VDI.get_uuid(vdi)} (doomed)",
        "Type 'yes' to continue",
    ]
    assert "host3" in hosts(api)
    assert xe.ok("pool-eject", f"host-uuid={uuid}", "--force") == (
        "Specified host will attempt to restart as a master of a new pool in 10. seconds...\n")
    assert sorted(hosts(api)) == ["host1", "host2"]
    assert log.read_text() == "pool-eject -reason none\n"
    assert api.VM.get_power_state(vm) == "Halted"
    assert [line.split()[0] for line in FaultClient(xapid.state_dir).status()] == ["host1", "host2"]
