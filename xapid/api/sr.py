"""SR: create (with its PBDs, plugged), introduce, forget and destroy."""

from __future__ import annotations

from xapid.api import Call, handler
from xapid.api.pbd import assert_clustered_host, plug
from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.storage import plain_name, sm_of
from xapid.store import Transaction


@handler("SR.create")
def create(call: Call, host: str, device_config: dict[str, str], physical_size: int, name_label: str,
           name_description: str, type: str, content_type: str, shared: bool, sm_config: dict[str, str]) -> str:
    with call.store.transaction() as tx:
        tx.get("host", host)
        if sm_of(tx, type) is None:
            raise ApiError("SR_UNKNOWN_DRIVER", type)
        if physical_size < 0:
            raise ApiError("INVALID_VALUE", "physical_size", physical_size)
        assert_clustered_host(tx, host, type)  # xapi_sr.ml create: before anything is made
        sr = tx.create("SR", {
            "name_label": name_label, "name_description": name_description, "type": type,
            "content_type": content_type, "shared": shared, "sm_config": sm_config,
            "physical_size": physical_size, "physical_utilisation": 0, "virtual_allocation": 0,
            "allowed_operations": ["scan", "destroy", "forget", "plug", "unplug", "update", "vdi_create",
                                   "vdi_destroy", "vdi_introduce", "pbd_create", "pbd_destroy"],
        })
        hosts = tx.refs("host") if shared else [host]
        for h in hosts:
            pbd = tx.create("PBD", {"host": h, "SR": sr, "device_config": device_config,
                                    "currently_attached": False})
            plug(tx, pbd)
        call.daemon.disks.make_sr_dir(tx.get("SR", sr)["uuid"])
        return sr


@handler("SR.introduce")
def introduce(call: Call, uuid: str, name_label: str, name_description: str, type: str, content_type: str,
              shared: bool, sm_config: dict[str, str]) -> str:
    # The uuid names the SR's folder under the state dir: nothing that could leave it ("" = a fresh one).
    if uuid and not plain_name(uuid):
        raise ApiError("INVALID_VALUE", "uuid", uuid)
    with call.store.transaction() as tx:
        if tx.by_uuid("SR", uuid) is not None:
            raise ApiError("INVALID_VALUE", "uuid", uuid)
        return tx.create("SR", {"uuid": uuid, "name_label": name_label, "name_description": name_description,
                                "type": type, "content_type": content_type, "shared": shared,
                                "sm_config": sm_config})


def _remove(call: Call, tx: Transaction, sr: str) -> str:
    rec = tx.get("SR", sr)
    pbds = tx.referrers("PBD", "SR", sr)
    if any(tx.get("PBD", p)["currently_attached"] for p in pbds):
        raise ApiError("SR_HAS_PBD", sr)
    pool = tx.read("pool", tx.refs("pool")[0])
    assert pool is not None
    for vdi in tx.referrers("VDI", "SR", sr):
        if pool["ha_enabled"] and vdi in pool["ha_statefiles"]:
            raise ApiError("HA_IS_ENABLED")
        for vbd in tx.referrers("VBD", "VDI", vdi):
            tx.update("VBD", vbd, VDI=NULL_REF, empty=True)
        tx.delete("VDI", vdi)
    for p in pbds:
        tx.delete("PBD", p)
    for ref, prec in tx.items("pool"):
        for field in ("default_SR", "suspend_image_SR", "crash_dump_SR"):
            if prec[field] == sr:
                tx.update("pool", ref, **{field: NULL_REF})
    # No dangling references to the SR (xapi_sr.ml destroy/forget).
    for ref, hrec in tx.items("host"):
        for field in ("suspend_image_sr", "crash_dump_sr", "local_cache_sr"):
            if hrec[field] == sr:
                tx.update("host", ref, **{field: NULL_REF})
    for ref, vrec in tx.items("VM"):
        if vrec["suspend_SR"] == sr:
            tx.update("VM", ref, suspend_SR=NULL_REF)
    tx.delete("SR", sr)
    return str(rec["uuid"])


@handler("SR.forget")
def forget(call: Call, sr: str) -> None:
    with call.store.transaction() as tx:
        _remove(call, tx, sr)


@handler("SR.destroy")
def destroy(call: Call, sr: str) -> None:
    with call.store.transaction() as tx:
        uuid = _remove(call, tx, sr)
    call.daemon.disks.remove_sr(uuid)


@handler("SR.get_supported_types")
def get_supported_types(call: Call) -> list[str]:
    return sorted(rec["type"] for _r, rec in call.store.items("SM"))


@handler("SR.scan", "SR.update")
def scan(call: Call, sr: str) -> None:
    if call.store.get("SR", sr) is None:
        raise ApiError("HANDLE_INVALID", "SR", sr)


@handler("SR.assert_can_host_ha_statefile")
def assert_can_host_ha_statefile(call: Call, sr: str) -> None:
    """The statefile checks of pool.enable_ha (ha.md 4.1 step 12, 5.2) against the stack chosen now."""
    ha = call.daemon.ha
    with call.store.transaction() as tx:
        tx.get("SR", sr)
        chosen = ha._choose_stack(tx, call.daemon.master_ref(), "")
        ha._assert_statefile_sr(tx, sr, chosen)
