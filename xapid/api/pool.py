"""pool: the HA calls (their behaviour lives in :mod:`xapid.ha.manager`)."""

from __future__ import annotations

from xapid.api import Call, handler
from xapid.api.vm import RESTART_PRIORITIES
from xapid.errors import ApiError


@handler("pool.enable_ha")
def enable_ha(call: Call, heartbeat_srs: list[str], configuration: dict[str, str], cluster_stack: str) -> None:
    call.daemon.ha.enable(call, heartbeat_srs, configuration, cluster_stack)


@handler("pool.disable_ha")
def disable_ha(call: Call) -> None:
    call.daemon.ha.disable(call)


@handler("pool.set_ha_host_failures_to_tolerate")
def set_ha_host_failures_to_tolerate(call: Call, self: str, value: int) -> None:
    if value < 0:
        raise ApiError("INVALID_VALUE", "ha_host_failures_to_tolerate", value)
    with call.store.transaction() as tx:
        tx.update("pool", self, ha_host_failures_to_tolerate=value)
    call.daemon.ha.update_plan()


@handler("pool.ha_compute_max_host_failures_to_tolerate")
def ha_compute_max_host_failures_to_tolerate(call: Call) -> int:
    return call.daemon.ha.compute_max_failures(update=True)


@handler("pool.ha_failover_plan_exists")
def ha_failover_plan_exists(call: Call, n: int) -> bool:
    return call.daemon.ha.plan_exists(n)


@handler("pool.ha_compute_hypothetical_max_host_failures_to_tolerate")
def ha_compute_hypothetical_max_host_failures_to_tolerate(call: Call, configuration: dict[str, str]) -> int:
    """The failures tolerated if exactly the VMs given ``restart`` in ``configuration`` were protected."""
    protected = []
    for vm, priority in configuration.items():
        if priority not in RESTART_PRIORITIES:
            raise ApiError("INVALID_VALUE", "ha_restart_priority", priority)
        rec = call.store.get("VM", vm)
        if rec is None:
            raise ApiError("HANDLE_INVALID", "VM", vm)
        if priority == "restart":
            protected.append(rec)
    return call.daemon.ha.compute_max_failures(protected=protected)


@handler("pool.ha_prevent_restarts_for")
def ha_prevent_restarts_for(call: Call, seconds: int) -> None:
    """Suspend the master's restart logic for ``seconds`` (< 1 lifts it); works with HA off too (xapi_pool.ml)."""
    call.daemon.ha.monitor.prevent_restarts_for(seconds)
