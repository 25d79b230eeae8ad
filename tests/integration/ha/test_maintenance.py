"""Host maintenance: disable, enable, evacuate, get_vms_which_prevent_evacuation (xapi_host.ml), with and
without HA; host power through the API (shutdown, reboot, power_on) without HA."""

from __future__ import annotations

from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid
from tests.integration.ha.conftest import HaPool, vm_record, wait_for
from xapid.hw.faults import FaultClient


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def names(x: Any) -> dict[str, str]:
    return {x.host.get_name_label(h): h for h in x.host.get_all()}


def new_vm(x: Any, name: str, on: str | None = None, memory_gib: int = 2, priority: str = "") -> str:
    ref = x.VM.create(vm_record(name, memory_gib))
    if priority:
        x.VM.set_ha_restart_priority(ref, priority)
    if on is not None:
        x.VM.start_on(ref, on, False, False)
    return str(ref)


def resident(x: Any, vm: str) -> str:
    host = x.VM.get_resident_on(vm)
    return "-" if host == "OpaqueRef:NULL" else str(x.host.get_name_label(host))


def live(x: Any, host: str) -> bool:
    return bool(x.host_metrics.get_live(x.host.get_metrics(host)))


def power(xapid: Xapid, name: str) -> str:
    """The power column of ``xapid fault status`` for host ``name``."""
    for line in FaultClient(xapid.state_dir).status():
        fields = line.split()
        if fields[0] == name:
            return dict(f.split("=", 1) for f in fields[2:])["power"]
    raise AssertionError(f"no status line for {name}")


def test_disable_and_enable(xapid: Xapid, api: Any) -> None:
    """xapi_host.ml disable/enable: a disabled host takes no new VM and allows shutdown and reboot."""
    x = api
    h = names(x)
    assert x.host.get_enabled(h["host2"]) is True
    assert "shutdown" not in x.host.get_allowed_operations(h["host2"])
    x.host.disable(h["host2"])
    assert x.host.get_enabled(h["host2"]) is False
    assert {"shutdown", "reboot"} <= set(x.host.get_allowed_operations(h["host2"]))
    x.host.disable(h["host2"])  # already disabled: nothing to do
    x.host.disable(h["host1"])
    x.host.disable(h["host3"])
    vm = new_vm(x, "nowhere")
    assert failure(x.VM.start_on, vm, h["host2"], False, False) == ["HOST_DISABLED", h["host2"]]
    assert failure(x.VM.start, vm, False, False) == ["NO_HOSTS_AVAILABLE"]
    x.host.enable(h["host2"])
    assert x.host.get_enabled(h["host2"]) is True
    assert "shutdown" not in x.host.get_allowed_operations(h["host2"])
    x.VM.start(vm, False, False)
    assert resident(x, vm) == "host2"


def test_a_disable_lasts_until_xapi_restarts_unless_auto_enable_is_false(xapid: Xapid, api: Any) -> None:
    """xapi_host_helpers.ml consider_enabling_host: xapi's restart forgets a plain disable;
    ``auto_enable = false`` (local db host_auto_enable) keeps the host disabled until host.enable."""
    h = names(api)
    api.host.disable(h["host2"])
    api.host.disable(h["host3"], False)
    xapid.restart()
    x = xapid.session().xenapi
    assert x.host.get_enabled(h["host2"]) is True
    assert x.host.get_enabled(h["host3"]) is False
    x.host.enable(h["host3"])
    assert x.host.get_enabled(h["host3"]) is True
    xapid.restart()
    x = xapid.session().xenapi
    assert x.host.get_enabled(h["host3"]) is True


def test_evacuate_moves_every_vm_and_keeps_it_running(xapid: Xapid, api: Any) -> None:
    x = api
    h = names(x)
    vms = [new_vm(x, f"vm{i}", on=h["host2"], memory_gib=8) for i in range(4)]
    halted = new_vm(x, "halted")
    assert x.host.get_vms_which_prevent_evacuation(h["host2"]) == {}
    x.host.evacuate(h["host2"])
    for vm in vms:
        assert x.VM.get_power_state(vm) == "Running"
        assert resident(x, vm) in ("host1", "host3")
    # The biggest free host first: the four 8 GiB VMs spread over both hosts.
    assert {resident(x, vm) for vm in vms} == {"host1", "host3"}
    assert x.VM.get_power_state(halted) == "Halted"
    assert x.host.get_current_operations(h["host2"]) == {}
    assert x.host.get_resident_VMs(h["host2"]) == [x.host.get_control_domain(h["host2"])]


def test_evacuate_refuses_before_moving_anything(xapid: Xapid, api: Any) -> None:
    """xapi_host.ml compute_evacuation_plan_no_wlb: every VM gets a host or an error, errors refuse it all."""
    x = api
    h = names(x)
    small = new_vm(x, "small", on=h["host2"], memory_gib=2)
    huge = new_vm(x, "huge", on=h["host2"], memory_gib=57)
    new_vm(x, "filler1", on=h["host1"], memory_gib=10)
    new_vm(x, "filler3", on=h["host3"], memory_gib=10)
    assert x.host.get_vms_which_prevent_evacuation(h["host2"]) == {huge: ["HOST_NOT_ENOUGH_FREE_MEMORY", huge]}
    assert failure(x.host.evacuate, h["host2"]) == ["HOST_NOT_ENOUGH_FREE_MEMORY", huge]
    # xapi_host.ml assert_can_evacuate: every VM's error, "code,params" joined by "|".
    assert failure(x.host.assert_can_evacuate, h["host2"]) == [
        "CANNOT_EVACUATE_HOST", f"HOST_NOT_ENOUGH_FREE_MEMORY,{huge}"]
    assert x.host.assert_can_evacuate(h["host1"]) == ""
    assert x.host.get_uncooperative_resident_VMs(h["host2"]) == []
    assert resident(x, small) == resident(x, huge) == "host2"
    x.host.disable(h["host1"])
    x.host.disable(h["host3"])
    assert x.host.get_vms_which_prevent_evacuation(h["host2"]) == {
        small: ["NO_HOSTS_AVAILABLE", small], huge: ["NO_HOSTS_AVAILABLE", huge]}
    assert failure(x.host.evacuate, h["host2"])[0] == "NO_HOSTS_AVAILABLE"
    assert failure(x.host.evacuate, "OpaqueRef:nope") == ["HANDLE_INVALID", "host", "OpaqueRef:nope"]


def test_shutdown_needs_a_disabled_host_then_power_on_brings_it_back(xapid: Xapid, api: Any) -> None:
    """Without HA: HOST_NOT_DISABLED; the VMs move away; the host is dead at once; power_on boots it
    and it enables itself (a boot clears host_disabled_until_reboot)."""
    x = api
    h = names(x)
    vm = new_vm(x, "moves", on=h["host2"])
    assert failure(x.host.shutdown, h["host2"]) == ["HOST_NOT_DISABLED"]
    assert failure(x.host.reboot, h["host2"]) == ["HOST_NOT_DISABLED"]
    assert failure(x.host.power_on, h["host2"]) == ["HOST_IS_LIVE", h["host2"]]
    x.host.disable(h["host2"])
    x.host.shutdown(h["host2"])
    assert power(xapid, "host2") == "off"
    assert live(x, h["host2"]) is False
    assert x.VM.get_power_state(vm) == "Running" and resident(x, vm) in ("host1", "host3")
    assert x.host.get_enabled(h["host2"]) is False
    assert failure(x.host.enable, h["host2"]) == ["HOST_OFFLINE", h["host2"]]
    assert failure(x.host.shutdown, h["host2"]) == ["HOST_OFFLINE", h["host2"]]
    assert "power_on" in x.host.get_allowed_operations(h["host2"])
    x.host.power_on(h["host2"])
    wait_for(lambda: x.host.get_enabled(h["host2"]), what="host2 to start up and enable itself")
    assert power(xapid, "host2") == "on"
    assert live(x, h["host2"]) is True
    assert x.message.get_all_records() == {}  # HA is off: no HA_HOST_WAS_FENCED


def test_reboot_without_ha(xapid: Xapid, api: Any) -> None:
    x = api
    h = names(x)
    x.host.disable(h["host3"])
    x.host.reboot(h["host3"])
    wait_for(lambda: x.host.get_enabled(h["host3"]), what="host3 back after its reboot")
    assert power(xapid, "host3") == "on" and live(x, h["host3"])
    assert x.host.get_current_operations(h["host3"]) == {}


def test_shutdown_of_a_host_with_running_vms_that_cannot_move_shuts_them_down(xapid: Xapid, api: Any) -> None:
    """vm_evacuation.ml ensure_no_vms: VMs that prevent evacuation are shut down first."""
    x = api
    h = names(x)
    stuck = new_vm(x, "stuck", on=h["host1"], memory_gib=59)
    x.host.disable(h["host1"])
    new_vm(x, "filler", on=h["host2"], memory_gib=10)
    new_vm(x, "filler", on=h["host3"], memory_gib=10)
    x.host.shutdown(h["host1"])
    assert x.VM.get_power_state(stuck) == "Halted" and resident(x, stuck) == "-"
    assert x.VM.get_ha_always_run(stuck) is False


# -- with HA on ---------------------------------------------------------------------------------------


def test_evacuate_with_ha_needs_protected_vms(ha_pool: HaPool) -> None:
    """With HA on, unprotected VMs must be suspended or shut down first (HOST_EVACUATE_VM_NOT_HA_PROTECTED)."""
    p = ha_pool
    x = p.api
    protected = p.vm("protected", "restart", on="host2")
    best = p.vm("best", "best-effort", on="host2")
    assert x.host.get_vms_which_prevent_evacuation(p.hosts["host2"]) == {
        best: ["HOST_EVACUATE_VM_NOT_HA_PROTECTED", best]}
    assert failure(x.host.evacuate, p.hosts["host2"]) == ["HOST_EVACUATE_VM_NOT_HA_PROTECTED", best]
    assert p.where(protected) == ("Running", "host2")
    x.VM.hard_shutdown(best)
    x.host.evacuate(p.hosts["host2"])
    assert p.where(protected)[0] == "Running" and p.where(protected)[1] in ("host1", "host3")
    assert p.messages("HA_HOST_FAILED") == []


def test_disable_and_enable_with_ha_keep_the_host_live(ha_pool: HaPool) -> None:
    p = ha_pool
    x = p.api
    x.host.disable(p.hosts["host3"])
    assert x.host.get_enabled(p.hosts["host3"]) is False
    vm = p.vm("vm", "restart")
    x.VM.start(vm, False, False)
    assert p.where(vm)[1] != "host3"
    x.host.enable(p.hosts["host3"])
    assert x.host.get_enabled(p.hosts["host3"]) is True
    assert p.live("host3")
    assert x.pool.get_ha_enabled(p.pool) is True


def test_memory_of_huge_vm(xapid: Xapid, api: Any) -> None:
    """The evacuation memory check counts what really runs on a target, control domain included."""
    x = api
    h = names(x)
    big = new_vm(x, "big", on=h["host2"], memory_gib=60)
    x.host.disable(h["host3"])
    # host1: 64 GiB - 4 GiB control domain = 60 GiB free: the 60 GiB VM just fits.
    assert x.host.get_vms_which_prevent_evacuation(h["host2"]) == {}
    x.host.evacuate(h["host2"])
    assert resident(x, big) == "host1"
