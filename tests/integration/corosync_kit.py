"""Helpers for tests that run real corosync (the corosync HA stack, clustered pools).

They need root, ``ip`` and the Debian package ``corosync``: :data:`MISSING` says what is missing
(tests skip with it; XAPID_CI=1 turns the skip into a failure).  :func:`tracker` stops every
daemon it was given and fails the test if any namespace, process or ``/dev/shm`` entry of its
pools is left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Xapid
from xapid.hw.netns import prefix_for

MISSING = ("needs root" if os.geteuid() != 0 else
           "needs the corosync package (apt-get install corosync)" if shutil.which("corosync") is None else
           "needs iproute2 (ip netns)" if shutil.which("ip") is None else None)
needs_corosync = pytest.mark.skipif(MISSING is not None, reason=f"real corosync: {MISSING}")


def corosync_processes(state_dir: Path) -> list[int]:
    """Live processes (corosync or its agent) whose environment names a host folder of ``state_dir``."""
    needle = f"XAPID_HOST_DIR={state_dir}/hosts/".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        if needle in env and stat.rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X"):
            out.append(int(name))
    return out


def named(pids: list[int], comm: str) -> list[int]:
    """The pids among ``pids`` whose command name is ``comm``."""
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                out.append(pid)
        except OSError:
            pass
    return out


def namespaces(state_dir: Path) -> list[str]:
    prefix = prefix_for(state_dir)
    return sorted(n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
                  if n.startswith(prefix))


def leftovers(state_dir: Path, pids: set[int]) -> dict[str, list[str]]:
    """What a pool may never leave behind: namespaces of this state dir, its processes, their /dev/shm
    entries, mounts (namespace files, private /run) visible from here."""
    shm = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"qb-{p}-") or f"-{p}-" in n for p in pids)]
    prefix = prefix_for(state_dir)
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if f"/{prefix}" in line or str(state_dir) in line]
    found = {"netns": namespaces(state_dir), "processes": [str(p) for p in corosync_processes(state_dir)],
             "shm": shm, "mounts": mounts}
    return {k: v for k, v in found.items() if v}


class Tracker:
    """Remembers every corosync pid seen, to look for their /dev/shm entries at the end."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.daemons: list[Xapid] = []

    def seen(self, d: Xapid) -> list[int]:
        pids = corosync_processes(d.state_dir)
        self.pids |= set(pids)
        return pids


@pytest.fixture
def tracker(xapid_factory: Any) -> Iterator[Tracker]:
    """Stops every daemon it tracks, then fails the test if anything of its pools is left."""
    t = Tracker()
    yield t
    problems = {}
    for d in t.daemons:
        t.seen(d)
        d.stop()
        left = leftovers(d.state_dir, t.pids)
        if left:
            problems[str(d.state_dir)] = left
    assert not problems, f"left behind after the daemon stopped: {problems}"


def ocfs2_sr(x: Any) -> str:
    """A shared OCFS2 SR (its driver requires the corosync stack) plugged on every host."""
    master = x.pool.get_master(x.pool.get_all()[0])
    return str(x.SR.create(master, {}, str(2 * 1024**4), "OCFS2", "", "ocfs2", "user", True, {}))


def management(x: Any, host: str) -> str:
    """The host's management PIF."""
    return next(p for p in x.PIF.get_all() if x.PIF.get_host(p) == host and x.PIF.get_management(p))


def power(fault: Any) -> dict[str, str]:
    """host name -> power state, from ``xapid fault status``."""
    out = {}
    for line in fault.status():
        name, _uuid, fields = line.split(" ", 2)
        out[name] = dict(f.split("=", 1) for f in fields.split())["power"]
    return out
