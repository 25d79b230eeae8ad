"""HA planning, overcommit protection and memory accounting through the SDK (ha.md 4.10, 5.2, 5.5).

Seeded hosts: 64 GiB each, a 4 GiB dom0, so 60 GiB for guests.  The VMs here have all four memory
fields equal (no ballooning) unless a test says otherwise.  Sources: xapi's memory_check.ml,
xapi_vm_helpers.ml (assert_enough_memory_available, start_delay), message_forwarding.ml
(check_vm_preserves_ha_plan), xapi_ha_vm_failover.ml (update_pool_status,
mark_pool_as_overcommitted), xapi_pool.ml, xapi_vm.ml (set_ha_restart_priority), xapi_sr.ml.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid
from tests.integration.test_xe_support import Xe, make
from xapid import schema as schema_mod
from xapid.store import Store

GIB = 1024**3


def vm_of(api: Any, name: str, gib: float, dynamic_min: float | None = None, priority: str = "",
          **extra: str) -> str:
    size = str(int(gib * GIB))
    low = str(int((dynamic_min if dynamic_min is not None else gib) * GIB))
    return make(api, "VM", name_label=name, is_a_template=False, memory_static_max=size, memory_dynamic_max=size,
                memory_dynamic_min=low, memory_static_min=low, VCPUs_max="1", VCPUs_at_startup="1",
                actions_after_shutdown="destroy", actions_after_reboot="restart", actions_after_crash="restart",
                ha_restart_priority=priority, **extra)


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def free(api: Any, host: str) -> int:
    """``host_metrics.memory_free`` (its getter is a removed message; the record still carries it)."""
    return int(api.host_metrics.get_record(api.host.get_metrics(host))["memory_free"])


def hosts_by_name(api: Any) -> list[str]:
    return sorted(api.host.get_all(), key=lambda h: api.host.get_name_label(h))


def messages(api: Any, name: str) -> list[dict[str, Any]]:
    return [m for m in api.message.get_all_records().values() if m["name"] == name]


def plan_fields(api: Any) -> tuple[int, bool, int]:
    pool = api.pool.get_record(api.pool.get_all()[0])
    return int(pool["ha_plan_exists_for"]), bool(pool["ha_overcommitted"]), int(pool["ha_host_failures_to_tolerate"])


# -- memory accounting (no HA) ------------------------------------------------------------------------


def test_memory_free_follows_what_runs(api: Any) -> None:
    h1, h2, _h3 = hosts_by_name(api)
    # The seeded value is what the model gives: 64 GiB less the 4 GiB dom0.
    for h in (h1, h2):
        assert free(api, h) == 60 * GIB
        dom0 = api.host.get_control_domain(h)
        assert int(api.VM_metrics.get_memory_actual(api.VM.get_metrics(dom0))) == 4 * GIB
    vms = [vm_of(api, f"v{i}", 20) for i in range(4)]
    for i, v in enumerate(vms[:3]):
        api.VM.start_on(v, h1, False, False)
        assert free(api, h1) == (40 - 20 * i) * GIB
    assert int(api.VM_metrics.get_memory_actual(api.VM.get_metrics(vms[0]))) == 20 * GIB
    # memory_check.ml: needed = the VM's dynamic_min, available = the host's free memory.
    assert failure(api.VM.start_on, vms[3], h1, False, False) == ["HOST_NOT_ENOUGH_FREE_MEMORY", str(20 * GIB), "0"]
    assert api.VM.get_power_state(vms[3]) == "Halted" and free(api, h1) == 0
    api.VM.start(vms[3], False, False)  # VM.start chooses a host the VM fits on
    assert api.VM.get_resident_on(vms[3]) != h1
    api.VM.hard_reboot(vms[0])
    assert free(api, h1) == 0
    api.VM.clean_shutdown(vms[0])
    assert free(api, h1) == 20 * GIB
    api.VM.hard_shutdown(vms[1])
    assert free(api, h1) == 40 * GIB
    api.VM.power_state_reset(vms[2])
    assert free(api, h1) == 60 * GIB and api.VM.get_resident_on(vms[2]) == "OpaqueRef:NULL"
    api.VM.destroy(vms[2])
    assert free(api, h1) == 60 * GIB
    # Nothing fits a 61 GiB minimum anywhere.
    assert failure(api.VM.start, vm_of(api, "huge", 61), False, False) == ["NO_HOSTS_AVAILABLE"]


def test_a_ballooning_vm_starts_on_its_dynamic_min_and_gets_what_is_left(api: Any) -> None:
    h1 = hosts_by_name(api)[0]
    api.VM.start_on(vm_of(api, "fixed", 20), h1, False, False)
    elastic = vm_of(api, "elastic", 50, dynamic_min=10)
    api.VM.start_on(elastic, h1, False, False)
    # dom0 4 + fixed 20 + elastic between 10 and 50 on 64 GiB: squeezed to 40, nothing free.
    assert int(api.VM_metrics.get_memory_actual(api.VM.get_metrics(elastic))) == 40 * GIB
    assert free(api, h1) == 0
    assert failure(api.VM.start_on, vm_of(api, "more", 31, dynamic_min=31), h1, False, False) == [
        "HOST_NOT_ENOUGH_FREE_MEMORY", str(31 * GIB), str(30 * GIB)]


def test_start_delay_is_slept_after_the_start(api: Any) -> None:
    v = vm_of(api, "slow", 1)
    api.VM.set_start_delay(v, "1")
    t0 = time.monotonic()
    api.VM.start(v, False, False)
    assert time.monotonic() - t0 >= 1.0
    assert api.VM.get_power_state(v) == "Running"


def test_restart_priority_on_a_paused_vm_leaves_always_run_false(api: Any) -> None:
    """xapi_vm.ml set_ha_restart_priority: only a Running VM's ha_always_run follows the priority."""
    paused = vm_of(api, "paused", 1)
    api.VM.start(paused, True, False)
    assert api.VM.get_power_state(paused) == "Paused"
    api.VM.set_ha_restart_priority(paused, "restart")
    assert api.VM.get_ha_restart_priority(paused) == "restart" and api.VM.get_ha_always_run(paused) is False
    running = vm_of(api, "running", 1)
    api.VM.start(running, False, False)
    api.VM.set_ha_always_run(running, True)  # deprecated: the same as priority restart
    assert api.VM.get_ha_restart_priority(running) == "restart" and api.VM.get_ha_always_run(running) is True
    api.VM.set_ha_restart_priority(running, "best-effort")
    assert api.VM.get_ha_always_run(running) is False
    halted = vm_of(api, "halted", 1)
    api.VM.set_ha_always_run(halted, True)
    assert api.VM.get_ha_restart_priority(halted) == "restart" and api.VM.get_ha_always_run(halted) is False
    assert failure(api.VM.set_ha_restart_priority, halted, "always") == [
        "INVALID_VALUE", "ha_restart_priority", "always"]


def test_failures_to_tolerate_is_checked_and_recomputed_with_ha_off(api: Any) -> None:
    pool = api.pool.get_all()[0]
    assert failure(api.pool.set_ha_host_failures_to_tolerate, pool, "-1") == [
        "INVALID_VALUE", "ha_host_failures_to_tolerate", "-1"]
    api.pool.set_ha_host_failures_to_tolerate(pool, "2")
    assert plan_fields(api) == (2, False, 2)  # recomputed although HA is off, as xapi does


# -- overcommit protection with HA on -------------------------------------------------------------------


def test_overcommit_protection_and_plan_upkeep(api: Any, xapid: Xapid, tmp_path: Path) -> None:
    pool = api.pool.get_all()[0]
    record = tmp_path / "hook.log"
    hook = xapid.state_dir / "hooks" / "pool-ha-overcommitted" / "10-record"
    hook.parent.mkdir(parents=True)
    hook.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    hook.chmod(0o755)
    api.pool.enable_ha([], {"timeout": "10"})
    api.pool.set_ha_host_failures_to_tolerate(pool, "1")
    assert plan_fields(api) == (1, False, 1)
    vms = [vm_of(api, f"p{i}", 20, priority="restart") for i in range(7)]
    for v in vms[:6]:
        api.VM.start(v, False, False)
        assert api.VM.get_ha_always_run(v) is True
    assert plan_fields(api) == (1, False, 1)
    h1 = hosts_by_name(api)[0]
    before = free(api, h1)
    # Six 20 GiB VMs survive one failure of three 60 GiB hosts; a seventh would not.
    assert failure(api.VM.start, vms[6], False, False) == ["HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"]
    assert api.VM.get_power_state(vms[6]) == "Halted" and free(api, h1) == before
    assert failure(api.pool.set_ha_host_failures_to_tolerate, pool, "2") == [
        "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"]
    assert plan_fields(api) == (1, False, 1)
    assert api.pool.ha_failover_plan_exists("1") is True and api.pool.ha_failover_plan_exists("2") is False
    assert api.pool.ha_compute_max_host_failures_to_tolerate() == "1"
    # The hypothetical call only reads: pretending the seventh is protected changes nothing stored.
    assert api.pool.ha_compute_hypothetical_max_host_failures_to_tolerate(
        {v: "restart" for v in vms}) == "0"
    assert plan_fields(api) == (1, False, 1) and api.VM.get_ha_restart_priority(vms[0]) == "restart"

    api.pool.set_ha_allow_overcommit(pool, True)
    api.VM.start(vms[6], False, False)
    assert plan_fields(api) == (0, True, 1)
    over = messages(api, "HA_POOL_OVERCOMMITTED")
    assert len(over) == 1 and over[0]["cls"] == "Pool" and over[0]["priority"] == "3"
    assert over[0]["obj_uuid"] == api.pool.get_uuid(pool)
    drop = messages(api, "HA_POOL_DROP_IN_PLAN_EXISTS_FOR")
    assert [(m["body"], m["priority"]) for m in drop] == [("0", "3")]
    assert record.read_text() == "-reason none\n"  # xapi_hooks.ml: pool hooks pass reason__none

    api.VM.clean_shutdown(vms[6])
    assert plan_fields(api) == (1, False, 1)
    api.VM.start(vms[6], False, False)
    assert plan_fields(api) == (0, True, 1)
    assert len(messages(api, "HA_POOL_OVERCOMMITTED")) == 2  # one per false -> true change
    assert record.read_text().count("-reason none") == 2
    api.VM.set_ha_restart_priority(vms[6], "")  # running: no longer protected...
    assert api.VM.get_ha_always_run(vms[6]) is False
    assert plan_fields(api) == (0, True, 1)  # ...but its memory still counts on its host
    api.VM.hard_shutdown(vms[6])
    assert plan_fields(api) == (1, False, 1)
    api.pool.disable_ha()


def test_restart_priority_changes_keep_the_plan_fields_current(api: Any) -> None:
    """40 GiB VMs, one per host, 20 GiB free each: a protected one could restart nowhere."""
    pool = api.pool.get_all()[0]
    api.pool.enable_ha([], {"timeout": "10"})
    api.pool.set_ha_host_failures_to_tolerate(pool, "1")
    api.pool.set_ha_allow_overcommit(pool, True)
    vms = [vm_of(api, f"v{i}", 40) for i in range(3)]
    for v, h in zip(vms, hosts_by_name(api), strict=True):
        api.VM.start_on(v, h, False, False)
    assert plan_fields(api) == (1, False, 1)
    api.VM.set_ha_restart_priority(vms[0], "restart")
    assert api.VM.get_ha_always_run(vms[0]) is True
    assert plan_fields(api) == (0, True, 1)
    api.VM.set_ha_restart_priority(vms[0], "")
    assert plan_fields(api) == (1, False, 1)
    api.pool.set_ha_allow_overcommit(pool, False)
    assert failure(api.VM.set_ha_restart_priority, vms[1], "restart") == ["HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"]
    assert api.VM.get_ha_restart_priority(vms[1]) == "" and plan_fields(api) == (1, False, 1)
    # A halted VM may get priority restart: it is protected only once started (ha_always_run).
    halted = vm_of(api, "halted", 40)
    api.VM.set_ha_restart_priority(halted, "restart")
    assert plan_fields(api) == (1, False, 1)
    assert api.pool.ha_compute_max_host_failures_to_tolerate() == "3"
    api.pool.disable_ha()


def test_failover_plan_answers_per_vm(api: Any, xapid: Xapid, tmp_path: Path) -> None:
    h1, h2, h3 = hosts_by_name(api)
    small = [vm_of(api, f"s{i}", 20) for i in range(2)]
    big = vm_of(api, "big", 45)
    for v in [*small, big]:
        api.VM.start_on(v, h1 if v != big else h2, False, False)
    plan = api.pool.ha_compute_vm_failover_plan([h1], small)
    assert set(plan) == set(small)
    assert {plan[v]["host"] for v in small} <= {h2, h3}
    # h1 and h3 failing leaves h2 with 15 GiB: neither 20 GiB VM fits.
    assert api.pool.ha_compute_vm_failover_plan([h1, h3], small) == {
        v: {"error_code": "HOST_NOT_ENOUGH_FREE_MEMORY"} for v in small}
    xe = Xe(tmp_path, xapid)
    out = xe.ok("pool-ha-compute-vm-failover-plan", f"host-uuids={api.host.get_uuid(h2)}")
    rows = [tuple(part.strip() for part in line.split(": ", 1)) for line in out.splitlines() if line]
    assert rows == [("VM", "Destination Host or Error"),
                    (f"{api.VM.get_uuid(big)} (big)", f"{api.host.get_uuid(h3)} (host3)")]
    assert out.startswith("VM ") and out.endswith("\n\n")
    assert xe.ok("pool-ha-compute-max-host-failures-to-tolerate") == "3\n"


def test_sr_can_host_the_statefile(api: Any) -> None:
    nfs = api.SR.get_by_name_label("Shared NFS storage")[0]
    api.SR.assert_can_host_ha_statefile(nfs)
    local = api.SR.get_by_name_label("Local storage on host1")[0]
    assert failure(api.SR.assert_can_host_ha_statefile, local) == ["SR_HAS_NO_PBDS", local]


def test_a_vm_with_a_local_disk_is_not_agile(api: Any) -> None:
    local = api.SR.get_by_name_label("Local storage on host1")[0]
    nfs = api.SR.get_by_name_label("Shared NFS storage")[0]
    v = vm_of(api, "local", 2, priority="restart")
    shared = api.VDI.create({"SR": nfs, "virtual_size": str(GIB), "type": "user", "sharable": False,
                             "read_only": False, "other_config": {}, "name_label": "shared"})
    api.VBD.create({"VM": v, "VDI": shared, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                    "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    api.VM.assert_agile(v)
    disk = api.VDI.create({"SR": local, "virtual_size": str(GIB), "type": "user", "sharable": False,
                           "read_only": False, "other_config": {}, "name_label": "disk"})
    api.VBD.create({"VM": v, "VDI": disk, "userdevice": "1", "bootable": False, "mode": "RW", "type": "Disk",
                    "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert failure(api.VM.assert_agile, v) == ["HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", local]
    api.VM.start_on(v, hosts_by_name(api)[0], False, False)
    # A running non-agile protected VM: a plan exists only if it is ignored, so none for all.
    assert api.pool.ha_failover_plan_exists("0") is False
    assert api.pool.ha_compute_max_host_failures_to_tolerate() == "0"
    # Unplaced (every host failed), it gets its agility error rather than HOST_NOT_ENOUGH_FREE_MEMORY.
    assert api.pool.ha_compute_vm_failover_plan(api.host.get_all(), [v]) == {
        v: {"error_code": "HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED"}}


def test_a_cluster_caps_the_failures_at_corosyncs_quorum(xapid: Xapid, api: Any) -> None:
    """compute_max_host_failures_to_tolerate: with a Cluster, fewer than half the clustered hosts."""
    assert api.pool.ha_compute_max_host_failures_to_tolerate() == "3"
    hosts = api.host.get_all()
    xapid.stop()
    store = Store(schema_mod.load(), xapid.state_dir / "xapid.db")
    try:
        with store.transaction() as tx:
            cluster = tx.create("Cluster", {"cluster_stack": "corosync", "pool_auto_join": True})
            for h in hosts[:2]:  # the third host has no enabled cluster host
                tx.create("Cluster_host", {"cluster": cluster, "host": h, "enabled": True, "joined": True})
    finally:
        store.close()
    xapid.start()
    s = xapid.session()
    try:
        # ((3 - 1 - 1) / 2) + 1 = 1
        assert s.xenapi.pool.ha_compute_max_host_failures_to_tolerate() == "1"
    finally:
        s.xenapi.session.logout()
