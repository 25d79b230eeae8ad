"""Storage emulation: the SM table from driver descriptors, SR folders and VDI files.

Each SR owns a folder ``<state-dir>/sr/<sr-uuid>/``; each VDI is a real sparse
file ``<vdi-uuid>.img`` in it whose length is the VDI's ``virtual_size``.
Files are made before the record that owns them commits and removed after the
record is gone, so a crash can leave only files no record owns;
:func:`reconcile` moves those to ``<state-dir>/lost+found/`` at start-up.
Every path is handled through :mod:`xapid.statefiles` (no symbolic link is
followed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog

from xapid import cbtlog, statefiles
from xapid.errors import ApiError
from xapid.store import Store, Transaction

log = structlog.get_logger("xapid.storage")

SM_KEYS = ("type", "name_label", "name_description", "vendor", "copyright", "version",
           "required_api_version", "capabilities", "features", "configuration", "driver_filename",
           "required_cluster_stack")


# Descriptor keys that are not SM fields: how the emulation treats the driver.
#   clustering: PBD.plug and SR.create need the host's Cluster_host on one of required_cluster_stack,
#   enabled and quorate (xapi_clustering.ml assert_cluster_host_is_enabled_for_matching_sms: real
#   xapi's rule, which real gfs2 lives by).  Without it a required stack is the design's: HA starts it.
EMULATION_KEYS = ("clustering",)

_clustering_types: set[str] = set()


class DescriptorError(Exception):
    pass


def needs_clustering(sr_type: str) -> bool:
    """Whether SRs of ``sr_type`` plug only on hosts of an enabled, quorate cluster (``clustering``)."""
    return sr_type in _clustering_types


def load_descriptors(sm_dir: Path) -> dict[str, dict[str, Any]]:
    """Read every ``*.json`` driver descriptor; a bad one is a start-up error naming the file."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(sm_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DescriptorError(f"{path}: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("type"), str) or not doc["type"]:
            raise DescriptorError(f"{path}: descriptor needs a non-empty string 'type'")
        unknown = set(doc) - set(SM_KEYS) - set(EMULATION_KEYS)
        if unknown:
            raise DescriptorError(f"{path}: unknown keys {sorted(unknown)}")
        stacks = doc.get("required_cluster_stack", [])
        if not isinstance(stacks, list) or not all(isinstance(s, str) for s in stacks):
            raise DescriptorError(f"{path}: required_cluster_stack must be a list of strings")
        if not isinstance(doc.get("clustering", False), bool):
            raise DescriptorError(f"{path}: clustering must be true or false")
        features = doc.get("features", {})
        if not isinstance(features, dict) or not all(isinstance(v, int) for v in features.values()):
            raise DescriptorError(f"{path}: features must map names to integer versions")
        if doc["type"] in out:
            raise DescriptorError(f"{path}: duplicate driver type {doc['type']}")
        out[doc["type"]] = doc
    return out


def sync_sm_table(store: Store, descriptors: dict[str, dict[str, Any]]) -> None:
    """Make the SM table match the descriptors (create, update, remove), keeping refs stable."""
    _clustering_types.clear()
    _clustering_types.update(t for t, doc in descriptors.items() if doc.get("clustering"))
    with store.transaction() as tx:
        by_type = {rec["type"]: ref for ref, rec in tx.items("SM")}
        for sm_type, doc in descriptors.items():
            values = {k: doc[k] for k in SM_KEYS if k in doc}
            values.setdefault("name_label", sm_type)
            if sm_type in by_type:
                tx.update("SM", by_type[sm_type], **values)
            else:
                tx.create("SM", values)
        for sm_type, ref in by_type.items():
            if sm_type not in descriptors:
                tx.delete("SM", ref)


def sm_of(tx: Transaction, sr_type: str) -> tuple[str, dict[str, Any]] | None:
    """The SM record driving SRs of ``sr_type``."""
    for ref, rec in tx.items("SM"):
        if rec["type"] == sr_type:
            return ref, rec
    return None


def plain_name(name: str) -> bool:
    """True iff ``name`` is one usable path component: 1 to 200 bytes, not ``.`` or ``..``, no ``/``,
    NUL or other control character."""
    return (0 < len(name.encode("utf-8", "surrogatepass")) <= 200 and name not in (".", "..") and "/" not in name
            and not any(ord(ch) < 32 or ord(ch) == 127 for ch in name))


class Disks:
    """Files backing SRs and VDIs under the state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "sr"
        self.lost_and_found = state_dir / "lost+found"

    def sr_dir(self, sr_uuid: str) -> Path:
        if not plain_name(sr_uuid):  # never a path that leaves <state-dir>/sr (SR.introduce takes any uuid)
            raise ApiError("SR_BACKEND_FAILURE", "1", "", f"the SR uuid {sr_uuid!r} cannot name a folder")
        return self.root / sr_uuid

    def vdi_path(self, sr_uuid: str, vdi_uuid: str) -> Path:
        return self.sr_dir(sr_uuid) / f"{vdi_uuid}.img"

    def make_sr_dir(self, sr_uuid: str) -> Path:
        """Create the SR's folder (and ``sr/``) if missing."""
        path = self.sr_dir(sr_uuid)
        try:
            statefiles.make_dirs(path)
        except OSError as e:
            raise ApiError("SR_BACKEND_FAILURE", "1", "", f"cannot create the SR folder: {e.strerror}") from None
        return path

    def create_vdi(self, sr_uuid: str, vdi_uuid: str, size: int) -> Path:
        """A new sparse file of ``size`` bytes, durable (file and folder fsynced) before it returns."""
        path = self.vdi_path(sr_uuid, vdi_uuid)
        try:
            fd = statefiles.create_new(path)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            statefiles.fsync_dir(path.parent)
        except (OSError, OverflowError, ValueError) as e:
            if not isinstance(e, FileExistsError):
                with contextlib.suppress(OSError):  # the call fails, so no file may remain
                    statefiles.remove(path)
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise ApiError("SR_BACKEND_FAILURE", "1", "", f"cannot create VDI file: {reason}") from None
        return path

    def allocated(self, sr_uuid: str, vdi_uuid: str) -> int:
        """Bytes the VDI's file really occupies (its allocated blocks); 0 when it has no file."""
        try:
            return self.vdi_path(sr_uuid, vdi_uuid).stat().st_blocks * 512
        except (OSError, ApiError):
            return 0

    def copy_vdi(self, src: tuple[str, str], dst: tuple[str, str], size: int, share: bool = False) -> Path:
        """A new file for VDI ``dst`` (sr uuid, vdi uuid) holding the bytes of ``src``, ``size`` long.

        Only the data extents of the source are read and written (``SEEK_DATA``/``SEEK_HOLE``), so
        holes stay holes.  With ``share`` (a clone or snapshot) the copy first tries a reflink
        (``FICLONE``: blocks shared copy-on-write, as an SM's fast clone); a filesystem without
        reflinks gets a real copy.  The new file is fsynced; on failure no file remains.
        """
        src_path = self.vdi_path(*src)
        path = self.vdi_path(*dst)
        made = False
        try:
            fin = os.open(src_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fout = statefiles.create_new(path)
                made = True
                try:
                    if not (share and _reflink(fin, fout)):
                        _copy_extents(fin, fout, min(size, os.fstat(fin).st_size))
                    os.ftruncate(fout, size)
                    os.fsync(fout)
                finally:
                    os.close(fout)
            finally:
                os.close(fin)
            statefiles.fsync_dir(path.parent)
        except (OSError, OverflowError, ValueError) as e:
            if made:
                with contextlib.suppress(OSError):
                    statefiles.remove(path)
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise ApiError("SR_BACKEND_FAILURE", "1", "", f"cannot copy VDI file: {reason}") from None
        return path

    def resize_vdi(self, sr_uuid: str, vdi_uuid: str, size: int) -> None:
        """Grow (or shrink) the VDI's file to ``size`` bytes; new space is a hole."""
        path = self.vdi_path(sr_uuid, vdi_uuid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except (OSError, OverflowError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise ApiError("SR_BACKEND_FAILURE", "1", "", f"cannot resize VDI file: {reason}") from None

    def write_at(self, sr_uuid: str, vdi_uuid: str, offset: int, data: bytes) -> None:
        """Write ``data`` into the VDI's file at ``offset`` and make it durable (a memory image header)."""
        fd = os.open(self.vdi_path(sr_uuid, vdi_uuid), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_vdi(self, sr_uuid: str, vdi_uuid: str) -> None:
        """Remove the VDI's file and its changed block tracking log, if any."""
        try:
            statefiles.remove(self.vdi_path(sr_uuid, vdi_uuid))
        except (OSError, ApiError):  # the record is gone already; a leftover is reconciled at the next start
            pass
        self.remove_cbt_log(sr_uuid, vdi_uuid)

    def cbt_log(self, sr_uuid: str, vdi_uuid: str) -> Path:
        """Where the VDI's changed block tracking log lives (see :mod:`xapid.cbtlog`)."""
        return cbtlog.path(self.sr_dir(sr_uuid), vdi_uuid)

    def remove_cbt_log(self, sr_uuid: str, vdi_uuid: str) -> None:
        try:
            cbtlog.remove(self.cbt_log(sr_uuid, vdi_uuid))
        except (OSError, ApiError):  # as remove_vdi
            pass

    def remove_sr(self, sr_uuid: str) -> None:
        if plain_name(sr_uuid):
            try:
                statefiles.remove_tree(self.sr_dir(sr_uuid))
            except OSError:  # as remove_vdi
                pass


def reconcile(store: Store, disks: Disks) -> list[str]:
    """Move every file and folder under ``sr/`` that no record owns into ``lost+found/<time>/sr/``.

    ``sr/<X>`` is owned by the SR whose uuid is X; ``sr/<X>/<Y>.img`` (and ``<Y>.cbtlog``) by a VDI
    of uuid Y in that SR.
    Anything else (a crash between a file and its record, a forgotten SR's folder) is quarantined,
    never deleted, and logged.  Returns the moved paths relative to ``sr/``.
    """
    srs = {rec["uuid"] for _ref, rec in store.items("SR")}
    owned: dict[str, set[str]] = {}
    for _ref, rec in store.items("VDI"):
        sr = store.get("SR", rec["SR"])
        if sr is not None:
            names = {rec["uuid"], rec["location"] or rec["uuid"]}
            owned.setdefault(sr["uuid"], set()).update({f"{n}.img" for n in names}
                                                       | {f"{n}{cbtlog.SUFFIX}" for n in names})
    moved: list[str] = []
    dest = disks.lost_and_found / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) / "sr"
    for name, kind in statefiles.list_dir(disks.root):
        if kind == "dir" and name in srs:
            for child, _kind in statefiles.list_dir(disks.root / name):
                if child not in owned.get(name, set()):
                    moved.append(f"{name}/{child}")
        else:
            moved.append(name)
    for rel in moved:
        target = _free(dest / rel)
        statefiles.move(disks.root / rel, target)
        log.warning("quarantined a file no record owns (left by a crash or SR.forget)", path=f"sr/{rel}",
                    moved_to=str(target))
    return moved


def _free(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``... whichever does not exist yet."""
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def _reflink(src: int, dst: int) -> bool:
    """Share ``src``'s blocks into ``dst`` (copy-on-write); False where the filesystem cannot."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError:
        return False
    return True


def data_extents(fd: int, length: int) -> list[tuple[int, int]]:
    """The (offset, length) data extents of the first ``length`` bytes of ``fd`` (the whole range
    where the filesystem cannot tell)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < length:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            return [(0, length)]  # no SEEK_DATA here: everything counts as data
        if start >= length:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        out.append((start, end - start))
        pos = end
    return out


def _copy_extents(src: int, dst: int, length: int) -> None:
    """Copy the data extents of ``src`` to the same offsets of ``dst`` (in the kernel where it can)."""
    for offset, size in data_extents(src, length):
        done = 0
        while done < size:
            try:
                n = os.copy_file_range(src, dst, size - done, offset + done, offset + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                n = _copy_plain(src, dst, offset + done, size - done)
            if n == 0:
                break
            done += n


def _copy_plain(src: int, dst: int, offset: int, size: int) -> int:
    chunk = os.pread(src, min(size, 1 << 20), offset)
    if chunk:
        os.pwrite(dst, chunk, offset)
    return len(chunk)
