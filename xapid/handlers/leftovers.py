"""What a daemon killed in the middle of a VM import leaves behind, taken away at the next start.

An import commits its VMs (each carrying ``import`` in ``current_operations``), their VBDs, VIFs
and new VDIs before it streams the disks in; a daemon killed then would restart with a VM whose
disks are half written.  As an interrupted import in xapi is cleaned up, :func:`discard` destroys
such VMs with their metrics, VBDs, VIFs and the VDIs only their disk VBDs use (never a CD's ISO or
a disk another VM shares), before start-up clears every ``current_operations``.
"""

from __future__ import annotations

import structlog

from xapid.api import vdi as vdi_api
from xapid.storage import Disks
from xapid.store import Store

log = structlog.get_logger("xapid.handlers")


def discard(store: Store, disks: Disks) -> list[str]:
    """Destroy every VM an import left unfinished; return their uuids."""
    # Nearly every VM has no current operation: test that first (start-up scans every VM).
    vms = [ref for ref, rec in store.items("VM")
           if rec["current_operations"] and "import" in rec["current_operations"].values()]
    if not vms:
        return []
    files: list[tuple[str, str]] = []
    uuids = []
    with store.transaction() as tx:
        for vm in vms:
            rec = tx.get("VM", vm)
            uuids.append(str(rec["uuid"]))
            vdis = set()
            for vbd in tx.referrers("VBD", "VM", vm):
                vbd_rec = tx.get("VBD", vbd)
                if vbd_rec["type"] != "CD" and tx.read("VDI", vbd_rec["VDI"]) is not None:
                    vdis.add(vbd_rec["VDI"])
                tx.delete("VBD", vbd)
            for vif in tx.referrers("VIF", "VM", vm):
                tx.delete("VIF", vif)
            if tx.read("VM_metrics", rec["metrics"]) is not None:
                tx.delete("VM_metrics", rec["metrics"])
            tx.delete("VM", vm)
            for vdi in vdis:
                if not tx.referrers("VBD", "VDI", vdi):
                    files.append(vdi_api.remove_vdi(tx, vdi))
    for f in files:
        disks.remove_vdi(*f)
    log.warning("destroyed VMs an interrupted import left behind", vms=uuids)
    return uuids
