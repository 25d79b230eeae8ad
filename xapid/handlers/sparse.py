"""Reading and writing VDI files so that holes stay holes.

:class:`SparseWriter` writes a stream into a file: all-zero runs (checked :data:`GRAIN` bytes at a
time) are never written; where the file already has data there, the range is punched out
(``fallocate(PUNCH_HOLE)``), so what reads as zeros occupies nothing.  :class:`SparseReader` reads a
file through its data extents (``SEEK_DATA``/``SEEK_HOLE``): a hole is answered from a shared zero
buffer without a system call.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import functools
import os

from xapid import cbtlog
from xapid.storage import data_extents

GRAIN = 64 * 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``length`` bytes at ``offset`` (they read as zeros); False where unsupported."""
    if _fallocate is None or length <= 0:
        return False
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


@functools.lru_cache(maxsize=16)
def zeros(n: int) -> bytes:
    """``n`` zero bytes, shared (the common sizes are made once)."""
    return bytes(n)


def _is_zero(data: bytes | bytearray, start: int, end: int) -> bool:
    # A bytes comparison is a memcmp; comparing memoryviews goes item by item (100 times slower).
    # Most data grains have a non-zero first or last byte: no copy for those.
    if data[start] or data[end - 1]:
        return False
    return data[start:end] == zeros(end - start)


class SparseWriter:
    """Writes pieces of a disk into ``fd`` (opened for writing), skipping zeros."""

    def __init__(self, fd: int, track: bool = False) -> None:
        self.fd = fd
        self.written = 0  # bytes really written (data)
        self._punch = True
        # With ``track``: the changed block tracking blocks every write or clear touched.
        self.touched: set[int] | None = set() if track else None

    def write_at(self, offset: int, data: bytes | bytearray) -> None:
        """Write ``data`` at ``offset``: its all-zero grains become holes, the rest is written."""
        if self.touched is not None:
            self.touched.update(cbtlog.blocks_of(offset, len(data)))
        view = memoryview(data)
        run = 0  # start of the pending data run
        pos = 0
        n = len(data)
        while pos < n:
            end = min(pos + GRAIN, n)
            if _is_zero(data, pos, end):
                if run < pos:
                    self._write(offset + run, view[run:pos])
                zero_end = end
                while zero_end < n and _is_zero(data, zero_end, min(zero_end + GRAIN, n)):
                    zero_end = min(zero_end + GRAIN, n)
                self.clear(offset + pos, zero_end - pos)
                run = pos = zero_end
                continue
            pos = end
        if run < n:
            self._write(offset + run, view[run:n])

    def _write(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.written += len(view)

    def clear(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros without allocating them."""
        if self.touched is not None:
            self.touched.update(cbtlog.blocks_of(offset, length))
        try:
            start = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # nothing but a hole from here on
            start = offset
        if start >= offset + length:
            return  # a hole already
        if self._punch and punch_hole(self.fd, offset, length):
            return
        self._punch = False
        for at in range(offset, offset + length, 1 << 20):
            self._write(at, memoryview(zeros(min(1 << 20, offset + length - at))))


class SparseReader:
    """Reads a disk file of ``size`` bytes through its data extents."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.extents = data_extents(fd, size)
        self._starts = [o for o, _ in self.extents]

    def has_data(self, offset: int, length: int) -> bool:
        """Whether any byte in ``[offset, offset + length)`` lies in a data extent."""
        i = bisect.bisect_right(self._starts, offset + length - 1) - 1
        return i >= 0 and self.extents[i][0] + self.extents[i][1] > offset

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (zeros past the end of the file)."""
        length = max(0, min(length, self.size - offset))
        if not self.has_data(offset, length):
            return zeros(length)
        data = os.pread(self.fd, length, offset)
        return data if len(data) == length else data.ljust(length, b"\0")
