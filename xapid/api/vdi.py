"""VDI: each VDI is a real sparse file in its SR's folder."""

from __future__ import annotations

from typing import Any

from xapid import generic
from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.storage import Disks
from xapid.store import Transaction


def account(tx: Transaction, sr: str) -> None:
    """Recompute the SR's allocation figures from its VDIs (thick accounting)."""
    total = sum(tx.get("VDI", v)["virtual_size"] for v in tx.referrers("VDI", "SR", sr))
    tx.update("SR", sr, virtual_allocation=total, physical_utilisation=total)


def create_vdi(disks: Disks, tx: Transaction, values: dict[str, Any]) -> str:
    """Insert a VDI record and its backing file inside ``tx``."""
    sr = tx.get("SR", values["SR"])
    if values.get("virtual_size", 0) < 0:
        raise ApiError("INVALID_VALUE", "virtual_size", values["virtual_size"])
    ref = tx.create("VDI", values)
    rec = tx.get("VDI", ref)
    rec["location"] = rec["uuid"]
    rec["physical_utilisation"] = rec["virtual_size"]
    rec["allowed_operations"] = ["clone", "copy", "resize", "snapshot", "destroy", "forget", "update"]
    disks.create_vdi(sr["uuid"], rec["uuid"], rec["virtual_size"])
    account(tx, values["SR"])
    return ref


@handler("VDI.create")
def create(call: Call, args: dict[str, Any]) -> str:
    cdef = call.daemon.schema.classes["VDI"]
    values = generic.create_values(call, cdef, args, call.daemon.dispatcher.coerce)
    with call.store.transaction() as tx:
        generic.check_refs(tx, cdef.fields, values)
        return create_vdi(call.daemon.disks, tx, values)


@handler("VDI.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VDI", self)
        pool = tx.read("pool", tx.refs("pool")[0])
        assert pool is not None
        if pool["ha_enabled"] and (self in pool["ha_statefiles"] or rec["type"] in ("redo_log", "ha_statefile")):
            raise ApiError("HA_IS_ENABLED")
        vbds = tx.referrers("VBD", "VDI", self)
        for vbd in vbds:
            if tx.get("VBD", vbd)["currently_attached"]:
                raise ApiError("VDI_IN_USE", self, "destroy")
        sr_uuid = tx.get("SR", rec["SR"])["uuid"]
        tx.delete("VDI", self)
        # As xapi: the VDI's VBDs go at once, and a VM suspended onto it forgets it.
        for vbd in vbds:
            tx.delete("VBD", vbd)
        for vm, vm_rec in tx.items("VM"):
            if vm_rec["suspend_VDI"] == self:
                tx.update("VM", vm, suspend_VDI=NULL_REF)
        account(tx, rec["SR"])
    call.daemon.disks.remove_vdi(sr_uuid, rec["uuid"])

