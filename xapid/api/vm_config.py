"""VM configuration: memory limits and VCPUs with xapi's constraint errors, device numbers, templates.

Behaviour from xapi's ``xapi_vm.ml`` (``set_memory_limits``, ``set_memory_dynamic_range``,
``set_memory_static_range``, ``set_VCPUs_max``, ``set_VCPUs_at_startup``, ``get_allowed_VBD_devices``,
``get_allowed_VIF_devices``), ``xapi_vm_memory_constraints.ml`` and ``message_forwarding.ml`` (each
setter first asserts its ``changing_*`` operation, which fixes the power states it accepts).
"""

from __future__ import annotations

from typing import Any

from xapid import operations
from xapid.api import Call, handler
from xapid.api.vm import account_host, disk_number
from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.store import Transaction
from xapid.timeutil import now_iso

MIB = 1024**2
VCPU_RULE = "VCPU values must satisfy: 0 < VCPUs_at_startup ≤ VCPUs_max"


# -- memory ---------------------------------------------------------------------------------------------


def assert_memory_valid(rec: dict[str, Any], static_min: int, dynamic_min: int, dynamic_max: int,
                        static_max: int) -> None:
    """``assert_valid_for_current_context``: ordered limits; pinned at static_max for a control domain or
    a nested-virt VM (``MEMORY_CONSTRAINT_VIOLATION_MAXPIN [reason]``)."""
    ordered = 0 <= static_min <= dynamic_min <= dynamic_max <= static_max
    reason = None
    if rec["is_control_domain"]:
        reason = "control domain"
    elif rec["platform"].get("nested-virt", "").lower() in ("1", "true"):
        reason = "nested virt"
    if reason is not None:
        if not (ordered and dynamic_min == dynamic_max == static_max):
            raise ApiError("MEMORY_CONSTRAINT_VIOLATION_MAXPIN", reason)
    elif not ordered:
        raise ApiError("MEMORY_CONSTRAINT_VIOLATION_ORDER")


def _memory(call: Call, vm: str, op: str, static_min: int | None = None, dynamic_min: int | None = None,
            dynamic_max: int | None = None, static_max: int | None = None, target: int | None = None) -> None:
    with call.store.transaction() as tx:
        rec = operations.assert_vm(tx, vm, op)
        values = {
            "memory_static_min": int(rec["memory_static_min"]) if static_min is None else static_min,
            "memory_dynamic_min": int(rec["memory_dynamic_min"]) if dynamic_min is None else dynamic_min,
            "memory_dynamic_max": int(rec["memory_dynamic_max"]) if dynamic_max is None else dynamic_max,
            "memory_static_max": int(rec["memory_static_max"]) if static_max is None else static_max,
        }
        assert_memory_valid(rec, values["memory_static_min"], values["memory_dynamic_min"],
                            values["memory_dynamic_max"], values["memory_static_max"])
        rec.update(values)
        if target is not None:
            rec["memory_target"] = target
        if rec["is_control_domain"] and rec["power_state"] == "Running" and op != "changing_dynamic_range":
            rec["requires_reboot"] = True
        if rec["power_state"] == "Running" and rec["resident_on"] != NULL_REF:
            account_host(tx, rec["resident_on"], vm)


@handler("VM.set_memory_limits")
def set_memory_limits(call: Call, self: str, static_min: int, static_max: int, dynamic_min: int,
                      dynamic_max: int) -> None:
    _memory(call, self, "changing_memory_limits", static_min, dynamic_min, dynamic_max, static_max, dynamic_min)


@handler("VM.set_memory")
def set_memory(call: Call, self: str, value: int) -> None:
    """All of static_max, dynamic_min and dynamic_max to ``value`` (xapi_vm.ml ``set_memory``)."""
    _memory(call, self, "changing_memory_limits", None, value, value, value, value)


@handler("VM.set_memory_static_range")
def set_memory_static_range(call: Call, self: str, min: int, max: int) -> None:  # noqa: A002
    _memory(call, self, "changing_static_range", static_min=min, static_max=max)


@handler("VM.set_memory_static_max")
def set_memory_static_max(call: Call, self: str, value: int) -> None:
    _memory(call, self, "changing_static_range", static_max=value)


@handler("VM.set_memory_static_min")
def set_memory_static_min(call: Call, self: str, value: int) -> None:
    _memory(call, self, "changing_static_range", static_min=value)


@handler("VM.set_memory_dynamic_range")
def set_memory_dynamic_range(call: Call, self: str, min: int, max: int) -> None:  # noqa: A002
    """Halted or Running; a running VM's share of its host is recomputed at once."""
    _memory(call, self, "changing_dynamic_range", dynamic_min=min, dynamic_max=max, target=min)


@handler("VM.set_memory_dynamic_max")
def set_memory_dynamic_max(call: Call, self: str, value: int) -> None:
    rec = _record(call, self)
    _memory(call, self, "changing_dynamic_range", dynamic_min=int(rec["memory_dynamic_min"]), dynamic_max=value,
            target=int(rec["memory_dynamic_min"]))


@handler("VM.set_memory_dynamic_min")
def set_memory_dynamic_min(call: Call, self: str, value: int) -> None:
    _memory(call, self, "changing_dynamic_range", dynamic_min=value, target=value)


@handler("VM.set_memory_target_live")
def set_memory_target_live(call: Call, self: str, target: int) -> None:
    _record(call, self)  # deprecated in xapi: accepted and ignored


@handler("VM.wait_memory_target_live")
def wait_memory_target_live(call: Call, self: str) -> None:
    _record(call, self)  # the emulated balloon driver reaches its target at once


@handler("VM.maximise_memory")
def maximise_memory(call: Call, self: str, total: int, approximate: bool) -> int:
    """The largest static_max whose start memory fits ``total``, rounded down to a MiB."""
    rec = _record(call, self)
    fit = max(0, int(total) - int(rec["memory_overhead"] or 0))
    return fit // MIB * MIB


@handler("VM.compute_memory_overhead")
def compute_memory_overhead(call: Call, vm: str) -> int:
    return int(_record(call, vm)["memory_overhead"] or 0)


# -- VCPUs ------------------------------------------------------------------------------------------------


def _is_dom0(rec: dict[str, Any]) -> bool:
    return bool(rec["is_control_domain"]) and int(rec["domid"]) == 0


@handler("VM.set_VCPUs_max")
def set_vcpus_max(call: Call, self: str, value: int) -> None:
    with call.store.transaction() as tx:
        rec = operations.assert_vm(tx, self, "changing_VCPUs")
        if _is_dom0(rec):
            raise ApiError("INTERNAL_ERROR", "set_VCPUs_max is not allowed on dom0")
        if value < 1 or value < int(rec["VCPUs_at_startup"]):
            raise ApiError("INVALID_VALUE", VCPU_RULE, value)
        rec["VCPUs_max"] = value
        if rec["is_control_domain"] and rec["power_state"] == "Running":
            rec["requires_reboot"] = True


@handler("VM.set_VCPUs_at_startup")
def set_vcpus_at_startup(call: Call, self: str, value: int) -> None:
    with call.store.transaction() as tx:
        rec = operations.assert_vm(tx, self, "changing_VCPUs")
        if _is_dom0(rec):
            raise ApiError("OPERATION_NOT_ALLOWED", "set_VCPUs_at_startup is not allowed on dom0")
        if value < 1 or value > int(rec["VCPUs_max"]):
            raise ApiError("INVALID_VALUE", VCPU_RULE, value)
        rec["VCPUs_at_startup"] = value


@handler("VM.set_VCPUs_number_live")
def set_vcpus_number_live(call: Call, self: str, nvcpu: int) -> None:
    """A running guest gets ``nvcpu`` VCPUs (1..VCPUs_max); HVM guests need the vcpu-hotplug feature."""
    with call.store.transaction() as tx:
        rec = operations.assert_vm(tx, self, "changing_VCPUs_live")
        if nvcpu < 1 or nvcpu > int(rec["VCPUs_max"]):
            raise ApiError("INVALID_VALUE", "nvcpu", nvcpu)
        metrics = tx.find("VM_metrics", rec["metrics"])
        if metrics is not None:
            metrics.update(VCPUs_number=nvcpu, last_updated=now_iso())


# -- devices ----------------------------------------------------------------------------------------------


def used_disks(tx: Transaction, vm: str) -> set[int]:
    """Disk numbers a VM's VBDs occupy, by their ``device`` or ``userdevice`` (``all_used_VBD_devices``)."""
    used: set[int] = set()
    for vbd in tx.referrers("VBD", "VM", vm):
        rec = tx.read("VBD", vbd)
        if rec is None:
            continue
        for name in (rec["device"], rec["userdevice"]):
            n = disk_number(str(name))
            if n is not None:
                used.add(n)
    return used


def allowed_vbd_devices(tx: Transaction, vm: str) -> list[str]:
    rec = tx.get("VM", vm)
    top = 255 if rec["is_control_domain"] else 254
    used = used_disks(tx, vm)
    return [str(n) for n in range(top + 1) if n not in used]


def allowed_vif_devices(tx: Transaction, vm: str) -> list[str]:
    tx.get("VM", vm)
    used = {str((tx.read("VIF", v) or {}).get("device")) for v in tx.referrers("VIF", "VM", vm)}
    return [str(n) for n in range(16) if str(n) not in used]


@handler("VM.get_allowed_VBD_devices")
def get_allowed_vbd_devices(call: Call, vm: str) -> list[str]:
    with call.store.transaction() as tx:
        return allowed_vbd_devices(tx, vm)


@handler("VM.get_allowed_VIF_devices")
def get_allowed_vif_devices(call: Call, vm: str) -> list[str]:
    with call.store.transaction() as tx:
        return allowed_vif_devices(tx, vm)


# -- operations and templates ---------------------------------------------------------------------------------


def _record(call: Call, vm: str) -> dict[str, Any]:
    rec = call.store.get("VM", vm)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "VM", vm)
    return rec


@handler("VM.assert_operation_valid")
def assert_operation_valid(call: Call, self: str, op: str) -> None:
    with call.store.transaction() as tx:
        operations.assert_vm(tx, self, op)


@handler("VM.update_allowed_operations")
def update_allowed_operations(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        tx.get("VM", self)  # taking the record for writing recomputes its lists at commit


@handler("VM.get_boot_record")
def get_boot_record(call: Call, self: str) -> dict[str, Any]:
    return call.store.render("VM", self, _record(call, self))


@handler("VM.set_is_a_template")
def set_is_a_template(call: Call, self: str, value: bool) -> None:
    """xapi_vm_helpers.ml: turning a VM into a template needs ``make_into_template`` (halted, not in an
    appliance) and no HA protection (``VM_IS_PROTECTED``); turning it back stamps its install time."""
    with call.store.transaction() as tx:
        rec = tx.get("VM", self)
        if value == rec["is_a_template"]:
            return
        if value:
            operations.assert_vm(tx, self, "make_into_template")
            pool = tx.read("pool", tx.refs("pool")[0]) or {}
            if pool.get("ha_enabled") and rec["ha_always_run"] and rec["ha_restart_priority"] == "restart":
                raise ApiError("VM_IS_PROTECTED", self)
            rec["ha_always_run"] = False
        else:
            metrics = tx.find("VM_metrics", rec["metrics"])
            if metrics is not None:
                metrics["install_time"] = now_iso()
            rec["is_default_template"] = False
        rec["is_a_template"] = value


@handler("VM.set_suspend_VDI")
def set_suspend_vdi(call: Call, self: str, value: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VM", self)
        if rec["power_state"] != "Suspended":
            raise ApiError("VM_BAD_POWER_STATE", self, "suspended", rec["power_state"].lower())
        if value != NULL_REF:
            tx.get("VDI", value)
        rec["suspend_VDI"] = value
