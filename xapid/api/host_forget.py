"""A host leaves the pool: dead without HA (``xapi_host.ml`` declare_dead, destroy) or alive
(``xapi_pool.ml`` eject).

``host.declare_dead`` is what an administrator does when a host died and HA is off: its VMs are
reset to Halted (so they can be started elsewhere) and it is disabled.  ``host.destroy``
(``xe host-forget``) removes a dead host's records from the pool for good, declaring it
permanently dead to the cluster stack first (``Cluster_host.forget``).  Both refuse a host that
still answers (``HOST_IS_LIVE``), and both run the ``host-pre-declare-dead`` and
``host-post-declare-dead`` hooks, whose failure aborts the call (``XAPI_HOOK_FAILED``).
``pool.eject`` sends a live slave away: it leaves the cluster, its records go and it reboots into
a pool of its own, which xapid does not emulate (its machine leaves the emulated hardware).
"""

from __future__ import annotations

from typing import Any

import structlog

from xapid.api import Call, handler
from xapid.api import vm as vm_api
from xapid.api.host import refresh_allowed_operations
from xapid.errors import ApiError
from xapid.ha import hooks
from xapid.store import Transaction

log = structlog.get_logger("xapid.api.host_forget")

# What names a host and goes with it (xapi's db_gc collects these once the host record is gone).
_OWNED = ("host_cpu", "PBD", "PIF", "Certificate", "Feature", "PCI", "PGPU", "PUSB", "host_crashdump", "host_patch",
          "PVS_cache_storage")


def _host(call: Call, host: str) -> dict[str, Any]:
    rec = call.store.get("host", host)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    return rec


def is_alive(call: Call, host: str, rec: dict[str, Any]) -> bool:
    """xapi's ``is_host_alive``: not live in the database is definitive; otherwise ask the host,
    and a host that does not answer (off, fenced, frozen) is dead."""
    metrics = call.store.get("host_metrics", rec["metrics"])
    if metrics is not None and not metrics["live"]:
        return False
    return call.daemon.hw.is_running(str(rec["uuid"]))


def _precheck(call: Call, host: str, rec: dict[str, Any]) -> None:
    """``precheck_destroy_declare_dead``: the host must be dead, and the master never is."""
    if host == call.daemon.master_ref() or is_alive(call, host, rec):
        raise ApiError("HOST_IS_LIVE", host)


def _user_vms(call: Call, host: str) -> list[str]:
    return [vm for vm in call.store.referrers("VM", "resident_on", host)
            if not (call.store.get("VM", vm) or {}).get("is_control_domain", True)]


def _hooks_dir(call: Call) -> Any:
    return call.daemon.state_dir / "hooks"


@handler("host.declare_dead")
def declare_dead(call: Call, host: str) -> None:
    """Reset the dead host's VMs to Halted and disable it (``Host.declare_dead``)."""
    rec = _host(call, host)
    _precheck(call, host, rec)
    uuid = str(rec["uuid"])
    hooks.run_checked(_hooks_dir(call), hooks.HOST_PRE_DECLARE_DEAD, hooks.REASON_USER, uuid)
    vms = _user_vms(call, host)
    with call.store.transaction() as tx:
        for vm in vms:
            vm_api.reset_vm_to_halted(tx, vm)
        tx.update("host", host, enabled=False)
    log.warning("host declared dead", host=uuid, vms_reset=len(vms))
    pool = call.store.get("pool", call.daemon.pool_ref()) or {}
    if vms and pool.get("ha_enabled"):
        call.daemon.ha.planning.update_pool_status()
    hooks.run_checked(_hooks_dir(call), hooks.HOST_POST_DECLARE_DEAD, hooks.REASON_USER, uuid)
    refresh_allowed_operations(call.store, host)


@handler("host.destroy")
def destroy(call: Call, self: str) -> None:
    """Forget a dead host: its records go, and the cluster stack is told it never comes back."""
    rec = _host(call, self)
    _precheck(call, self, rec)
    pool = call.store.get("pool", call.daemon.pool_ref()) or {}
    if pool.get("ha_enabled"):
        raise ApiError("HA_IS_ENABLED")  # CA-23732
    if _user_vms(call, self):
        raise ApiError("HOST_HAS_RESIDENT_VMS", self)
    uuid = str(rec["uuid"])
    hooks.run_checked(_hooks_dir(call), hooks.HOST_PRE_DECLARE_DEAD, hooks.REASON_DBDESTROY, uuid)
    _forget_cluster_host(call, self)
    hooks.run_checked(_hooks_dir(call), hooks.HOST_POST_DECLARE_DEAD, hooks.REASON_DBDESTROY, uuid)
    with call.store.transaction() as tx:
        _remove_host(tx, self, rec)
    call.daemon.forget_host(uuid)
    log.warning("host forgotten", host=uuid, name=rec["name_label"])


def _forget_cluster_host(call: Call, host: str) -> None:
    """As ``xapi_hooks.ml`` host_pre_declare_dead: declared permanently dead to the cluster, errors ignored."""
    from xapid.api.cluster import forget_cluster_host  # noqa: PLC0415 - cluster imports host helpers

    for ch in [r for r, rec in call.store.items("Cluster_host") if rec["host"] == host]:
        try:
            forget_cluster_host(call, ch)
        except ApiError as e:
            log.warning("Cluster_host.forget failed; the host is forgotten anyway", cluster_host=ch, error=e.code)


def _remove_host(tx: Transaction, host: str, rec: dict[str, Any]) -> None:
    for cls in _OWNED:
        for ref in tx.referrers(cls, "host", host):
            if cls == "PIF":
                pif = tx.get("PIF", ref)
                if tx.read("PIF_metrics", pif["metrics"]) is not None:
                    tx.delete("PIF_metrics", pif["metrics"])
            tx.delete(cls, ref)
    for vm in tx.referrers("VM", "resident_on", host):  # only its control domains are left
        vm_api.remove_vm(tx, vm, tx.get("VM", vm))
    for ch in tx.referrers("Cluster_host", "host", host):
        tx.delete("Cluster_host", ch)
    if tx.read("host_metrics", rec["metrics"]) is not None:
        tx.delete("host_metrics", rec["metrics"])
    tx.delete("host", host)


def eject(call: Call, host: str) -> None:
    """``pool.eject`` (xapi_pool.ml eject_self, then the record goes on the master)."""
    rec = _host(call, host)
    pool_ref = call.daemon.pool_ref()
    pool = call.store.get("pool", pool_ref) or {}
    if pool.get("ha_enabled"):
        raise ApiError("HA_IS_ENABLED")
    if host == call.daemon.master_ref():
        raise ApiError("INTERNAL_ERROR", "Xapi_pool.Cannot_eject_master")
    if not call.daemon.hw.is_running(str(rec["uuid"])):
        raise ApiError("HOST_OFFLINE", host)  # the ejected host itself runs eject_self
    for vm in call.store.referrers("VM", "resident_on", host):
        vm_rec = call.store.get("VM", vm) or {}
        if not vm_rec.get("is_control_domain", True) and vm_rec.get("power_state") != "Halted":
            raise ApiError("OPERATION_NOT_ALLOWED", "VM resident on host")
    from xapid.api import pbd as pbd_api  # noqa: PLC0415 - pbd imports this package's helpers
    from xapid.api.cluster import cluster_host_destroy  # noqa: PLC0415

    for pbd in call.store.referrers("PBD", "host", host):  # unplug_pbds: fails if one cannot go
        pbd_api.unplug(call, pbd)
    for ch in [r for r, ch_rec in call.store.items("Cluster_host") if ch_rec["host"] == host]:
        cluster_host_destroy(call, ch)
    hooks.run_checked(_hooks_dir(call), hooks.POOL_EJECT, hooks.REASON_NONE)
    uuid = str(rec["uuid"])
    call.daemon.hw.power_off(uuid, "ejected from the pool: reboots as a pool of its own")
    with call.store.transaction() as tx:
        _remove_host(tx, host, rec)
    call.daemon.forget_host(uuid)
    log.warning("host ejected", host=uuid, name=rec["name_label"])
