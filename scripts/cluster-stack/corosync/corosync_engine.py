"""The corosync cluster stack: real corosync 3 behind xapi's seven HA scripts (standard library only).

Every script of this folder is a shim calling ``main(<script name>, argv)``.  Membership and
quorum are decided by corosync (knet transport, votequorum); this engine only translates.

Per host
    ``ha_start_daemon`` starts an *agent* inside the host's network namespace
    (``ip netns exec $XAPID_NETNS``, made by xapid's emulated hardware, see ``xapid-hardware``).
    The agent gives itself a private ``/run`` (corosync's lock file ``/run/corosync.pid`` is
    hard-coded) and a private ``/dev/shm`` (libqb's IPC rings: they vanish with the mount
    namespace, so a killed node never leaks shared memory), starts ``corosync -f`` as its child
    and follows quorum through libquorum (ctypes, event driven).  Files, in the host folder:
    ``corosync/corosync.conf``, ``corosync/corosync.log``, ``corosync-agent.pid``,
    ``corosync.pid``, ``corosync/view.json`` (the agent's view, rewritten on every change and
    every second) and ``corosync/agent.log``.

corosync.conf
    One node per host of xhad.conf; node id = the host's cluster-network index + 1 and address,
    both from ``$XAPID_HW_DIR/netns.json`` (recorded in ``corosync/nodes.json``), so that a
    clustered pool's corosync (same ids) can be adopted.  ``token`` = HeartbeatTimeout * 1000 /
    20 ms (at least 200; T = 10 gives 500 ms), consensus 1.2 * token (corosync's default), so a
    dead node leaves the membership after about 2.2 * token = T / 9: well inside
    HeartbeatTimeout.  The knet ping timers are set explicitly (interval token / 5, at least
    100 ms; timeout at least 400 ms): derived automatically they flap below token 500.
    votequorum with ``auto_tie_breaker: 1``: an exact half containing the lowest node id (the
    host with the lowest cluster-network index, normally the first) stays quorate, as xhad's
    tie-break; every other minority loses quorum.

Fencing (as sbd with a watchdog)
    Once quorate the agent arms the host's watchdog (``arm W``, W = HeartbeatWatchdogTimeout / 2,
    at least 5 s: see :func:`watchdog_seconds`) and re-arms it every 0.25 s while its partition
    is quorate and fencing is armed.  A host whose partition loses quorum stops petting and is
    reset by its watchdog W seconds later; so is a host whose agent or corosync dies, or that
    hangs.  ``ha_disarm_fencing`` and a clean stop send ``disarm``.

Liveset (``ha_query_liveset``)
    Host i is live iff it is not excluded and either is a member of this host's membership,
    or left it less than W + 1.5 s ago and did not stop cleanly (a node that left is dead only
    once it is certainly fenced).  ``master``: the holder of the master lock, if live.
    ``statefile_access``: this host's own access; TRUE for other live hosts.

Statefile (the heartbeat SR's statefile VDI)
    A JSON document at offset 0, NUL-padded to 4 KiB: ``pool_state`` (init/active/invalid),
    ``generation``, ``master`` (uuid or null) and ``hosts`` (uuid -> ``excluded``,
    ``stopped``).  Writers hold a POSIX lock on the file.  ``ha_propose_master`` grants the
    lock (TRUE) iff this host is Online in a quorate partition and the holder is nobody, itself,
    or not live; there is at most one quorate partition, so at most one master.
    ``ha_set_pool_state invalid`` makes every agent disarm, stop corosync and exit.

Requirements: root, ``ip`` (iproute2), ``mount``, ``corosync`` and libquorum (package
corosync), and the namespace from xapid; without them ``ha_start_daemon`` exits 16 naming what
is missing.  Exit codes are the MTC codes of ha.md 2.3.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "xhad"))
import xhad_engine as xe  # noqa: E402 - the sibling stack's conf reader, fabric and watchdog client
from xhad_engine import Exit  # noqa: E402

AGENT_FLAG = "--agent"
ENGINE_FILE = os.path.abspath(__file__)
AGENT_PID = "corosync-agent.pid"
COROSYNC_PID = "corosync.pid"
# A clustered pool's corosync (xapid's emulated xapi-clusterd runs it): HA adopts it, never stops it.
CLUSTER_PID = "clusterd-corosync.pid"
ADOPT_FLAG = "--adopt"
SUBDIR = "corosync"
VIEW = "view.json"
BLOCK = 4096
TICK = 0.25
VIEW_EVERY = 1.0
POOL_STATE_EVERY = 1.0
STOP_GRACE = 5.0
LEFT_GRACE = 1.5
START_MARGIN = 15.0
MIN_TOKEN = 200
CS_OK = 1
CS_DISPATCH_ALL = 2
TRACK_CURRENT, TRACK_CHANGES = 1, 4
PASS_ON = (2, 8, 9, 10, 11, 12, 13, 15, 16)


# --------------------------------------------------------------------------- files and helpers


def subdir(hostdir: str) -> str:
    path = os.path.join(hostdir, SUBDIR)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def read_pid(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[-1].split()[:1]
    except OSError:
        return False
    return bool(state) and state[0] not in (b"Z", b"X")


def agent_pid(conf: xe.Conf) -> int | None:
    """The pid of this host's agent if it runs."""
    pid = read_pid(os.path.join(conf.hostdir, AGENT_PID))
    if pid is None or not _alive(pid):
        return None
    args = _cmdline(pid)
    return pid if AGENT_FLAG.encode() in args and os.fsencode(conf.path) in args else None


def corosync_pid(hostdir: str, name: str = COROSYNC_PID) -> int | None:
    pid = read_pid(os.path.join(hostdir, name))
    if pid is None or not _alive(pid):
        return None
    args = _cmdline(pid)
    return pid if args and os.path.basename(args[0]) == b"corosync" else None


def read_view(conf: xe.Conf, pid: int | None) -> dict | None:
    try:
        with open(os.path.join(conf.hostdir, SUBDIR, VIEW)) as handle:
            view = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(view, dict) or (pid is not None and view.get("pid") != pid):
        return None
    return view


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _log(message: str) -> None:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
    print(f"{stamp}.{int(now * 1000) % 1000:03d} [{os.getpid()}] {message}", flush=True)


# --------------------------------------------------------------------------- statefile


class Statefile:
    """The stack's JSON document in the statefile VDI, read and written under a POSIX lock."""

    def __init__(self, conf: xe.Conf) -> None:
        self.conf = conf
        if xe.Fabric.from_env().storage_blocked(conf.local, conf.statefile):
            raise Exit(xe.EXIT_CAN_NOT_ACCESS_STATEFILE, "the statefile's SR is unreachable (I/O error)")
        try:
            self.fd = os.open(conf.statefile, os.O_RDWR)
        except OSError as exc:
            raise Exit(xe.EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot open the statefile: {exc}") from None

    def __enter__(self) -> Statefile:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, BLOCK, 0)
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)

    def read(self, check: bool = True) -> dict:
        raw = os.pread(self.fd, BLOCK, 0).rstrip(b"\0")
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("pool_state") not in xe.POOL_STATES:
            if check:
                raise Exit(xe.EXIT_INVALID_STATE_FILE, "the statefile holds no corosync pool state")
            return {"generation": self.conf.generation, "master": None, "hosts": {}}
        if check and doc.get("generation") != self.conf.generation:
            raise Exit(xe.EXIT_GENERATION_UUID_MISMATCH, "the statefile belongs to another HA generation")
        doc.setdefault("hosts", {})
        return doc

    def write(self, doc: dict) -> None:
        data = json.dumps(doc, separators=(",", ":")).encode()
        if len(data) > BLOCK:
            raise Exit(xe.EXIT_INTERNAL_BUG, "statefile document too large")
        os.pwrite(self.fd, data.ljust(BLOCK, b"\0"), 0)


def update_host(conf: xe.Conf, **fields: object) -> None:
    with Statefile(conf) as sf:
        doc = sf.read()
        doc["hosts"].setdefault(conf.local, {}).update(fields)
        sf.write(doc)


# --------------------------------------------------------------------------- corosync.conf


def watchdog_seconds(conf: xe.Conf) -> int:
    """The watchdog timeout W the agent arms: half of HeartbeatWatchdogTimeout, at least 5 s.

    xhad needs the whole T because its own detection takes T; corosync detects a lost node in
    about T / 9, so the watchdog only bounds how long a node that lost quorum (or hung) may
    live on, as sbd's watchdog timeout does.  Halving it keeps a 20-fold margin over the 0.25 s
    petting interval and makes failover about T / 2 faster.
    """
    return max(5, conf.watchdog_timeout // 2)


def token_ms(conf: xe.Conf) -> int:
    return max(MIN_TOKEN, conf.heartbeat_timeout * 1000 // 20)


def render_corosync_conf(conf: xe.Conf, nodes: dict[str, tuple[int, str]], token: int, logfile: str,
                         state_dir: str, name: str = "xapid") -> str:
    """corosync.conf for the hosts of ``conf`` (``nodes``: uuid -> (node id, address))."""
    interval = max(100, token // 5)
    timeout = max(400, token // 2)
    nodelist = "".join(
        f"    node {{\n        name: n{n}\n        nodeid: {n}\n        ring0_addr: {a}\n    }}\n"
        for n, a in sorted(nodes[h] for h in conf.hosts))
    return f"""# Written by the xapid corosync stack for host {conf.local}; do not edit.
totem {{
    version: 2
    cluster_name: {name}
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: {token}
    token_coefficient: 0
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
{nodelist}}}
"""


def requirements() -> str | None:
    """What this host lacks to run corosync here, or None."""
    if os.geteuid() != 0:
        return "the corosync stack needs root (network namespaces, mounts)"
    for tool, package in (("corosync", "corosync"), ("ip", "iproute2"), ("mount", "mount")):
        if shutil.which(tool) is None:
            return f"the corosync stack needs {tool} (package {package})"
    if ctypes.util.find_library("quorum") is None:
        return "the corosync stack needs libquorum (package libquorum5, installed with corosync)"
    if not os.environ.get("XAPID_NETNS"):
        why = os.environ.get("XAPID_NETNS_ERROR") or "no network namespace from xapid (XAPID_NETNS unset)"
        return f"the corosync stack needs a network namespace per host: {why}"
    return None


def layout(conf: xe.Conf) -> dict[str, tuple[int, str]]:
    """host uuid -> (corosync node id, address) from ``$XAPID_HW_DIR/netns.json`` (node id = index + 1)."""
    path = os.path.join(os.environ.get("XAPID_HW_DIR", ""), "netns.json")
    try:
        with open(path) as handle:
            hosts = json.load(handle)["hosts"]
        return {h: (int(hosts[h]["index"]) + 1, str(hosts[h]["address"])) for h in conf.hosts}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Exit(xe.EXIT_INVALID_ENVIRONMENT, f"no cluster-network address for every host in {path}: {exc}") from None


def node_ids(conf: xe.Conf) -> list[int]:
    """The corosync node id of each host of the conf, in conf order (as ha_start_daemon recorded them)."""
    try:
        with open(os.path.join(conf.hostdir, SUBDIR, "nodes.json")) as handle:
            ids = json.load(handle)
        return [int(ids[h]) for h in conf.hosts]
    except (OSError, ValueError, KeyError, TypeError):
        return [i + 1 for i in range(len(conf.hosts))]


# --------------------------------------------------------------------------- the agent


class Quorum:
    """libquorum through ctypes: the quorate flag and the member list, event driven."""

    NOTIFY = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32,
                              ctypes.POINTER(ctypes.c_uint32))

    class Callbacks(ctypes.Structure):
        _fields_ = [("quorum_notify_fn", ctypes.c_void_p)]

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(ctypes.util.find_library("quorum") or "libquorum.so.5")
        self.handle = ctypes.c_uint64()
        self.quorate = False
        self.members: list[int] = []
        self.ring = 0
        self.changed = False
        self._cb = self.NOTIFY(self._notify)
        self._callbacks = self.Callbacks(ctypes.cast(self._cb, ctypes.c_void_p))
        self.fd = -1

    def _notify(self, _handle: int, quorate: int, ring: int, n: int, view: ctypes.Array) -> None:
        self.quorate = bool(quorate)
        self.members = sorted(view[i] for i in range(n))
        self.ring = int(ring)
        self.changed = True

    def connect(self) -> bool:
        qtype = ctypes.c_uint32()
        if self.lib.quorum_initialize(ctypes.byref(self.handle), ctypes.byref(self._callbacks),
                                      ctypes.byref(qtype)) != CS_OK:
            return False
        if self.lib.quorum_trackstart(self.handle, TRACK_CURRENT | TRACK_CHANGES) != CS_OK:
            self.lib.quorum_finalize(self.handle)
            return False
        fd = ctypes.c_int()
        self.lib.quorum_fd_get(self.handle, ctypes.byref(fd))
        self.fd = fd.value
        return True

    def dispatch(self) -> bool:
        return bool(self.lib.quorum_dispatch(self.handle, CS_DISPATCH_ALL) == CS_OK)


class Agent:
    """The per-host process: corosync's parent, the watchdog's petter, the view's writer."""

    def __init__(self, conf: xe.Conf, adopted: int | None = None) -> None:
        self.conf = conf
        self.adopted = adopted
        self.dir = subdir(conf.hostdir)
        self.watchdog = xe.watchdog_path(conf)
        self.status = "Starting"
        self.armed = True
        self.stopping = False
        self.disarm_requested = False
        self.left: dict[int, float] = {}
        self.members: list[int] = []
        self.quorate = False
        self.corosync: subprocess.Popen[bytes] | None = None
        self.pet_armed = False

    def private_mounts(self) -> None:
        run = os.path.join(self.dir, "run")
        os.makedirs(run, exist_ok=True)
        for name in os.listdir(run):
            try:
                os.unlink(os.path.join(run, name))
            except OSError:
                pass
        for argv in (["mount", "--bind", run, "/run"],
                     ["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", "/dev/shm"]):
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                raise Exit(xe.EXIT_SYSTEM_ERROR, f"{' '.join(argv)}: {proc.stderr.strip()}")

    def start_corosync(self) -> None:
        log = open(os.path.join(self.dir, "corosync.stdout"), "ab")
        self.corosync = subprocess.Popen(["corosync", "-f", "-c", os.path.join(self.dir, "corosync.conf")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        xe.write_atomic(os.path.join(self.conf.hostdir, COROSYNC_PID), f"{self.corosync.pid}\n")
        _log(f"corosync {self.corosync.pid} started")

    def corosync_alive(self) -> bool:
        if self.adopted is not None:
            return _alive(self.adopted)
        return self.corosync is not None and self.corosync.poll() is None

    def write_view(self) -> None:
        view = {"pid": os.getpid(), "status": self.status, "quorate": self.quorate, "members": self.members,
                "left": {str(k): v for k, v in self.left.items()}, "armed": self.armed, "time": time.time()}
        xe.write_atomic(os.path.join(self.dir, VIEW), json.dumps(view))

    def on_quorum(self, quorum: Quorum) -> None:
        now = time.time()
        gone = set(self.members) - set(quorum.members)
        for node in gone:
            self.left[node] = now
        for node in quorum.members:
            self.left.pop(node, None)
        if gone or quorum.quorate != self.quorate or set(quorum.members) != set(self.members):
            _log(f"membership {quorum.members} quorate={quorum.quorate} ring={quorum.ring} left={sorted(gone)}")
        self.members, self.quorate = list(quorum.members), quorum.quorate
        if self.quorate and self.status == "Starting":
            self.status = "Online"
            _log("quorate: Online")

    def pet(self) -> bool:
        """Pet (re-arm) the watchdog if this host may survive; True if the view changed (disarm)."""
        changed = False
        if self.disarm_requested:
            self.disarm_requested = False
            self.armed = False
            xe.send_watchdog(self.watchdog, "disarm")
            _log("fencing disarmed")
            changed = True
        if self.status == "Online" and self.armed and self.quorate:
            xe.send_watchdog(self.watchdog, f"arm {watchdog_seconds(self.conf)}")
            if not self.pet_armed:
                _log(f"watchdog armed ({watchdog_seconds(self.conf)} s)")
            self.pet_armed = True
        elif self.pet_armed and self.armed and not self.quorate:
            _log("partition lost quorum: no more petting; the watchdog will reset this host")
            self.pet_armed = False
        return changed

    def pool_state_invalid(self) -> bool:
        try:
            with Statefile(self.conf) as sf:
                return sf.read(check=False).get("pool_state") == "invalid"
        except (Exit, OSError):
            return False

    def stop_corosync(self) -> None:
        if self.corosync is None:  # an adopted corosync belongs to the clustered pool
            return
        if self.corosync.poll() is None:
            self.corosync.terminate()
            try:
                self.corosync.wait(3)
            except subprocess.TimeoutExpired:
                self.corosync.kill()
                self.corosync.wait()
        try:
            os.unlink(os.path.join(self.conf.hostdir, COROSYNC_PID))
        except FileNotFoundError:
            pass

    def leave(self, why: str) -> None:
        """A clean end: disarm, record the stop, stop corosync."""
        _log(why)
        xe.send_watchdog(self.watchdog, "disarm")
        try:
            update_host(self.conf, stopped=True)
        except (Exit, OSError):
            pass
        self.stop_corosync()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "disarm_requested", True))
        if self.adopted is None:
            self.private_mounts()
            self.start_corosync()
        quorum = Quorum()
        deadline = time.monotonic() + 15
        while not quorum.connect():
            if self.stopping or not self.corosync_alive():
                self.leave("corosync ended before it served quorum")
                return xe.EXIT_SYSTEM_ERROR
            if time.monotonic() > deadline:
                self.leave("corosync did not serve quorum within 15 s")
                return xe.EXIT_SYSTEM_ERROR
            time.sleep(0.05)
        self.write_view()
        last_view = last_pool = time.monotonic()
        while True:
            if self.stopping:
                self.leave("stopping (SIGTERM)")
                return xe.EXIT_SUCCESS
            try:
                ready = select.select([quorum.fd], [], [], TICK)[0]
            except InterruptedError:
                ready = []
            if ready and not quorum.dispatch():
                if self.stopping:
                    continue
                _log("lost the connection to corosync; no more petting")
                self.stop_corosync()
                return xe.EXIT_SYSTEM_ERROR
            if quorum.changed:
                quorum.changed = False
                self.on_quorum(quorum)
                self.write_view()
                last_view = time.monotonic()
            changed = self.pet()
            now = time.monotonic()
            if now - last_pool >= POOL_STATE_EVERY:
                last_pool = now
                if self.pool_state_invalid():
                    self.leave("pool state invalid: HA is being disabled")
                    return xe.EXIT_INVALID_POOL_STATE
            if changed or now - last_view >= VIEW_EVERY:
                self.write_view()
                last_view = now


def agent_main(conf_path: str, adopted: int | None = None) -> int:
    conf = xe.read_conf(conf_path)
    xe.write_atomic(os.path.join(conf.hostdir, AGENT_PID), f"{os.getpid()}\n")
    _log(f"agent for host {conf.local} in namespace {os.environ.get('XAPID_NETNS')}"
         + (f", adopting the clustered pool's corosync {adopted}" if adopted else ""))
    try:
        return Agent(conf, adopted).run()
    except Exit as exc:
        _log(exc.message)
        return exc.code


# --------------------------------------------------------------------------- scripts


def set_pool_state(conf: xe.Conf, args: list[str]) -> int:
    if len(args) != 1 or args[0] not in xe.POOL_STATES:
        raise Exit(xe.EXIT_INVALID_PARAMETER, "usage: ha_set_pool_state init|invalid|active")
    state = args[0]
    if state == "init" and agent_pid(conf) is not None:
        raise Exit(xe.EXIT_DAEMON_IS_PRESENT, "the corosync agent is running")
    with Statefile(conf) as sf:
        if state == "init":
            doc = {"stack": "corosync", "pool_state": "init", "generation": conf.generation, "master": None,
                   "hosts": {}}
        else:
            doc = sf.read(check=state == "active")
            doc["pool_state"] = state
        sf.write(doc)
    return xe.EXIT_SUCCESS


def kill_agent(conf: xe.Conf, pid: int | None) -> None:
    """SIGKILL the agent's process group and this host's corosync."""
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            _signal(pid, signal.SIGKILL)
    cpid = corosync_pid(conf.hostdir)
    if cpid is not None:
        _signal(cpid, signal.SIGKILL)


def start_daemon(conf: xe.Conf) -> int:
    missing = requirements()
    if missing:
        raise Exit(xe.EXIT_INVALID_ENVIRONMENT, missing)
    if agent_pid(conf) is not None:
        raise Exit(xe.EXIT_DAEMON_IS_PRESENT, "the corosync agent is already running")
    with Statefile(conf) as sf:
        doc = sf.read()
        if doc["pool_state"] == "invalid":
            raise Exit(xe.EXIT_INVALID_POOL_STATE, "pool state is invalid")
        joining = doc["pool_state"] == "init"
    stale = corosync_pid(conf.hostdir)
    if stale is not None:
        _signal(stale, signal.SIGKILL)
    directory = subdir(conf.hostdir)
    os.makedirs(os.path.join(directory, "state"), exist_ok=True)
    nodes = layout(conf)
    xe.write_atomic(os.path.join(directory, "nodes.json"), json.dumps({h: n for h, (n, _a) in nodes.items()}))
    xe.write_atomic(os.path.join(directory, "corosync.conf"), render_corosync_conf(
        conf, nodes, token_ms(conf), os.path.join(directory, "corosync.log"), os.path.join(directory, "state")))
    for name in (VIEW,):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    agent = [sys.executable or "python3", "-S", ENGINE_FILE, AGENT_FLAG, conf.path]
    cluster = corosync_pid(conf.hostdir, CLUSTER_PID)
    if cluster is not None:
        # The clustered pool's corosync runs already: follow it inside its own namespaces.
        argv = ["nsenter", "-t", str(cluster), "-m", "-n", *agent, ADOPT_FLAG, str(cluster)]
    else:
        argv = ["ip", "netns", "exec", os.environ["XAPID_NETNS"], *agent]
    with open(os.path.join(directory, "agent.log"), "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=directory,
            start_new_session=True, close_fds=True)
    limit = conf.join_timeout if joining else conf.boot_join_timeout
    deadline = time.monotonic() + limit + START_MARGIN
    try:
        while True:
            code = proc.poll()
            if code is not None:
                raise Exit(code if code in PASS_ON else xe.EXIT_BOOTJOIN_TIMEOUT,
                           f"the corosync agent exited with {code} (see {directory}/agent.log)")
            view = read_view(conf, proc.pid)
            if view is not None and view.get("status") == "Online":
                update_host(conf, excluded=False, stopped=False)
                if joining:
                    with Statefile(conf) as sf:
                        doc = sf.read()
                        if doc["pool_state"] == "init":
                            doc["pool_state"] = "active"
                            sf.write(doc)
                return xe.EXIT_SUCCESS
            if time.monotonic() >= deadline:
                kill_agent(conf, proc.pid)
                proc.wait()
                raise Exit(xe.EXIT_BOOTJOIN_TIMEOUT, "no quorate membership before the join timeout")
            time.sleep(0.05)
    except BaseException:
        if proc.poll() is None:
            kill_agent(conf, proc.pid)
            proc.wait()
        raise


def stop_daemon(conf: xe.Conf) -> int:
    pid = agent_pid(conf)
    if pid is not None:
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while agent_pid(conf) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if agent_pid(conf) is not None:
            kill_agent(conf, pid)
            try:
                update_host(conf, stopped=True)
            except (Exit, OSError):
                pass
    cpid = corosync_pid(conf.hostdir)
    if cpid is not None:
        _signal(cpid, signal.SIGKILL)
    xe.send_watchdog(xe.watchdog_path(conf), "disarm")
    for name in (AGENT_PID, COROSYNC_PID):
        try:
            os.unlink(os.path.join(conf.hostdir, name))
        except FileNotFoundError:
            pass
    return xe.EXIT_SUCCESS


def _running(conf: xe.Conf) -> int:
    pid = agent_pid(conf)
    if pid is None:
        raise Exit(xe.EXIT_DAEMON_IS_NOT_PRESENT, "the corosync agent is not running")
    return pid


def fresh_doc(conf: xe.Conf) -> dict | None:
    """The statefile document, None if unreachable; Exit 14 when the pool state is invalid."""
    try:
        with Statefile(conf) as sf:
            doc = sf.read()
    except Exit as exc:
        if exc.code in (xe.EXIT_CAN_NOT_ACCESS_STATEFILE, xe.EXIT_INVALID_STATE_FILE):
            return None
        raise
    if doc["pool_state"] == "invalid":
        raise Exit(xe.EXIT_DAEMON_IS_NOT_PRESENT, "pool state is invalid; the agent is stopping")
    return doc


def liveness(conf: xe.Conf, view: dict, doc: dict | None, now: float) -> list[bool]:
    """Per host of the conf: live as this host sees it (see the module docstring)."""
    members = set(view.get("members") or [])
    left = {int(k): float(v) for k, v in (view.get("left") or {}).items()}
    hosts = (doc or {}).get("hosts", {})
    out = []
    for host, node in zip(conf.hosts, node_ids(conf), strict=True):
        entry = hosts.get(host, {})
        if entry.get("excluded"):
            out.append(False)
        elif node in members:
            out.append(True)
        else:
            recent = node in left and now - left[node] < watchdog_seconds(conf) + LEFT_GRACE
            out.append(recent and not entry.get("stopped"))
    return out


def query_liveset(conf: xe.Conf) -> int:
    pid = _running(conf)
    doc = fresh_doc(conf)
    view = read_view(conf, pid)
    if view is None or view.get("status") != "Online":
        sys.stdout.write(xe.render_starting(conf))
        return xe.EXIT_SUCCESS
    now = time.time()
    live = liveness(conf, view, doc, now)
    holder = (doc or {}).get("master")
    hosts = (doc or {}).get("hosts", {})
    by_node = dict(zip(node_ids(conf), conf.hosts, strict=True))
    members = [by_node[n] for n in view.get("members", []) if n in by_node]

    def flag(value: bool) -> str:
        return "TRUE" if value else "FALSE"

    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<ha_liveset_info version="1.0">', "  <status>Online</status>",
           f"  <localhost><HostID>{xe.escape(conf.local)}</HostID><HostIndex>{conf.index}</HostIndex></localhost>"]
    for i, host in enumerate(conf.hosts):
        access = doc is not None if i == conf.index else live[i]
        out += ["  <host>", f"    <HostID>{xe.escape(host)}</HostID><HostIndex>{i}</HostIndex>",
                f"    <liveness>{flag(live[i])}</liveness><master>{flag(live[i] and holder == host)}</master>",
                f"    <statefile_access>{flag(access)}</statefile_access>",
                "    <statefile_corrupted>FALSE</statefile_corrupted>",
                f"    <excluded>{flag(bool(hosts.get(host, {}).get('excluded')))}</excluded>", "  </host>"]
    out.append("  <raw_status_on_local_host>")
    for name in xe_latencies():
        out.append(f"    <{name}>0</{name}>")
    for i, host in enumerate(conf.hosts):
        peers = " ".join(members) if live[i] else ""
        out += ["    <host_raw_data>", f"      <HostID>{xe.escape(host)}</HostID>",
                "      <time_since_last_update_on_statefile>0</time_since_last_update_on_statefile>",
                "      <time_since_last_heartbeat>0</time_since_last_heartbeat>",
                "      <time_since_xapi_restart_first_attempted>-1</time_since_xapi_restart_first_attempted>",
                f"      <heartbeat_active_list_on_heartbeat>{xe.escape(peers)}</heartbeat_active_list_on_heartbeat>",
                f"      <heartbeat_active_list_on_statefile>{xe.escape(peers)}</heartbeat_active_list_on_statefile>",
                "    </host_raw_data>"]
    out.append("  </raw_status_on_local_host>")
    out.append("  <warning_on_local_host>")
    for name, value in (("statefile_lost", doc is None), ("heartbeat_approaching_timeout", False),
                        ("statefile_approaching_timeout", False), ("Xapi_healthcheck_approaching_timeout", False),
                        ("network_bonding_error", False)):
        out.append(f"    <{name}>{flag(value)}</{name}>")
    out += ["  </warning_on_local_host>", "</ha_liveset_info>"]
    sys.stdout.write("\n".join(out) + "\n")
    return xe.EXIT_SUCCESS


def xe_latencies() -> tuple[str, ...]:
    return ("statefile_latency", "statefile_latency_min", "statefile_latency_max", "heartbeat_latency",
            "heartbeat_latency_min", "heartbeat_latency_max", "Xapi_healthcheck_latency",
            "Xapi_healthcheck_latency_min", "Xapi_healthcheck_latency_max")


def propose_master(conf: xe.Conf) -> int:
    pid = _running(conf)
    view = read_view(conf, pid)
    if view is None or view.get("status") != "Online":
        raise Exit(xe.EXIT_INVALID_LOCALHOST_STATE, f"host {conf.local} is not Online")
    granted = False
    with Statefile(conf) as sf:
        doc = sf.read()
        if doc["pool_state"] == "invalid":
            raise Exit(xe.EXIT_INVALID_POOL_STATE, "pool state is invalid")
        live = liveness(conf, view, doc, time.time())
        if not live[conf.index]:
            raise Exit(xe.EXIT_INVALID_LOCALHOST_STATE, f"host {conf.local} is not live")
        holder = doc.get("master")
        holder_live = holder in conf.hosts and live[conf.hosts.index(holder)]
        # Only a quorate partition may hand out the lock: there is at most one.
        if view.get("quorate") and (holder is None or holder == conf.local or not holder_live):
            granted = True
            if holder != conf.local:
                doc["master"] = conf.local
                sf.write(doc)
    sys.stdout.write("TRUE\n" if granted else "FALSE\n")
    return xe.EXIT_SUCCESS


def disarm_fencing(conf: xe.Conf) -> int:
    pid = _running(conf)
    _signal(pid, signal.SIGUSR1)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline and agent_pid(conf) is not None:
        view = read_view(conf, pid)
        if view is not None and view.get("armed") is False:
            break
        time.sleep(0.05)
    xe.send_watchdog(xe.watchdog_path(conf), "disarm")
    return xe.EXIT_SUCCESS


def set_excluded(conf: xe.Conf) -> int:
    update_host(conf, excluded=True)
    return xe.EXIT_SUCCESS


def _run(script: str, argv: list[str]) -> int:
    if script not in xe.SCRIPTS:
        raise Exit(xe.EXIT_INVALID_PARAMETER, f"unknown script {script}")
    args = list(argv)
    conf_path = os.environ.get("XHAD_CONF", "")
    if len(args) >= 2 and args[0] == "-C":
        conf_path = args[1]
        del args[:2]
    if not conf_path:
        raise Exit(xe.EXIT_CAN_NOT_READ_CONFIG_FILE, "XHAD_CONF is not set")
    conf = xe.read_conf(os.path.abspath(conf_path))
    if script == "ha_set_pool_state":
        return set_pool_state(conf, args)
    if args:
        raise Exit(xe.EXIT_INVALID_PARAMETER, f"{script} takes no arguments, got {args}")
    handlers = {"ha_start_daemon": start_daemon, "ha_stop_daemon": stop_daemon, "ha_query_liveset": query_liveset,
                "ha_propose_master": propose_master, "ha_disarm_fencing": disarm_fencing,
                "ha_set_excluded": set_excluded}
    return handlers[script](conf)


def main(script: str, argv: list[str]) -> int:
    """Run cluster-stack script ``script`` with ``argv``; returns its MTC exit code."""
    code = xe._guarded(_run, script, argv)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == AGENT_FLAG:
        sys.exit(xe._guarded(agent_main, os.path.abspath(sys.argv[2])))
    if len(sys.argv) == 5 and sys.argv[1] == AGENT_FLAG and sys.argv[3] == ADOPT_FLAG and sys.argv[4].isdigit():
        sys.exit(xe._guarded(agent_main, os.path.abspath(sys.argv[2]), int(sys.argv[4])))
    print(f"usage: {sys.argv[0]} {AGENT_FLAG} <xhad.conf>", file=sys.stderr)
    sys.exit(xe.EXIT_INVALID_PARAMETER)
