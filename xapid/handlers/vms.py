"""VM export and import as XVA over HTTP: ``GET /export`` and ``PUT /import`` (xapi's export.ml,
import.ml, stream_vdi.ml; the format in :mod:`xapid.handlers.xva`).

Export (``uuid=`` or ``ref=``): the VM must allow ``export`` (halted or suspended, as xapi) and
carries ``export`` in ``current_operations`` while it streams.  ``ova.xml`` holds, as xapi's
``vm_metadata``: the VM, its metrics, its VBDs and VIFs, their networks, VDIs and SRs, with every
reference rewritten to an export-local ``Ref:N`` (or the null ref) and the runtime state cleared
(halted, nothing attached, no operations, no snapshot links); then each disk (non-CD, not on an
ISO SR) in the chunks of the XVA format.  Nothing is held whole: one 1 MiB chunk at a time.

``use_compression=true`` (or ``gzip``) gzips the stream, as xapi; an import sniffs gzip by itself.
``zstd`` is not supported either way.

Import (``sr_id=`` or ``sr_uuid=``, else the pool's default SR; ``restore=true`` keeps the VM's
uuid, MAC seed and MACs; ``force=true`` ignores checksum failures and keeps what was made when the
import fails, as xapi): the first member must be ``ova.xml`` (``IMPORT_ERROR_UNEXPECTED_FILE``),
from an xapi no newer than this one (``IMPORT_INCOMPATIBLE_VERSION``).  The VDIs (new sparse files
in the SR), VMs, metrics, VBDs and VIFs are created in one transaction, each VM carrying ``import``
in ``current_operations``; then the disks are streamed in, holes skipped.  Networks are matched by
uuid, then bridge, then name, and created when none matches; CDs keep their ISO when a VDI of that
uuid exists here, else become empty drives.  On success the task's result is the set of new VM
refs (xapi's ``complete_import``); on any failure, a client gone mid-way included
(``IMPORT_ERROR_PREMATURE_EOF``), everything made is destroyed and the task fails.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import structlog

from xapid import operations
from xapid.api import vdi as vdi_api
from xapid.api import vm as vm_api
from xapid.api import vtpm as vtpm_api
from xapid.api.vif import gen_mac
from xapid.api.vm_copy import vm_operation
from xapid.errors import ApiError, internal
from xapid.handlers import sparse, xva
from xapid.handlers.access import Access, Refusal, bad_request, route
from xapid.handlers.disks import PROGRESS_EVERY, read_piece, vdi_file, with_slash
from xapid.handlers.locality import serve_here_or_redirect
from xapid.schema import EPOCH, NULL_REF, Type
from xapid.server import ClientGone, Response, Route
from xapid.store import Record, Store, Transaction, new_ref, new_uuid
from xapid.timeutil import now_iso

log = structlog.get_logger("xapid.handlers.vms")

VM_SET = Type("set", elem=Type("ref", "VM"))
# The classes of an export, in export.ml make_all's order.
EXPORTED = ("VM", "VM_metrics", "VBD", "VIF", "network", "VDI", "SR", "VTPM")
VDI_FIELDS = ("name_label", "name_description", "type", "sharable", "read_only", "other_config", "xenstore_data",
              "virtual_size", "on_boot", "allow_caching", "metadata_of_pool", "tags", "sm_config")


def routes() -> list[Route]:
    return [
        *with_slash(route("get_export", export_vm)),
        *with_slash(route("put_import", import_vm, stream=True, body_cap="max_upload_size")),
    ]


def _xapi_version(access: Access) -> tuple[int, int]:
    host = access.daemon.store.get("host", access.daemon.master_ref()) or {}
    text = str(host.get("software_version", {}).get("xapi", "0.0"))
    major, _, minor = text.partition(".")
    return (int(major) if major.isdigit() else 0, int(minor) if minor.isdigit() else 0)


# -- export -------------------------------------------------------------------------------------------


def vm_of(access: Access) -> str:
    store = access.daemon.store
    ref = access.param("ref")
    if ref:
        if not store.exists("VM", ref):
            raise ApiError("HANDLE_INVALID", "VM", ref)
        return ref
    uuid = access.param("uuid")
    if not uuid:
        raise Refusal(bad_request("a uuid or ref parameter is required"),
                      ["INTERNAL_ERROR", "Missing uuid or ref parameter"])
    found = store.by_uuid("VM", uuid)
    if found is None:
        raise ApiError("UUID_INVALID", "VM", uuid)
    return found


def export_vm(access: Access) -> Response:
    """``GET /export``: stream the VM as an XVA (see the module docstring)."""
    vm = vm_of(access)
    serve_here_or_redirect(access, vm_srs(access.daemon.store, vm))
    with access.daemon.store.transaction() as tx:
        operations.assert_vm(tx, vm, "export")  # refused before the 200; marked while it streams
        for vbd in tx.referrers("VBD", "VM", vm):
            vbd_rec = tx.get("VBD", vbd)
            if vbd_rec["type"] != "CD" and tx.read("VDI", vbd_rec["VDI"]) is not None:
                operations.assert_vdi(tx, vbd_rec["VDI"], "copy")  # not while a disk is being written
    compression = (access.param("use_compression") or "").lower()
    if compression == "zstd":
        raise ApiError("INTERNAL_ERROR", "zstd compression is not supported")
    headers = [("cache-control", "no-cache, no-store"), *([("task-id", access.task)] if access.task else []),
               ("content-disposition", 'attachment; filename="export.xva"')]
    stream = _export_stream(access, vm)
    return Response(200, b"", "application/octet-stream", close=True, headers=headers,
                    stream=xva.gzip_stream(stream) if compression in ("true", "gzip") else stream)


def _export_stream(access: Access, vm: str) -> Iterator[bytes]:
    with vm_operation(access.call("VM.export"), vm, "export"):
        access.progress(0.0)
        _table, objects, disks = metadata(access, vm)
        now = int(time.time())
        version = xva.version_struct(*_version_fields(access), *_xapi_version(access))
        yield xva.tar_file(xva.OVA_XML, xva.ova_xml(version, objects), now)
        total = sum(size for _id, _vdi, size in disks) or 1
        done = 0
        last = 0.0
        for ident, vdi, size in disks:
            fd = os.open(vdi_file(access, vdi), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                reader = sparse.SparseReader(fd, size)
                for i, piece in enumerate(xva.disk_members(ident, size, reader.read_at, now)):
                    yield piece
                    if time.monotonic() - last >= PROGRESS_EVERY:
                        last = time.monotonic()
                        access.progress(min((done + i // 2 * xva.CHUNK) / total, 0.99))
                        access.check_cancelled()
            finally:
                os.close(fd)
            done += size
        yield xva.END


def _version_fields(access: Access) -> tuple[str, str, str, str]:
    host = access.daemon.store.get("host", access.daemon.master_ref()) or {}
    sv = host.get("software_version", {})
    return (str(host.get("hostname", "")), str(sv.get("product_version", "")), str(sv.get("product_brand", "")),
            str(sv.get("build_number", "")))


def metadata(access: Access, vm: str) -> tuple[dict[str, str], list[tuple[str, str, str]],
                                                 list[tuple[str, str, int]]]:
    """(internal ref -> Ref:N, ova.xml objects, disks to stream as (Ref:N, VDI, size)) of ``vm``."""
    store = access.daemon.store
    table: dict[str, str] = {}

    def add(ref: str) -> None:
        if ref and ref != NULL_REF and ref not in table:
            table[ref] = f"Ref:{len(table)}"

    rec = store.render("VM", vm)
    add(vm)
    for vif in rec["VIFs"]:
        vif_rec = store.get("VIF", vif)
        if vif_rec is not None:
            add(vif)
            add(vif_rec["network"])
    for vbd in rec["VBDs"]:
        vbd_rec = store.get("VBD", vbd)
        if vbd_rec is not None:
            add(vbd)
            if not vbd_rec["empty"] and store.exists("VDI", vbd_rec["VDI"]):
                add(vbd_rec["VDI"])
                add(store.get("VDI", vbd_rec["VDI"])["SR"])  # type: ignore[index]
    if store.exists("VM_metrics", rec["metrics"]):
        add(rec["metrics"])
    for vtpm in rec["VTPMs"]:
        add(vtpm)
    by_class: dict[str, list[str]] = {}
    for ref in table:
        cls = next(c for c in EXPORTED if store.exists(c, ref))
        by_class.setdefault(cls, []).append(ref)
    encoder = access.daemon.encoder
    objects = []
    for cls in EXPORTED:
        for ref in by_class.get(cls, []):
            if cls == "VTPM":
                objects.append((cls, table[ref], encoder.xml(_vtpm_snapshot(store, ref, table), None)))
                continue
            snapshot = _rewrite(access, cls, store.render(cls, ref), table)
            objects.append((cls, table[ref], encoder.xml(snapshot, Type("record", cls))))
    disks = []
    for vbd in rec["VBDs"]:
        vbd_rec = store.get("VBD", vbd)
        if vbd_rec is None or vbd_rec["type"] == "CD" or vbd_rec["VDI"] not in table:
            continue
        vdi_rec = store.get("VDI", vbd_rec["VDI"])
        sr_rec = store.get("SR", vdi_rec["SR"]) if vdi_rec else None
        if vdi_rec is None or sr_rec is None or sr_rec["content_type"] == "iso":
            continue
        disks.append((table[vbd_rec["VDI"]], vbd_rec["VDI"], int(vdi_rec["virtual_size"])))
    disks.sort()  # stream_vdi.ml vdi_ordering: by the prefix, as text
    return table, objects, disks


def _vtpm_snapshot(store: Store, ref: str, table: dict[str, str]) -> dict[str, Any]:
    """export.ml make_vtpm: not the API record but importexport.ml's ``vtpm'``, which carries the
    contents (its keys are the OCaml field names, as ppx_deriving_rpc writes them)."""
    rec = store.get("VTPM", ref) or {}
    secret = store.get("secret", rec.get("contents", NULL_REF)) or {}
    return {"vTPM'_VM": table.get(rec.get("VM", NULL_REF), NULL_REF), "vTPM'_uuid": rec.get("uuid", ""),
            "vTPM'_is_unique": bool(rec.get("is_unique")), "vTPM'_is_protected": bool(rec.get("is_protected")),
            "vTPM'_content": str(secret.get("value", ""))}


def _map_refs(value: Any, ty: Type, table: dict[str, str]) -> Any:
    if ty.kind == "ref":
        return table.get(value, NULL_REF)
    if ty.kind == "set" and ty.elem is not None and ty.elem.kind == "ref":
        return [table[v] for v in value if v in table]
    if ty.kind == "map" and ty.key is not None and ty.value is not None and "ref" in (ty.key.kind, ty.value.kind):
        return {}
    return value


def _rewrite(access: Access, cls: str, rec: Record, table: dict[str, str]) -> Record:
    """An exported snapshot: references made export-local, runtime state cleared (export.ml make_*)."""
    cdef = access.daemon.schema.classes[cls]
    out = {name: _map_refs(rec[name], f.type, table) for name, f in cdef.fields.items() if name in rec}
    clear: dict[str, Any] = {"current_operations": {}, "allowed_operations": []}
    if cls == "VM":
        clear.update(power_state="Halted", suspend_VDI=NULL_REF, is_a_snapshot=False, snapshot_of=NULL_REF,
                     snapshots=[], snapshot_time=EPOCH, transportable_snapshot_id="", parent=NULL_REF,
                     crash_dumps=[], consoles=[], protection_policy=NULL_REF, blobs={}, resident_on=NULL_REF,
                     domid=-1)
    elif cls in ("VBD", "VIF"):
        clear.update(currently_attached=False, metrics=NULL_REF)
    elif cls == "network":
        clear.update(PIFs=[])
    elif cls == "VDI":
        clear.update(crash_dumps=[])
    elif cls == "SR":
        clear.update(PBDs=[])
    for name, value in clear.items():
        if name in out:
            out[name] = value
    return out


# -- import -------------------------------------------------------------------------------------------


class Import:
    """What one import made, so that a failure can take it all back."""

    def __init__(self) -> None:
        self.vms: list[str] = []
        self.vdis: list[str] = []
        self.networks: list[str] = []
        self.disks: list[tuple[str, str, int]] = []  # (Ref:N, new VDI, size), in stream order
        self.key = new_ref()


def target_sr(access: Access) -> str:
    store = access.daemon.store
    sr = access.param("sr_id") or ""
    if not sr and access.param("sr_uuid"):
        sr = store.by_uuid("SR", access.param("sr_uuid") or "") or ""
        if not sr:
            raise ApiError("UUID_INVALID", "SR", access.param("sr_uuid") or "")
    if not sr:
        pool = store.get("pool", store.refs("pool")[0]) or {}
        sr = str(pool.get("default_SR", NULL_REF))
        if not store.exists("SR", sr):
            raise ApiError("DEFAULT_SR_NOT_FOUND", sr)
    if not store.exists("SR", sr):
        raise ApiError("HANDLE_INVALID", "SR", sr)
    if store.get("SR", sr)["content_type"] == "iso":  # type: ignore[index]
        raise ApiError("SR_OPERATION_NOT_SUPPORTED")
    return sr


def vm_srs(store: Store, vm: str) -> set[str]:
    """The SRs of the VM's disks (not empty drives) and of its suspend image (``assert_can_see_SRs``)."""
    srs = set()
    for vbd in store.referrers("VBD", "VM", vm):
        rec = store.get("VBD", vbd) or {}
        vdi = store.get("VDI", rec.get("VDI", NULL_REF)) if not rec.get("empty", True) else None
        if vdi is not None:
            srs.add(str(vdi["SR"]))
    vm_rec = store.get("VM", vm) or {}
    if vm_rec.get("power_state") == "Suspended":
        suspend = store.get("VDI", vm_rec.get("suspend_VDI", NULL_REF))
        if suspend is not None:
            srs.add(str(suspend["SR"]))
    return srs


def import_vm(access: Access) -> Response:
    """``PUT /import``: read an XVA and create its VMs (see the module docstring)."""
    sr = target_sr(access)
    serve_here_or_redirect(access, {sr})
    restore = access.flag("restore")
    force = access.flag("force")
    reader = access.request.reader
    assert reader is not None
    access.progress(0.0)
    made = Import()
    if access.task:
        made.key = access.task
    try:
        try:
            tar = xva.TarReader(xva.opened(lambda n: read_piece(access, n)))
            first = tar.next()
            if first is None or first[0] != xva.OVA_XML:
                raise xva.XvaError("IMPORT_ERROR_UNEXPECTED_FILE", xva.OVA_XML, first[0] if first else "")
            if first[1] > xva.MAX_OVA_XML:
                raise xva.XvaError("IMPORT_ERROR", f"ova.xml of {first[1]} bytes is too large")
            version, objects = xva.parse_ova_xml(tar.data())
            theirs = (int(version.get("xapi_major", 0) or 0), int(version.get("xapi_minor", 0) or 0))
            if theirs > _xapi_version(access):
                raise ApiError("IMPORT_INCOMPATIBLE_VERSION")
            _create(access, sr, objects, restore, made)
            if access.task:  # import.ml: the signal to a GUI that it may remap networks now
                with access.daemon.store.transaction() as tx:
                    rec = tx.find("task", access.task)
                    if rec is not None:
                        rec["other_config"] = {**rec["other_config"], "object_creation": "complete"}
            _receive_disks(access, tar, made, force)
            # Nothing is read after the last disk (import.ml neither): Xen Orchestra closes then.
        except xva.XvaError as e:
            raise ApiError(e.code, *e.params) from None
        except (ClientGone, EOFError):
            raise ApiError("IMPORT_ERROR_PREMATURE_EOF") from None
        except ValueError as e:
            raise ApiError("IMPORT_ERROR", str(e)) from None
        except OSError as e:
            raise ApiError("VDI_IO_ERROR", f"Device I/O error: {e.strerror}") from None
    except BaseException:
        if force:
            log.warning("not cleaning up after a failed import since force was given")
        else:
            _undo(access, made)
        raise
    _complete(access, made)
    access.result(made.vms, VM_SET)
    return Response(200, b"", "application/octet-stream", close=True,
                    headers=[("cache-control", "no-cache, no-store"),
                             *([("task-id", access.task)] if access.task else [])])


def _values(access: Access, cls: str, snapshot: dict[str, Any], refs: dict[str, str],
            skip: frozenset[str] = frozenset()) -> Record:
    """The stored fields of ``cls`` found in ``snapshot``, coerced to their types, references
    mapped through ``refs`` (export id -> new ref; anything else becomes null).  A value this
    schema cannot take keeps the field's default."""
    coerce = access.daemon.dispatcher.coerce
    out: Record = {}
    for f in access.daemon.schema.classes[cls].stored_fields():
        if f.name not in snapshot or f.name in skip:
            continue
        try:
            value = coerce(snapshot[f.name], f.type)
        except ApiError:
            continue
        if f.type.kind == "ref":
            value = refs.get(value, NULL_REF)
        elif f.type.kind == "set" and f.type.elem is not None and f.type.elem.kind == "ref":
            value = [refs[v] for v in value if v in refs]
        out[f.name] = value
    return out


def _create(access: Access, sr: str, objects: list[dict[str, Any]], restore: bool, made: Import) -> None:
    store = access.daemon.store
    disks = access.daemon.disks
    by_id = {o["id"]: o for o in objects}
    of_class: dict[str, list[dict[str, Any]]] = {}
    for o in objects:
        of_class.setdefault(o["class"].lower(), []).append(o)
    vms = [o for o in of_class.get("vm", []) if not o["snapshot"].get("is_a_snapshot")]
    if not vms:
        raise xva.XvaError("IMPORT_ERROR", "the archive holds no VM")
    vm_ids = {o["id"] for o in vms}
    vbds = [o for o in of_class.get("vbd", []) if o["snapshot"].get("VM") in vm_ids]
    vifs = [o for o in of_class.get("vif", []) if o["snapshot"].get("VM") in vm_ids]
    vtpms = [o for o in of_class.get("vtpm", []) if o["snapshot"].get("vTPM'_VM") in vm_ids]
    refs: dict[str, str] = {}
    files: list[tuple[str, str]] = []
    sr_uuid = store.get("SR", sr)["uuid"]  # type: ignore[index]
    try:
        with store.transaction() as tx:
            _networks(tx, vifs, by_id, refs, made)
            for vbd in vbds:
                ident = vbd["snapshot"].get("VDI", NULL_REF)
                vdi = by_id.get(ident)
                if vdi is None or vdi["class"].lower() != "vdi" or ident in refs:
                    continue
                src_sr = by_id.get(vdi["snapshot"].get("SR", NULL_REF), {}).get("snapshot", {})
                if str(vbd["snapshot"].get("type", "")).upper() == "CD" or src_sr.get("content_type") == "iso":
                    local = tx.store.by_uuid("VDI", str(vdi["snapshot"].get("uuid", "")))
                    if local is not None:
                        refs[ident] = local  # the same ISO is here
                    continue
                values = {k: v for k, v in _values(access, "VDI", vdi["snapshot"], {}).items() if k in VDI_FIELDS}
                values["SR"] = sr
                new = vdi_api.create_vdi(disks, tx, values)
                files.append((sr_uuid, tx.get("VDI", new)["uuid"]))
                refs[ident] = new
                made.vdis.append(new)
                made.disks.append((ident, new, int(values.get("virtual_size", 0))))
            for vm in vms:
                _vm(access, tx, vm, refs, restore, made)
            for vbd in vbds:
                values = _values(access, "VBD", vbd["snapshot"], refs,
                                 frozenset({"uuid", "metrics", "current_operations", "allowed_operations"}))
                values.update(currently_attached=False)
                if values.get("VDI", NULL_REF) == NULL_REF:
                    values.update(VDI=NULL_REF, empty=True)
                refs[vbd["id"]] = tx.create("VBD", values)
            for vif in vifs:
                values = _values(access, "VIF", vif["snapshot"], refs,
                                 frozenset({"uuid", "metrics", "current_operations", "allowed_operations"}))
                values.update(currently_attached=False)
                if not restore and values.get("MAC_autogenerated", False):
                    seed = tx.get("VM", values["VM"])["other_config"].get("mac_seed", new_uuid())
                    device = str(values.get("device", "0"))
                    values["MAC"] = gen_mac(int(device) if device.isdigit() else 0, seed)
                refs[vif["id"]] = tx.create("VIF", values)
            for vtpm in vtpms:
                _import_vtpm(tx, vtpm["snapshot"], refs, restore)
    except BaseException:
        for sr_uuid_, vdi_uuid in files:
            disks.remove_vdi(sr_uuid_, vdi_uuid)
        made.vms.clear()
        made.vdis.clear()
        made.networks.clear()
        made.disks.clear()
        raise
    made.disks.sort()  # the order the exporter streams them in


def _import_vtpm(tx: Transaction, snap: dict[str, Any], refs: dict[str, str], restore: bool) -> None:
    """import.ml VTPM: a new VTPM of the imported VM with the archive's contents; a restore keeps
    its uuid, which must then be free."""
    content = str(snap.get("vTPM'_content", ""))
    try:
        base64.b64decode(content.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise internal("VTPM contents are not base64") from None
    ref = vtpm_api.introduce(tx, refs[snap["vTPM'_VM"]], snap.get("vTPM'_is_unique") is True, content,
                             snap.get("vTPM'_is_protected") is True)
    uuid = str(snap.get("vTPM'_uuid", ""))
    if restore and uuid:
        if tx.by_uuid("VTPM", uuid) is not None:
            raise xva.XvaError("IMPORT_ERROR", f"A VTPM with UUID {uuid} already exists")
        tx.update("VTPM", ref, uuid=uuid)


def _networks(tx: Transaction, vifs: list[dict[str, Any]], by_id: dict[str, dict[str, Any]],
              refs: dict[str, str], made: Import) -> None:
    for vif in vifs:
        ident = vif["snapshot"].get("network", NULL_REF)
        net = by_id.get(ident)
        if net is None or ident in refs:
            continue
        snap = net["snapshot"]
        local = tx.store.by_uuid("network", str(snap.get("uuid", "")))
        if local is None:
            for ref, rec in tx.items("network"):
                if snap.get("bridge") and rec["bridge"] == snap.get("bridge"):
                    local = ref
                    break
        if local is None:
            local = next((r for r, rec in tx.items("network") if rec["name_label"] == snap.get("name_label")), None)
        if local is None:
            count = sum(1 for _ in tx.items("network"))
            local = tx.create("network", {
                "name_label": str(snap.get("name_label", "")),
                "name_description": str(snap.get("name_description", "")),
                "bridge": f"xapi{count}", "MTU": int(snap.get("MTU", 1500) or 1500), "managed": True,
                "other_config": dict(snap.get("other_config", {}) or {})})
            made.networks.append(local)
        refs[ident] = local


def _vm(access: Access, tx: Transaction, vm: dict[str, Any], refs: dict[str, str], restore: bool,
        made: Import) -> None:
    snap = vm["snapshot"]
    skip = frozenset({"current_operations", "allowed_operations", "metrics", "guest_metrics", "resident_on",
                      "scheduled_to_be_resident_on", "suspend_VDI", "parent", "snapshot_of", "power_state", "domid",
                      "uuid", "is_a_snapshot", "blobs", "protection_policy", "snapshot_schedule", "appliance"})
    values = _values(access, "VM", snap, refs, skip)
    other = dict(values.get("other_config", {}))
    uuid = str(snap.get("uuid", ""))
    if restore and uuid:
        existing = tx.store.by_uuid("VM", uuid)
        if existing is not None:
            raise ApiError("DUPLICATE_VM", existing)
        values["uuid"] = uuid
    else:
        other["mac_seed"] = new_uuid()
    other.setdefault("mac_seed", new_uuid())
    metrics = tx.create("VM_metrics", {"memory_actual": values.get("memory_dynamic_max", 0),
                                       "VCPUs_number": values.get("VCPUs_at_startup", 0),
                                       "install_time": now_iso(), "last_updated": now_iso()})
    values.update(other_config=other, metrics=metrics, power_state="Halted", domid=-1, resident_on=NULL_REF,
                  current_operations={made.key: "import"}, allowed_operations=[])
    ref = tx.create("VM", values)
    refs[vm["id"]] = ref
    made.vms.append(ref)


def _receive_disks(access: Access, tar: xva.TarReader, made: Import, force: bool) -> None:
    total = sum(size for _i, _v, size in made.disks) or 1
    done = 0
    last = 0.0
    for ident, vdi, size in made.disks:
        fd = os.open(vdi_file(access, vdi), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            writer = sparse.SparseWriter(fd)

            def progress(offset: int, base: int = done) -> None:
                nonlocal last
                if time.monotonic() - last >= PROGRESS_EVERY:
                    last = time.monotonic()
                    access.progress(min((base + offset) / total, 0.99))
                    access.check_cancelled()

            xva.read_disk(tar, ident, size, writer.write_at, progress, force)
            os.fsync(fd)
        finally:
            os.close(fd)
        done += size


def _complete(access: Access, made: Import) -> None:
    """Clear ``import`` from the new VMs and account the disks written (import.ml complete_import)."""
    disks = access.daemon.disks
    with access.daemon.store.transaction() as tx:
        for vm in made.vms:
            rec = tx.find("VM", vm)
            if rec is not None:
                rec["current_operations"].pop(made.key, None)
        srs = set()
        for vdi in made.vdis:
            rec = tx.find("VDI", vdi)
            if rec is not None:
                sr = tx.get("SR", rec["SR"])
                rec["physical_utilisation"] = disks.allocated(sr["uuid"], vdi_api.file_of(rec))
                srs.add(rec["SR"])
        for sr in srs:
            vdi_api.account(tx, sr)


def _undo(access: Access, made: Import) -> None:
    """Destroy everything the import made (import.ml cleanup)."""
    files = []
    with access.daemon.store.transaction() as tx:
        for vm in made.vms:
            rec = tx.find("VM", vm)
            if rec is not None:
                vm_api.remove_vm(tx, vm, rec)
        for vdi in made.vdis:
            if tx.read("VDI", vdi) is not None:
                files.append(vdi_api.remove_vdi(tx, vdi))
        for net in made.networks:
            if tx.read("network", net) is not None and not tx.referrers("VIF", "network", net):
                tx.delete("network", net)
    for f in files:
        with contextlib.suppress(ApiError):
            access.daemon.disks.remove_vdi(*f)
