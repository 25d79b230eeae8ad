"""VDI: each VDI is a real sparse file in its SR's folder (xapi_vdi.ml).

Copies, clones and snapshots write a new file (clones and snapshots share blocks by reflink where
the filesystem can, else they are full sparse copies); the bytes are copied before the record is
committed, outside the store lock, and a failed call leaves no file behind.  ``physical_utilisation``
is what the file really occupies, ``SR.virtual_allocation`` the sum of its VDIs' virtual sizes and
``SR.physical_utilisation`` the sum of their real occupation.
"""

from __future__ import annotations

from typing import Any

from xapid import cbtlog, generic, operations
from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.storage import Disks, plain_name
from xapid.store import Transaction, new_uuid
from xapid.timeutil import now_iso

# Fields a copy, clone or snapshot takes from its source (xapi's SM layer copies the VDI's metadata).
COPIED = ("name_label", "name_description", "type", "sharable", "read_only", "other_config", "xenstore_data",
          "virtual_size", "on_boot", "allow_caching", "metadata_of_pool", "tags")


def file_of(rec: dict[str, Any]) -> str:
    """The name of the VDI's file in its SR's folder (its location; the uuid for xapid's own VDIs)."""
    return str(rec["location"] or rec["uuid"])


def account(tx: Transaction, sr: str) -> None:
    """Recompute the SR's allocation figures from its VDIs."""
    vdis = [tx.get("VDI", v) for v in tx.referrers("VDI", "SR", sr)]
    tx.update("SR", sr, virtual_allocation=sum(int(v["virtual_size"]) for v in vdis),
              physical_utilisation=sum(int(v["physical_utilisation"]) for v in vdis))


def create_vdi(disks: Disks, tx: Transaction, values: dict[str, Any]) -> str:
    """Insert a VDI record and its backing file inside ``tx``."""
    sr = tx.get("SR", values["SR"])
    if values.get("virtual_size", 0) < 0:
        raise ApiError("INVALID_VALUE", "virtual_size", values["virtual_size"])
    ref = tx.create("VDI", values)
    rec = tx.get("VDI", ref)
    rec["location"] = rec["uuid"]
    rec["managed"] = True  # xapi's VDI.create: a VDI the SR manages (VBDs refuse unmanaged ones)
    disks.create_vdi(sr["uuid"], rec["uuid"], rec["virtual_size"])
    rec["physical_utilisation"] = disks.allocated(sr["uuid"], rec["uuid"])
    account(tx, values["SR"])
    return ref


@handler("VDI.create")
def create(call: Call, args: dict[str, Any]) -> str:
    cdef = call.daemon.schema.classes["VDI"]
    values = generic.create_values(call, cdef, args, call.daemon.dispatcher.coerce)
    with call.store.transaction() as tx:
        generic.check_refs(tx, cdef.fields, values)
        return create_vdi(call.daemon.disks, tx, values)


def remove_vdi(tx: Transaction, vdi: str) -> tuple[str, str]:
    """Delete the VDI record, its VBDs and suspend references inside ``tx``; return (sr uuid, vdi uuid)
    of the file the caller removes after the commit."""
    rec = tx.get("VDI", vdi)
    sr_uuid = tx.get("SR", rec["SR"])["uuid"]
    vbds = tx.referrers("VBD", "VDI", vdi)
    tx.delete("VDI", vdi)
    # As xapi: the VDI's VBDs go at once, and a VM suspended onto it forgets it.
    for vbd in vbds:
        tx.delete("VBD", vbd)
    for vm, vm_rec in tx.items("VM"):
        if vm_rec["suspend_VDI"] == vdi:
            tx.update("VM", vm, suspend_VDI=NULL_REF)
    account(tx, rec["SR"])
    return str(sr_uuid), file_of(rec)


@handler("VDI.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VDI", self)
        pool = tx.read("pool", tx.refs("pool")[0])
        assert pool is not None
        if pool["ha_enabled"] and (self in pool["ha_statefiles"] or rec["type"] in ("redo_log", "ha_statefile")):
            raise ApiError("HA_IS_ENABLED")
        operations.assert_vdi(tx, self, "destroy")
        files = remove_vdi(tx, self)
    call.daemon.disks.remove_vdi(*files)


@handler("VDI.forget")
def forget(call: Call, vdi: str) -> None:
    """The record goes, the file stays (xapi_vdi.ml ``forget``: database only)."""
    with call.store.transaction() as tx:
        operations.assert_vdi(tx, vdi, "forget")
        rec = tx.get("VDI", vdi)
        for vbd in tx.referrers("VBD", "VDI", vdi):
            tx.delete("VBD", vbd)
        tx.delete("VDI", vdi)
        account(tx, rec["SR"])


# -- copies ----------------------------------------------------------------------------------------------


def duplicate(call: Call, vdi: str, kind: str, sr: str | None = None, name: str | None = None) -> str:
    """A new VDI with the bytes of ``vdi``: ``kind`` is ``clone``, ``snapshot`` or ``copy`` (to ``sr``).

    The file is written first; the record is committed after, with ``snapshot_of``/``is_a_snapshot``/
    ``snapshot_time`` for a snapshot.  Refuses what xapi refuses (``assert_operation_valid``).
    """
    disks = call.daemon.disks
    with call.store.transaction() as tx:
        src = dict(operations.assert_vdi(tx, vdi, kind))
        src_sr = tx.get("SR", src["SR"])
        target = sr if sr is not None else src["SR"]
        dst_sr = tx.get("SR", target)
        if kind == "copy" and dst_sr["content_type"] == "iso" and src_sr["content_type"] != "iso":
            raise ApiError("OPERATION_NOT_ALLOWED", "Cannot copy a VDI to an ISO SR")
    uuid = new_uuid()
    disks.copy_vdi((src_sr["uuid"], file_of(src)), (dst_sr["uuid"], uuid), int(src["virtual_size"]),
                   share=kind != "copy")
    if kind == "snapshot" and src["cbt_enabled"]:
        # The snapshot keeps the log of what changed up to now; the VDI starts the next one.
        cbtlog.close_for_snapshot(disks.cbt_log(src_sr["uuid"], file_of(src)), disks.cbt_log(dst_sr["uuid"], uuid))
    try:
        with call.store.transaction() as tx:
            tx.get("SR", target)
            values = {k: src[k] for k in COPIED}
            values.update(uuid=uuid, SR=target, location=uuid, managed=True, missing=False,
                          sm_config={k: v for k, v in src["sm_config"].items() if k in ("type", "vdi_type")},
                          physical_utilisation=disks.allocated(dst_sr["uuid"], uuid))
            if name is not None:
                values["name_label"] = name
            if kind == "snapshot":
                values.update(is_a_snapshot=True, snapshot_of=vdi, snapshot_time=now_iso(),
                              cbt_enabled=bool(src["cbt_enabled"]))
            ref = tx.create("VDI", values)
            account(tx, target)
            return ref
    except BaseException:
        disks.remove_vdi(dst_sr["uuid"], uuid)
        raise


@handler("VDI.clone")
def clone(call: Call, vdi: str, driver_params: dict[str, str]) -> str:
    return duplicate(call, vdi, "clone")


@handler("VDI.snapshot")
def snapshot(call: Call, vdi: str, driver_params: dict[str, str]) -> str:
    return duplicate(call, vdi, "snapshot")


@handler("VDI.copy")
def copy(call: Call, vdi: str, sr: str, base_vdi: str, into_vdi: str) -> str:
    """A full copy to ``sr``; with ``into_vdi`` the bytes go into that existing VDI (xapi_vdi.ml copy)."""
    if into_vdi == NULL_REF:
        if call.store.get("SR", sr) is None:
            raise ApiError("HANDLE_INVALID", "SR", sr)
        return duplicate(call, vdi, "copy", sr)
    disks = call.daemon.disks
    with call.store.transaction() as tx:
        src = dict(operations.assert_vdi(tx, vdi, "copy"))
        dst = dict(tx.get("VDI", into_vdi))
        if int(dst["virtual_size"]) < int(src["virtual_size"]):
            raise ApiError("VDI_TOO_SMALL", into_vdi, src["virtual_size"])
        src_sr, dst_sr = tx.get("SR", src["SR"])["uuid"], tx.get("SR", dst["SR"])["uuid"]
    disks.copy_vdi((src_sr, file_of(src)), (dst_sr, file_of(dst)), int(dst["virtual_size"]))
    with call.store.transaction() as tx:
        tx.update("VDI", into_vdi, physical_utilisation=disks.allocated(dst_sr, file_of(dst)))
        account(tx, dst["SR"])
    return into_vdi


# -- size ---------------------------------------------------------------------------------------------------


def _resize(call: Call, vdi: str, size: int, op: str) -> None:
    disks = call.daemon.disks
    with call.store.transaction() as tx:
        rec = operations.assert_vdi(tx, vdi, op)
        if size < 0:
            raise ApiError("INVALID_VALUE", "size", size)
        if size < int(rec["virtual_size"]):
            # The file-based drivers cannot shrink a disk (SM's VDISize error).
            raise ApiError("SR_BACKEND_FAILURE_79", "", "VDI Invalid size", "shrinking not allowed")
        sr = tx.get("SR", rec["SR"])
        if size - int(rec["virtual_size"]) > int(sr["physical_size"]) - int(sr["virtual_allocation"]) \
                and sr["type"] not in ("ext", "nfs", "file"):
            raise ApiError("SR_FULL", size, sr["physical_size"])
        disks.resize_vdi(sr["uuid"], file_of(rec), size)
        rec["virtual_size"] = size
        rec["physical_utilisation"] = disks.allocated(sr["uuid"], file_of(rec))
        account(tx, rec["SR"])


@handler("VDI.resize")
def resize(call: Call, vdi: str, size: int) -> None:
    _resize(call, vdi, size, "resize")


# -- records without storage work ---------------------------------------------------------------------------


@handler("VDI.introduce")
def introduce(call: Call, uuid: str, name_label: str, name_description: str, SR: str, type: str,  # noqa: N803
              sharable: bool, read_only: bool, other_config: dict[str, str], location: str,
              xenstore_data: dict[str, str], sm_config: dict[str, str], managed: bool, virtual_size: int,
              physical_utilisation: int, metadata_of_pool: str, is_a_snapshot: bool, snapshot_time: str,
              snapshot_of: str) -> str:
    """A record for a file already in the SR's folder (``location`` is its uuid-named file); the
    uuid must be new (``UUID_INVALID``) and the location unique in the SR (``LOCATION_NOT_UNIQUE``)."""
    disks = call.daemon.disks
    with call.store.transaction() as tx:
        sr = tx.get("SR", SR)
        location = location or uuid
        if not plain_name(location):
            raise ApiError("INVALID_VALUE", "location", location)
        for _ref, rec in tx.items("VDI"):
            if rec["SR"] == SR and rec["location"] == location:
                raise ApiError("LOCATION_NOT_UNIQUE", SR, location)
        uuid = uuid or new_uuid()
        if tx.by_uuid("VDI", uuid) is not None:
            raise ApiError("UUID_INVALID", "VDI", uuid)
        path = disks.vdi_path(sr["uuid"], location)
        if not path.is_file():
            raise ApiError("VDI_MISSING", SR, location)
        ref = tx.create("VDI", {
            "uuid": uuid, "name_label": name_label, "name_description": name_description, "SR": SR, "type": type,
            "sharable": sharable, "read_only": read_only, "other_config": other_config, "location": location,
            "xenstore_data": xenstore_data, "sm_config": sm_config, "managed": managed,
            "virtual_size": path.stat().st_size, "physical_utilisation": disks.allocated(sr["uuid"], location),
            "metadata_of_pool": metadata_of_pool, "is_a_snapshot": is_a_snapshot, "snapshot_time": snapshot_time,
            "snapshot_of": snapshot_of,
        })
        account(tx, SR)
        return ref


@handler("VDI.update")
def update(call: Call, vdi: str) -> None:
    disks = call.daemon.disks
    with call.store.transaction() as tx:
        rec = operations.assert_vdi(tx, vdi, "update")
        sr = tx.get("SR", rec["SR"])
        rec["physical_utilisation"] = disks.allocated(sr["uuid"], file_of(rec))
        account(tx, rec["SR"])
