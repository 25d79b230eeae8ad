"""VM copies: clone, copy, snapshot, checkpoint, revert, provision (xapi_vm_clone.ml, xapi_vm_snapshot.ml,
xapi_vm.ml, xapi_templates.ml).

A copy is made in three steps, as xapi's ``Xapi_vm_clone.clone``: the source is marked busy
(``current_operations``), its disks are copied (VDI.clone / VDI.copy / VDI.snapshot semantics, real
file copies outside the store lock; CDs are shared, empty drives stay empty), then the new VM record,
its metrics, VBDs and VIFs are committed in one transaction.  A failure removes every disk made so far.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from xapid import operations
from xapid.api import Call, handler
from xapid.api import vdi as vdi_api
from xapid.api import vtpm as vtpm_api
from xapid.api.vbd import create as vbd_create
from xapid.api.vif import gen_mac
from xapid.api.vm import _ha_enabled, _to_halted, suspend_sr, write_memory_image
from xapid.errors import ApiError
from xapid.schema import EPOCH, NULL_REF
from xapid.store import Transaction, new_ref, new_uuid
from xapid.timeutil import now_iso

# VM fields a copy never takes from its source (copy_vm_record sets them itself).
NOT_COPIED = frozenset({
    "uuid", "allowed_operations", "current_operations", "power_state", "name_label", "is_a_template",
    "is_default_template", "is_a_snapshot", "snapshot_of", "snapshot_time", "snapshot_info", "snapshot_metadata",
    "transportable_snapshot_id", "parent", "resident_on", "scheduled_to_be_resident_on", "suspend_VDI", "domid",
    "domarch", "metrics", "guest_metrics", "blobs", "ha_always_run", "protection_policy", "is_snapshot_from_vmpp",
    "is_vmss_snapshot", "snapshot_schedule", "appliance", "start_delay", "shutdown_delay", "order", "suspend_SR",
    "version", "requires_reboot", "pending_guidances", "recommended_guidances", "pending_guidances_recommended",
    "pending_guidances_full", "other_config", "attached_PCIs", "groups", "blocked_operations", "generation_id",
})
# Fields revert leaves alone (xapi_vm_snapshot.ml do_not_copy, extended for snapshots without metadata).
NOT_REVERTED = frozenset({
    "uuid", "suspend_VDI", "power_state", "parent", "current_operations", "allowed_operations", "metrics",
    "guest_metrics", "resident_on", "domid", "protection_policy", "snapshot_schedule", "scheduled_to_be_resident_on",
    "tags", "affinity", "groups", "attached_PCIs", "is_snapshot_from_vmpp", "name_label", "is_a_snapshot",
    "is_a_template", "is_default_template", "snapshot_of", "snapshot_time", "transportable_snapshot_id",
    "snapshot_info", "snapshot_metadata", "blobs",
})
KIND_OF_OP = {"clone": "clone", "copy": "copy", "snapshot": "snapshot", "checkpoint": "snapshot"}


@contextmanager
def vm_operation(call: Call, vm: str, op: str) -> Iterator[dict[str, Any]]:
    """Check ``op`` on ``vm`` and keep it in ``current_operations`` while the block runs (message_forwarding.ml
    ``with_vm_operation``); yields a copy of the VM's record as it was."""
    key = call.task or new_ref()
    with call.store.transaction() as tx:
        rec = operations.assert_vm(tx, vm, op)
        rec["current_operations"][key] = op
        snapshot = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                    for k, v in rec.items()}
    try:
        yield snapshot
    finally:
        with call.store.transaction() as tx:
            current = tx.find("VM", vm)
            if current is not None:
                current["current_operations"].pop(key, None)


def copy_disks(call: Call, vm: str, op: str, sr: str | None, ignore: list[str]) -> list[tuple[dict[str, Any], str]]:
    """(source VBD record, new VDI) per VBD of ``vm``: disks copied, CDs shared, empty drives NULL."""
    made: list[str] = []
    out: list[tuple[dict[str, Any], str]] = []
    try:
        for vbd in call.store.referrers("VBD", "VM", vm):
            rec = call.store.get("VBD", vbd)
            if rec is None:
                continue
            rec = dict(rec)
            if op in ("snapshot", "checkpoint") and rec["VDI"] in ignore:
                continue
            if rec["empty"] or rec["VDI"] == NULL_REF:
                out.append((rec, NULL_REF))
            elif rec["type"] == "CD":
                out.append((rec, rec["VDI"]))
            else:
                new = vdi_api.duplicate(call, rec["VDI"], KIND_OF_OP[op], sr)
                made.append(new)
                out.append((rec, new))
    except BaseException:
        _destroy_vdis(call, made)
        raise
    return out


def _destroy_vdis(call: Call, vdis: list[str]) -> None:
    for vdi in vdis:
        try:
            with call.store.transaction() as tx:
                if tx.read("VDI", vdi) is None:
                    continue
                files = vdi_api.remove_vdi(tx, vdi)
            call.daemon.disks.remove_vdi(*files)
        except ApiError:
            pass


def _new_vm_record(src: dict[str, Any], vm: str, op: str, new_name: str, power_state: str) -> dict[str, Any]:
    """``copy_vm_record``: the new VM's fields."""
    snapshot = op in ("snapshot", "checkpoint")
    values = {k: v for k, v in src.items() if k not in NOT_COPIED}
    other = dict(src["other_config"])
    if not snapshot:
        other["mac_seed"] = new_uuid()
    other.pop("default_template", None)
    other.pop("xensource_internal", None)
    if src["is_a_template"] and "base_template_name" not in other:
        other["base_template_name"] = src["name_label"]
    info = {"power-state-at-snapshot": src["power_state"]} if snapshot else {}
    if snapshot:
        info["disk-snapshot-type"] = "crash_consistent"
    values.update(
        name_label=new_name, power_state=power_state, other_config=other,
        is_a_template=snapshot or bool(src["is_a_template"]), is_default_template=False, is_a_snapshot=snapshot,
        snapshot_of=vm if snapshot else NULL_REF, snapshot_time=now_iso() if snapshot else EPOCH,
        snapshot_info=info, parent=src["parent"] if snapshot else NULL_REF, resident_on=NULL_REF,
        scheduled_to_be_resident_on=NULL_REF, domid=-1, ha_always_run=False, suspend_VDI=NULL_REF,
        requires_reboot=False, generation_id=new_uuid() if src["generation_id"] else "",
    )
    return values


def _copy_devices(tx: Transaction, new_vm: str, disks: list[tuple[dict[str, Any], str]], vifs: list[dict[str, Any]],
                  seed: str, preserve_macs: bool, attached: bool) -> None:
    for rec, vdi in disks:
        other = dict(rec["other_config"])
        if rec["type"] == "Disk":
            other.setdefault("owner", "")  # CA-58405: the copy owns its disks
        tx.create("VBD", {
            "VM": new_vm, "VDI": vdi, "empty": rec["empty"] or vdi == NULL_REF, "userdevice": rec["userdevice"],
            "device": rec["device"], "bootable": rec["bootable"], "mode": rec["mode"], "type": rec["type"],
            "unpluggable": rec["unpluggable"], "other_config": other, "currently_attached": attached and rec[
                "currently_attached"], "qos_algorithm_type": rec["qos_algorithm_type"],
            "qos_algorithm_params": rec["qos_algorithm_params"],
        })
    for rec in vifs:
        mac, generated = rec["MAC"], rec["MAC_autogenerated"]
        if not preserve_macs:
            mac, generated = gen_mac(int(rec["device"]), seed), True
        values = {k: rec[k] for k in ("device", "network", "MTU", "other_config", "qos_algorithm_type",
                                      "qos_algorithm_params", "locking_mode", "ipv4_allowed", "ipv6_allowed",
                                      "trunks", "ipv4_configuration_mode", "ipv4_addresses", "ipv4_gateway",
                                      "ipv6_configuration_mode", "ipv6_addresses", "ipv6_gateway")}
        values.update(VM=new_vm, MAC=mac, MAC_autogenerated=generated, currently_attached=False)
        tx.create("VIF", values)


def make_copy(call: Call, vm: str, op: str, new_name: str, sr: str | None = None,
              ignore_vdis: list[str] | None = None) -> str:
    """``Xapi_vm_clone.clone`` for ``op`` in clone, copy, snapshot, checkpoint; returns the new VM."""
    with vm_operation(call, vm, op) as src:
        state = src["power_state"]
        if op == "checkpoint" and state in ("Running", "Paused", "Suspended"):
            power_state = "Suspended"
        elif op in ("clone", "copy") and state == "Suspended":
            power_state = "Suspended"
        else:
            power_state = "Halted"
        disks = copy_disks(call, vm, op, sr, ignore_vdis or [])
        made = [vdi for rec, vdi in disks if rec["type"] != "CD" and vdi != NULL_REF]
        suspend_files: list[str] = []
        try:
            suspend_vdi = NULL_REF
            if src["suspend_VDI"] != NULL_REF and op != "snapshot" and call.store.get("VDI", src["suspend_VDI"]):
                suspend_vdi = vdi_api.duplicate(call, src["suspend_VDI"], "copy" if op == "copy" else "clone", sr)
                suspend_files.append(suspend_vdi)
            vifs = [dict(rec) for v in call.store.referrers("VIF", "VM", vm)
                    if (rec := call.store.get("VIF", v)) is not None]
            with call.store.transaction() as tx:
                live = tx.get("VM", vm)
                values = _new_vm_record(src, vm, op, new_name, power_state)
                metrics_src = tx.read("VM_metrics", src["metrics"]) or {}
                metrics = tx.create("VM_metrics", {
                    "memory_actual": metrics_src.get("memory_actual", values["memory_dynamic_max"]),
                    "VCPUs_number": metrics_src.get("VCPUs_number", values["VCPUs_at_startup"]),
                    "install_time": now_iso(), "last_updated": now_iso(),
                    "current_domain_type": metrics_src.get("current_domain_type", "unspecified")})
                values["metrics"] = metrics
                if op == "checkpoint" and state in ("Running", "Paused"):
                    sr_for_image = suspend_sr(tx, vm, src)
                    suspend_vdi = write_memory_image(call.daemon, tx, vm, src, sr_for_image, "Suspend image")
                values["suspend_VDI"] = suspend_vdi
                new_vm = tx.create("VM", values)
                _copy_devices(tx, new_vm, disks, vifs, values["other_config"].get("mac_seed", new_uuid()),
                              op in ("snapshot", "checkpoint"), attached=power_state == "Suspended")
                vtpm_api.copy_all(tx, vm, new_vm)
                if op in ("snapshot", "checkpoint"):
                    live["parent"] = new_vm
                return new_vm
        except BaseException:
            _destroy_vdis(call, made + suspend_files)
            raise


@handler("VM.clone")
def clone(call: Call, vm: str, new_name: str) -> str:
    return make_copy(call, vm, "clone", new_name)


@handler("VM.copy")
def copy(call: Call, vm: str, new_name: str, sr: str) -> str:
    """Full copies of the disks, onto ``sr`` (``OpaqueRef:NULL``: each disk's own SR); never an ISO SR."""
    target = None
    if sr != NULL_REF:
        rec = call.store.get("SR", sr)
        if rec is not None:
            if rec["content_type"] == "iso":
                raise ApiError("OPERATION_NOT_ALLOWED", "Cannot copy a VM's disks to an ISO SR")
            target = sr
    return make_copy(call, vm, "copy", new_name, target)


@handler("VM.snapshot")
def snapshot(call: Call, vm: str, new_name: str, ignore_vdis: list[str]) -> str:
    return make_copy(call, vm, "snapshot", new_name, None, ignore_vdis)


@handler("VM.checkpoint")
def checkpoint(call: Call, vm: str, new_name: str) -> str:
    """A snapshot with the memory image: the snapshot of a running VM is Suspended with its own suspend VDI."""
    return make_copy(call, vm, "checkpoint", new_name)


@handler("VM.revert")
def revert(call: Call, snapshot: str) -> None:
    """Bring the snapshot's VM back to it (xapi_vm_snapshot.ml ``revert``): the VM's disks that the
    snapshot covers are replaced by clones of the snapshot's disks, its VIFs by the snapshot's (MACs
    kept), its fields by the snapshot's; a checkpoint's VM comes back Suspended with a copy of the image."""
    old_image = None
    with call.store.transaction() as tx:
        operations.assert_vm(tx, snapshot, "revert")
        snap = dict(tx.get("VM", snapshot))
        vm = snap["snapshot_of"]
        if vm == NULL_REF or tx.read("VM", vm) is None:
            raise ApiError("VM_REVERT_FAILED", snapshot, vm)
        live = tx.get("VM", vm)
        if live["power_state"] != "Halted":
            # The running or suspended domain is thrown away (xapi destroys it before reverting).
            _to_halted(tx, vm, live)
            if live["suspend_VDI"] != NULL_REF and tx.read("VDI", live["suspend_VDI"]) is not None:
                old_image = vdi_api.remove_vdi(tx, live["suspend_VDI"])
            live["suspend_VDI"] = NULL_REF
    if old_image is not None:
        call.daemon.disks.remove_vdi(*old_image)
    if _ha_enabled(call.daemon):
        call.daemon.ha.planning.update_pool_status()
    disks = copy_disks(call, snapshot, "clone", None, [])
    made = [vdi for rec, vdi in disks if rec["type"] != "CD" and vdi != NULL_REF]
    try:
        image = NULL_REF
        if snap["suspend_VDI"] != NULL_REF and call.store.get("VDI", snap["suspend_VDI"]) is not None:
            image = vdi_api.duplicate(call, snap["suspend_VDI"], "clone")
            made.append(image)
        snap_vifs = [dict(r) for v in call.store.referrers("VIF", "VM", snapshot)
                     if (r := call.store.get("VIF", v)) is not None]
        covered = {(call.store.get("VDI", r["VDI"]) or {}).get("snapshot_of") for r, _v in disks}
        doomed: list[tuple[str, str]] = []
        with call.store.transaction() as tx:
            live = tx.get("VM", vm)
            for vbd in tx.referrers("VBD", "VM", vm):
                rec = tx.get("VBD", vbd)
                if rec["type"] == "Disk" and rec["VDI"] in covered and tx.read("VDI", rec["VDI"]) is not None:
                    doomed.append(vdi_api.remove_vdi(tx, rec["VDI"]))
                if tx.read("VBD", vbd) is not None:
                    tx.delete("VBD", vbd)
            for vif in tx.referrers("VIF", "VM", vm):
                tx.delete("VIF", vif)
            for key, value in snap.items():
                if key not in NOT_REVERTED and key in live:
                    live[key] = value
            live["ha_always_run"] = False
            live["parent"] = snapshot
            live["power_state"] = snap["power_state"]
            live["suspend_VDI"] = image
            _copy_devices(tx, vm, disks, snap_vifs, live["other_config"].get("mac_seed", new_uuid()), True,
                          attached=snap["power_state"] == "Suspended")
    except BaseException:
        _destroy_vdis(call, made)
        raise
    for files in doomed:
        call.daemon.disks.remove_vdi(*files)


# -- provision (xapi_templates.ml) ------------------------------------------------------------------------------


def parse_disks(text: str) -> list[dict[str, Any]]:
    """The ``<provision><disk .../></provision>`` XML of ``other_config:disks``."""
    try:
        root = ET.fromstring(text)  # noqa: S314 - a short document from the VM's own record
        if root.tag != "provision":
            raise ValueError(root.tag)
        out = []
        for disk in root:
            a = disk.attrib
            if disk.tag != "disk":
                raise ValueError(disk.tag)
            vdi_type = a.get("type", "system")
            if vdi_type not in ("system", "user", "ephemeral", "suspend", "crashdump"):
                raise ApiError("INTERNAL_ERROR", f'string2vdi_type: Unknown VDI type "{vdi_type}"')
            out.append({"device": a["device"], "size": int(a["size"]), "sr": a["sr"],
                        "bootable": a["bootable"] == "true", "type": vdi_type})
        return out
    except (ET.ParseError, KeyError, ValueError):
        raise ApiError("INTERNAL_ERROR", "Xapi_templates.Parse_failure") from None


@handler("VM.provision")
def provision(call: Call, vm: str) -> None:
    """Make the VM a VM (``is_a_template`` false) and create the disks its ``other_config:disks`` describes:
    one VDI (named after its device, "Created by template provisioner") and VBD each on the SR whose
    uuid the XML names (``UUID_INVALID [sr, uuid]`` otherwise, an empty uuid included, as xapi), then
    remove the install keys.  The XML and its SRs are checked before anything changes; disks made
    before a later failure are destroyed."""
    with call.store.transaction() as tx:
        operations.assert_vm(tx, vm, "provision")
        text = tx.get("VM", vm)["other_config"].get("disks")
    # Everything is checked before anything changes (xapi would already have cleared is_a_template).
    disks = parse_disks(text) if text else []
    srs = []
    for disk in disks:
        sr = call.store.by_uuid("SR", disk["sr"])
        if sr is None:
            raise ApiError("UUID_INVALID", "sr", disk["sr"])
        srs.append(sr)
    with call.store.transaction() as tx:
        rec = operations.assert_vm(tx, vm, "provision")
        rec["is_a_template"] = False
        rec["is_default_template"] = False
        metrics = tx.find("VM_metrics", rec["metrics"])
        if metrics is not None:
            metrics["install_time"] = now_iso()
    if not disks:
        return
    made: list[str] = []
    try:
        for disk, sr in zip(disks, srs, strict=True):
            with call.store.transaction() as tx:
                vdi = vdi_api.create_vdi(call.daemon.disks, tx, {
                    "name_label": "", "name_description": "Created by template provisioner", "SR": sr,
                    "virtual_size": disk["size"], "type": disk["type"], "sharable": False, "read_only": False,
                    "other_config": {}, "xenstore_data": {}, "sm_config": {"vmhint": call.store.get("VM", vm)["uuid"]},
                })
            made.append(vdi)
            vbd = vbd_create(call, {"VM": vm, "VDI": vdi, "userdevice": disk["device"], "bootable": disk["bootable"],
                                    "mode": "RW", "type": "Disk", "unpluggable": disk["type"] != "system",
                                    "empty": False, "other_config": {"owner": ""}, "qos_algorithm_type": "",
                                    "qos_algorithm_params": {}, "device": "", "currently_attached": False})
            with call.store.transaction() as tx:
                tx.update("VDI", vdi, name_label=tx.get("VBD", vbd)["userdevice"])
        with call.store.transaction() as tx:
            other = tx.get("VM", vm)["other_config"]
            other.pop("disks", None)
            other.pop("postinstall", None)
    except BaseException:
        _destroy_vdis(call, made)
        raise
