"""Which processes belong to an emulated host, and signalling them.

An emulated host's processes are all processes whose environment carries
``XAPID_HOST_DIR=<host folder>`` (the adapter sets it for every cluster-stack
script; children inherit it).  Environments are read from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

HOST_DIR_VAR = b"XAPID_HOST_DIR="


def processes_of(host_dir: Path) -> list[int]:
    """Pids of the live (not zombie) processes whose environment names ``host_dir``."""
    needle = HOST_DIR_VAR + os.fsencode(str(host_dir)) + b"\0"
    me = os.getpid()
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if needle not in env + b"\0":
            continue
        # Field 3 of /proc/<pid>/stat is the state; Z (zombie) and X (dead) no longer run.
        state = stat.rsplit(b")", 1)[-1].split()[:1]
        if state and state[0] in (b"Z", b"X"):
            continue
        found.append(pid)
    return found


def signal_all(host_dir: Path, signum: int, rounds: int = 5) -> int:
    """Send ``signum`` to every process of the host, repeating while new ones appear.

    Returns how many distinct processes were signalled.  Repeating catches children that a
    process forked between the scan and the signal.
    """
    done: set[int] = set()
    for _ in range(rounds):
        fresh = [p for p in processes_of(host_dir) if p not in done]
        if not fresh:
            break
        for pid in fresh:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
            done.add(pid)
        if signum == signal.SIGKILL:
            time.sleep(0.01)
    return len(done)


def kill_all(host_dir: Path, timeout: float = 5.0) -> int:
    """SIGKILL every process of the host (SIGCONT first, so stopped ones die at once); wait until none is left."""
    signal_all(host_dir, signal.SIGCONT, rounds=1)
    killed = signal_all(host_dir, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while processes_of(host_dir) and time.monotonic() < deadline:
        signal_all(host_dir, signal.SIGKILL, rounds=1)
        time.sleep(0.02)
    return killed
