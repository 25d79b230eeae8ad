"""The dynamic VHD format (Microsoft's VHD specification), streamed both ways.

Export (:func:`export_layout`, :func:`export_stream`): a dynamic VHD holding only the blocks of the
disk that have data (from the file's data extents), in the layout xapi's vhd-tool writes: a copy of
the footer, the dynamic header, the block allocation table, the blocks in disk order (each a sector
bitmap then its data), the footer.  Its length is known before the first byte is sent.

Import (:class:`VhdReader`): reads such a stream front to back, never seeking back, so a socket can
feed it: footer copy, header, BAT, then each allocated block where the BAT says it is.  Blocks must
appear in increasing file order (vhd-tool's and qemu-img's layout); a BAT pointing backwards, a
differencing disk or a bad checksum is :class:`VhdError`.  Only sectors the block's bitmap marks
present are handed on, so the holes of the source stay holes.
"""

from __future__ import annotations

import struct
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator

SECTOR = 512
BLOCK = 2 * 1024 * 1024  # vhd-tool's and xapi's block size
FOOTER = 512
HEADER = 1024
UNALLOCATED = 0xFFFFFFFF
MAX_SIZE = 2040 * 1024**3  # xapi's Constants.max_vhd_size
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, the origin of VHD timestamps
DYNAMIC, FIXED, DIFFERENCING = 3, 2, 4


class VhdError(Exception):
    """The stream is not a dynamic VHD this reader can take."""


def _checksum(data: bytes, skip: int) -> int:
    """The one's complement of the sum of all bytes but the 4 at ``skip`` (the checksum field)."""
    return ~(sum(data[:skip]) + sum(data[skip + 4:])) & 0xFFFFFFFF


def geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track for ``size`` bytes (the VHD specification's algorithm)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def footer(size: int, disk_uuid: bytes, disk_type: int = DYNAMIC, timestamp: int | None = None) -> bytes:
    """The 512-byte footer of a ``size``-byte disk."""
    stamp = int(time.time() if timestamp is None else timestamp) - VHD_EPOCH
    cyl, heads, spt = geometry(size)
    body = struct.pack(">8sIIQI4sI4sQQHBBII16sB", b"conectix", 2, 0x00010000,
                       FOOTER if disk_type != FIXED else 0xFFFFFFFFFFFFFFFF, stamp & 0xFFFFFFFF,
                       b"xapi", 0x00010000, b"Lnux", size, size, cyl, heads, spt, disk_type, 0, disk_uuid, 0)
    body = body.ljust(FOOTER, b"\0")
    return body[:64] + struct.pack(">I", _checksum(body, 64)) + body[68:]


def dynamic_header(table_offset: int, entries: int) -> bytes:
    """The 1024-byte dynamic disk header (no parent)."""
    body = struct.pack(">8sQQIII", b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000, entries, BLOCK)
    body = body.ljust(HEADER, b"\0")
    return body[:36] + struct.pack(">I", _checksum(body, 36)) + body[40:]


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


BITMAP = _round_up(BLOCK // SECTOR // 8, SECTOR)  # one bit per sector, padded to a sector


def allocated_blocks(extents: Iterable[tuple[int, int]], size: int) -> list[int]:
    """The numbers of the blocks that hold any byte of the (offset, length) data ``extents``."""
    out: set[int] = set()
    for offset, length in extents:
        end = min(offset + length, size)
        if end > offset:
            out.update(range(offset // BLOCK, (end - 1) // BLOCK + 1))
    return sorted(out)


def export_layout(size: int, blocks: list[int]) -> tuple[int, int, int]:
    """(table offset, first block offset, total length) of the dynamic VHD of ``blocks``."""
    entries = (size + BLOCK - 1) // BLOCK
    table = FOOTER + HEADER
    first = table + _round_up(entries * 4, SECTOR)
    return table, first, first + len(blocks) * (BITMAP + BLOCK) + FOOTER


def export_stream(size: int, blocks: list[int], read_at: Callable[[int, int], bytes],
                  disk_uuid: bytes | None = None) -> Iterator[bytes]:
    """The bytes of the dynamic VHD of a ``size``-byte disk whose allocated blocks are ``blocks``.

    ``read_at(offset, length)`` reads the disk (short reads past its end are padded with zeros);
    one block at a time is held in memory.
    """
    if size > MAX_SIZE:
        raise VhdError(f"a VHD holds at most {MAX_SIZE} bytes")
    disk_uuid = disk_uuid or uuidlib.uuid4().bytes
    entries = (size + BLOCK - 1) // BLOCK
    table_offset, first, _total = export_layout(size, blocks)
    foot = footer(size, disk_uuid)
    bat = bytearray(b"\xff" * _round_up(entries * 4, SECTOR))
    for i, block in enumerate(blocks):
        struct.pack_into(">I", bat, block * 4, (first + i * (BITMAP + BLOCK)) // SECTOR)
    yield foot + dynamic_header(table_offset, entries) + bytes(bat)
    bitmap = b"\xff" * (BLOCK // SECTOR // 8) + b"\0" * (BITMAP - BLOCK // SECTOR // 8)
    for block in blocks:
        offset = block * BLOCK
        data = read_at(offset, min(BLOCK, size - offset))
        yield bitmap
        yield data if len(data) == BLOCK else data.ljust(BLOCK, b"\0")
    yield foot


class VhdReader:
    """Reads a dynamic VHD from ``read(n)`` (up to ``n`` bytes, b"" at the end) front to back."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.position = 0
        self.size = 0
        self._bat: list[tuple[int, int]] = []  # (file offset, block number), in file order

    def _exact(self, n: int) -> bytes:
        parts = []
        left = n
        while left:
            data = self._read(min(left, 1 << 20))
            if not data:
                raise EOFError("the VHD stream ended early")
            parts.append(data)
            left -= len(data)
        self.position += n
        return b"".join(parts)

    def _skip_to(self, offset: int) -> None:
        if offset < self.position:
            raise VhdError("the VHD's blocks are not in file order (cannot stream it)")
        while self.position < offset:
            self._exact(min(offset - self.position, 1 << 20))

    def read_header(self) -> int:
        """Read footer copy, dynamic header and BAT; return the disk's virtual size."""
        foot = self._exact(FOOTER)
        if foot[:8] != b"conectix":
            raise VhdError("not a VHD (no footer copy at the start: only dynamic VHDs are accepted)")
        if struct.unpack_from(">I", foot, 64)[0] != _checksum(foot, 64):
            raise VhdError("bad VHD footer checksum")
        data_offset, = struct.unpack_from(">Q", foot, 16)
        self.size, = struct.unpack_from(">Q", foot, 48)
        disk_type, = struct.unpack_from(">I", foot, 60)
        if disk_type == DIFFERENCING:
            raise VhdError("differencing VHDs cannot be imported")
        if disk_type != DYNAMIC:
            raise VhdError(f"unsupported VHD disk type {disk_type} (only dynamic VHDs are accepted)")
        self._skip_to(data_offset)
        head = self._exact(HEADER)
        if head[:8] != b"cxsparse":
            raise VhdError("no dynamic disk header")
        if struct.unpack_from(">I", head, 36)[0] != _checksum(head, 36):
            raise VhdError("bad VHD dynamic header checksum")
        table_offset, _version, entries, block_size = struct.unpack_from(">QIII", head, 16)
        if block_size != BLOCK:
            raise VhdError(f"unsupported VHD block size {block_size}")
        if entries * BLOCK < self.size or entries > MAX_SIZE // BLOCK + 1:
            raise VhdError("the VHD's block table does not cover its size")
        self._skip_to(table_offset)
        raw = self._exact(entries * 4)
        self._bat = sorted((sector * SECTOR, n) for n, sector in enumerate(struct.unpack(f">{entries}I", raw))
                           if sector != UNALLOCATED)
        return self.size

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """(disk offset, data) of each run of present sectors, in stream order; then the rest is read."""
        bitmap_bytes = BLOCK // SECTOR // 8
        for file_offset, number in self._bat:
            self._skip_to(file_offset)
            bitmap = self._exact(BITMAP)[:bitmap_bytes]
            data = self._exact(BLOCK)
            base = number * BLOCK
            if bitmap == b"\xff" * bitmap_bytes:
                yield base, data
                continue
            start = None
            for sector in range(BLOCK // SECTOR + 1):
                present = sector < BLOCK // SECTOR and bitmap[sector >> 3] & (0x80 >> (sector & 7))
                if present and start is None:
                    start = sector
                elif not present and start is not None:
                    yield base + start * SECTOR, data[start * SECTOR:sector * SECTOR]
                    start = None
