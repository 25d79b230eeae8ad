"""VBD: creation with xapi's checks, plug/unplug on a running VM, CD insert/eject (xapi_vbd.ml).

The allowed operations and their refusals come from :mod:`xapid.operations` (``xapi_vbd_helpers.ml``).
"""

from __future__ import annotations

from typing import Any

from xapid import generic, operations
from xapid.api import Call, handler
from xapid.api.vm import device_name, disk_number
from xapid.api.vm_config import allowed_vbd_devices, used_disks
from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.store import Transaction

ATTACHABLE_VDI_TYPES = ("system", "user", "ephemeral", "suspend", "crashdump", "metadata", "rrd", "pvs_cache")


def valid_device(device: str, vbd_type: str) -> bool:
    """``valid_device``: ``autodetect``, a device name (xvdb, hda, sdc...) or a number."""
    if device == "autodetect" or (not device.isdigit() and disk_number(device) is not None):
        return True
    return vbd_type != "Floppy" and device.isdigit()


def assert_agile_storage(tx: Transaction, vm: str, vdi: str) -> None:
    """A protected VM may not gain a disk on an SR that is not properly shared (xapi_vbd_helpers.ml)."""
    pool = tx.read("pool", tx.refs("pool")[0]) or {}
    rec = tx.get("VM", vm)
    if not pool.get("ha_enabled") or pool.get("ha_allow_overcommit"):
        return
    if not (rec["ha_always_run"] or rec["ha_restart_priority"] == "restart"):
        return
    sr = tx.get("VDI", vdi)["SR"]
    sr_rec = tx.get("SR", sr)
    attached = {(tx.read("PBD", p) or {}).get("host") for p in tx.referrers("PBD", "SR", sr)
                if (tx.read("PBD", p) or {}).get("currently_attached")}
    if not sr_rec["shared"] or any(h not in attached for h in tx.refs("host")):
        raise ApiError("HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", sr)


@handler("VBD.create")
def create(call: Call, args: dict[str, Any]) -> str:
    cdef = call.daemon.schema.classes["VBD"]
    values = generic.create_values(call, cdef, args, call.daemon.dispatcher.coerce)
    with call.store.transaction() as tx:
        return create_vbd(tx, values)


def create_vbd(tx: Transaction, values: dict[str, Any]) -> str:
    """``VBD.create``'s checks and record inside ``tx`` (``values`` already coerced); the new ref."""
    vm = values["VM"]
    vm_rec = tx.get("VM", vm)
    empty = bool(values["empty"])
    vdi = values.get("VDI", NULL_REF)
    if not empty:
        vdi_rec = tx.get("VDI", vdi)
        if vdi_rec["type"] not in ATTACHABLE_VDI_TYPES:
            raise ApiError("VDI_INCOMPATIBLE_TYPE", vdi, vdi_rec["type"])
    elif vdi != NULL_REF:
        tx.get("VDI", vdi)
    vbd_type, mode = values["type"], values["mode"]
    if vbd_type == "CD" and mode != "RO":
        raise ApiError("VBD_CDS_MUST_BE_READONLY")
    if vbd_type != "CD" and empty:
        raise ApiError("VBD_NOT_REMOVABLE_MEDIA", "in constructor")
    if mode == "RW" and not empty and tx.get("VDI", vdi)["read_only"]:
        raise ApiError("VDI_READONLY", vdi)
    for op_ref, op in sorted(vm_rec["current_operations"].items(), key=lambda item: item[1]):
        if op in ("migrate_send", "pool_migrate"):
            raise ApiError("OTHER_OPERATION_IN_PROGRESS", "VM", vm, op, op_ref)
    userdevice = str(values["userdevice"])
    if not valid_device(userdevice, vbd_type):
        raise ApiError("INVALID_DEVICE", userdevice)
    if userdevice == "autodetect":
        free = allowed_vbd_devices(tx, vm)
        if not free:
            raise ApiError("INVALID_DEVICE", userdevice)
        userdevice = free[0]
    wanted = disk_number(userdevice)
    if wanted is not None and wanted in used_disks(tx, vm):
        raise ApiError("DEVICE_ALREADY_EXISTS", userdevice)
    if not empty:
        assert_agile_storage(tx, vm, vdi)
    suspended = vm_rec["power_state"] == "Suspended"
    values.update(userdevice=userdevice, VDI=vdi if not empty else NULL_REF,
                  device=values.get("device", "") if suspended else "",
                  currently_attached=bool(values.get("currently_attached")) if suspended else False)
    if not empty:
        backend = tx.get("VDI", vdi)["sm_config"].get("backend-kind")
        if backend is not None:
            values["other_config"] = {"backend-kind": backend, **values.get("other_config", {})}
    return tx.create("VBD", values)


@handler("VBD.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VBD", self)
        if rec["currently_attached"]:
            vm = tx.read("VM", rec["VM"]) or {}
            raise ApiError("OPERATION_NOT_ALLOWED", f"VBD '{rec['uuid']}' still attached to '{vm.get('uuid', '')}'")
        tx.delete("VBD", self)


@handler("VBD.plug")
def plug(call: Call, self: str) -> None:
    """Hot-plug into the running VM: the VBD gets its device name and is attached."""
    with call.store.transaction() as tx:
        plug_vbd(tx, self)


def plug_vbd(tx: Transaction, self: str) -> None:
    """``VBD.plug``'s checks and change inside ``tx``."""
    rec = operations.assert_vbd(tx, self, "plug")
    vm = tx.get("VM", rec["VM"])
    metrics = tx.read("VM_metrics", vm["metrics"]) or {}
    if metrics.get("current_domain_type") == "hvm" and rec["type"] != "CD" and rec["mode"] == "RO":
        raise ApiError("DISK_VBD_MUST_BE_READWRITE_FOR_HVM", self)
    rec.update(currently_attached=True, device=device_name(str(rec["userdevice"])))


def _unplug(call: Call, vbd: str, op: str) -> None:
    with call.store.transaction() as tx:
        rec = operations.assert_vbd(tx, vbd, op)
        rec["currently_attached"] = False


@handler("VBD.unplug")
def unplug(call: Call, self: str) -> None:
    _unplug(call, self, "unplug")


@handler("VBD.unplug_force")
def unplug_force(call: Call, self: str) -> None:
    _unplug(call, self, "unplug_force")


@handler("VBD.insert")
def insert(call: Call, vbd: str, vdi: str) -> None:
    """Put ``vdi`` into the empty CD drive (halted or running VM)."""
    with call.store.transaction() as tx:
        rec = tx.get("VBD", vbd)
        vdi_rec = tx.get("VDI", vdi)
        rec = operations.assert_vbd(tx, vbd, "insert")
        if not vdi_rec["managed"]:
            raise ApiError("VDI_NOT_MANAGED", vdi)
        assert_agile_storage(tx, rec["VM"], vdi)
        rec.update(VDI=vdi, empty=False)


@handler("VBD.eject")
def eject(call: Call, vbd: str) -> None:
    with call.store.transaction() as tx:
        rec = operations.assert_vbd(tx, vbd, "eject")
        rec.update(VDI=NULL_REF, empty=True)


@handler("VBD.assert_attachable")
def assert_attachable(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        operations.assert_vbd(tx, self, "attach")


@handler("VBD.set_mode")
def set_mode(call: Call, self: str, value: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VBD", self)
        vm = tx.get("VM", rec["VM"])
        if vm["power_state"] != "Halted":
            raise ApiError("VM_BAD_POWER_STATE", rec["VM"], "halted", vm["power_state"].lower())
        rec["mode"] = value
