"""pool: the HA calls (enable/disable in :mod:`xapid.ha.manager`, planning in :mod:`xapid.ha.planning`)."""

from __future__ import annotations

from xapid.api import Call, handler
from xapid.errors import ApiError


@handler("pool.enable_ha")
def enable_ha(call: Call, heartbeat_srs: list[str], configuration: dict[str, str], cluster_stack: str) -> None:
    call.daemon.ha.enable(call, heartbeat_srs, configuration, cluster_stack)


@handler("pool.disable_ha")
def disable_ha(call: Call) -> None:
    call.daemon.ha.disable(call)


@handler("pool.set_ha_host_failures_to_tolerate")
def set_ha_host_failures_to_tolerate(call: Call, self: str, value: int) -> None:
    """xapi_pool.ml: a plan for more than 0 failures must survive the change (with HA on and
    overcommit not allowed); the value is then stored and planning status recomputed, HA on or off."""
    if value < 0:
        raise ApiError("INVALID_VALUE", "ha_host_failures_to_tolerate", value)
    planning = call.daemon.ha.planning
    with call.store.transaction() as tx:
        pool = tx.get("pool", self)
        if int(pool["ha_plan_exists_for"]) > 0:
            planning.assert_nfailures_change_preserves_plan(value)
        pool["ha_host_failures_to_tolerate"] = value
    planning.update_pool_status()


@handler("pool.ha_compute_max_host_failures_to_tolerate")
def ha_compute_max_host_failures_to_tolerate(call: Call) -> int:
    return call.daemon.ha.planning.compute_max_failures(update=True)


@handler("pool.ha_failover_plan_exists")
def ha_failover_plan_exists(call: Call, n: int) -> bool:
    return call.daemon.ha.planning.plan_exists(n)


@handler("pool.ha_compute_hypothetical_max_host_failures_to_tolerate")
def ha_compute_hypothetical_max_host_failures_to_tolerate(call: Call, configuration: dict[str, str]) -> int:
    """The failures tolerated if exactly the VMs given ``restart`` in ``configuration`` were protected."""
    return call.daemon.ha.planning.hypothetical_max_failures(configuration)


@handler("pool.ha_compute_vm_failover_plan")
def ha_compute_vm_failover_plan(call: Call, failed_hosts: list[str],
                                failed_vms: list[str]) -> dict[str, dict[str, str]]:
    return call.daemon.ha.planning.failover_plan(failed_hosts, failed_vms)


@handler("pool.ha_prevent_restarts_for")
def ha_prevent_restarts_for(call: Call, seconds: int) -> None:
    """Suspend the master's restart logic for ``seconds`` (< 1 lifts it); works with HA off too (xapi_pool.ml)."""
    call.daemon.ha.monitor.prevent_restarts_for(seconds)


@handler("pool.get_license_state")
def get_license_state(call: Call, self: str) -> dict[str, str]:
    """The pool's edition (its hosts') and when its licence expires (xapi_pool_license.ml)."""
    if call.store.get("pool", self) is None:
        raise ApiError("HANDLE_INVALID", "pool", self)
    editions = {rec["edition"] for _r, rec in call.store.items("host")}
    return {"edition": min(editions) if editions else "xcp-ng", "expiry": "never"}
