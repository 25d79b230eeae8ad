"""host: maintenance (disable, enable, evacuate), power (shutdown, reboot, power_on), and the calls a
host answers for itself (emergency HA disable, the xapi health check, emergency mode).

What the HA subsystem does on the way (statefile checks, leaving the liveset, the start-up
after a boot) lives in :mod:`xapid.ha.manager`; the emulated power switch in :mod:`xapid.hw`.
Behaviour follows xapi's ``xapi_host.ml``, ``xapi_host_helpers.ml`` and ``message_forwarding.ml``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog

from xapid.api import Call, handler
from xapid.api import vm as vm_api
from xapid.certificates import server_certificate
from xapid.errors import ApiError
from xapid.ha.failover import is_protected
from xapid.ha.planning import vm_record
from xapid.hw.metrics import data_source_record, invalid_data_source, missing_data_source
from xapid.schema import NULL_REF
from xapid.store import Transaction, new_ref
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from xapid.ha.manager import HaManager
    from xapid.store import Store

log = structlog.get_logger("xapid.api.host")

HOST_OPERATIONS = ("provision", "evacuate", "shutdown", "reboot", "power_on", "vm_start", "vm_resume",
                   "vm_migrate", "apply_updates", "enable")
_CREATING = ("provision", "vm_resume", "vm_migrate")
_REMOVING = ("evacuate", "reboot", "shutdown")


# -- allowed and current operations (xapi_host_helpers.ml valid_operations) -------------------------------


def operation_errors(tx: Transaction, host: str) -> dict[str, ApiError | None]:
    """For every host operation, the error that refuses it now (None: allowed)."""
    rec = tx.get("host", host)
    table: dict[str, ApiError | None] = dict.fromkeys(HOST_OPERATIONS)

    def refuse(error: ApiError, ops: tuple[str, ...]) -> None:
        for op in ops:
            if table[op] is None:
                table[op] = error

    def busy(op_ref: str, op: str) -> ApiError:
        return ApiError("OTHER_OPERATION_IN_PROGRESS", "host", host, op, op_ref)

    current = list(rec["current_operations"].items())
    removing = next(((r, o) for r, o in current if o in _REMOVING), None)
    creating = next(((r, o) for r, o in current if o in _CREATING), None)
    for op in HOST_OPERATIONS:
        if op == "power_on":
            continue
        if op in _CREATING and removing is not None:
            refuse(busy(*removing), (op,))
        elif op in _REMOVING and creating is not None:
            refuse(busy(*creating), (op,))
    for op_ref, op in current:
        if op == "reboot":
            refuse(busy(op_ref, op), ("shutdown", "apply_updates"))
        elif op == "shutdown":
            refuse(busy(op_ref, op), ("reboot", "apply_updates"))
        elif op == "apply_updates":
            refuse(busy(op_ref, op), ("reboot", "shutdown", "enable"))
        elif op == "provision":
            refuse(busy(op_ref, op), ("provision",))
    if rec["enabled"]:
        refuse(ApiError("HOST_NOT_DISABLED"), ("reboot", "shutdown", "apply_updates"))
    metrics = tx.read("host_metrics", rec["metrics"])
    if metrics is not None and metrics["live"]:
        refuse(ApiError("HOST_IS_LIVE", host), ("power_on",))
    return table


def update_allowed_operations(tx: Transaction, host: str) -> None:
    """Recompute ``host.allowed_operations`` from its current state."""
    errors = operation_errors(tx, host)
    allowed = [op for op in HOST_OPERATIONS if errors[op] is None]
    rec = tx.get("host", host)
    if rec["allowed_operations"] != allowed:
        rec["allowed_operations"] = allowed


def refresh_allowed_operations(store: Store, host: str) -> None:
    with store.transaction() as tx:
        update_allowed_operations(tx, host)


@contextmanager
def host_operation(call: Call, host: str, op: str) -> Iterator[None]:
    """Check ``op`` is allowed on ``host``, record it in ``current_operations`` while the block runs."""
    key = call.task or new_ref()
    with call.store.transaction() as tx:
        error = operation_errors(tx, host)[op]
        if error is not None:
            raise error
        tx.get("host", host)["current_operations"][key] = op
        update_allowed_operations(tx, host)
    try:
        yield
    finally:
        with call.store.transaction() as tx:
            rec = tx.find("host", host)
            if rec is not None:
                rec["current_operations"].pop(key, None)
                update_allowed_operations(tx, host)


def _host(call: Call, host: str) -> dict[str, Any]:
    rec = call.store.get("host", host)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    return rec


def _reach(ha: HaManager, host: str) -> None:
    """A call xapi forwards to ``host`` itself: it must be running, and not in emergency mode."""
    if not ha.is_running(host):
        raise ApiError("HOST_OFFLINE", host)
    error = ha.emergency_error(host)
    if error is not None:
        raise error


def _assert_plan_preserved(ha: HaManager, host: str) -> None:
    """xapi_ha_vm_failover.ml assert_host_disable_preserves_ha_plan (the planner's check)."""
    check = getattr(ha.planning, "assert_host_change_preserves_plan", None)
    if check is not None:
        check(host)


def _recompute_plan(ha: HaManager) -> None:
    if ha.pool()["ha_enabled"]:
        ha.planning.update_pool_status()


# -- maintenance ----------------------------------------------------------------------------------------


@handler("host.disable")
def disable(call: Call, host: str, auto_enable: bool) -> None:
    """No new VMs start on the host; with ``auto_enable`` false it stays disabled across its restarts."""
    ha = call.daemon.ha
    rec = _host(call, host)
    _assert_plan_preserved(ha, host)
    _reach(ha, host)
    if rec["enabled"]:
        log.info("host disabled by user request", host=rec["uuid"], auto_enable=auto_enable)
        with call.store.transaction() as tx:
            tx.update("host", host, enabled=False)
            update_allowed_operations(tx, host)
        ha.user_disabled.add(host)
        if not auto_enable:
            ha.local.set(rec["uuid"], host_auto_enable=False)
        _recompute_plan(ha)


@handler("host.enable")
def enable(call: Call, host: str) -> None:
    """The host may run new VMs again (xapi_host.ml enable and assert_safe_to_reenable)."""
    ha = call.daemon.ha
    rec = _host(call, host)
    with host_operation(call, host, "enable"):
        _reach(ha, host)
        if rec["enabled"]:
            return
        if ha.starting(host):
            raise ApiError("HOST_STILL_BOOTING")
        if ha.local.get(rec["uuid"], "host_disabled_until_reboot", False):
            raise ApiError("HOST_DISABLED_UNTIL_REBOOT", host)
        ha.user_disabled.discard(host)
        ha.local.set(rec["uuid"], host_auto_enable=True)
        log.info("host enabled by user request", host=rec["uuid"])
        with call.store.transaction() as tx:
            tx.update("host", host, enabled=True)
        pool = ha.pool()
        if pool["ha_enabled"] and pool["ha_overcommitted"]:
            ha.planning.update_pool_status()


def _free_memory(call: Call, host: str) -> int:
    """Free memory of ``host`` at maximum compression (memory_check.ml, as VM.start sees it)."""
    with call.store.transaction() as tx:
        return vm_api.free_for_start(tx, host, NULL_REF)


def _boot_error(store: Store, vm: str, target: str) -> ApiError | None:
    """Why ``vm`` could not run on ``target`` (storage and networks it needs), or None."""
    for vbd in store.referrers("VBD", "VM", vm):
        vdi = (store.get("VBD", vbd) or {}).get("VDI", NULL_REF)
        sr = (store.get("VDI", vdi) or {}).get("SR", NULL_REF) if vdi != NULL_REF else NULL_REF
        if sr == NULL_REF:
            continue
        if not any((p := store.get("PBD", pbd)) is not None and p["host"] == target and p["currently_attached"]
                   for pbd in store.referrers("PBD", "SR", sr)):
            return ApiError("VM_REQUIRES_SR", vm, sr)
    for vif in store.referrers("VIF", "VM", vm):
        network = (store.get("VIF", vif) or {}).get("network", NULL_REF)
        if network == NULL_REF:
            continue
        if not any((p := store.get("PIF", pif)) is not None and p["host"] == target
                   for pif in store.referrers("PIF", "network", network)):
            return ApiError("VM_REQUIRES_NETWORK", vm, network)
    return None


def evacuation_plan(call: Call, host: str) -> dict[str, str | ApiError]:
    """Where each VM resident on ``host`` would go, or why it cannot (compute_evacuation_plan_no_wlb).

    Targets are the other hosts that are enabled and live.  With HA on, only protected VMs may move
    (the others give ``HOST_EVACUATE_VM_NOT_HA_PROTECTED``); a VM must be able to run on every target;
    then the biggest VMs (start memory) go first to the host with the most free memory (maximum compression).
    """
    store = call.store
    ha = call.daemon.ha
    targets = []
    for ref, rec in store.items("host"):
        metrics = store.get("host_metrics", rec["metrics"])
        if ref != host and rec["enabled"] and metrics is not None and metrics["live"] and ha.is_running(ref):
            targets.append(ref)
    vms = [(ref, rec) for ref in store.referrers("VM", "resident_on", host)
           if (rec := store.get("VM", ref)) is not None and not rec["is_control_domain"]]
    plan: dict[str, str | ApiError] = {}
    if not targets:
        return {vm: ApiError("NO_HOSTS_AVAILABLE", vm) for vm, _rec in vms}
    movable = []
    ha_on = bool(ha.pool()["ha_enabled"])
    for vm, rec in vms:
        if ha_on and not is_protected(rec):
            plan[vm] = ApiError("HOST_EVACUATE_VM_NOT_HA_PROTECTED", vm)
            continue
        error = next((e for t in targets if (e := _boot_error(store, vm, t)) is not None), None)
        if error is not None:
            plan[vm] = error
        else:
            movable.append((vm, rec))
    free = {t: _free_memory(call, t) for t in targets}
    need_of = {vm: vm_record(vm, rec).start_memory() for vm, rec in movable}
    for vm, _rec in sorted(movable, key=lambda item: -need_of[item[0]]):
        need = need_of[vm]
        best = max(targets, key=lambda t: free[t])
        if free[best] >= need:
            free[best] -= need
            plan[vm] = best
        else:
            plan[vm] = ApiError("HOST_NOT_ENOUGH_FREE_MEMORY", vm)
    return {vm: plan[vm] for vm, _rec in vms}


@handler("host.get_vms_which_prevent_evacuation")
def get_vms_which_prevent_evacuation(call: Call, self: str) -> dict[str, list[str]]:
    """Each VM that cannot leave the host, with the error (code and parameters) that keeps it there."""
    _host(call, self)
    return {vm: error.description for vm, error in evacuation_plan(call, self).items()
            if isinstance(error, ApiError)}


@handler("host.assert_can_evacuate")
def assert_can_evacuate(call: Call, host: str) -> None:
    """``CANNOT_EVACUATE_HOST`` with every VM's error as ``code,param,...`` joined by ``|`` (xapi_host.ml)."""
    _host(call, host)
    errors = [",".join(e.description) for e in evacuation_plan(call, host).values() if isinstance(e, ApiError)]
    if errors:
        raise ApiError("CANNOT_EVACUATE_HOST", "|".join(errors))


@handler("host.get_uncooperative_resident_VMs")
def get_uncooperative_resident_vms(call: Call, self: str) -> list[str]:
    """Always empty, as in xapi (the call is kept for old clients)."""
    _host(call, self)
    return []


def _migrate(call: Call, vm: str, target: str) -> None:
    """Move a running VM to ``target`` (what the VM.pool_migrate of an evacuation leaves behind)."""
    with call.store.transaction() as tx:
        rec = tx.find("VM", vm)
        if rec is None or rec["power_state"] not in ("Running", "Paused"):
            return
        source = rec["resident_on"]
        rec.update(resident_on=target, scheduled_to_be_resident_on=NULL_REF)
        metrics = tx.find("VM_metrics", rec["metrics"])
        if metrics is not None:
            metrics["last_updated"] = now_iso()
        vm_api.account_host(tx, source, vm)
        vm_api.account_host(tx, target, vm)


def _evacuate(call: Call, host: str) -> None:
    plan = evacuation_plan(call, host)
    for error in plan.values():
        if isinstance(error, ApiError):
            raise error
    done = 0
    for vm, target in plan.items():
        assert isinstance(target, str)
        _migrate(call, vm, target)
        done += 1
        call.daemon.tasks.progress(call.task, done / len(plan))
    left = [v for v in call.store.referrers("VM", "resident_on", host)
            if not (call.store.get("VM", v) or {}).get("is_control_domain", True)]
    if left:
        raise ApiError("INTERNAL_ERROR", f"evacuate: {len(left)} VMs are still resident on {host}")


@handler("host.evacuate")
def evacuate(call: Call, host: str, network: str, evacuate_batch_size: int) -> None:
    """Move every VM off the host, or refuse with the first VM's error before moving any."""
    ha = call.daemon.ha
    _host(call, host)
    if network != NULL_REF and call.store.get("network", network) is None:
        raise ApiError("HANDLE_INVALID", "network", network)
    _assert_plan_preserved(ha, host)
    with host_operation(call, host, "evacuate"):
        _evacuate(call, host)


# -- power ----------------------------------------------------------------------------------------------


def _ensure_no_vms(call: Call, host: str) -> None:
    """Empty the host before it goes down (vm_evacuation.ml ensure_no_vms): VMs that cannot move are
    shut down (cleanly, else hard), the others migrate; whatever still runs is then shut down."""

    def shut_down(vm: str) -> None:
        rec = call.store.get("VM", vm)
        if rec is None or rec["power_state"] not in ("Running", "Paused"):
            return
        try:
            if rec["power_state"] == "Running":
                vm_api.clean_shutdown(call, vm)
            else:
                vm_api.hard_shutdown(call, vm)
        except ApiError as e:
            log.warning("could not shut a VM down before the host goes down", vm=rec["uuid"], error=str(e))
            vm_api.hard_shutdown(call, vm)

    for vm, target in evacuation_plan(call, host).items():
        if isinstance(target, ApiError):
            shut_down(vm)
    try:
        _evacuate(call, host)
    except ApiError as e:
        log.warning("evacuation before power-off incomplete", host=host, error=str(e))
    for vm in call.store.referrers("VM", "resident_on", host):
        rec = call.store.get("VM", vm)
        if rec is not None and not rec["is_control_domain"]:
            shut_down(vm)


def _power_cycle(call: Call, host: str, op: str) -> None:
    """``host.shutdown`` / ``host.reboot`` (xapi_host.ml shutdown_and_reboot_common, prepare_for_poweroff)."""
    ha = call.daemon.ha
    rec = _host(call, host)
    uuid = rec["uuid"]
    with host_operation(call, host, op):
        _reach(ha, host)
        ha.assert_have_statefile_access(host)
        log.warning("host going down", host=uuid, operation=op)
        ha.begin_shutdown(host)
        refresh_allowed_operations(call.store, host)
        _ensure_no_vms(call, host)
        try:
            ha.before_clean_shutdown(host)
        except ApiError as e:
            if e.code == "HA_LOST_STATEFILE":  # nothing done yet: the host stays up
                ha.shutting_down.discard(host)
            raise
        ha.prepare_for_poweroff(host)
        call.daemon.hw.power_off(uuid, f"clean {op}")
        if op == "reboot":
            call.daemon.hw.boot(uuid)


@handler("host.shutdown")
def shutdown(call: Call, host: str) -> None:
    """Power the (disabled) host off cleanly; its VMs move away or shut down first."""
    _power_cycle(call, host, "shutdown")


@handler("host.reboot")
def reboot(call: Call, host: str) -> None:
    """As :func:`shutdown`, then the host boots again (its xapi start-up runs in the background)."""
    _power_cycle(call, host, "reboot")


@handler("host.power_on")
def power_on(call: Call, host: str) -> None:
    """Power on a host that is off or fenced (the emulated hardware stands for xapi's power-on plugin)."""
    rec = _host(call, host)
    with host_operation(call, host, "power_on"):
        if call.daemon.hw.power(rec["uuid"]) in ("off", "fenced"):
            log.info("host power-on requested", host=rec["uuid"])
            call.daemon.hw.boot(rec["uuid"])


# -- calls a host answers for itself ----------------------------------------------------------------------


@handler("host.emergency_ha_disable")
def emergency_ha_disable(call: Call, soft: bool) -> None:
    """HA off on the host this call was sent to (never forwarded, as in xapi)."""
    call.daemon.ha.emergency_disable(call.host, soft)


@handler("host.ha_xapi_healthcheck")
def ha_xapi_healthcheck(call: Call) -> bool:
    """Whether the xapi of the host this call was sent to is healthy (xhad's xapi watchdog asks this
    through ``xapi-health-check``).  xapi_host.ml answers ``not (Xapi_fist.fail_healthcheck ())``:
    getting here means xapi works, unless the fault ``xapid fault xapi-fail`` stands for that fist
    point on the host (a hung or crashed xapi never gets here)."""
    uuid = call.daemon.ha.host_uuid(call.host)
    return call.daemon.ha.is_running(call.host) and call.daemon.hw.toolstack.healthy(uuid)


RESTART_AGENT_DELAY = 1.0  # xapi_host.ml restart_agent: the call answers, then xe-toolstack-restart runs


@handler("host.restart_agent")
def restart_agent(call: Call, host: str) -> None:
    """Restart the host's xapi a second after answering (``xe-toolstack-restart``): its address goes
    away for a moment, its sessions end (on the master: every session and task), HA carries on."""
    rec = _host(call, host)
    uuid = str(rec["uuid"])
    if not call.daemon.hw.is_running(uuid):
        raise ApiError("HOST_OFFLINE", host)  # message_forwarding.ml cannot reach it
    timer = threading.Timer(RESTART_AGENT_DELAY, call.daemon.hw.toolstack.restart, args=(uuid, "host.restart_agent"))
    timer.daemon = True
    timer.start()


@handler("host.is_in_emergency_mode")
def is_in_emergency_mode(call: Call) -> bool:
    """True iff the host this call was sent to is in emergency mode (its HA start-up failed)."""
    return call.daemon.ha.emergency_error(call.host) is not None


@handler("host.get_servertime")
def get_servertime(call: Call, host: str) -> str:
    _host(call, host)
    return now_iso()


@handler("host.get_management_interface")
def get_management_interface(call: Call, host: str) -> str:
    _host(call, host)
    for pif in call.store.referrers("PIF", "host", host):
        rec = call.store.get("PIF", pif)
        if rec and rec["management"]:
            return pif
    raise ApiError("INTERNAL_ERROR", "host has no management interface")



# -- calls clients make of any host (xapi_host.ml, xapi_plugins.ml) ---------------------------------------


@handler("host.compute_free_memory")
def compute_free_memory(call: Call, host: str) -> int:
    """Free memory with every resident VM ballooned down (``host_compute_free_memory_with_maximum_compression``)."""
    _host(call, host)
    return _free_memory(call, host)


@handler("host.compute_memory_overhead")
def compute_memory_overhead(call: Call, host: str) -> int:
    return int(_host(call, host)["memory_overhead"] or 0)


@handler("host.call_plugin")
def call_plugin(call: Call, host: str, plugin: str, fn: str, args: dict[str, str]) -> str:
    """The emulated hosts ship no dom0 plugins: ``XENAPI_MISSING_PLUGIN [plugin]``, as xapi for an unknown one."""
    _host(call, host)
    raise ApiError("XENAPI_MISSING_PLUGIN", plugin)


@handler("host.has_extension")
def has_extension(call: Call, host: str, name: str) -> bool:
    _host(call, host)
    return False


@handler("host.get_server_certificate")
def get_server_certificate(call: Call, host: str) -> str:
    """The PEM certificate the host serves TLS with (``certificates.ml``); see :mod:`xapid.certificates`."""
    rec = _host(call, host)
    daemon = call.daemon
    return server_certificate(daemon.hw.host_dir(rec["uuid"]), str(rec["hostname"] or rec["name_label"]),
                              daemon.tls_cert)


# -- performance data sources (xapi_host.ml get/record/query/forget_data_source*) ----------------------------
# Answered from the emulated metrics (xapid/hw/metrics.py), the same numbers /rrd_updates serves.


def _host_metrics(call: Call, host: str) -> tuple[str, list[Any]]:
    rec = call.store.get("host", host)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    if not call.daemon.hw.is_running(rec["uuid"]):
        raise ApiError("HOST_OFFLINE", host)  # its rrdd cannot be reached (message_forwarding)
    found = call.daemon.metrics.host_sources(host)
    assert found is not None
    return found


@handler("host.get_data_sources")
def get_data_sources(call: Call, host: str) -> list[dict[str, object]]:
    uuid, sources = _host_metrics(call, host)
    return [data_source_record(ds, on) for ds, on in call.daemon.metrics.possible(uuid, sources)]


@handler("host.record_data_source")
def record_data_source(call: Call, host: str, data_source: str) -> None:
    uuid, sources = _host_metrics(call, host)
    if not call.daemon.metrics.record(uuid, data_source, sources):
        raise ApiError("INTERNAL_ERROR", missing_data_source(data_source))


@handler("host.query_data_source")
def query_data_source(call: Call, host: str, data_source: str) -> float:
    _host_metrics(call, host)
    rrd = call.daemon.metrics.host_rrd(host)
    assert rrd is not None
    try:
        return rrd.latest(data_source)
    except KeyError:
        raise ApiError("INTERNAL_ERROR", invalid_data_source(data_source)) from None


@handler("host.forget_data_source_archives")
def forget_data_source_archives(call: Call, host: str, data_source: str) -> None:
    uuid, sources = _host_metrics(call, host)
    call.daemon.metrics.forget(uuid, data_source, sources)
