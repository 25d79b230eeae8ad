"""pool: the HA calls (enable/disable in :mod:`xapid.ha.manager`, planning in :mod:`xapid.ha.planning`)
and master transitions (xapi_pool.ml, xapi_pool_transition.ml).

Every transition restarts the xapi of every host it touches (``light_fuse_and_run``), and the
new master starts from its replica of the pool database, in which sessions are never stored
(the session class is ``PersistNothing``): no session survives a transition.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import structlog

from xapid.api import Call, handler
from xapid.api.message import create_message
from xapid.errors import ApiError, internal

if TYPE_CHECKING:
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.api.pool")

MASTER_KEY = "pool_master_address"  # a host's own idea of its master's address (its pool.conf)


def transition_master(daemon: Daemon, host: str, followers: list[str] | None = None) -> bool:
    """Make ``host`` the pool's master; False if it already was.

    ``followers`` are the hosts that learn of the new master (None: every host, as in a two-phase
    commit or an HA failover); the others keep naming the old one in ``HOST_IS_SLAVE``.  Every
    session and every task ends; the new master raises ``POOL_MASTER_TRANSITION`` (xapi_pool_transition.ml
    consider_sending_alert).
    """
    store = daemon.store
    old = daemon.master_ref()
    if old == host:
        return False
    old_address = daemon.master_address()
    local = daemon.ha.local
    for ref, rec in store.items("host"):
        # The old master follows the new one when it comes back (a real one would come back as a
        # second master with its own database, which one shared database cannot show).
        if ref in (host, old) or followers is None or ref in followers:
            if local.get(rec["uuid"], MASTER_KEY):
                local.set(rec["uuid"], **{MASTER_KEY: None})
        elif not local.get(rec["uuid"], MASTER_KEY):
            local.set(rec["uuid"], **{MASTER_KEY: old_address})
    with store.transaction() as tx:
        tx.update("pool", daemon.pool_ref(), master=host)
    daemon.sessions.drop_all()
    for ref in store.refs("host"):
        if followers is None or ref == host or ref == old or ref in followers:
            daemon.sessions.drop_local(ref)
    # The new master's database has no tasks: tasks are never persisted or replicated (datamodel
    # task: PersistNothing), so a client polling one gets HANDLE_INVALID once it logs in again.
    daemon.tasks.drop_all("pool master transition")
    uuid = (store.get("host", host) or {}).get("uuid", "")
    log.warning("pool master transition", master=uuid, previous=(store.get("host", old) or {}).get("uuid", ""))
    create_message(store, "POOL_MASTER_TRANSITION", 4, "Host", uuid, "")
    return True


def _assert_not_armed(call: Call) -> None:
    """The emergency transitions refuse while HA is armed on the receiving host (xapi_pool.ml)."""
    if call.daemon.ha.armed(call.host):
        raise ApiError("HA_IS_ENABLED")


@handler("pool.eject")
def eject(call: Call, host: str) -> None:
    """A live slave leaves the pool for good (see :func:`xapid.api.host_forget.eject`)."""
    from xapid.api import host_forget  # noqa: PLC0415 - host_forget reaches pool through the HA modules

    running = set((call.store.get("pool", call.daemon.pool_ref()) or {}).get("current_operations", {}).values())
    if "ha_enable" in running:  # xapi_pool_helpers.ml: eject waits for no HA operation
        raise ApiError("HA_ENABLE_IN_PROGRESS")
    if "ha_disable" in running:
        raise ApiError("HA_DISABLE_IN_PROGRESS")
    host_forget.eject(call, host)


@handler("pool.designate_new_master")
def designate_new_master(call: Call, host: str) -> None:
    """The planned transition (xapi_pool.ml designate_new_master, a two-phase commit with every host):
    refused with HA on; nothing to do if ``host`` is the master; every host must be reachable."""
    daemon = call.daemon
    if call.store.get("host", host) is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    if host == daemon.master_ref():
        return
    if daemon.ha.pool()["ha_enabled"]:
        raise ApiError("HA_IS_ENABLED")
    for ref in [host, *(r for r in call.store.refs("host") if r != host)]:
        if not daemon.ha.is_running(ref):
            raise ApiError("HOST_OFFLINE", ref)
    transition_master(daemon, host)


@handler("pool.emergency_transition_to_master")
def emergency_transition_to_master(call: Call) -> None:
    """The receiving host makes itself master (its xapi restarts); the other slaves keep naming the
    old master until ``pool.recover_slaves``.  On the master it only restarts its xapi."""
    _assert_not_armed(call)
    daemon = call.daemon
    if call.on_master:
        daemon.sessions.drop_all()
        daemon.sessions.drop_local(call.host)
        return
    transition_master(daemon, call.host, followers=[])


@handler("pool.emergency_reset_master")
def emergency_reset_master(call: Call, master_address: str) -> None:
    """The receiving slave follows the master at ``master_address`` from now on (its xapi restarts)."""
    _assert_not_armed(call)
    try:
        address = str(ipaddress.ip_address(master_address))
    except ValueError:
        raise internal(f"Couldn't resolve hostname: {master_address}") from None  # no name lookups here
    daemon = call.daemon
    if call.on_master:
        log.warning("pool.emergency_reset_master on the master: ignored", address=address)
        return
    uuid = call.store.get("host", call.host)["uuid"]
    known = daemon.master_address(call.host)
    if known == address:
        return
    daemon.ha.local.set(uuid, **{MASTER_KEY: None if address == daemon.master_address() else address})
    daemon.sessions.drop_local(call.host)


@handler("pool.recover_slaves")
def recover_slaves(call: Call) -> list[str]:
    """Point every reachable slave at this master (``emergency_reset_master`` on each, failures
    skipped); the hosts that took it."""
    daemon = call.daemon
    master = daemon.master_ref()
    address = daemon.master_address()
    recovered = []
    for ref, rec in call.store.items("host"):
        if ref == master or not daemon.ha.is_running(ref) or daemon.ha.armed(ref):
            continue
        if daemon.ha.local.get(rec["uuid"], MASTER_KEY) not in (None, address):
            daemon.ha.local.set(rec["uuid"], **{MASTER_KEY: None})
            daemon.sessions.drop_local(ref)
        recovered.append(ref)
    return recovered


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
