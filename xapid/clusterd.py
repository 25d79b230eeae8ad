"""The emulated xapi-clusterd: the corosync of a clustered pool (``Cluster``, ``Cluster_host``).

Real xapi asks its host-local daemon xapi-clusterd to create, join, enable, disable and leave a
corosync cluster; xapid does the same for each emulated host.  Every node is a real corosync 3
inside the host's network namespace (the emulated hardware's cluster network,
:mod:`xapid.hw.netns`), with a private ``/run`` and ``/dev/shm`` in its own mount namespace
(``ip netns exec`` gives one), and ``XAPID_HOST_DIR`` in its environment: ``xapid fault
crash`` kills it with the host, ``partition`` cuts its links.

Node ids are the hosts' cluster-network indexes + 1, as in the corosync HA stack, so that
``pool.enable_ha`` on a clustered pool adopts these daemons (the stack finds
``<host folder>/clusterd-corosync.pid``) instead of starting its own.  The nodelist is every
joined ``Cluster_host``; a join rewrites it on every node and reloads the running ones
(``corosync-cfgtool -R``).  ``token`` = ``token_timeout`` s, ``token_coefficient`` =
``token_timeout_coefficient`` s, as xapi passes them.

:class:`Clusterd` also keeps ``Cluster.is_quorate``, ``quorum``, ``live_hosts``,
``expected_hosts`` and ``Cluster_host.live`` true from corosync's own answer
(``corosync-quorumtool`` run inside a live node's namespaces), once a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from xapid import statefiles
from xapid.errors import ApiError, internal
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.clusterd")

PID_FILE = "clusterd-corosync.pid"
SUBDIR = "clusterd"
WATCH_INTERVAL = 1.0
_LAUNCH = 'mount --bind "$1" /run && mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && exec corosync -f -c "$2"'


def requirements() -> str | None:
    """What this machine lacks to run corosync nodes, or None."""
    if os.geteuid() != 0:
        return "clustering needs root (network namespaces and mounts for the emulated hosts' corosync)"
    for tool, package in (("corosync", "corosync"), ("corosync-quorumtool", "corosync"), ("ip", "iproute2"),
                          ("nsenter", "util-linux"), ("mount", "mount")):
        if shutil.which(tool) is None:
            return f"clustering needs {tool} (package {package})"
    return None


def render_conf(nodes: list[tuple[int, str]], token_ms: int, coefficient_ms: int, logfile: str,
                state_dir: str, name: str) -> str:
    """corosync.conf for ``nodes`` ((node id, address) pairs)."""
    interval = max(100, token_ms // 5)
    timeout = max(400, token_ms // 2)
    body = "".join(f"    node {{\n        name: n{n}\n        nodeid: {n}\n        ring0_addr: {a}\n    }}\n"
                   for n, a in sorted(nodes))
    return f"""# Written by xapid's emulated xapi-clusterd; do not edit.
totem {{
    version: 2
    cluster_name: {name}
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: {token_ms}
    token_coefficient: {coefficient_ms}
    interface {{
        linknumber: 0
        knet_ping_interval: {interval}
        knet_ping_timeout: {timeout}
        knet_pong_count: 1
    }}
}}
logging {{
    to_stderr: no
    to_syslog: no
    to_logfile: yes
    logfile: {logfile}
    timestamp: hires
    blackbox: off
}}
quorum {{
    provider: corosync_votequorum
    auto_tie_breaker: 1
}}
system {{
    state_dir: {state_dir}
    sched_rr: no
}}
nodelist {{
{body}}}
"""


def parse_quorumtool(text: str) -> dict[str, Any]:
    """The fields of ``corosync-quorumtool -s`` that Cluster shows (quorate, quorum, votes, members)."""
    out: dict[str, Any] = {"quorate": False, "quorum": 0, "expected": 0, "members": []}
    in_members = False
    for line in text.splitlines():
        words = line.split()
        if line.startswith("Quorate:"):
            out["quorate"] = words[-1] == "Yes"
        elif line.startswith("Quorum:") and len(words) > 1 and words[1].isdigit():
            out["quorum"] = int(words[1])
        elif line.startswith("Expected votes:") and words[-1].isdigit():
            out["expected"] = int(words[-1])
        elif words[:1] == ["Nodeid"]:
            in_members = True
        elif in_members and words and words[0].isdigit():
            out["members"].append(int(words[0]))
    return out


class Clusterd:
    """Per-host corosync nodes of the pool's ``Cluster`` (at most one, as in xapi)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- nodes ------------------------------------------------------------------------------------

    def _dir(self, uuid: str) -> Path:
        d = self.daemon.hw.host_dir(uuid) / SUBDIR
        statefiles.make_dirs(d)
        return d

    def _pid_path(self, uuid: str) -> Path:
        return self.daemon.hw.host_dir(uuid) / PID_FILE

    def pid(self, uuid: str) -> int | None:
        """The pid of host ``uuid``'s cluster corosync while it runs."""
        with self._lock:
            proc = self._procs.get(uuid)
            if proc is None:
                return None
            if proc.poll() is not None:
                self._procs.pop(uuid, None)
                self._pid_path(uuid).unlink(missing_ok=True)
                return None
            return proc.pid

    def _network(self, uuids: list[str]) -> dict[str, tuple[int, str]]:
        """uuid -> (node id, address); makes the cluster network first.  ApiError when it cannot be made."""
        missing = requirements()
        if missing:
            raise internal(f"xapi-clusterd: {missing}")
        hw = self.daemon.hw
        for uuid in uuids:
            env = hw.cluster_network(uuid, create=True)
            if "XAPID_NETNS_ERROR" in env:
                raise internal(f"xapi-clusterd: {env['XAPID_NETNS_ERROR']}")
        out = {}
        for uuid in uuids:
            index = hw.netns.index_of(uuid)
            if index is None:
                raise internal(f"xapi-clusterd: host {uuid} has no cluster-network namespace")
            out[uuid] = (index + 1, hw.netns.address_of(uuid))
        return out

    def _write_conf(self, uuid: str, members: list[str], cluster: dict[str, Any]) -> Path:
        nodes = self._network(members)
        d = self._dir(uuid)
        (d / "state").mkdir(exist_ok=True)
        (d / "run").mkdir(exist_ok=True)
        conf = d / "corosync.conf"
        text = render_conf(list(nodes.values()), int(float(cluster["token_timeout"]) * 1000),
                           int(float(cluster["token_timeout_coefficient"]) * 1000), str(d / "corosync.log"),
                           str(d / "state"), "xapid")
        statefiles.write_atomic(conf, text.encode(), mode=0o644)
        return conf

    def start(self, uuid: str, members: list[str], cluster: dict[str, Any], wait: bool = True) -> None:
        """Start host ``uuid``'s corosync with nodelist ``members`` (no-op while it runs)."""
        with self._lock:
            if self.pid(uuid) is not None:
                return
            conf = self._write_conf(uuid, members, cluster)
            d = self._dir(uuid)
            # A fresh private /run: a stale /run/corosync.pid would stop corosync.
            shutil.rmtree(d / "run", ignore_errors=True)
            (d / "run").mkdir()
            netns = self.daemon.hw.netns.host_netns(uuid)
            assert netns is not None
            env = {**os.environ, "XAPID_HOST_DIR": str(self.daemon.hw.host_dir(uuid))}
            with open(d / "corosync.stdout", "ab") as out:
                proc = subprocess.Popen(["ip", "netns", "exec", netns, "sh", "-c", _LAUNCH, "sh", str(d / "run"),
                                         str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True, close_fds=True)
            self._procs[uuid] = proc
            statefiles.write_atomic(self._pid_path(uuid), f"{proc.pid}\n".encode(), mode=0o644)
            log.info("cluster corosync started", host=uuid, pid=proc.pid, members=len(members))
        if wait:
            deadline = time.monotonic() + 15
            while self.status(uuid) is None:
                if self.pid(uuid) is None:
                    raise internal(f"xapi-clusterd: corosync of host {uuid} exited; see {d / 'corosync.log'}")
                if time.monotonic() > deadline:
                    raise internal(f"xapi-clusterd: corosync of host {uuid} does not answer")
                time.sleep(0.1)

    def stop(self, uuid: str) -> None:
        """Stop host ``uuid``'s corosync (SIGTERM, then SIGKILL); it leaves the membership."""
        with self._lock:
            proc = self._procs.pop(uuid, None)
            self._pid_path(uuid).unlink(missing_ok=True)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("cluster corosync stopped", host=uuid)

    def reload(self, uuids: list[str], members: list[str], cluster: dict[str, Any]) -> None:
        """New nodelist ``members`` on the running nodes of ``uuids`` (rewritten, then reloaded in place)."""
        running = [u for u in uuids if self.pid(u) is not None]
        for uuid in running:
            self._write_conf(uuid, members, cluster)
        # -R reloads every node of the sender's membership; a node that is still joining is not in it yet.
        for uuid in running:
            self._in_node(uuid, ["corosync-cfgtool", "-R"])

    def _in_node(self, uuid: str, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        pid = self.pid(uuid)
        if pid is None:
            return None
        try:
            return subprocess.run(["nsenter", "-t", str(pid), "-m", "-n", *argv], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None

    def status(self, uuid: str) -> dict[str, Any] | None:
        """corosync's own view from host ``uuid``'s node, or None if it does not answer."""
        proc = self._in_node(uuid, ["corosync-quorumtool", "-s"])
        if proc is None or proc.returncode not in (0, 2):
            return None
        return parse_quorumtool(proc.stdout)

    # -- the watcher (xapi_clustering.ml Watcher) ---------------------------------------------------

    def start_watcher(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="clusterd-watch", daemon=True)
        self._thread.start()

    def stop_all(self) -> None:
        """Daemon shutdown: end the watcher and every node."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            uuids = list(self._procs)
        for uuid in uuids:
            self.stop(uuid)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the watcher must survive a failing round
                log.exception("cluster watcher round failed")

    def sync(self) -> None:
        """Copy corosync's membership and quorum into the Cluster and Cluster_host records."""
        store = self.daemon.store
        clusters = store.items("Cluster")
        if not clusters:
            return
        cluster_ref, _cluster = clusters[0]
        hosts = {ref: rec for ref, rec in store.items("Cluster_host") if rec["cluster"] == cluster_ref}
        uuid_of = {ref: store.get("host", rec["host"])["uuid"] for ref, rec in hosts.items()
                   if store.get("host", rec["host"]) is not None}
        view = None
        master = self.daemon.master_ref()
        order = sorted(uuid_of.items(), key=lambda item: store.get("Cluster_host", item[0])["host"] != master)
        for _ch, uuid in order:
            if self.daemon.hw.is_running(uuid) and self.pid(uuid) is not None:
                view = self.status(uuid)
                if view is not None:
                    break
        members = set(view["members"]) if view else set()
        with store.transaction() as tx:
            rec = tx.read("Cluster", cluster_ref)
            if rec is None:
                return
            fields = {"is_quorate": bool(view and view["quorate"]), "quorum": int(view["quorum"]) if view else 0,
                      "live_hosts": len(members), "expected_hosts": int(view["expected"]) if view else 0}
            if any(rec[k] != v for k, v in fields.items()):
                tx.update("Cluster", cluster_ref, **fields)
            for ch, uuid in uuid_of.items():
                index = self.daemon.hw.netns.index_of(uuid)
                live = index is not None and index + 1 in members and self.pid(uuid) is not None
                ch_rec = tx.read("Cluster_host", ch)
                if ch_rec is not None and ch_rec["live"] != live:
                    tx.update("Cluster_host", ch, live=live, last_update_live=now_iso())

    def members(self, cluster_ref: str) -> list[str]:
        """Host uuids of the cluster's joined Cluster_hosts: the nodelist."""
        store = self.daemon.store
        out = []
        for _ref, rec in store.items("Cluster_host"):
            host = store.get("host", rec["host"])
            if rec["cluster"] == cluster_ref and rec["joined"] and host is not None:
                out.append(str(host["uuid"]))
        return out

    def resync_host(self, host_ref: str) -> None:
        """xapi start-up on a host (xapi_cluster_host.ml resync_host): an enabled Cluster_host runs its node."""
        store = self.daemon.store
        for _ref, rec in store.items("Cluster_host"):
            if rec["host"] != host_ref or not rec["enabled"]:
                continue
            cluster = store.get("Cluster", rec["cluster"])
            host = store.get("host", host_ref)
            if cluster is None or host is None:
                continue
            try:
                # Waiting until it answers lets HA's start-up adopt it rather than start a second corosync.
                self.start(str(host["uuid"]), self.members(rec["cluster"]), cluster, wait=True)
            except (ApiError, OSError) as exc:
                log.error("cannot start the cluster node at xapi start-up", host=host["uuid"], error=str(exc))
