"""The emulated hosts' cluster network: a Linux network namespace per host behind a bridge.

Real cluster managers (corosync) need one network stack per node: their IPC sockets are
abstract Unix sockets (per network namespace) and they pick their own node by matching local
addresses.  So, for stacks that ask for it (a ``xapid-hardware`` file in the stack folder
listing ``netns``), xapid gives every emulated host a namespace ``<prefix>h<index>`` with one
interface ``eth0`` holding a private address, plugged into a bridge that lives in a hub
namespace ``<prefix>hub``.  Nothing is created in the root namespace; the addresses exist
only inside these namespaces, so traffic never leaves them.

The prefix ``xc<8 hex>`` is derived from the resolved state dir: several daemons (and
parallel test workers) on one machine never share a namespace, and names stay short (ip's
names live in ``/run/netns``; interface names inside a namespace are private to it).

Network groups of the fabric (``xapid fault partition``) become bridges: the port of every
host in group G is moved to bridge ``br<k>`` of the hub, so hosts of different groups are on
different Ethernet segments and no packet crosses; ``heal`` puts every port back on ``br0``.

The layout is published for stacks in ``$XAPID_HW_DIR/netns.json``::

    {"prefix": "xc1a2b3c4d", "hub": "xc1a2b3c4dhub",
     "hosts": {"<uuid>": {"netns": "xc1a2b3c4dh0", "address": "10.213.0.1", "index": 0}}}

:meth:`ClusterNetwork.teardown` kills every process still inside the namespaces (SIGKILL)
and deletes them; :meth:`ClusterNetwork.reclaim` does the same at daemon start for whatever
a killed daemon left behind (found by prefix in ``/run/netns``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from xapid import statefiles

log = structlog.get_logger("xapid.hw.netns")

NETNS_RUN = Path("/run/netns")
LAYOUT_FILE = "netns.json"
SUBNET = "10.213"
PREFIX_LEN = 16
MAX_HOSTS = 64 * 250
_IP_TIMEOUT = 20.0


class NetnsError(Exception):
    """The cluster network cannot be made here; the message names what is missing."""


def prefix_for(state_dir: Path) -> str:
    """``xc`` plus 8 hex digits of the state dir's resolved path: unique per daemon, short."""
    digest = hashlib.sha1(os.fsencode(str(Path(state_dir).resolve()))).hexdigest()
    return f"xc{digest[:8]}"


def address(index: int) -> str:
    """The private address of host ``index`` (10.213.0.1, 10.213.0.2, ...)."""
    return f"{SUBNET}.{index // 250}.{index % 250 + 1}"


def missing_requirements() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``), or None."""
    if os.geteuid() != 0:
        return "the cluster network needs root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "the cluster network needs the ip command (package iproute2)"
    return None


def _ip(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, timeout=_IP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from None
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def _pids_in(name: str) -> list[int]:
    proc = _ip("netns", "pids", name, check=False)
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def _kill_in(names: Iterable[str], timeout: float = 5.0) -> int:
    """SIGKILL every process inside the namespaces ``names`` (SIGCONT first); wait until none is left."""
    names = list(names)
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for name in names for p in _pids_in(name)]
        live = [p for p in pids if not _zombie(p)]
        if not live or time.monotonic() > deadline:
            return len(killed)
        for pid in live:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            killed.add(pid)
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[:1]
    except OSError:
        return True
    return bool(state) and state[0] in (b"Z", b"X")


class ClusterNetwork:
    """The namespaces of one daemon's emulated hosts.  Thread-safe."""

    def __init__(self, state_dir: Path, hw_dir: Path) -> None:
        self.prefix = prefix_for(state_dir)
        self.hub = f"{self.prefix}hub"
        self.layout_path = hw_dir / LAYOUT_FILE
        self._lock = threading.RLock()
        self._hosts: dict[str, int] = {}  # uuid -> index, only while the namespaces exist
        self._groups: dict[str, str] = {}
        self._bridges: dict[str, str] = {}  # network group -> bridge in the hub

    def netns_of(self, index: int) -> str:
        return f"{self.prefix}h{index}"

    # -- queries ----------------------------------------------------------------------------------

    def exists(self) -> bool:
        with self._lock:
            return bool(self._hosts)

    def host_netns(self, uuid: str) -> str | None:
        """The namespace of host ``uuid``, or None while the cluster network does not exist."""
        with self._lock:
            index = self._hosts.get(uuid)
            return None if index is None else self.netns_of(index)

    def index_of(self, uuid: str) -> int | None:
        """Host ``uuid``'s index in the cluster network (its address is ``address(index)``), or None."""
        with self._lock:
            return self._hosts.get(uuid)

    def address_of(self, uuid: str) -> str:
        index = self.index_of(uuid)
        if index is None:
            raise NetnsError(f"host {uuid} has no namespace")
        return address(index)

    def leftovers(self) -> list[str]:
        """Namespaces with this daemon's prefix that exist now (for reclaim and for tests)."""
        try:
            return sorted(n for n in os.listdir(NETNS_RUN) if n.startswith(self.prefix))
        except OSError:
            return []

    # -- life cycle -------------------------------------------------------------------------------

    def ensure(self, uuids: list[str], groups: dict[str, str]) -> None:
        """Make the hub and a namespace for every host of ``uuids`` (existing ones are kept).

        Raises NetnsError naming what is missing (root, iproute2) or which ``ip`` step failed;
        a failed first creation leaves nothing behind.
        """
        reason = missing_requirements()
        if reason is not None:
            raise NetnsError(reason)
        with self._lock:
            fresh = not self._hosts
            try:
                if fresh:
                    self._teardown_locked()
                    _ip("netns", "add", self.hub)
                    _ip("-n", self.hub, "link", "set", "lo", "up")
                    self._bridges = {}
                    self._bridge("0")
                for uuid in uuids:
                    if uuid in self._hosts:
                        continue
                    index = max(self._hosts.values(), default=-1) + 1
                    if index >= MAX_HOSTS:
                        raise NetnsError("too many hosts for the cluster network")
                    self._add_host(index)
                    self._hosts[uuid] = index
                self._write_layout()
                self._apply_locked(groups)
            except NetnsError:
                if fresh:
                    self._teardown_locked()
                raise
        if fresh:
            log.info("cluster network created", prefix=self.prefix, hosts=len(uuids))

    def _bridge(self, group: str) -> str:
        bridge = self._bridges.get(group)
        if bridge is None:
            bridge = f"br{len(self._bridges)}"
            _ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
            _ip("-n", self.hub, "link", "set", bridge, "up")
            self._bridges[group] = bridge
        return bridge

    def _add_host(self, index: int) -> None:
        name = self.netns_of(index)
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{index}", "netns", self.hub)
        _ip("-n", name, "addr", "add", f"{address(index)}/{PREFIX_LEN}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", self.hub, "link", "set", f"v{index}", "master", self._bridge("0"))
        _ip("-n", self.hub, "link", "set", f"v{index}", "up")
        self._groups[str(index)] = "0"

    def _write_layout(self) -> None:
        doc = {"prefix": self.prefix, "hub": self.hub,
               "hosts": {u: {"netns": self.netns_of(i), "address": address(i), "index": i}
                         for u, i in self._hosts.items()}}
        statefiles.write_atomic(self.layout_path, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o644)

    def apply(self, groups: dict[str, str]) -> None:
        """Put each host's port on the bridge of its network group (a missing host: group "0")."""
        with self._lock:
            if self._hosts:
                try:
                    self._apply_locked(groups)
                except NetnsError as exc:
                    log.error("cannot apply the network partition to the cluster network", error=str(exc))

    def _apply_locked(self, groups: dict[str, str]) -> None:
        moves = []
        for uuid, index in self._hosts.items():
            group = groups.get(uuid, "0")
            if self._groups.get(str(index)) != group:
                moves.append(f"link set v{index} master {self._bridge(group)}")
                self._groups[str(index)] = group
        if moves:
            _ip("-n", self.hub, "-batch", "-", stdin="\n".join(moves) + "\n")
            log.info("cluster network regrouped", moves=len(moves))

    def teardown(self) -> None:
        """Kill whatever still runs inside the namespaces and delete them all (idempotent)."""
        with self._lock:
            self._teardown_locked()

    def _teardown_locked(self) -> None:
        names = self.leftovers()
        if names:
            killed = _kill_in(names)
            if killed:
                log.warning("killed processes left in the cluster network", processes=killed)
            for name in names:
                _ip("netns", "del", name, check=False)
            log.info("cluster network removed", prefix=self.prefix, namespaces=len(names))
        self._hosts.clear()
        self._groups.clear()
        self._bridges.clear()
        try:
            self.layout_path.unlink()
        except FileNotFoundError:
            pass

    def reclaim(self) -> None:
        """At daemon start: remove whatever a previous run of this state dir left (it may have been killed)."""
        if os.geteuid() != 0:
            return
        with self._lock:
            left = self.leftovers()
            if left:
                log.warning("reclaiming the cluster network of a previous run", namespaces=left)
            self._teardown_locked()
