"""The planning layer (xapid.ha.planning) on an in-process daemon: the entry points HA code calls.

The daemon is real (store, seed, handlers' helpers); HA is marked enabled in the store directly,
since these tests exercise planning, not the heartbeat.  Sources: xapi_ha_vm_failover.ml
(compute_restart_plan, assert_host_disable_preserves_ha_plan), xapi_ha.ml (plan_out_of_date),
xapi_vm_lifecycle.ml (force_state_reset).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.hardening.support import write_conf
from xapid import config as config_mod
from xapid.api.vm import reset_vm_to_halted, start_vm
from xapid.daemon import Daemon
from xapid.errors import ApiError

GIB = 1024**3


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(config_mod.load(write_conf(tmp_path / "xapi.conf")), tmp_path / "state", hosts=3)
    yield d
    d.store.close()


def hosts(d: Daemon) -> list[str]:
    return sorted(d.store.refs("host"), key=lambda h: d.store.get("host", h)["name_label"])  # type: ignore[index]


def new_vm(d: Daemon, gib: int, priority: str = "restart") -> str:
    with d.store.transaction() as tx:
        metrics = tx.create("VM_metrics", {})
        return tx.create("VM", {"name_label": "v", "memory_static_max": gib * GIB, "memory_dynamic_max": gib * GIB,
                                "memory_dynamic_min": gib * GIB, "memory_static_min": gib * GIB,
                                "ha_restart_priority": priority, "metrics": metrics, "power_state": "Halted",
                                "domid": -1})


def pool(d: Daemon) -> dict[str, Any]:
    rec = d.store.get("pool", d.pool_ref())
    assert rec is not None
    return rec


def set_pool(d: Daemon, **values: Any) -> None:
    with d.store.transaction() as tx:
        tx.update("pool", d.pool_ref(), **values)


def memory_free(d: Daemon, host: str) -> int:
    return int(d.store.get("host_metrics", d.store.get("host", host)["metrics"])["memory_free"])  # type: ignore[index]


def test_reset_to_halted_keeps_protection_and_gives_the_memory_back(daemon: Daemon) -> None:
    """force_state_reset: devices and residency cleared, ha_always_run untouched."""
    h1 = hosts(daemon)[0]
    vm = new_vm(daemon, 20)
    assert start_vm(daemon, vm, h1) == h1
    assert memory_free(daemon, h1) == 40 * GIB
    with daemon.store.transaction() as tx:
        assert reset_vm_to_halted(tx, vm) == h1
    rec = daemon.store.get("VM", vm)
    assert rec is not None
    assert (rec["power_state"], rec["resident_on"], rec["domid"], rec["ha_always_run"]) == (
        "Halted", "OpaqueRef:NULL", -1, True)
    assert memory_free(daemon, h1) == 60 * GIB


def test_restart_plan_for_vms_of_a_dead_host(daemon: Daemon) -> None:
    h1, h2, h3 = hosts(daemon)
    on_h1 = [new_vm(daemon, 20) for _ in range(3)]
    for vm in on_h1:
        start_vm(daemon, vm, h1)
    start_vm(daemon, new_vm(daemon, 50), h2)
    with daemon.store.transaction() as tx:
        for vm in on_h1:
            reset_vm_to_halted(tx, vm)
        tx.update("host_metrics", tx.get("host", h1)["metrics"], live=False)
    placement, unplaced = daemon.ha.planning.restart_plan(on_h1, [h2, h3])
    assert unplaced == [] and sorted(placement.values()) == [h3, h3, h3]  # h2 has 10 GiB left
    placement, unplaced = daemon.ha.planning.restart_plan(on_h1, [h2])
    assert placement == {} and unplaced == on_h1
    with pytest.raises(ApiError) as e:
        daemon.ha.planning.restart_plan(["OpaqueRef:nope"], [h2])
    assert e.value.description == ["HANDLE_INVALID", "VM", "OpaqueRef:nope"]


def test_host_change_guard(daemon: Daemon) -> None:
    """assert_host_disable_preserves_ha_plan: the plan must survive without the host."""
    h1, h2, h3 = hosts(daemon)
    for h in (h1, h2):
        start_vm(daemon, new_vm(daemon, 30), h)
    planning = daemon.ha.planning
    set_pool(daemon, ha_host_failures_to_tolerate=1)
    planning.update_pool_status()
    assert (pool(daemon)["ha_plan_exists_for"], pool(daemon)["ha_overcommitted"]) == (1, False)
    planning.assert_host_change_preserves_plan(h3)  # HA off: never refused
    set_pool(daemon, ha_enabled=True)
    planning.assert_host_change_preserves_plan(h3)  # without h3, one 30 GiB VM still fits beside the other
    start_vm(daemon, new_vm(daemon, 30), h3)
    with pytest.raises(ApiError) as e:
        planning.assert_host_change_preserves_plan(h3)
    assert e.value.code == "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"
    set_pool(daemon, ha_allow_overcommit=True)
    planning.assert_host_change_preserves_plan(h3)


def test_recomputation_runs_when_due(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    planning = daemon.ha.planning
    assert planning.recompute_if_due() is True  # out of date at start, as xapi's monitor
    assert planning.recompute_if_due() is False
    set_pool(daemon, ha_host_failures_to_tolerate=2)
    assert pool(daemon)["ha_plan_exists_for"] == 0  # nothing recomputed yet
    planning.schedule_recomputation()
    assert planning.recompute_if_due() is True
    assert pool(daemon)["ha_plan_exists_for"] == 2
    import xapid.ha.planning as mod

    later = mod.time.monotonic() + mod.RECOMPUTE_INTERVAL + 1
    monkeypatch.setattr(mod.time, "monotonic", lambda: later)
    assert planning.recompute_if_due() is True


def test_update_pool_status_reports_changes_and_alerts_once(daemon: Daemon) -> None:
    planning = daemon.ha.planning
    set_pool(daemon, ha_host_failures_to_tolerate=1)
    assert planning.update_pool_status() is True  # 0 -> 1
    assert planning.update_pool_status() is False
    for h in hosts(daemon):
        start_vm(daemon, new_vm(daemon, 40), h)  # three protected 40 GiB VMs: none can move
    assert planning.update_pool_status() is True
    assert (pool(daemon)["ha_plan_exists_for"], pool(daemon)["ha_overcommitted"]) == (0, True)
    assert planning.update_pool_status() is False
    names = sorted(rec["name"] for _r, rec in daemon.store.items("message"))
    assert names == ["HA_POOL_DROP_IN_PLAN_EXISTS_FOR", "HA_POOL_OVERCOMMITTED"]
