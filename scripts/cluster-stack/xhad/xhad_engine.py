"""Emulated xhad: the logic behind the seven cluster-stack scripts (standard library only).

Every script in this folder (and in sibling stacks such as ``../melio``) is a shim calling
``main(<script name>, argv)``.  The engine emulates the xhad daemon closely enough for xapid
to enable, monitor and disable HA with real processes on one machine.

Inputs
    ``XHAD_CONF`` (or ``-C <file>`` on the command line, like the real scripts): this host's
    xhad.conf (ha.md 3.1).  Its parent directory is the *host folder*, which holds
    ``xhad.pid``, ``xhad.lock``, ``xhad.log`` and the optional ``fist/`` folder.
    ``XAPI_HOST_UUID``, when set, must equal the conf's local HostID (else exit 16).

Statefile
    The conf's ``StateFile`` is a pre-existing file of exactly 266240 bytes shared by all
    hosts: a 4 KiB global block followed by 64 host slots of 4 KiB (slot N belongs to the
    N-th host of the conf's host list).  Each block is a small JSON object padded with NULs;
    an all-NUL block is empty.  Global block: ``pool_state`` (init/active/invalid),
    ``generation`` and ``master`` (UUID holding the master lock, or null).  Host slot:
    ``host``, ``pid`` of its heartbeat process, ``heartbeat`` (time.time() of the last beat),
    ``excluded`` and ``armed`` (fencing).  Every access holds ``flock`` on the statefile.

Heartbeat process
    ``ha_start_daemon`` spawns ``<python> xhad_engine.py --heartbeat <conf>`` in its own
    session with its output in ``xhad.log``.  It writes ``xhad.pid``, beats into its slot every
    HeartbeatInterval seconds (at least 1), moves the pool state from init to active, and
    exits (clearing its pid from the slot) on SIGTERM, when the pool state becomes invalid
    (exit 11), when the generation changes (10), or when the statefile (8) or host folder (0)
    disappears.  A host is *live* iff its slot's pid is a running heartbeat process, its last
    beat is younger than HeartbeatTimeout seconds and it is not excluded.  To make a host
    fail, kill the pid in ``xhad.pid``; it drops out of every liveset at the next query.

Fault injection (fist points)
    Before anything else, if ``<host folder>/fist/<script name>`` exists, its non-empty lines
    are obeyed in order: ``exit N`` exits with N at once, ``sleep S`` sleeps S seconds and
    goes on, ``garbage`` prints non-XML text and exits 0.  Any other line exits 1.

Exit codes are the MTC codes of ha.md 2.3: 1 bad argument, 6 unreadable conf, 7 invalid
conf, 8 statefile not accessible or wrong size, 9 statefile contents invalid, 10 generation
mismatch, 11 invalid pool state, 12 join timeout, 14 daemon not running, 15 daemon running,
16 environment mismatch, 17 host not live, 127 any unexpected error (never a traceback
with exit code 1).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

SCRIPTS = (
    "ha_set_pool_state",
    "ha_start_daemon",
    "ha_stop_daemon",
    "ha_query_liveset",
    "ha_propose_master",
    "ha_disarm_fencing",
    "ha_set_excluded",
)

EXIT_SUCCESS = 0
EXIT_INVALID_PARAMETER = 1
EXIT_CAN_NOT_READ_CONFIG_FILE = 6
EXIT_INVALID_CONFIG_FILE = 7
EXIT_CAN_NOT_ACCESS_STATEFILE = 8
EXIT_INVALID_STATE_FILE = 9
EXIT_GENERATION_UUID_MISMATCH = 10
EXIT_INVALID_POOL_STATE = 11
EXIT_BOOTJOIN_TIMEOUT = 12
EXIT_DAEMON_IS_NOT_PRESENT = 14
EXIT_DAEMON_IS_PRESENT = 15
EXIT_INVALID_ENVIRONMENT = 16
EXIT_INVALID_LOCALHOST_STATE = 17
EXIT_INTERNAL_BUG = 127

BLOCK_SIZE = 4096
MAX_HOSTS = 64
STATEFILE_SIZE = BLOCK_SIZE * (1 + MAX_HOSTS)
POOL_STATES = ("init", "active", "invalid")
HEARTBEAT_FLAG = "--heartbeat"
ENGINE_FILE = os.path.abspath(__file__)


def escape(text: str) -> str:
    """XML-escape text (xml.sax.saxutils would pull in urllib and email: 40 ms per script run)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
PID_FILE = "xhad.pid"
LOCK_FILE = "xhad.lock"
LOG_FILE = "xhad.log"
POLL = 0.1
HEARTBEAT_POLL = 0.2
STOP_GRACE = 5.0
LOCK_TIMEOUT = 10.0
MAX_CONF_BYTES = 1 << 20
# Exit statuses of a heartbeat process that ha_start_daemon passes on unchanged.
PASS_ON = (
    EXIT_CAN_NOT_READ_CONFIG_FILE,
    EXIT_INVALID_CONFIG_FILE,
    EXIT_CAN_NOT_ACCESS_STATEFILE,
    EXIT_INVALID_STATE_FILE,
    EXIT_GENERATION_UUID_MISMATCH,
    EXIT_INVALID_POOL_STATE,
    EXIT_DAEMON_IS_PRESENT,
)


class Exit(Exception):
    """Stop the current script with an MTC exit code and an optional message for stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class Conf:
    """The parts of xhad.conf the engine uses."""

    def __init__(
        self,
        path: str,
        generation: str,
        hosts: list[str],
        local: str,
        statefile: str,
        parameters: dict[str, int],
    ) -> None:
        self.path = path
        self.hostdir = os.path.dirname(path)
        self.generation = generation
        self.hosts = hosts
        self.local = local
        self.index = hosts.index(local)
        self.statefile = statefile
        self.parameters = parameters

    @property
    def heartbeat_interval(self) -> int:
        """Seconds between beats: HeartbeatInterval, at least 1."""
        return max(1, self.parameters.get("HeartbeatInterval", 1))

    @property
    def heartbeat_timeout(self) -> int:
        """Beats older than this many seconds (HeartbeatTimeout) no longer count."""
        return max(1, self.parameters.get("HeartbeatTimeout", 60))

    @property
    def join_timeout(self) -> int:
        """How long ha_start_daemon waits for the first beat (EnableJoinTimeout)."""
        return max(1, self.parameters.get("EnableJoinTimeout", 120))


# --------------------------------------------------------------------------- configuration


def _leaf(parent: ET.Element, path: str) -> str:
    """The trimmed, non-empty text at ``path``; Exit 7 otherwise."""
    element = parent.find(path)
    text = (element.text or "").strip() if element is not None else ""
    if not text:
        raise Exit(EXIT_INVALID_CONFIG_FILE, f"xhad.conf: missing or empty <{path}>")
    return text


def read_conf(path: str) -> Conf:
    """Read and check this host's xhad.conf; Exit 6 if unreadable, 7 if invalid."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONF_BYTES + 1)
    except OSError as exc:
        raise Exit(EXIT_CAN_NOT_READ_CONFIG_FILE, f"cannot read {path}: {exc}") from None
    if len(data) > MAX_CONF_BYTES:
        raise Exit(EXIT_INVALID_CONFIG_FILE, f"{path} is larger than 1 MiB")
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, ValueError) as exc:
        raise Exit(EXIT_INVALID_CONFIG_FILE, f"{path} is not well-formed XML: {exc}") from None
    if root.tag != "xhad-config":
        raise Exit(EXIT_INVALID_CONFIG_FILE, f"{path}: root is <{root.tag}>, not <xhad-config>")
    generation = _leaf(root, "common-config/GenerationUUID")
    hosts = [_leaf(host, "HostID") for host in root.findall("common-config/host")]
    if not hosts or len(hosts) > MAX_HOSTS or len(set(hosts)) != len(hosts):
        raise Exit(EXIT_INVALID_CONFIG_FILE, f"{path}: need 1..{MAX_HOSTS} distinct hosts, got {hosts}")
    parameters: dict[str, int] = {}
    for element in root.findall("common-config/parameters/*"):
        try:
            parameters[element.tag] = int((element.text or "").strip())
        except ValueError:
            raise Exit(
                EXIT_INVALID_CONFIG_FILE, f"{path}: parameter {element.tag} is not an integer"
            ) from None
    local = _leaf(root, "local-config/localhost/HostID")
    if local not in hosts:
        raise Exit(EXIT_INVALID_CONFIG_FILE, f"{path}: local host {local} is not in the host list")
    statefile = _leaf(root, "local-config/localhost/StateFile")
    env_host = os.environ.get("XAPI_HOST_UUID")
    if env_host is not None and env_host != local:
        raise Exit(EXIT_INVALID_ENVIRONMENT, f"XAPI_HOST_UUID {env_host} is not the conf's host {local}")
    return Conf(path, generation, hosts, local, statefile, parameters)


# --------------------------------------------------------------------------- statefile


class Statefile:
    """The shared statefile, flock-ed (exclusive when writable) for the ``with`` block."""

    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        self.writable = writable
        try:
            self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot open statefile {path}: {exc}") from None
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(self.fd)
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot size statefile {path}: {exc}") from None
        if size != STATEFILE_SIZE:
            os.close(self.fd)
            raise Exit(
                EXIT_CAN_NOT_ACCESS_STATEFILE, f"statefile {path} has {size} bytes, not {STATEFILE_SIZE}"
            )

    def __enter__(self) -> Self:
        # Bounded wait: a hung (e.g. SIGSTOPped) holder must look like an unreachable
        # statefile, not block every other host forever.
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_EX if self.writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, "statefile lock not granted in time") from None
                time.sleep(0.005)
            except OSError as exc:
                os.close(self.fd)
                raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot lock statefile: {exc}") from None

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)  # closing releases the flock

    def read_block(self, index: int) -> dict | None:
        """The JSON object in block ``index`` (0 = global), or None if the block is empty."""
        try:
            data = os.pread(self.fd, BLOCK_SIZE, index * BLOCK_SIZE)
        except OSError as exc:
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot read statefile: {exc}") from None
        if len(data) != BLOCK_SIZE:
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, "short read from statefile")
        body = data.rstrip(b"\0")
        if not body:
            return None
        try:
            value = json.loads(body.decode("utf-8"))
        except ValueError:
            raise Exit(EXIT_INVALID_STATE_FILE, f"statefile block {index} is not valid JSON") from None
        if not isinstance(value, dict):
            raise Exit(EXIT_INVALID_STATE_FILE, f"statefile block {index} is not an object")
        return value

    def write_block(self, index: int, value: dict | None) -> None:
        """Replace block ``index`` with ``value`` (None empties it)."""
        data = json.dumps(value, separators=(",", ":")).encode("utf-8") if value is not None else b""
        if len(data) > BLOCK_SIZE:
            raise Exit(EXIT_INTERNAL_BUG, f"statefile block {index} would exceed {BLOCK_SIZE} bytes")
        try:
            written = os.pwrite(self.fd, data.ljust(BLOCK_SIZE, b"\0"), index * BLOCK_SIZE)
        except OSError as exc:
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot write statefile: {exc}") from None
        if written != BLOCK_SIZE:
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, "short write to statefile")

    def global_block(self) -> dict:
        """The validated global block; Exit 9 if it is empty or malformed."""
        block = self.read_block(0)
        if block is None:
            raise Exit(EXIT_INVALID_STATE_FILE, "statefile is not initialised (ha_set_pool_state init)")
        master = block.get("master")
        if (
            block.get("pool_state") not in POOL_STATES
            or not isinstance(block.get("generation"), str)
            or not (master is None or isinstance(master, str))
        ):
            raise Exit(EXIT_INVALID_STATE_FILE, "statefile global block is malformed")
        return block

    def slot(self, conf: Conf, index: int) -> dict:
        """The validated slot of the conf's ``index``-th host; an empty or foreign slot reads as
        a host that never beat."""
        block = self.read_block(1 + index)
        if block is None or block.get("host") != conf.hosts[index]:
            return empty_slot(conf.hosts[index])
        pid = block.get("pid")
        beat = block.get("heartbeat")
        if (
            not (pid is None or (isinstance(pid, int) and not isinstance(pid, bool)))
            or not (beat is None or isinstance(beat, (int, float)))
            or not isinstance(block.get("excluded"), bool)
            or not isinstance(block.get("armed"), bool)
        ):
            raise Exit(EXIT_INVALID_STATE_FILE, f"statefile slot {index} is malformed")
        return block

    def write_slot(self, index: int, slot: dict | None) -> None:
        """Replace the slot of the conf's ``index``-th host (None empties it)."""
        self.write_block(1 + index, slot)


def empty_slot(host: str) -> dict:
    """The slot of a host that never beat."""
    return {"host": host, "pid": None, "heartbeat": None, "excluded": False, "armed": False}


def checked_global(sf: Statefile, conf: Conf) -> dict:
    """The global block, Exit 10 if its generation is not the conf's."""
    block = sf.global_block()
    if block["generation"] != conf.generation:
        raise Exit(
            EXIT_GENERATION_UUID_MISMATCH,
            f"statefile generation {block['generation']} differs from conf generation {conf.generation}",
        )
    return block


# --------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[bytes] | None:
    """The NUL-separated command line of ``pid``, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")
    except OSError:
        return None


def is_heartbeat(pid: object, conf_path: str | None = None) -> bool:
    """True iff ``pid`` is a running (not zombie) heartbeat process, of ``conf_path`` if given."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not os.path.isdir("/proc/self"):
        return True
    # A zombie or an unrelated process that reused the pid has no matching command line.
    parts = _cmdline(pid)
    if not parts or HEARTBEAT_FLAG.encode() not in parts:
        return False
    return conf_path is None or os.fsencode(conf_path) in parts


def read_pid_file(hostdir: str) -> int | None:
    """The pid recorded in ``<hostdir>/xhad.pid``, or None."""
    try:
        with open(os.path.join(hostdir, PID_FILE)) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def write_pid_file(hostdir: str, pid: int) -> None:
    """Atomically record ``pid`` in ``<hostdir>/xhad.pid``."""
    path = os.path.join(hostdir, PID_FILE)
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as handle:
        handle.write(f"{pid}\n")
    os.replace(tmp, path)


def remove_pid_file(hostdir: str, only_if: int | None = None) -> None:
    """Remove ``<hostdir>/xhad.pid`` (only if it names ``only_if``, when given)."""
    if only_if is not None and read_pid_file(hostdir) != only_if:
        return
    try:
        os.unlink(os.path.join(hostdir, PID_FILE))
    except FileNotFoundError:
        pass


def running_pid(conf_path: str) -> int | None:
    """The pid of this host's heartbeat process, or None if it is not running."""
    pid = read_pid_file(os.path.dirname(conf_path))
    return pid if pid is not None and is_heartbeat(pid, conf_path) else None


def is_live(slot: dict, conf: Conf, now: float) -> bool:
    """A host is live iff not excluded, its beat is fresh and its heartbeat process runs."""
    beat = slot.get("heartbeat")
    return (
        not slot.get("excluded")
        and beat is not None
        and now - beat < conf.heartbeat_timeout
        and is_heartbeat(slot.get("pid"))
    )


def liveness(sf: Statefile, conf: Conf) -> tuple[list[dict], list[bool]]:
    """The slots of the conf's hosts, in conf order, and whether each host is live."""
    slots = [sf.slot(conf, index) for index in range(len(conf.hosts))]
    now = time.time()
    return slots, [is_live(slot, conf, now) for slot in slots]


# --------------------------------------------------------------------------- heartbeat process


def heartbeat_main(conf_path: str) -> int:
    """Body of the heartbeat process; returns its exit status (see the module docstring)."""
    stopping: list[bool] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    conf = read_conf(conf_path)
    me = os.getpid()
    lock_fd = os.open(os.path.join(conf.hostdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log(f"another heartbeat process holds {LOCK_FILE}")
        return EXIT_DAEMON_IS_PRESENT
    write_pid_file(conf.hostdir, me)
    _log(f"heartbeat {me} started for host {conf.local}")
    try:
        code = _beat(conf, me, stopping)
    except Exit as exc:
        code = exc.code
        _log(exc.message)
    finally:
        _leave(conf, me)
    _log(f"heartbeat {me} exits with {code}")
    return code


def _beat(conf: Conf, me: int, stopping: list[bool]) -> int:
    """Beat until a signal arrives (exit 0) or a stop condition raises Exit."""
    next_beat = 0.0
    while not stopping:
        if not os.path.isdir(conf.hostdir):
            raise Exit(EXIT_SUCCESS, "host folder is gone")
        if not os.path.exists(conf.statefile):
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, "statefile is gone")
        if read_pid_file(conf.hostdir) != me:
            raise Exit(EXIT_SUCCESS, f"{PID_FILE} no longer names this process")
        now = time.time()
        with Statefile(conf.statefile, writable=True) as sf:
            block = checked_global(sf, conf)
            if block["pool_state"] == "invalid":
                raise Exit(EXIT_INVALID_POOL_STATE, "pool state is invalid")
            slot = sf.slot(conf, conf.index)
            if slot["pid"] not in (None, me) and is_heartbeat(slot["pid"]):
                raise Exit(EXIT_DAEMON_IS_PRESENT, f"heartbeat {slot['pid']} owns this host's slot")
            if now >= next_beat:
                if block["pool_state"] == "init":
                    block["pool_state"] = "active"
                    sf.write_block(0, block)
                slot.update(host=conf.local, pid=me, heartbeat=now)
                sf.write_slot(conf.index, slot)
                next_beat = now + conf.heartbeat_interval
        time.sleep(HEARTBEAT_POLL)
    _log("stopped by signal")
    return EXIT_SUCCESS


def _leave(conf: Conf, me: int) -> None:
    """Best effort: take our pid out of the slot and remove our pid file."""
    try:
        with Statefile(conf.statefile, writable=True) as sf:
            slot = sf.slot(conf, conf.index)
            if slot["pid"] == me:
                slot["pid"] = None
                sf.write_slot(conf.index, slot)
    except (Exit, OSError):
        pass
    remove_pid_file(conf.hostdir, only_if=me)


def _log(message: str) -> None:
    """Append a timestamped line to the heartbeat log (its stdout)."""
    if message:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{os.getpid()}] {message}", flush=True)


# --------------------------------------------------------------------------- scripts


def set_pool_state(conf_path: str, args: list[str]) -> int:
    """ha_set_pool_state init|invalid|active: init (re)formats the statefile; the others set the state."""
    if len(args) != 1 or args[0] not in POOL_STATES:
        raise Exit(EXIT_INVALID_PARAMETER, "usage: ha_set_pool_state init|invalid|active")
    state = args[0]
    conf = read_conf(conf_path)
    if state == "init":
        if running_pid(conf.path):
            raise Exit(EXIT_DAEMON_IS_PRESENT, "the heartbeat daemon is running")
        with Statefile(conf.statefile, writable=True) as sf:
            sf.write_block(0, {"pool_state": "init", "generation": conf.generation, "master": None})
            for index in range(MAX_HOSTS):
                sf.write_slot(index, None)
        return EXIT_SUCCESS
    with Statefile(conf.statefile, writable=True) as sf:
        if state == "active":
            block = checked_global(sf, conf)
        else:
            try:
                block = sf.global_block()
            except Exit:
                # Invalidation must work even on a damaged statefile.
                block = {"generation": conf.generation, "master": None}
        block["pool_state"] = state
        sf.write_block(0, block)
    return EXIT_SUCCESS


def start_daemon(conf_path: str) -> int:
    """ha_start_daemon: spawn the heartbeat process and wait for its first beat (exit 0)."""
    conf = read_conf(conf_path)
    if running_pid(conf.path):
        raise Exit(EXIT_DAEMON_IS_PRESENT, "the heartbeat daemon is already running")
    with Statefile(conf.statefile, writable=True) as sf:
        block = checked_global(sf, conf)
        if block["pool_state"] == "invalid":
            raise Exit(EXIT_INVALID_POOL_STATE, "pool state is invalid")
        slot = sf.slot(conf, conf.index)
        # Joining clears the excluded flag (ha.md 4.9) and arms fencing.
        slot.update(host=conf.local, excluded=False, armed=True)
        sf.write_slot(conf.index, slot)
    remove_pid_file(conf.hostdir)
    started = time.time()
    with open(os.path.join(conf.hostdir, LOG_FILE), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable or "python3", "-S", ENGINE_FILE, HEARTBEAT_FLAG, conf.path],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=conf.hostdir,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + conf.join_timeout
    try:
        while True:
            code = proc.poll()
            if code is not None:
                return code if code in PASS_ON else EXIT_BOOTJOIN_TIMEOUT
            with Statefile(conf.statefile, writable=False) as sf:
                slot = sf.slot(conf, conf.index)
            if slot["pid"] == proc.pid and (slot["heartbeat"] or 0) >= started:
                return EXIT_SUCCESS
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait()
                return EXIT_BOOTJOIN_TIMEOUT
            time.sleep(POLL)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def stop_daemon(conf_path: str) -> int:
    """ha_stop_daemon: SIGTERM (then SIGKILL) the heartbeat process; 0 also when none runs."""
    pid = running_pid(conf_path)
    if pid is not None:
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, conf_path, STOP_GRACE):
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, conf_path, STOP_GRACE)
            try:
                _leave(read_conf(conf_path), pid)
            except Exit:
                pass
    remove_pid_file(os.path.dirname(conf_path))
    return EXIT_SUCCESS


def _signal(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid`` unless it is already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, conf_path: str, limit: float) -> bool:
    """Wait up to ``limit`` seconds for heartbeat ``pid`` to end; whether it did."""
    deadline = time.monotonic() + limit
    while is_heartbeat(pid, conf_path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def _require_running(conf: Conf) -> None:
    """Exit 14 unless this host's heartbeat process runs."""
    if running_pid(conf.path) is None:
        raise Exit(EXIT_DAEMON_IS_NOT_PRESENT, "the heartbeat daemon is not running")


def query_liveset(conf_path: str) -> int:
    """ha_query_liveset: print the liveset computed from the statefile now."""
    conf = read_conf(conf_path)
    _require_running(conf)
    began = time.monotonic()
    with Statefile(conf.statefile, writable=False) as sf:
        block = checked_global(sf, conf)
        if block["pool_state"] == "invalid":
            raise Exit(EXIT_DAEMON_IS_NOT_PRESENT, "pool state is invalid; the daemon is stopping")
        slots, live = liveness(sf, conf)
    latency = int((time.monotonic() - began) * 1000)
    sys.stdout.write(render_liveset(conf, block, slots, live, latency))
    sys.stdout.flush()
    return EXIT_SUCCESS


def render_liveset(conf: Conf, block: dict, slots: list[dict], live: list[bool], latency: int) -> str:
    """The liveset document of ha.md 3.2 for the given statefile view."""

    def flag(value: bool) -> str:
        return "TRUE" if value else "FALSE"

    now = time.time()
    live_hosts = " ".join(host for host, up in zip(conf.hosts, live, strict=True) if up)
    interval_ms = conf.heartbeat_interval * 1000
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<ha_liveset_info version="1.0">',
        "  <status>Online</status>",
        f"  <localhost><HostID>{escape(conf.local)}</HostID><HostIndex>{conf.index}</HostIndex></localhost>",
    ]
    for index, (host, slot, up) in enumerate(zip(conf.hosts, slots, live, strict=True)):
        out += [
            "  <host>",
            f"    <HostID>{escape(host)}</HostID><HostIndex>{index}</HostIndex>",
            f"    <liveness>{flag(up)}</liveness><master>{flag(up and block['master'] == host)}</master>",
            f"    <statefile_access>{flag(up or index == conf.index)}</statefile_access>",
            "    <statefile_corrupted>FALSE</statefile_corrupted>",
            f"    <excluded>{flag(slot['excluded'])}</excluded>",
            "  </host>",
        ]
    out.append("  <raw_status_on_local_host>")
    for name, value in (
        ("statefile_latency", latency),
        ("statefile_latency_min", 0),
        ("statefile_latency_max", max(latency, 1)),
        ("heartbeat_latency", interval_ms),
        ("heartbeat_latency_min", interval_ms),
        ("heartbeat_latency_max", interval_ms + 50),
        ("Xapi_healthcheck_latency", 0),
        ("Xapi_healthcheck_latency_min", 0),
        ("Xapi_healthcheck_latency_max", 0),
    ):
        out.append(f"    <{name}>{value}</{name}>")
    for host, slot, up in zip(conf.hosts, slots, live, strict=True):
        age = -1 if slot["heartbeat"] is None else max(0, int((now - slot["heartbeat"]) * 1000))
        # A dead host sees nobody; a live one sees every live host.
        peers = live_hosts if up else ""
        out += [
            "    <host_raw_data>",
            f"      <HostID>{escape(host)}</HostID>",
            f"      <time_since_last_update_on_statefile>{age}</time_since_last_update_on_statefile>",
            f"      <time_since_last_heartbeat>{age}</time_since_last_heartbeat>",
            "      <time_since_xapi_restart_first_attempted>-1</time_since_xapi_restart_first_attempted>",
            f"      <heartbeat_active_list_on_heartbeat>{escape(peers)}</heartbeat_active_list_on_heartbeat>",
            f"      <heartbeat_active_list_on_statefile>{escape(peers)}</heartbeat_active_list_on_statefile>",
            "    </host_raw_data>",
        ]
    out.append("  </raw_status_on_local_host>")
    out.append("  <warning_on_local_host>")
    for name in (
        "statefile_lost",
        "heartbeat_approaching_timeout",
        "statefile_approaching_timeout",
        "Xapi_healthcheck_approaching_timeout",
        "network_bonding_error",
    ):
        out.append(f"    <{name}>FALSE</{name}>")
    out.append("  </warning_on_local_host>")
    out.append("</ha_liveset_info>")
    return "\n".join(out) + "\n"


def propose_master(conf_path: str) -> int:
    """ha_propose_master: take the master lock if free, ours, or held by a dead host; print TRUE/FALSE."""
    conf = read_conf(conf_path)
    _require_running(conf)
    with Statefile(conf.statefile, writable=True) as sf:
        block = checked_global(sf, conf)
        if block["pool_state"] == "invalid":
            raise Exit(EXIT_INVALID_POOL_STATE, "pool state is invalid")
        _, live = liveness(sf, conf)
        if not live[conf.index]:
            raise Exit(EXIT_INVALID_LOCALHOST_STATE, f"host {conf.local} is not live")
        holder = block["master"]
        holder_live = holder in conf.hosts and live[conf.hosts.index(holder)]
        granted = holder is None or holder == conf.local or not holder_live
        if granted and holder != conf.local:
            block["master"] = conf.local
            sf.write_block(0, block)
    sys.stdout.write("TRUE\n" if granted else "FALSE\n")
    sys.stdout.flush()
    return EXIT_SUCCESS


def disarm_fencing(conf_path: str) -> int:
    """ha_disarm_fencing: clear this host's armed flag (14 if the daemon is not running)."""
    conf = read_conf(conf_path)
    _require_running(conf)
    with Statefile(conf.statefile, writable=True) as sf:
        slot = sf.slot(conf, conf.index)
        slot.update(host=conf.local, armed=False)
        sf.write_slot(conf.index, slot)
    return EXIT_SUCCESS


def set_excluded(conf_path: str) -> int:
    """ha_set_excluded: set this host's excluded flag straight in the statefile."""
    conf = read_conf(conf_path)
    with Statefile(conf.statefile, writable=True) as sf:
        slot = sf.slot(conf, conf.index)
        slot.update(host=conf.local, excluded=True)
        sf.write_slot(conf.index, slot)
    return EXIT_SUCCESS


# --------------------------------------------------------------------------- entry points


def _fist(hostdir: str, script: str) -> int | None:
    """Obey ``<hostdir>/fist/<script>``; an exit code to stop with, or None to go on."""
    try:
        with open(os.path.join(hostdir, "fist", script)) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        words = line.split()
        if not words:
            continue
        if words[0] == "exit" and len(words) == 2 and words[1].isascii() and words[1].isdigit():
            return int(words[1]) & 0xFF
        if words[0] == "sleep" and len(words) == 2:
            try:
                time.sleep(float(words[1]))
            except ValueError:
                raise Exit(EXIT_INVALID_PARAMETER, f"bad fist point line {line!r}") from None
            continue
        if words == ["garbage"]:
            sys.stdout.write("<<< this is not a liveset &&& \x7f TRUE\n")
            sys.stdout.flush()
            return EXIT_SUCCESS
        raise Exit(EXIT_INVALID_PARAMETER, f"bad fist point line {line!r}")
    return None


def _run(script: str, argv: list[str]) -> int:
    """Dispatch one script invocation; raises Exit for MTC failures."""
    if script not in SCRIPTS:
        raise Exit(EXIT_INVALID_PARAMETER, f"unknown script {script}")
    args = list(argv)
    conf_path = os.environ.get("XHAD_CONF", "")
    if len(args) >= 2 and args[0] == "-C":
        conf_path = args[1]
        del args[:2]
    if not conf_path:
        raise Exit(EXIT_CAN_NOT_READ_CONFIG_FILE, "XHAD_CONF is not set")
    conf_path = os.path.abspath(conf_path)
    fist = _fist(os.path.dirname(conf_path), script)
    if fist is not None:
        return fist
    if script == "ha_set_pool_state":
        return set_pool_state(conf_path, args)
    if args:
        raise Exit(EXIT_INVALID_PARAMETER, f"{script} takes no arguments, got {args}")
    handlers = {
        "ha_start_daemon": start_daemon,
        "ha_stop_daemon": stop_daemon,
        "ha_query_liveset": query_liveset,
        "ha_propose_master": propose_master,
        "ha_disarm_fencing": disarm_fencing,
        "ha_set_excluded": set_excluded,
    }
    return handlers[script](conf_path)


def _guarded(body: Callable[..., int], *args: object) -> int:
    """Run ``body(*args)``: Exit gives its code (message to stderr), anything unexpected 127."""
    try:
        return body(*args)
    except Exit as exc:
        if exc.message:
            print(exc.message, file=sys.stderr)
        return exc.code
    except Exception:  # noqa: BLE001 - the MTC contract: any unexpected error is exit 127
        traceback.print_exc()
        return EXIT_INTERNAL_BUG


def main(script: str, argv: list[str]) -> int:
    """Run cluster-stack script ``script`` with ``argv``; returns its MTC exit code."""
    return _guarded(_run, script, argv)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == HEARTBEAT_FLAG:
        sys.exit(_guarded(heartbeat_main, os.path.abspath(sys.argv[2])))
    print(f"usage: {sys.argv[0]} {HEARTBEAT_FLAG} <xhad.conf>", file=sys.stderr)
    sys.exit(EXIT_INVALID_PARAMETER)
