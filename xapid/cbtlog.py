"""Changed block tracking logs: which 64 KiB blocks of a VDI were written, snapshot to snapshot.

A VDI with CBT enabled has a log beside its disk file (``<sr>/<location>.cbtlog``): an id, the id
of the log it follows (its parent) and the blocks written since that parent was closed.  A
snapshot closes the log: the snapshot keeps it, the VDI starts a new one whose parent it is (as
blktap's CBT logs chain).  ``VDI.list_changed_blocks(from, to)`` is the union of the logs after
``from``'s, up to and including ``to``'s.  ``VDI.data_destroy`` deletes a snapshot's data and
keeps its log, which is what lets a backup tool drop old snapshots and still ask what changed.

Every write of a log is atomic and durable (written aside, fsynced, renamed).
"""

from __future__ import annotations

import base64
import json
import uuid as uuidlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xapid import statefiles
from xapid.errors import ApiError

BLOCK = 64 * 1024  # the CBT block: one bit of the bitmap
SUFFIX = ".cbtlog"


def path(sr_dir: Path, location: str) -> Path:
    return sr_dir / f"{location}{SUFFIX}"


def blocks_of(offset: int, length: int) -> range:
    """The CBT blocks that ``length`` bytes at ``offset`` touch."""
    if length <= 0:
        return range(0)
    return range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)


def read(log: Path) -> dict[str, Any] | None:
    """The log (``id``, ``parent``, ``blocks``), or None when the VDI has none."""
    data = statefiles.read_bytes(log)
    if data is None:
        return None
    doc = json.loads(data)
    return {"id": str(doc["id"]), "parent": doc.get("parent"), "blocks": [int(b) for b in doc.get("blocks", [])]}


def _write(log: Path, doc: dict[str, Any]) -> None:
    statefiles.write_atomic(log, json.dumps(doc, sort_keys=True).encode(), mode=0o600)


def start(log: Path, parent: str | None = None) -> str:
    """A new empty log (following ``parent``); returns its id."""
    new = str(uuidlib.uuid4())
    _write(log, {"id": new, "parent": parent, "blocks": []})
    return new


def remove(log: Path) -> None:
    if log.exists():
        statefiles.remove(log)


def mark(log: Path, blocks: Iterable[int]) -> None:
    """Record ``blocks`` as written (a no-op for a VDI without a log)."""
    doc = read(log)
    if doc is None:
        return
    merged = set(doc["blocks"]) | set(blocks)
    if len(merged) != len(doc["blocks"]):
        doc["blocks"] = sorted(merged)
        _write(log, doc)


def close_for_snapshot(live: Path, snapshot: Path) -> None:
    """A snapshot of the VDI of ``live`` was taken: it keeps the log, the VDI starts the next one."""
    doc = read(live)
    if doc is None:
        return
    _write(snapshot, doc)
    start(live, parent=doc["id"])


def changed_between(sr_dirs: Iterable[Path], log_from: Path, log_to: Path, size: int, refs: tuple[str, str]) -> str:
    """The base64 bitmap (block 0 is the most significant bit of byte 0) of the blocks written
    after ``log_from`` was closed up to ``log_to``; ``VDI_NO_CBT_METADATA [ref]`` for a missing log
    (``refs``: the two VDIs), ``SR_BACKEND_FAILURE_460`` if the logs are unrelated."""
    first, last = read(log_from), read(log_to)
    if first is None or last is None:
        raise ApiError("VDI_NO_CBT_METADATA", refs[0] if first is None else refs[1])
    logs: dict[str, dict[str, Any]] = {}
    for folder in sr_dirs:
        for entry in folder.glob(f"*{SUFFIX}"):
            doc = read(entry)
            if doc is not None:
                logs[doc["id"]] = doc
    changed: set[int] = set()
    current: dict[str, Any] | None = last
    while current is not None and current["id"] != first["id"]:
        changed.update(current["blocks"])
        current = logs.get(current["parent"]) if current["parent"] else None
    if current is None:
        raise ApiError("SR_BACKEND_FAILURE_460", "", "Failed to calculate changed blocks for given VDIs. "
                       "[opterr=Source and target VDI are unrelated]", "")
    bitmap = bytearray(((size + BLOCK - 1) // BLOCK + 7) // 8)
    for block in changed:
        if block // 8 < len(bitmap):
            bitmap[block // 8] |= 0x80 >> (block % 8)
    return base64.b64encode(bytes(bitmap)).decode("ascii")
