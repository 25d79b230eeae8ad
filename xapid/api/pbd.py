"""PBD: creation with xapi's checks, plug and unplug."""

from __future__ import annotations

from typing import Any

from xapid import generic
from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.ha import stack
from xapid.store import Transaction


def plug(tx: Transaction, pbd: str) -> None:
    """Attach ``pbd`` inside ``tx`` (a no-op when attached), after the cluster-stack checks."""
    rec = tx.get("PBD", pbd)
    if rec["currently_attached"]:
        return
    stack.check_plug(tx, pbd)
    rec["currently_attached"] = True


def in_use(tx: Transaction, pbd: str) -> None:
    """Refuse to detach storage that a running VM on that host or the HA statefile needs."""
    rec = tx.get("PBD", pbd)
    pool = tx.read("pool", tx.refs("pool")[0])
    assert pool is not None
    if pool["ha_enabled"]:
        for vdi in pool["ha_statefiles"]:
            vrec = tx.read("VDI", vdi)
            if vrec is not None and vrec["SR"] == rec["SR"]:
                raise ApiError("HA_IS_ENABLED")
    for vdi in tx.referrers("VDI", "SR", rec["SR"]):
        for vbd in tx.referrers("VBD", "VDI", vdi):
            vbd_rec = tx.read("VBD", vbd)
            vm = tx.read("VM", vbd_rec["VM"]) if vbd_rec else None
            if vm and vm["power_state"] != "Halted" and vm["resident_on"] == rec["host"]:
                raise ApiError("VDI_IN_USE", vdi, "unplug")


@handler("PBD.create")
def create(call: Call, args: dict[str, Any]) -> str:
    cdef = call.daemon.schema.classes["PBD"]
    values = generic.create_values(call, cdef, args, call.daemon.dispatcher.coerce)
    if "SRmaster" in values.get("device_config", {}):
        raise ApiError("VALUE_NOT_SUPPORTED", "SRmaster", values["device_config"]["SRmaster"],
                       "This key is for internal use only")
    with call.store.transaction() as tx:
        generic.check_refs(tx, cdef.fields, values)
        for ref, rec in tx.items("PBD"):
            if rec["SR"] == values["SR"] and rec["host"] == values["host"]:
                raise ApiError("PBD_EXISTS", values["SR"], values["host"], ref)
        values["currently_attached"] = False
        return tx.create("PBD", values)


@handler("PBD.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        if tx.get("PBD", self)["currently_attached"]:
            raise ApiError("OPERATION_NOT_ALLOWED", "PBD is currently attached")
        tx.delete("PBD", self)


@handler("PBD.plug")
def plug_call(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        plug(tx, self)


@handler("PBD.unplug")
def unplug(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("PBD", self)
        if not rec["currently_attached"]:
            return
        in_use(tx, self)
        rec["currently_attached"] = False

