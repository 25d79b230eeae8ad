"""VDI: changed block tracking (xapi_vdi.ml enable_cbt, disable_cbt, data_destroy, list_changed_blocks).

The logs themselves are :mod:`xapid.cbtlog`.  What writes a VDI here is an HTTP import
(``/import_raw_vdi``, ``/import``): every block it writes or clears is logged, as a guest's
writes would be through tapdisk.  Refusals come from the VDI operation checks
(:func:`xapid.operations.vdi_error`): the SR must offer ``VDI_CONFIG_CBT``, a snapshot cannot
change its CBT setting, only a CBT-enabled snapshot loses its data.
"""

from __future__ import annotations

from typing import Any

import structlog

from xapid import cbtlog, operations, statefiles
from xapid.api import Call, handler
from xapid.api.vdi import account, file_of
from xapid.errors import ApiError

log = structlog.get_logger("xapid.api.vdi_cbt")


def _log_of(call: Call, rec: dict[str, Any]) -> Any:
    sr = call.store.get("SR", rec["SR"]) or {}
    return call.daemon.disks.cbt_log(str(sr.get("uuid", "")), file_of(rec))


@handler("VDI.enable_cbt")
def enable_cbt(call: Call, self: str) -> None:
    """Start logging the VDI's writes (nothing happens if it already does)."""
    with call.store.transaction() as tx:
        rec = dict(operations.assert_vdi(tx, self, "enable_cbt"))
    if rec["cbt_enabled"]:
        return
    cbtlog.start(_log_of(call, rec))
    with call.store.transaction() as tx:
        tx.update("VDI", self, cbt_enabled=True)


@handler("VDI.disable_cbt")
def disable_cbt(call: Call, self: str) -> None:
    """Stop logging and drop the VDI's log (its snapshots keep theirs)."""
    with call.store.transaction() as tx:
        rec = dict(operations.assert_vdi(tx, self, "disable_cbt"))
        if not rec["cbt_enabled"]:
            return
        tx.update("VDI", self, cbt_enabled=False)
    cbtlog.remove(_log_of(call, rec))


@handler("VDI.data_destroy")
def data_destroy(call: Call, self: str) -> None:
    """Delete a CBT-enabled snapshot's data and keep its log: it becomes ``cbt_metadata``."""
    with call.store.transaction() as tx:
        rec = dict(operations.assert_vdi(tx, self, "data_destroy"))
        if rec["type"] == "cbt_metadata":
            return
        # xapi marks the type first, so that no VBD can be made for the VDI meanwhile.
        tx.update("VDI", self, type="cbt_metadata")
        for vbd in tx.referrers("VBD", "VDI", self):
            tx.delete("VBD", vbd)
    sr = call.store.get("SR", rec["SR"]) or {}
    path = call.daemon.disks.vdi_path(str(sr.get("uuid", "")), file_of(rec))
    if path.exists():
        statefiles.remove(path)
    with call.store.transaction() as tx:
        tx.update("VDI", self, physical_utilisation=0)
        account(tx, rec["SR"])
    log.info("VDI data destroyed; its CBT log is kept", vdi=rec["uuid"])


@handler("VDI.list_changed_blocks")
def list_changed_blocks(call: Call, vdi_from: str, vdi_to: str) -> str:
    """The blocks written between two snapshots of a CBT-enabled VDI, as a base64 bitmap of 64 KiB
    blocks (block 0 is the most significant bit of the first byte)."""
    with call.store.transaction() as tx:
        first = dict(operations.assert_vdi(tx, vdi_from, "list_changed_blocks"))
        last = dict(operations.assert_vdi(tx, vdi_to, "list_changed_blocks"))
    for ref, rec in ((vdi_from, first), (vdi_to, last)):
        if not rec["cbt_enabled"]:
            raise ApiError("VDI_NO_CBT_METADATA", ref)
    sr_dirs = {call.daemon.disks.sr_dir(str((call.store.get("SR", rec["SR"]) or {}).get("uuid", "")))
               for rec in (first, last)}
    return cbtlog.changed_between(sorted(sr_dirs), _log_of(call, first), _log_of(call, last),
                                  int(last["virtual_size"]), (vdi_from, vdi_to))

