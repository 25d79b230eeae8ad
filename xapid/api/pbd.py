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
    # xapi_pbd.ml get_active_vdis_by_pbd: every non-metadata VDI of the SR attached to a VM resident on the host.
    active: list[str] = []
    for vm in tx.referrers("VM", "resident_on", rec["host"]):
        for vbd in tx.referrers("VBD", "VM", vm):
            vbd_rec = tx.read("VBD", vbd)
            if vbd_rec is None or vbd_rec["empty"] or not vbd_rec["currently_attached"]:
                continue
            vdi = tx.read("VDI", vbd_rec["VDI"])
            if vdi is not None and vdi["SR"] == rec["SR"] and vdi["type"] != "metadata" \
                    and vbd_rec["VDI"] not in active:
                active.append(vbd_rec["VDI"])
    if active:
        raise ApiError("VDI_IN_USE", *active)


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

