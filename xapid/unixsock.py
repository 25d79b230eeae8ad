"""Unix-domain socket paths longer than the kernel's limit.

An ``AF_UNIX`` address holds at most 107 bytes, and state dirs (test and
benchmark temporary folders above all) are often longer.  Such a path is
reached through its folder instead: the folder is opened and the socket named
``/proc/self/fd/<fd>/<name>``, which Linux resolves at ``bind`` and
``connect`` time.  The folder's descriptor must stay open while the address
is in use (for a listening socket: as long as it listens).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

MAX_UNIX_PATH = 107


def fits(path: Path | str) -> bool:
    """Whether ``path`` can be used as an ``AF_UNIX`` address as it is."""
    return len(os.fsencode(str(path))) <= MAX_UNIX_PATH


def alias(path: Path | str) -> tuple[str, int | None]:
    """An address for ``path`` and the folder descriptor it needs (None: the path itself serves).

    The caller closes the descriptor when done with the address.
    """
    path = Path(path)
    if fits(path):
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def connect(sock: socket.socket, path: Path | str) -> None:
    """``sock.connect(path)``, however long ``path`` is."""
    address, fd = alias(path)
    try:
        sock.connect(address)
    finally:
        if fd is not None:
            os.close(fd)
