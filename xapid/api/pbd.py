"""PBD: creation with xapi's checks, plug and unplug."""

from __future__ import annotations

from typing import Any

from xapid import generic
from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.ha import stack
from xapid.storage import needs_clustering, sm_of
from xapid.store import Transaction


def plug(tx: Transaction, pbd: str) -> None:
    """Attach ``pbd`` inside ``tx`` (a no-op when attached), after the cluster-stack checks."""
    rec = tx.get("PBD", pbd)
    if rec["currently_attached"]:
        return
    sr = tx.get("SR", rec["SR"])
    assert_clustered_host(tx, rec["host"], sr["type"])
    stack.check_plug(tx, pbd)
    rec["currently_attached"] = True


def assert_clustered_host(tx: Transaction, host: str, sr_type: str) -> None:
    """xapi_clustering.ml assert_cluster_host_is_enabled_for_matching_sms, for drivers that need
    clustering (gfs2): the host's Cluster_host must be on a required stack (else
    ``NO_COMPATIBLE_CLUSTER_HOST [host]``), enabled (``CLUSTERING_DISABLED``) and quorate
    (``CLUSTER_HOST_NOT_JOINED``)."""
    if not needs_clustering(sr_type):
        return
    found = sm_of(tx, sr_type)
    required = list(found[1]["required_cluster_stack"]) if found is not None else []
    for ch in tx.referrers("Cluster_host", "host", host):
        rec = tx.read("Cluster_host", ch)
        cluster = tx.read("Cluster", rec["cluster"]) if rec is not None else None
        if rec is None or cluster is None or cluster["cluster_stack"] not in required:
            continue
        if not rec["enabled"]:
            raise ApiError("CLUSTERING_DISABLED", ch)
        if not cluster["is_quorate"]:
            raise ApiError("CLUSTER_HOST_NOT_JOINED", ch)
        return
    raise ApiError("NO_COMPATIBLE_CLUSTER_HOST", host)


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

