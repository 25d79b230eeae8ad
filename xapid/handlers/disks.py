"""Disk import and export over HTTP: ``PUT /import_raw_vdi`` and ``GET /export_raw_vdi``
(xapi's import_raw_vdi.ml, export_raw_vdi.ml and importexport.ml).

* ``vdi=`` names the VDI by ref or uuid; ``format=`` is ``raw`` (the default) or ``vhd`` (a dynamic
  VHD); any other format is 404 and fails the task with ``INTERNAL_ERROR ["Unknown format x"]``, as
  xapi.  ``PUT /import_raw_vdi?sr_id=`` without ``vdi`` creates ``Imported VDI`` of the body's size
  (raw only), as xapi.
* ``chunked`` (present, whatever its value, as xapi reads it) takes a raw body in vhd-tool's chunked
  format: pieces each led by a 12-byte little-endian header (offset u64, length u32) and written at
  their offset, ended by an all-zero header; with ``format=vhd`` it is 404, as xapi ("Cannot handle
  chunked VHD").
* Import bodies come by ``content-length`` or chunked, up to ``max-upload-size``, and are written as
  they arrive: zero runs are never written (holes stay holes, old data under them is punched out).
  A raw body or a VHD larger than the VDI's ``virtual_size`` is ``VDI_TOO_SMALL [vdi, size]``
  (refused from its content-length before a byte is read when it can be).  While a VDI is written it
  carries ``blocked`` in ``current_operations`` (the VDI operation enum has no import: xapi plugs it
  read-write into dom0, which equally keeps every other operation off it); a read-only VDI is
  ``VDI_READONLY``, one plugged into a running VM ``VDI_IN_USE``.
* Exports stream the file: raw with its ``content-length`` (holes are read from a zero buffer, not the
  disk), VHD as a dynamic VHD of the allocated blocks only (``VDI_TOO_LARGE`` past 2040 GiB).  A VDI
  being exported carries ``copy`` (a reading operation, as VDI.copy's source).
* The task (``task_id``) moves with the bytes and ends with the VDI's ref as its result; a client
  that goes away mid-upload fails it with ``CLIENT_ERROR`` and the VDI's operation is cleared.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from xapid import cbtlog, operations
from xapid.api import vdi as vdi_api
from xapid.errors import ApiError
from xapid.handlers import sparse, vhd
from xapid.handlers.access import Access, Refusal, bad_request, not_found, route
from xapid.handlers.locality import serve_here_or_redirect
from xapid.schema import Type
from xapid.server import ClientGone, Response, Route
from xapid.store import new_ref

if TYPE_CHECKING:
    from pathlib import Path

PIECE = 1 << 20  # bytes read or sent at a time
# Xen Orchestra's content-length for a stream of unknown length: it sends the data, then closes
# without waiting for an answer (xen-api putResource).  Such a body ends where the client closes.
UNKNOWN_LENGTH = 1024**5
PROGRESS_EVERY = 0.5  # seconds between task progress updates
FORMATS = {"raw": "application/octet-stream", "vhd": "application/vhd"}
VDI_REF = Type("ref", "VDI")


def with_slash(r: Route) -> list[Route]:
    """``r`` and its alias with a trailing slash (Xen Orchestra asks for ``/import/``; xapi matches by prefix)."""
    return [r, dataclasses.replace(r, prefix=r.prefix + "/")]


def routes() -> list[Route]:
    return [
        *with_slash(route("put_import_raw_vdi", import_raw_vdi, stream=True, body_cap="max_upload_size")),
        *with_slash(route("get_export_raw_vdi", export_raw_vdi)),
    ]


# -- shared --------------------------------------------------------------------------------------------


def vdi_of(access: Access, param: str = "vdi") -> str | None:
    """The VDI named by ``vdi=`` (or ``param``: a ref, else a uuid, else ``UUID_INVALID``), None without it."""
    name = access.param(param)
    if not name:
        return None
    store = access.daemon.store
    if store.exists("VDI", name):
        return name
    ref = store.by_uuid("VDI", name)
    if ref is None:
        raise ApiError("UUID_INVALID", "VDI", name)
    return ref


def format_of(access: Access) -> str:
    fmt = (access.param("format") or "raw").lower()
    if fmt not in FORMATS:
        raise Refusal(not_found(), ["INTERNAL_ERROR", f"Unknown format {fmt}"])
    return fmt


def vdi_file(access: Access, vdi: str) -> Path:
    store = access.daemon.store
    rec = store.get("VDI", vdi)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "VDI", vdi)
    sr = store.get("SR", rec["SR"])
    if sr is None:
        raise ApiError("HANDLE_INVALID", "SR", rec["SR"])
    return access.daemon.disks.vdi_path(sr["uuid"], vdi_api.file_of(rec))


@contextmanager
def vdi_operation(access: Access, vdi: str, op: str, writing: bool) -> Iterator[int]:
    """Check ``vdi`` can be read (or written), keep ``op`` in its ``current_operations`` meanwhile;
    yields its virtual size.  Writing refreshes its physical utilisation afterwards."""
    key = access.task or new_ref()
    store = access.daemon.store
    with store.transaction() as tx:
        rec = tx.get("VDI", vdi)
        if writing:
            if rec["read_only"]:
                raise ApiError("VDI_READONLY", vdi)
            if rec["type"] == "cbt_metadata":  # its data was destroyed: nothing to write into
                raise ApiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
            busy = next(iter(rec["current_operations"].items()), None)
            if busy is not None:
                raise ApiError("OTHER_OPERATION_IN_PROGRESS", "VDI", vdi, busy[1], busy[0])
            for vbd in tx.referrers("VBD", "VDI", vdi):
                vbd_rec = tx.read("VBD", vbd)
                if vbd_rec is not None and vbd_rec["currently_attached"]:
                    raise ApiError("VDI_IN_USE", vdi, "import")
        else:
            operations.assert_vdi(tx, vdi, "copy")
        rec["current_operations"][key] = op
        size = int(rec["virtual_size"])
    try:
        yield size
    finally:
        with store.transaction() as tx:
            current = tx.find("VDI", vdi)
            if current is not None:
                current["current_operations"].pop(key, None)
                if writing:
                    sr = tx.get("SR", current["SR"])
                    current["physical_utilisation"] = access.daemon.disks.allocated(sr["uuid"],
                                                                                    vdi_api.file_of(current))
                    vdi_api.account(tx, current["SR"])


class Progress:
    """Moves the task's progress with the bytes, at most every :data:`PROGRESS_EVERY` seconds."""

    def __init__(self, access: Access, total: int) -> None:
        self.access = access
        self.total = max(total, 1)
        self._last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY:
            self._last = now
            self.access.progress(min(done / self.total, 0.99))
            self.access.check_cancelled()


def content_length(access: Access) -> int | None:
    """The body's announced length; None when it is unknown (chunked, or Xen Orchestra's 1 PiB)."""
    value = access.request.header("content-length")
    return int(value) if value.isdigit() and int(value) != UNKNOWN_LENGTH else None


def until_close(access: Access) -> bool:
    """Whether the body ends where the client closes (Xen Orchestra's :data:`UNKNOWN_LENGTH`)."""
    return access.request.header("content-length") == str(UNKNOWN_LENGTH)


def read_piece(access: Access, n: int = PIECE) -> bytes:
    """Up to ``n`` bytes of the body, b"" at its end (a client closing a body of unknown length ends it)."""
    reader = access.request.reader
    assert reader is not None
    try:
        return reader.read(n)
    except ClientGone:
        if until_close(access):
            return b""
        raise


# -- import -------------------------------------------------------------------------------------------


def import_raw_vdi(access: Access) -> Response:
    """``PUT /import_raw_vdi``: write the body into the VDI (see the module docstring)."""
    fmt = format_of(access)
    pieces = access.param("chunked") is not None
    if pieces and fmt != "raw":
        raise Refusal(not_found(), ["INTERNAL_ERROR", "Cannot handle chunked VHD"])
    vdi = vdi_of(access)
    length = content_length(access)
    made = vdi is None
    store = access.daemon.store
    if vdi is not None:
        serve_here_or_redirect(access, {str(store.get("VDI", vdi)["SR"])})  # type: ignore[index]
    else:
        sr = _import_sr(access)
        serve_here_or_redirect(access, {sr})
        vdi = _new_vdi(access, sr, fmt, length)
    try:
        _write_vdi(access, vdi, fmt, pieces, length)
    except BaseException:
        if made:  # the VDI made for this import goes with it
            with access.daemon.store.transaction() as tx:
                files = vdi_api.remove_vdi(tx, vdi) if tx.read("VDI", vdi) is not None else None
            if files is not None:
                access.daemon.disks.remove_vdi(*files)
        raise
    access.result(vdi, VDI_REF)
    return Response(200, b"", "application/octet-stream", close=True, headers=_headers(access))


def _write_vdi(access: Access, vdi: str, fmt: str, pieces: bool, length: int | None) -> None:
    with vdi_operation(access, vdi, "blocked", writing=True) as size:
        if fmt == "raw" and not pieces and length is not None and length > size:
            raise Refusal(bad_request(f"the body ({length} bytes) is larger than the VDI ({size} bytes)"),
                          ["VDI_TOO_SMALL", vdi, str(length)])
        access.progress(0.0)
        fd = os.open(vdi_file(access, vdi), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        rec = access.daemon.store.get("VDI", vdi) or {}
        writer = sparse.SparseWriter(fd, track=bool(rec.get("cbt_enabled")))
        try:
            if pieces:
                _receive_pieces(access, writer, vdi, size)
            elif fmt == "raw":
                _receive_raw(access, writer, vdi, size, length)
            else:
                _receive_vhd(access, writer, vdi, size)
            os.fsync(fd)
        except ClientGone as e:
            raise ApiError("CLIENT_ERROR", f"the client stopped sending the disk: {e}") from None
        except OSError as e:
            raise ApiError("VDI_IO_ERROR", f"Device I/O errors: {e.strerror}") from None
        finally:
            os.close(fd)
            if writer.touched:  # also what a failed import wrote before it stopped
                sr = access.daemon.store.get("SR", rec["SR"]) or {}
                cbtlog.mark(access.daemon.disks.cbt_log(str(sr.get("uuid", "")), vdi_api.file_of(rec)),
                            writer.touched)


def _headers(access: Access) -> list[tuple[str, str]]:
    return [("cache-control", "no-cache, no-store"), *([("task-id", access.task)] if access.task else [])]


def _import_sr(access: Access) -> str:
    """The SR named by ``sr_id`` or ``sr_uuid`` for an import without ``vdi``."""
    store = access.daemon.store
    sr = access.param("sr_id") or ""
    if not sr and access.param("sr_uuid"):
        sr = store.by_uuid("SR", access.param("sr_uuid") or "") or ""
        if not sr:
            raise ApiError("UUID_INVALID", "SR", access.param("sr_uuid") or "")
    if not sr:
        raise Refusal(bad_request("a vdi or an SR is required"), ["VDI_MISSING"])
    if not store.exists("SR", sr):
        raise ApiError("HANDLE_INVALID", "SR", sr)
    return sr


def _new_vdi(access: Access, sr: str, fmt: str, length: int | None) -> str:
    """xapi: without ``vdi``, a raw body of known length into ``sr`` makes a new VDI."""
    store = access.daemon.store
    if fmt != "raw" or length is None:
        what = "Importing a VHD directly into an SR not yet supported" if fmt != "raw" else \
            "Not enough info supplied to import"
        raise Refusal(bad_request(what), ["INTERNAL_ERROR", what])
    with store.transaction() as tx:
        return vdi_api.create_vdi(access.daemon.disks, tx, {
            "name_label": "Imported VDI", "name_description": "", "SR": sr, "virtual_size": length,
            "type": "user", "sharable": False, "read_only": False, "other_config": {}, "xenstore_data": {},
            "sm_config": {}, "tags": []})


def _receive_raw(access: Access, writer: sparse.SparseWriter, vdi: str, size: int, length: int | None) -> None:
    progress = Progress(access, length if length is not None else size)
    offset = 0
    while True:
        data = read_piece(access)
        if not data:
            break
        if offset + len(data) > size:
            raise ApiError("VDI_TOO_SMALL", vdi, str(offset + len(data)))
        writer.write_at(offset, data)
        offset += len(data)
        progress(offset)


PIECE_HEADER = struct.Struct("<QI")  # vhd-tool's chunked.ml: offset, length, little-endian


def _receive_pieces(access: Access, writer: sparse.SparseWriter, vdi: str, size: int) -> None:
    def exact(n: int) -> bytes:
        parts, left = [], n
        while left:
            data = read_piece(access, min(left, PIECE))
            if not data:
                raise ApiError("CLIENT_ERROR", "the chunked stream ended before its last chunk")
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    progress = Progress(access, size)
    while True:
        offset, length = PIECE_HEADER.unpack(exact(PIECE_HEADER.size))
        if offset == 0 and length == 0:
            break
        if offset + length > size:
            raise ApiError("VDI_TOO_SMALL", vdi, str(offset + length))
        done = 0
        while done < length:
            data = exact(min(PIECE, length - done))
            writer.write_at(offset + done, data)
            done += len(data)
        progress(offset + length)


def _receive_vhd(access: Access, writer: sparse.SparseWriter, vdi: str, size: int) -> None:
    reader = access.request.reader
    assert reader is not None
    stream = vhd.VhdReader(lambda n: read_piece(access, n))
    try:
        disk_size = stream.read_header()
        if disk_size > size:
            raise ApiError("VDI_TOO_SMALL", vdi, str(disk_size))
        progress = Progress(access, disk_size)
        cursor = 0  # everything before it is written or cleared
        for offset, data in stream.blocks():
            if offset >= disk_size:
                continue
            data = data[:disk_size - offset]
            if offset > cursor:
                writer.clear(cursor, offset - cursor)  # sectors the VHD leaves out read as zeros
            writer.write_at(offset, data)
            cursor = max(cursor, offset + len(data))
            progress(offset)
        if cursor < disk_size:
            writer.clear(cursor, disk_size - cursor)
        try:
            while reader.read(PIECE):  # the closing footer
                pass
        except ClientGone:
            pass  # every block is in: a client closing now (Xen Orchestra does) loses nothing
    except vhd.VhdError as e:
        raise ApiError("VDI_IO_ERROR", f"not an importable VHD: {e}") from None
    except EOFError:
        raise ApiError("CLIENT_ERROR", "the VHD stream ended early") from None


# -- export -------------------------------------------------------------------------------------------


def export_raw_vdi(access: Access) -> Response:
    """``GET /export_raw_vdi``: stream the VDI as raw or VHD (see the module docstring)."""
    fmt = format_of(access)
    vdi = vdi_of(access)
    if vdi is None:
        raise ApiError("INTERNAL_ERROR", "Missing vdi query parameter")
    store = access.daemon.store
    rec = store.get("VDI", vdi)
    assert rec is not None
    base = base_of(access) if fmt == "vhd" else None  # vhd-tool's raw output ignores a base
    srs = {str(rec["SR"]), *([str(store.get("VDI", base)["SR"])] if base else [])}  # type: ignore[index]
    serve_here_or_redirect(access, srs)
    size = int(rec["virtual_size"])
    path = vdi_file(access, vdi)
    with store.transaction() as tx:
        operations.assert_vdi(tx, vdi, "copy")  # refuse now, before the 200; marked while it streams
    if fmt == "vhd" and size > vhd.MAX_SIZE:
        raise ApiError("VDI_TOO_LARGE", vdi, str(vhd.MAX_SIZE))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        reader = sparse.SparseReader(fd, size)
    except OSError:
        os.close(fd)
        raise
    blocks: list[int] = []
    if fmt == "raw":
        length = size
    else:
        try:
            blocks = vhd.allocated_blocks(reader.extents, size) if base is None else \
                _changed_blocks(access, reader, size, base)
        except BaseException:
            os.close(fd)
            raise
        length = vhd.export_layout(size, blocks)[2]
    headers = [*_headers(access), ("content-disposition", f'attachment; filename="{rec["uuid"]}.{fmt}"')]
    return Response(200, b"", FORMATS[fmt], close=True, headers=headers, length=length,
                    stream=_send(access, vdi, fmt, fd, reader, size, blocks))


def base_of(access: Access) -> str | None:
    """The VDI named by ``base=`` for a differential export, None without it (importexport.ml
    base_vdi_of_req)."""
    return vdi_of(access, "base")


def _changed_blocks(access: Access, reader: sparse.SparseReader, size: int, base: str) -> list[int]:
    """The VHD blocks whose bytes differ from ``base`` (vhd-tool's ``--relative-to``): a block is left
    out only when both disks hold the same bytes there, holes reading as zeros."""
    rec = access.daemon.store.get("VDI", base)
    assert rec is not None
    base_size = int(rec["virtual_size"])
    fd = os.open(vdi_file(access, base), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        other = sparse.SparseReader(fd, base_size)
        candidates = sorted(set(vhd.allocated_blocks(reader.extents, size))
                            | set(vhd.allocated_blocks(other.extents, min(base_size, size))))
        changed = []
        for block in candidates:
            offset = block * vhd.BLOCK
            n = min(vhd.BLOCK, size - offset)
            theirs = other.read_at(offset, n) if offset < base_size else b""
            if reader.read_at(offset, n) != theirs.ljust(n, b"\0"):
                changed.append(block)
        return changed
    finally:
        os.close(fd)


def _send(access: Access, vdi: str, fmt: str, fd: int, reader: sparse.SparseReader, size: int,
          blocks: list[int]) -> Iterator[bytes]:
    try:
        with vdi_operation(access, vdi, "copy", writing=False):
            access.progress(0.0)
            progress = Progress(access, size)
            if fmt == "raw":
                for offset in range(0, size, PIECE):
                    yield reader.read_at(offset, PIECE)
                    progress(offset)
            else:
                rec = access.daemon.store.get("VDI", vdi)
                disk_uuid = bytes.fromhex(rec["uuid"].replace("-", "")) if rec and len(rec["uuid"]) == 36 else None
                for i, piece in enumerate(vhd.export_stream(size, blocks, reader.read_at, disk_uuid)):
                    yield piece
                    progress(i // 2 * vhd.BLOCK)
            access.result(vdi, VDI_REF)
    finally:
        os.close(fd)

