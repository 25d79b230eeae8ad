"""VM: creation with its metrics object, and the power-state machine."""

from __future__ import annotations

from typing import Any

from xapid import generic
from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.store import Transaction
from xapid.timeutil import now_iso

RESTART_PRIORITIES = ("restart", "best-effort", "")


def _vm(tx: Transaction, vm: str, operation: str) -> dict[str, Any]:
    rec = tx.get("VM", vm)
    if rec["is_a_template"]:
        raise ApiError("VM_IS_TEMPLATE", vm, operation)
    if rec["is_control_domain"]:
        raise ApiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on the control domain")
    return rec


def _expect(vm: str, rec: dict[str, Any], *states: str) -> None:
    if rec["power_state"] not in states:
        raise ApiError("VM_BAD_POWER_STATE", vm, ";".join(s.lower() for s in states), rec["power_state"].lower())


def _live(tx: Transaction, host: str) -> bool:
    h = tx.get("host", host)
    metrics = tx.read("host_metrics", h["metrics"])
    return bool(metrics and metrics["live"]) and bool(h["enabled"])


def _run_on(tx: Transaction, vm: str, rec: dict[str, Any], host: str) -> None:
    domid = max([r["domid"] for _ref, r in tx.items("VM")] + [0]) + 1
    rec.update(power_state="Running", resident_on=host, domid=domid, scheduled_to_be_resident_on=NULL_REF)
    if rec["ha_restart_priority"] == "restart":
        rec["ha_always_run"] = True
    metrics = tx.find("VM_metrics", rec["metrics"])
    if metrics is not None:
        metrics.update(start_time=now_iso(), last_updated=now_iso(), state=["running"])


def _halt(tx: Transaction, vm: str, rec: dict[str, Any]) -> None:
    rec.update(power_state="Halted", resident_on=NULL_REF, domid=-1, ha_always_run=False)
    for vbd in tx.referrers("VBD", "VM", vm):
        tx.update("VBD", vbd, currently_attached=False)


@handler("VM.create")
def create(call: Call, args: dict[str, Any]) -> str:
    cdef = call.daemon.schema.classes["VM"]
    values = generic.create_values(call, cdef, args, call.daemon.dispatcher.coerce)
    if values.get("ha_restart_priority", "") not in RESTART_PRIORITIES:
        raise ApiError("INVALID_VALUE", "ha_restart_priority", values["ha_restart_priority"])
    with call.store.transaction() as tx:
        generic.check_refs(tx, cdef.fields, values)
        metrics = tx.create("VM_metrics", {"memory_actual": values.get("memory_dynamic_max", 0),
                                           "VCPUs_number": values.get("VCPUs_at_startup", 0),
                                           "install_time": now_iso(), "last_updated": now_iso()})
        values.update(metrics=metrics, power_state="Halted", domid=-1, resident_on=NULL_REF)
        return tx.create("VM", values)


@handler("VM.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VM", self)
        if rec["is_control_domain"]:
            raise ApiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on the control domain")
        if rec["power_state"] != "Halted":
            raise ApiError("VM_BAD_POWER_STATE", self, "halted", rec["power_state"].lower())
        for vbd in tx.referrers("VBD", "VM", self):
            tx.delete("VBD", vbd)
        for vif in tx.referrers("VIF", "VM", self):
            tx.delete("VIF", vif)
        if tx.read("VM_metrics", rec["metrics"]) is not None:
            tx.delete("VM_metrics", rec["metrics"])
        tx.delete("VM", self)


@handler("VM.start")
def start(call: Call, vm: str, start_paused: bool, force: bool) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "start")
        _expect(vm, rec, "Halted")
        candidates = [rec["affinity"]] if rec["affinity"] != NULL_REF else []
        candidates += [call.daemon.master_ref()] + tx.refs("host")
        host = next((h for h in candidates if tx.read("host", h) is not None and _live(tx, h)), None)
        if host is None:
            raise ApiError("HOST_OFFLINE", candidates[0] if candidates else NULL_REF)
        _run_on(tx, vm, rec, host)
        if start_paused:
            rec["power_state"] = "Paused"


@handler("VM.start_on")
def start_on(call: Call, vm: str, host: str, start_paused: bool, force: bool) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "start_on")
        _expect(vm, rec, "Halted")
        if not _live(tx, host):
            raise ApiError("HOST_OFFLINE", host)
        _run_on(tx, vm, rec, host)
        if start_paused:
            rec["power_state"] = "Paused"


@handler("VM.clean_shutdown", "VM.shutdown")
def clean_shutdown(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "clean_shutdown")
        _expect(vm, rec, "Running")
        _halt(tx, vm, rec)


@handler("VM.hard_shutdown")
def hard_shutdown(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "hard_shutdown")
        _expect(vm, rec, "Running", "Paused", "Suspended")
        _halt(tx, vm, rec)


@handler("VM.clean_reboot")
def clean_reboot(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "clean_reboot")
        _expect(vm, rec, "Running")
        _run_on(tx, vm, rec, rec["resident_on"])


@handler("VM.hard_reboot")
def hard_reboot(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "hard_reboot")
        _expect(vm, rec, "Running", "Paused")
        _run_on(tx, vm, rec, rec["resident_on"])


@handler("VM.pause")
def pause(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "pause")
        _expect(vm, rec, "Running")
        rec["power_state"] = "Paused"


@handler("VM.unpause")
def unpause(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "unpause")
        _expect(vm, rec, "Paused")
        rec["power_state"] = "Running"


@handler("VM.set_ha_restart_priority")
def set_ha_restart_priority(call: Call, self: str, value: str) -> None:
    if value not in RESTART_PRIORITIES:
        raise ApiError("INVALID_VALUE", "ha_restart_priority", value)
    with call.store.transaction() as tx:
        rec = tx.get("VM", self)
        rec["ha_restart_priority"] = value
        if rec["power_state"] != "Halted":
            rec["ha_always_run"] = value == "restart"


@handler("VM.set_ha_always_run")
def set_ha_always_run(call: Call, self: str, value: bool) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VM", self)
        rec["ha_restart_priority"] = "restart" if value else ""
        rec["ha_always_run"] = value


@handler("VM.power_state_reset")
def power_state_reset(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        _halt(tx, vm, tx.get("VM", vm))


def reset_vm_to_halted(tx: Transaction, vm: str) -> None:
    """Force ``vm`` to Halted (interim; keeps ha_always_run so HA restarts it)."""
    rec = tx.get("VM", vm)
    always = rec["ha_always_run"]
    _halt(tx, vm, rec)
    rec["ha_always_run"] = always


def start_vm(daemon: Any, vm: str, host: str | None, paused: bool = False, force: bool = False) -> str:
    """Start ``vm`` on ``host`` (None: anywhere) as VM.start/start_on do (interim)."""
    with daemon.store.transaction() as tx:
        rec = _vm(tx, vm, "start")
        _expect(vm, rec, "Halted")
        candidates = [host] if host else ([rec["affinity"]] if rec["affinity"] != NULL_REF else [])
        if not host:
            candidates += [daemon.master_ref()] + tx.refs("host")
        chosen = next((h for h in candidates if tx.read("host", h) is not None and _live(tx, h)), None)
        if chosen is None:
            raise ApiError("HOST_OFFLINE", candidates[0] if candidates else NULL_REF)
        _run_on(tx, vm, rec, chosen)
        if paused:
            rec["power_state"] = "Paused"
        return chosen
