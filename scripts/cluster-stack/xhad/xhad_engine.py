"""Emulated xhad: the logic behind the seven cluster-stack scripts (standard library only).

Every script in this folder (and in sibling stacks such as ``../melio``) is a shim calling
``main(<script name>, argv)``.  The engine emulates the xhad daemon (xenserver/xha) closely
enough for xapid to enable, monitor and disable HA with real processes on one machine, and it
fences like xhad: each host heartbeats over the network and the statefile, decides every tick
whether it may survive (ha.md 4.9, survival rules 1 and 2), and a host that may not asks its
watchdog to reset it.  It never imports xapid.

Inputs
    ``XHAD_CONF`` (or ``-C <file>`` on the command line, like the real scripts): this host's
    xhad.conf (ha.md 3.1).  Its parent directory is the *host folder*, which holds
    ``xhad.pid``, ``xhad.lock``, ``xhad.log``, ``xhad.view`` (the daemon's current liveset
    view), ``xhad.claim`` and the optional ``fist/`` folder.  ``XAPI_HOST_UUID``, when set,
    must equal the conf's local HostID (else exit 16).  ``XAPID_HOST_DIR`` names the folder of
    the watchdog socket (default: the host folder); ``XAPID_HW_DIR`` the folder of
    ``fabric.json`` (unset: no fabric, everyone in network group "0", nothing blocked).

Fabric (hw-contract.md)
    Re-read whenever its mtime, size or inode changes (stat on every wake-up).  Datagrams are
    neither sent to nor accepted from a host in another network group.  When ``storage_blocked``
    lists a folder containing the statefile for this host, every statefile access by this host
    (daemon and scripts) fails exactly like an I/O error.

Statefile
    The conf's ``StateFile`` is a pre-existing file of exactly 266240 bytes shared by all
    hosts: a 4 KiB global block followed by 64 host slots of 4 KiB (slot N belongs to the N-th
    host of the conf's host list).  Each block is a JSON object padded with NULs (an all-NUL
    block is empty) carrying a ``crc`` member (CRC-32 of the object without it; a block without
    ``crc`` is accepted, e.g. one written by hand).  Global block: ``pool_state``
    (init/active/invalid), ``generation`` and ``master`` (UUID holding the master lock, or
    null).  Host slot: ``host``, ``gen``, ``pid``/``inc`` (process and incarnation of its
    heartbeat), ``seq``, ``heartbeat`` (time.time() of the last write), ``state``
    (starting/online/fencing/stopped), ``sf`` (statefile_ok), ``hears`` (conf indices of the
    hosts it hears on the network), ``live`` (indices live in its liveset), ``fencing``,
    ``claim`` (holds a master claim made without statefile), ``excluded`` and ``armed``.  A set
    of conf indices is written as a bit mask in lower-case hex (bit i for index i: ``"5"`` is
    {0, 2}); a JSON list of indices is read as well.
    Writers take a POSIX record lock on the bytes they rewrite (a slot, the global block, or the
    whole file for ``init``); readers take none and retry a block whose CRC does not match.  So
    a hung (SIGSTOPped) host can only block its own scripts, never another host.

Heartbeat process
    ``ha_start_daemon`` spawns ``<python> -S xhad_engine.py --heartbeat <conf>`` in its own
    session with its output in ``xhad.log``.  The process binds UDP on its own ``IPaddress``
    and the conf's ``UDPport`` (exit 2 if it cannot), and sleeps in select() on that socket.
    Every HeartbeatInterval it sends every other host a JSON datagram (generation, host,
    incarnation, sequence number, state, statefile_ok, the hosts it hears, its liveset, fencing,
    excluded, claim); every StateFileInterval it reads all slots and rewrites its own.  Datagrams
    with a foreign generation, an unknown or spoofed sender (source address not the sender's
    IPaddress) or malformed content are ignored.  A host is *heard* while its last datagram is
    younger than HeartbeatTimeout; its slot is *fresh* while younger than StateFileTimeout.
    Of two reports of a host (datagram, slot) the newer counts; a report of a new incarnation
    replaces the old one for good.  A newcomer (or a host that does not hear us yet) gets a reply
    at once, and a change of our own state, liveset or statefile access is announced at once
    (datagrams and an extra statefile tick, rate-limited); a liveset that only grew waits for the
    next tick (only a joiner reads peers' livesets).  To keep 64 hosts cheap the loop wakes
    at most every 0.1 s, evaluates at most every 0.1 s unless a timeout falls due, and a
    datagram or slot whose content did not change (only ``seq``/times, which come last) is not
    parsed in full.  Measured at T=10: 64 hosts take about a quarter of one core.

Joining (status ``Starting``; no fencing)
    Statefile access is required (exit 8 when it fails), the pool state must not be invalid
    (11) and the generations must match (10); if ha_start_daemon dies (its caller's timeout
    killed it), the join is given up (12).  If some host is Online, the joiner waits until no
    Online host still counts it live (xhad's "all hosts recognise I was down"), then joins when
    it hears every Online host, they hear it and their slots are fresh; otherwise exit 13 after
    BootJoinTimeout.  If nobody is Online it forms a liveset as soon as every configured host
    (pool state init) or every non-excluded host (active) is heard, hears it and has a fresh
    slot.  Otherwise, after EnableJoinTimeout (init: exit 12) or BootJoinTimeout (active), it
    forms the liveset alone if it is in the winning partition of the starting hosts, else exit
    18 (it is excluded and others are not) or 13.  Going Online clears the excluded flag,
    moves pool state init to active and arms the watchdog.  Excluded hosts need not be up to
    form a liveset (xhad waits BootJoinTimeout for them).

Survival rules (Online, every evaluation; pure functions below)
    Rule 1: this host can write the statefile and is in the winning partition: for every
    candidate h (an Online, non-excluded host with a fresh slot reporting statefile_ok) its
    partition is the candidates that hear h and that h hears; the winner is the largest, ties
    going to the partition holding the lowest conf index (xha sm.c am_I_in_largest_partition).
    Rule 2: this host lost the statefile, and every non-excluded host is heard, reports no
    statefile access and hears every non-excluded host (xha sm.c test_Survival_Rule).  A host
    that has met neither rule continuously for 2 * max(HeartbeatInterval, StateFileInterval) + 1
    seconds (so that views have converged, xhad's "consistent view") self-fences: it sets
    ``fencing`` in its slot (if reachable) and its datagrams, sends ``fence <reason>`` to its
    watchdog and exits.  A disarmed host (ha_disarm_fencing) never fences.  A host whose own
    loop stalled for longer than HeartbeatWatchdogTimeout (SIGSTOP then SIGCONT) fences at once:
    the others have dropped it already.  An excluded host (ha_set_excluded while running) is
    not live and does not fence.  The self-fenced process exits 0 (xapid's watchdog SIGKILLs the
    host's processes anyway).  A partition healed before anyone fenced is simply forgotten:
    hearing resumes and the rules hold again within the settle time; a host that fenced must
    re-join (ha_start_daemon, as xapi's start-up does).  At T=10 a crashed host leaves the
    others' livesets 12 s after its last heartbeat, a partition loser fences about 15 s after
    the cut (HeartbeatTimeout + settle), a host that loses the statefile alone within
    StateFileInterval + settle (at most 7 s).

Liveset (ha_query_liveset; the local host's view)
    The daemon publishes its view in ``xhad.view`` (a NUL-padded JSON object with a ``crc``,
    rewritten in place on every change and every HeartbeatInterval); ha_query_liveset renders
    it, taking pool state, master and excluded flags fresh from the statefile when it can read
    it (pool state invalid: exit 14).  Host i is live iff it is in my liveset and not excluded.
    My liveset gains the Online hosts of my surviving partition (rule 1) or of the all-hosts
    network group (rule 2).  A member
    outside it stays live until it is certain to be fenced: it reports ``fencing`` or
    ``stopped``, a new incarnation of it appears, it is excluded, or it has been silent on
    network and statefile for HeartbeatWatchdogTimeout + HeartbeatInterval seconds.  ``master``
    is the live holder of the lock from the statefile (under rule 2: the lowest-index live
    claimant, else the most recent holder any live host read; datagrams carry each host's
    ``master`` and when it read it).  ``statefile_access``: my own access for me, the
    host's reported flag for other live hosts, FALSE for hosts that are not live.  Raw data as
    in xhad: per host, the hosts it hears as reported by heartbeat and on the statefile, and the
    time since its last heartbeat/slot update.  Warnings: ``statefile_lost`` when this host lost
    the statefile; ``heartbeat_approaching_timeout`` / ``statefile_approaching_timeout`` when
    a live peer has been silent for more than half of HeartbeatTimeout / StateFileTimeout;
    ``Xapi_healthcheck_approaching_timeout`` and the Xapi_healthcheck latencies come from the xapi
    monitor (below); ``network_bonding_error`` is never raised (there is no bond to watch).

xapi monitor (xapi_mon.py in this folder; xha daemon/xapi_mon.c)
    Once Online, a thread of the heartbeat process checks this host's xapi every
    XapiHealthCheckInterval (``host.ha_xapi_healthcheck`` at the host's own address, within
    XapiHealthCheckTimeout), restarts it on failure (``xapi-restart`` on the watchdog socket, up to
    XapiRestartAttempts within XapiRestartTimeout) and, if that does not work, self-fences like any
    other fence (only while armed).  See xapi_mon.py for the details.

Watchdog (hw-contract.md)
    ``$XAPID_HOST_DIR/watchdog`` (Unix datagram socket; a path too long for sun_path is reached
    through /proc/self/fd).  Going Online sends ``arm <Wh>`` (Wh = HeartbeatWatchdogTimeout),
    every later HeartbeatInterval tick re-arms; a clean stop (SIGTERM from ha_stop_daemon, pool
    state invalid, any error exit while Online) and ha_disarm_fencing send ``disarm``.  A
    joining host never arms.  Send errors are ignored.

Master lock (ha_propose_master)
    Granted (prints TRUE) if no host live in MY liveset holds it, or I hold it; exit 17 if I am
    not Online, not live or excluded.  Without statefile access it is granted only under rule 2
    and only to the lowest-index live host; the claim is carried in heartbeats and written to
    the statefile when it is reachable again (if the holder there is not live).  The script
    tells the local daemon through ``xhad.claim`` (``<incarnation> lock|claim <time>``) and
    SIGUSR2, as xhad's daemon takes the lock itself.

Other scripts
    ``ha_set_pool_state init`` (15 if the daemon runs) formats the statefile; ``invalid`` makes
    every daemon disarm and exit 11 at its next statefile tick (``ha_query_liveset`` then exits
    14).  ``ha_stop_daemon`` sends SIGTERM (SIGKILL after 5 s), returns 0 also when nothing
    runs; the stopped host leaves every liveset at once (it reports ``stopped``).
    ``ha_disarm_fencing`` clears the slot's armed flag, tells the daemon (SIGUSR1) and disarms
    the watchdog.  ``ha_set_excluded`` sets the excluded flag straight in the statefile.

Fault injection (fist points)
    Before anything else, if ``<host folder>/fist/<script name>`` exists, its non-empty lines
    are obeyed in order: ``exit N`` exits with N at once, ``sleep S`` sleeps S seconds and
    goes on, ``garbage`` prints non-XML text and exits 0.  Any other line exits 1.

Exit codes are the MTC codes of ha.md 2.3: 1 bad argument, 2 system error (UDP bind), 6
unreadable conf, 7 invalid conf, 8 statefile not accessible or wrong size, 9 statefile contents
invalid, 10 generation mismatch, 11 invalid pool state, 12 join timeout, 13 cannot join the
existing liveset, 14 daemon not running, 15 daemon running, 16 environment mismatch, 17 host
not Online/live, 18 start blocked by the excluded flag, 127 any unexpected error (never a
traceback with exit code 1).  Datagrams and slot contents reach other hosts only through the
processes of this engine: a host's view never depends on /proc.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING, Any

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
EXIT_SYSTEM_ERROR = 2
EXIT_CAN_NOT_READ_CONFIG_FILE = 6
EXIT_INVALID_CONFIG_FILE = 7
EXIT_CAN_NOT_ACCESS_STATEFILE = 8
EXIT_INVALID_STATE_FILE = 9
EXIT_GENERATION_UUID_MISMATCH = 10
EXIT_INVALID_POOL_STATE = 11
EXIT_BOOTJOIN_TIMEOUT = 12
EXIT_CAN_NOT_JOIN_EXISTING_LIVESET = 13
EXIT_DAEMON_IS_NOT_PRESENT = 14
EXIT_DAEMON_IS_PRESENT = 15
EXIT_INVALID_ENVIRONMENT = 16
EXIT_INVALID_LOCALHOST_STATE = 17
EXIT_BOOT_BLOCKED_BY_EXCLUDED = 18
EXIT_INTERNAL_BUG = 127

BLOCK_SIZE = 4096
MAX_HOSTS = 64
STATEFILE_SIZE = BLOCK_SIZE * (1 + MAX_HOSTS)
POOL_STATES = ("init", "active", "invalid")
HOST_STATES = ("starting", "online", "fencing", "stopped")
HEARTBEAT_FLAG = "--heartbeat"
ENGINE_FILE = os.path.abspath(__file__)
PID_FILE = "xhad.pid"
LOCK_FILE = "xhad.lock"
LOG_FILE = "xhad.log"
VIEW_FILE = "xhad.view"
CLAIM_FILE = "xhad.claim"
WATCHDOG_SOCKET = "watchdog"
FABRIC_FILE = "fabric.json"
POLL = 0.1
# ha_start_daemon waits for the heartbeat's word on a pipe, and looks at the view (a stat; read only
# when it changed) on every word and at least every START_WAIT; once the pipe is closed (the
# heartbeat is ending), every START_POLL until the exit shows.
START_POLL = 0.05
START_WAIT = 1.0
ONLINE_FD_VAR = "XHAD_ONLINE_FD"
STOP_GRACE = 5.0
LOCK_TIMEOUT = 10.0
DAEMON_LOCK_TIMEOUT = 1.0
MAX_CONF_BYTES = 1 << 20
MAX_DATAGRAM = 16384
MAX_FABRIC_BYTES = 1 << 20
# Minimum seconds between extra datagram rounds / statefile ticks when the view changes.
HB_ACCELERATION = 0.2
SF_ACCELERATION = 0.5
# Minimum seconds between two evaluations triggered by news (timeouts are exact).
EVAL_INTERVAL = 0.1
# Minimum seconds between two wake-ups of the heartbeat loop.
MIN_WAKE = 0.1
# Start-up of the heartbeat process is not part of the join timeout.
START_MARGIN = 15.0
# Exit statuses of a heartbeat process that ha_start_daemon passes on unchanged.
PASS_ON = (
    EXIT_SYSTEM_ERROR,
    EXIT_CAN_NOT_READ_CONFIG_FILE,
    EXIT_INVALID_CONFIG_FILE,
    EXIT_CAN_NOT_ACCESS_STATEFILE,
    EXIT_INVALID_STATE_FILE,
    EXIT_GENERATION_UUID_MISMATCH,
    EXIT_INVALID_POOL_STATE,
    EXIT_BOOTJOIN_TIMEOUT,
    EXIT_CAN_NOT_JOIN_EXISTING_LIVESET,
    EXIT_DAEMON_IS_PRESENT,
    EXIT_BOOT_BLOCKED_BY_EXCLUDED,
)


_XAPI_MON: ModuleType | None = None


def xapi_mon() -> ModuleType:
    """The xapi monitor module beside this file (loaded once; the engine may be loaded by path)."""
    global _XAPI_MON
    if _XAPI_MON is None:
        here = os.path.dirname(ENGINE_FILE)
        if here not in sys.path:
            sys.path.append(here)
        import xapi_mon as module

        _XAPI_MON = module
    return _XAPI_MON


def escape(text: str) -> str:
    """XML-escape text (xml.sax.saxutils would pull in urllib and email: 40 ms per script run)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
        addresses: list[str] | None = None,
        udp_port: int = 694,
    ) -> None:
        self.path = path
        self.hostdir = os.path.dirname(path)
        self.generation = generation
        self.hosts = hosts
        self.local = local
        self.index = hosts.index(local)
        self.statefile = statefile
        self.parameters = parameters
        self.addresses = addresses if addresses is not None else ["127.0.0.1"] * len(hosts)
        self.udp_port = udp_port

    def _param(self, name: str, default: int) -> int:
        return max(1, self.parameters.get(name, default))

    @cached_property
    def heartbeat_interval(self) -> int:
        """Seconds between heartbeat datagrams (HeartbeatInterval, at least 1)."""
        return self._param("HeartbeatInterval", 1)

    @cached_property
    def statefile_interval(self) -> int:
        """Seconds between statefile ticks (StateFileInterval, at least 1)."""
        return self._param("StateFileInterval", self.heartbeat_interval)

    @cached_property
    def heartbeat_timeout(self) -> int:
        """A host not heard for this many seconds (HeartbeatTimeout) is no longer heard."""
        return self._param("HeartbeatTimeout", 60)

    @cached_property
    def statefile_timeout(self) -> int:
        """A slot older than this many seconds (StateFileTimeout) is no longer fresh."""
        return self._param("StateFileTimeout", self.heartbeat_timeout)

    @cached_property
    def watchdog_timeout(self) -> int:
        """The timeout the daemon arms its watchdog with (HeartbeatWatchdogTimeout)."""
        return self._param("HeartbeatWatchdogTimeout", self.heartbeat_timeout)

    @cached_property
    def join_timeout(self) -> int:
        """How long a join during enable may take (EnableJoinTimeout)."""
        return self._param("EnableJoinTimeout", 120)

    @cached_property
    def boot_join_timeout(self) -> int:
        """How long a join into an active pool may take (BootJoinTimeout)."""
        return self._param("BootJoinTimeout", self.join_timeout)

    @cached_property
    def settle(self) -> float:
        """Seconds a host must fail both survival rules before it fences (views converge)."""
        return 2 * max(self.heartbeat_interval, self.statefile_interval) + 1

    @cached_property
    def silence_limit(self) -> float:
        """Seconds of silence after which a peer is certainly fenced (its watchdog fired)."""
        return self.watchdog_timeout + self.heartbeat_interval


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
    port_text = _leaf(root, "common-config/UDPport")
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise Exit(EXIT_INVALID_CONFIG_FILE, f"{path}: UDPport {port_text!r} is not a port number")
    host_elements = root.findall("common-config/host")
    hosts = [_leaf(host, "HostID") for host in host_elements]
    addresses = [_leaf(host, "IPaddress") for host in host_elements]
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
    return Conf(path, generation, hosts, local, statefile, parameters, addresses, int(port_text))


# --------------------------------------------------------------------------- fabric


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _under(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both normalised)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Fabric:
    """The emulated network groups and storage blocks of ``$XAPID_HW_DIR/fabric.json``."""

    def __init__(self, hw_dir: str | None) -> None:
        self.path = os.path.join(hw_dir, FABRIC_FILE) if hw_dir else None
        self.network: dict[str, str] = {}
        self.blocked: dict[str, list[str]] = {}
        self._key: tuple[int, int, int] | None = None

    @classmethod
    def from_env(cls) -> Fabric:
        """The fabric named by the environment (XAPID_HW_DIR), freshly read."""
        fabric = cls(os.environ.get("XAPID_HW_DIR") or None)
        fabric.refresh()
        return fabric

    def refresh(self) -> bool:
        """Re-read the file if its mtime, size or inode changed; whether the contents changed."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            key = None
        if key == self._key:
            return False
        self._key = key
        old = (self.network, self.blocked)
        self.network, self.blocked = self._parse() if key is not None else ({}, {})
        return (self.network, self.blocked) != old

    def _parse(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        """The file's contents; anything unparsable means the empty fabric."""
        try:
            with open(self.path or "", "rb") as handle:
                data = json.loads(handle.read(MAX_FABRIC_BYTES))
        except (OSError, ValueError):
            return {}, {}
        if not isinstance(data, dict):
            return {}, {}
        network = data.get("network", {})
        blocked = data.get("storage_blocked", {})
        if not isinstance(network, dict) or not isinstance(blocked, dict):
            return {}, {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in network.items()):
            return {}, {}
        if not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(f, str) for f in v)
            for k, v in blocked.items()
        ):
            return {}, {}
        return dict(network), {k: [_norm(f) for f in v] for k, v in blocked.items()}

    def group(self, host: str) -> str:
        """The network group of ``host`` ("0" when not listed)."""
        return self.network.get(host, "0")

    def connected(self, a: str, b: str) -> bool:
        """Whether hosts ``a`` and ``b`` can exchange heartbeat packets."""
        return self.group(a) == self.group(b)

    def storage_blocked(self, host: str, path: str) -> bool:
        """Whether ``host`` must treat any access to ``path`` as an I/O error."""
        folders = self.blocked.get(host)
        if not folders:
            return False
        paths = {_norm(path), os.path.realpath(path)}
        return any(_under(p, f) for p in paths for f in folders)


# --------------------------------------------------------------------------- statefile


def encode_block(value: dict) -> bytes:
    """The JSON text of ``value`` with a ``crc`` member appended (CRC-32 of the text without it)."""
    return encode_text(json.dumps(value, separators=(",", ":")))


def encode_text(body: str) -> bytes:
    """:func:`encode_block` of the object whose JSON text is ``body``."""
    crc = zlib.crc32(body.encode("utf-8"))
    if body == "{}":
        return f'{{"crc":{crc}}}'.encode()
    return f'{body[:-1]},"crc":{crc}}}'.encode()


_ZEROS = bytes(BLOCK_SIZE)
# NUL padding is checked with startswith(a view of _ZEROS): a memcmp, no copy, no byte loop.
_ZEROS_VIEW = memoryview(_ZEROS)
# A JSON number that json.loads gives as a float (it has a fraction or an exponent).
_FLOAT = rb"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+))"
_UINT = rb"(0|[1-9][0-9]*)"
# The members that change with every write, as this engine writes them (see _write_own_slot and
# Daemon.send): such a tail is read without json; any other text takes the full decode.
_SLOT_TAIL = re.compile(rb'"seq":' + _UINT + rb',"heartbeat":' + _FLOAT + rb',"crc":' + _UINT + rb"\}")
_DATAGRAM_TAIL = re.compile(rb'"seq":' + _UINT + rb',"master_t":(?:null|' + _FLOAT + rb'),"t":' + _FLOAT + rb"\}")


_EXCLUDED_TRUE = re.compile(rb'"excluded"\s*:\s*true')


def block_body(data: bytes) -> bytes:
    """``data`` without its NUL padding (``data.rstrip(b"\\0")``, without a scan byte by byte)."""
    end = data.rfind(b"}") + 1
    rest = len(data) - end
    if rest <= BLOCK_SIZE and data.startswith(_ZEROS_VIEW[:rest], end):
        return data[:end]
    return data.rstrip(b"\0")


def decode_block(data: bytes) -> dict | None:
    """The object in a NUL-padded block; None if empty.  Raises ValueError if unparsable or if
    its ``crc`` does not match (a torn read or damage)."""
    body = block_body(data)
    if not body:
        return None
    value = json.loads(body.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not an object")
    if "crc" in value:
        crc = value.pop("crc")
        # The inverse of encode_block, on the bytes: no second serialisation.
        cut = body.rfind(b'"crc":')
        if cut < 1:
            raise ValueError("checksum misplaced")
        text = body[: cut - 1] + b"}" if body[cut - 1 : cut] == b"," else b"{}"
        if zlib.crc32(text) != crc:
            raise ValueError("checksum mismatch")
    return value


class Statefile:
    """The shared statefile, opened for one operation (a ``with`` block).

    Opening fails with Exit 8 when the fabric blocks the statefile for ``host``, when it cannot
    be opened or has the wrong size.  Writers lock the byte ranges they rewrite.
    """

    def __init__(self, path: str, writable: bool, host: str | None = None, fabric: Fabric | None = None) -> None:
        self.path = path
        self.writable = writable
        if host is not None:
            fabric = fabric if fabric is not None else Fabric.from_env()
            if fabric.storage_blocked(host, path):
                raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot access statefile {path}: I/O error (blocked)")
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
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)  # closing releases every record lock of this process on the file

    def lock(self, first: int, count: int = 1, limit: float = LOCK_TIMEOUT) -> None:
        """Lock blocks ``first`` .. ``first + count - 1`` (0 = global) for writing; count 0 means
        the whole file.  Exit 8 if not granted within ``limit`` seconds (a hung holder must look
        like an unreachable statefile, not block forever)."""
        deadline = time.monotonic() + limit
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, count * BLOCK_SIZE, first * BLOCK_SIZE)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot lock statefile: {exc}") from None
                if time.monotonic() >= deadline:
                    raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, "statefile lock not granted in time") from None
                time.sleep(0.005)

    def read_raw(self, index: int, count: int = 1) -> bytes:
        """The bytes of blocks ``index`` .. ``index + count - 1``; Exit 8 on an I/O error."""
        try:
            data = os.pread(self.fd, count * BLOCK_SIZE, index * BLOCK_SIZE)
        except OSError as exc:
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"cannot read statefile: {exc}") from None
        if len(data) != count * BLOCK_SIZE:
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, "short read from statefile")
        return data

    def read_block(self, index: int) -> dict | None:
        """The object in block ``index`` (0 = global), or None if the block is empty; a block
        that stays unparsable over a few reads (not a torn read) is Exit 9."""
        for _ in range(3):
            try:
                return decode_block(self.read_raw(index))
            except (ValueError, UnicodeDecodeError):
                time.sleep(0.002)
        raise Exit(EXIT_INVALID_STATE_FILE, f"statefile block {index} is not a valid JSON object")

    def write_block(self, index: int, value: dict | None) -> None:
        """Replace block ``index`` with ``value`` (None empties it)."""
        data = encode_block(value) if value is not None else b""
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
        if not valid_global(block):
            raise Exit(EXIT_INVALID_STATE_FILE, "statefile global block is malformed")
        return block

    def slot(self, conf: Conf, index: int) -> dict:
        """The validated slot of the conf's ``index``-th host; an empty or foreign slot reads as
        a host that never beat."""
        block = self.read_block(1 + index)
        if block is None or block.get("host") != conf.hosts[index]:
            return empty_slot(conf.hosts[index])
        if not valid_slot(block):
            raise Exit(EXIT_INVALID_STATE_FILE, f"statefile slot {index} is malformed")
        return block

    def write_slot(self, index: int, slot: dict | None) -> None:
        """Replace the slot of the conf's ``index``-th host (None empties it)."""
        self.write_block(1 + index, slot)


def valid_global(block: dict) -> bool:
    """Whether a decoded global block has the expected members."""
    master = block.get("master")
    return (
        block.get("pool_state") in POOL_STATES
        and isinstance(block.get("generation"), str)
        and (master is None or isinstance(master, str))
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)



def valid_slot(block: dict) -> bool:
    """Whether a decoded slot has well-typed members (the newer ones may be absent)."""
    pid = block.get("pid")
    beat = block.get("heartbeat")
    return (
        (pid is None or _is_int(pid))
        and (beat is None or (isinstance(beat, (int, float)) and not isinstance(beat, bool)))
        and isinstance(block.get("excluded"), bool)
        and isinstance(block.get("armed"), bool)
        and block.get("state", None) in (None, *HOST_STATES)
    )


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


def open_statefile(conf: Conf, writable: bool, fabric: Fabric | None = None) -> Statefile:
    """This host's statefile (Exit 8 if the fabric blocks it or it cannot be opened)."""
    return Statefile(conf.statefile, writable, conf.local, fabric)


# --------------------------------------------------------------------------- reports


class Report:
    """What a host says about itself, by heartbeat datagram or in its statefile slot."""

    __slots__ = ("inc", "seq", "t", "state", "sf", "hears", "live", "fencing", "excluded", "claim", "gone", "online",
                 "_hears_mask")

    def __init__(
        self,
        inc: str,
        seq: int,
        t: float,
        state: str,
        sf: bool,
        hears: AbstractSet[int],
        live: AbstractSet[int] = frozenset(),
        fencing: bool = False,
        excluded: bool = False,
        claim: bool = False,
    ) -> None:
        self.inc = inc
        self.seq = seq
        self.t = t
        self.state = state
        self.sf = sf
        self.hears = frozenset(hears)
        self.live = frozenset(live)
        self.fencing = fencing
        self.excluded = excluded
        self.claim = claim
        # Plain attributes, not properties: every evaluation asks them of every peer, twice.
        # Whether the host says it is fencing or has stopped (it is certainly not live).
        self.gone = fencing or state in ("fencing", "stopped")
        # Whether the host says it is Online (and not leaving).
        self.online = state == "online" and not fencing and not excluded
        self._hears_mask: str | None = None

    def hears_mask(self) -> str:
        """``hears`` as a hex bit mask, worked out once per report (the view lists every peer's)."""
        if self._hears_mask is None:
            self._hears_mask = index_mask(self.hears)
        return self._hears_mask

    def fields(self) -> dict:
        """The report as JSON-ready members (shared by datagrams and slots)."""
        return {
            "inc": self.inc,
            "state": self.state,
            "sf": self.sf,
            "hears": self.hears_mask(),
            "live": index_mask(self.live),
            "fencing": self.fencing,
            "claim": self.claim,
            "seq": self.seq,
        }


_INDICES = [frozenset(range(n)) for n in range(MAX_HOSTS + 1)]
_INT_ONLY = frozenset({int})
_HEX_MASK = re.compile(r"[0-9a-f]{1,16}")
# The sets a pool's reports carry repeat from host to host and tick to tick: each mask is
# converted once (both ways), which makes a report as cheap to read as its JSON text allows.
_MASK_SETS: dict[str, frozenset[int]] = {}
_SET_MASKS: dict[frozenset[int], str] = {}
_MASK_CACHE_LIMIT = 4096


def index_mask(indices: AbstractSet[int]) -> str:
    """``indices`` (conf indices, 0..63) as the hex bit mask reports carry."""
    key = indices if isinstance(indices, frozenset) else frozenset(indices)
    mask = _SET_MASKS.get(key)
    if mask is None:
        mask = format(sum(1 << i for i in key), "x")
        if len(_SET_MASKS) >= _MASK_CACHE_LIMIT:
            _SET_MASKS.clear()
        _SET_MASKS[key] = mask
    return mask


def index_set(value: object, n: int) -> frozenset[int] | None:
    """A set of conf indices below ``n`` from a hex bit mask (or a list of indices); None if
    malformed."""
    if isinstance(value, str):
        found = _MASK_SETS.get(value)
        if found is None:
            if not _HEX_MASK.fullmatch(value):
                return None
            bits = int(value, 16)
            found = frozenset(i for i in range(bits.bit_length()) if bits >> i & 1)
            if len(_MASK_SETS) >= _MASK_CACHE_LIMIT:
                _MASK_SETS.clear()
            _MASK_SETS[value] = found
        return found if found <= _INDICES[n] else None
    # A list, as older heartbeats wrote (set operations, not a Python loop).
    if not isinstance(value, list) or len(value) > n:
        return None
    if not set(map(type, value)) <= _INT_ONLY:
        return None  # bools, floats, strings, lists...
    found = frozenset(value)
    return found if found <= _INDICES[n] else None


def parse_report(data: Mapping[str, object], n: int, t: object) -> Report | None:
    """The report in a datagram or slot object, or None if anything is malformed."""
    inc, seq, state, sf = data.get("inc"), data.get("seq"), data.get("state"), data.get("sf")
    hears = index_set(data.get("hears"), n)
    live = index_set(data.get("live", []), n)
    fencing, excluded, claim = data.get("fencing", False), data.get("excluded", False), data.get("claim", False)
    if (
        not isinstance(inc, str)
        or not inc
        or not _is_int(seq)
        or not isinstance(t, (int, float))
        or isinstance(t, bool)
        or state not in HOST_STATES
        or not isinstance(sf, bool)
        or hears is None
        or live is None
        or not isinstance(fencing, bool)
        or not isinstance(excluded, bool)
        or not isinstance(claim, bool)
    ):
        return None
    return Report(inc, seq, float(t), state, sf, hears, live, fencing, excluded, claim)


# --------------------------------------------------------------------------- survival rules (pure)


def partition_of(h: int, candidates: AbstractSet[int], hears: Mapping[int, AbstractSet[int]]) -> frozenset[int]:
    """Candidate ``h``'s partition: ``h`` and the candidates that hear it and that it hears."""
    empty: frozenset[int] = frozenset()
    # Intersect first (in C): only the hosts h hears need the look-up of what they hear.
    return frozenset({x for x in hears.get(h, empty) & candidates if h in hears.get(x, empty)} | {h})


def winning_partition(candidates: Iterable[int], hears: Mapping[int, AbstractSet[int]]) -> frozenset[int]:
    """The winning partition among ``candidates`` (conf indices of hosts that can write the
    statefile), given the set of hosts each of them hears on the network.

    The largest partition wins; of equal ones, the one holding the lowest conf index (xha sm.c
    am_I_in_largest_partition: strict ``>`` over ascending indices).  Empty if no candidates.
    """
    pool = frozenset(candidates)
    if all(pool <= hears.get(h, frozenset()) for h in pool):
        return pool  # everyone hears everyone: the usual case, and O(n)
    best: frozenset[int] = frozenset()
    for h in sorted(pool):
        part = partition_of(h, pool, hears)
        if len(part) > len(best) or (len(part) == len(best) and best and min(part) < min(best)):
            best = part
    return best


def rule1(
    me: int, sf_ok: bool, candidates: AbstractSet[int], hears: Mapping[int, AbstractSet[int]]
) -> frozenset[int] | None:
    """Survival rule 1: the winning partition if I can write the statefile and am in it, else None."""
    if not sf_ok:
        return None
    winner = winning_partition(set(candidates) | {me}, hears)
    return winner if me in winner else None


def rule2(
    me: int,
    sf_ok: bool,
    hosts: Iterable[int],
    excluded: AbstractSet[int],
    hears: Mapping[int, AbstractSet[int]],
    peer_sf: Mapping[int, bool],
) -> frozenset[int] | None:
    """Survival rule 2: the non-excluded hosts if I lost the statefile and each of them is heard
    by me, reports no statefile access and hears all of them (xha sm.c test_Survival_Rule);
    else None.  ``hears[i]`` for a peer is what it reports, for ``me`` what I hear; a host
    without a current report is absent from ``hears``."""
    if sf_ok:
        return None
    needed = frozenset(i for i in hosts if i not in excluded) | {me}
    for i in needed:
        if i not in hears or not needed <= hears[i]:
            return None
        if i != me and peer_sf.get(i, True):
            return None
    return needed


class Decision:
    """The outcome of one evaluation of the survival rules."""

    __slots__ = ("rule", "core", "reason")

    def __init__(self, rule: int, core: frozenset[int], reason: str = "") -> None:
        self.rule = rule  # 1 or 2 when surviving, 0 when neither rule holds
        self.core = core  # the hosts of my surviving partition (rule 1) / network group (rule 2)
        self.reason = reason

    @property
    def survive(self) -> bool:
        return self.rule != 0

    def __repr__(self) -> str:
        return f"Decision(rule={self.rule}, core={sorted(self.core)}, reason={self.reason!r})"


def decide(
    me: int,
    hosts: Iterable[int],
    sf_ok: bool,
    my_hears: AbstractSet[int],
    reports: Mapping[int, Report],
    sf_fresh: AbstractSet[int],
    excluded: AbstractSet[int],
) -> Decision:
    """Apply survival rules 1 and 2 for Online host ``me`` (ha.md 4.9).

    ``reports`` are the current reports of the other hosts (heard recently or with a fresh
    slot), ``sf_fresh`` the hosts whose slots are fresh, ``excluded`` the excluded hosts.
    Rule 1 candidates are the Online, non-excluded hosts with a fresh slot that report
    statefile access.
    """
    hears: dict[int, AbstractSet[int]] = {i: r.hears for i, r in reports.items() if not r.gone}
    hears[me] = frozenset(my_hears) | {me}
    candidates = {
        i for i, r in reports.items() if i in sf_fresh and r.sf and r.online and i not in excluded
    }
    core = rule1(me, sf_ok, candidates, hears)
    if core is not None:
        return Decision(1, core)
    peer_sf = {i: r.sf for i, r in reports.items()}
    core = rule2(me, sf_ok, hosts, excluded, hears, peer_sf)
    if core is not None:
        return Decision(2, core)
    if sf_ok:
        winner = winning_partition(candidates | {me}, hears)
        return Decision(0, frozenset(), f"not in the winning partition {sorted(winner)} (rule 1)")
    return Decision(0, frozenset(), "statefile lost and survival rule 2 not met")


def next_liveset(
    me: int,
    live: AbstractSet[int],
    decision: Decision,
    online: AbstractSet[int],
    gone: AbstractSet[int],
) -> frozenset[int]:
    """My liveset after an evaluation: the members not certainly fenced (``gone``), plus, when
    I survive, the Online hosts of my partition/group (``decision.core``)."""
    kept = {i for i in live if i not in gone}
    if decision.survive:
        kept |= {i for i in decision.core if i in online and i not in gone}
    return frozenset(kept | {me})


JOIN_WAIT = "wait"
JOIN = "join"
FORM = "form"


def join_step(
    me: int,
    hosts: Iterable[int],
    pool_init: bool,
    reports: Mapping[int, Report],
    my_hears: AbstractSet[int],
    sf_fresh: AbstractSet[int],
    excluded: AbstractSet[int],
    my_excluded: bool,
    timed_out: bool,
) -> tuple[str, int]:
    """One step of a joining host (status Starting): ``(JOIN_WAIT|JOIN|FORM, 0)`` or
    ``("exit", code)`` (xha sm.c test_Start_Criteria, join, wait_all_hosts_recognize_I_was_down).

    A host is *up* for me when it has a current report, I hear it, it hears me, its slot is
    fresh and it is not leaving.  With Online hosts present I join once none of them counts me
    live and all of them are up; else exit 13 at the timeout.  Without, I form a liveset once
    every configured (pool init) / non-excluded (active) host is up; at the timeout: init exit
    12; excluded while others are not, exit 18; in the winning partition of the starting hosts,
    form; else 13.
    """
    up = {
        i
        for i, r in reports.items()
        if i in my_hears and me in r.hears and i in sf_fresh and not r.gone and r.state in ("starting", "online")
    }
    online = {i for i, r in reports.items() if r.online and i not in excluded}
    if online:
        recognised = not any(me in reports[i].live for i in online)
        if recognised and online <= up:
            return JOIN, 0
        return ("exit", EXIT_CAN_NOT_JOIN_EXISTING_LIVESET) if timed_out else (JOIN_WAIT, 0)
    others = [i for i in hosts if i != me]
    needed = set(others) if pool_init else {i for i in others if i not in excluded}
    if needed <= up:
        return FORM, 0
    if not timed_out:
        return JOIN_WAIT, 0
    if pool_init:
        return "exit", EXIT_BOOTJOIN_TIMEOUT
    if my_excluded and needed:
        return "exit", EXIT_BOOT_BLOCKED_BY_EXCLUDED
    starting = {i for i, r in reports.items() if i in sf_fresh and r.state == "starting" and not r.gone}
    hears: dict[int, AbstractSet[int]] = {i: reports[i].hears for i in starting}
    hears[me] = frozenset(my_hears) | {me}
    if me in winning_partition(starting | {me}, hears):
        return FORM, 0
    return "exit", EXIT_CAN_NOT_JOIN_EXISTING_LIVESET


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


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (temp file + rename: readers see old or new, never half)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_pid_file(hostdir: str, pid: int) -> None:
    """Atomically record ``pid`` in ``<hostdir>/xhad.pid``."""
    write_atomic(os.path.join(hostdir, PID_FILE), f"{pid}\n")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_pid_file(hostdir: str, only_if: int | None = None) -> None:
    """Remove ``<hostdir>/xhad.pid`` (only if it names ``only_if``, when given)."""
    if only_if is not None and read_pid_file(hostdir) != only_if:
        return
    _unlink(os.path.join(hostdir, PID_FILE))


def running_pid(conf_path: str) -> int | None:
    """The pid of this host's heartbeat process, or None if it is not running."""
    pid = read_pid_file(os.path.dirname(conf_path))
    return pid if pid is not None and is_heartbeat(pid, conf_path) else None


def watchdog_path(conf: Conf) -> str:
    """``$XAPID_HOST_DIR/watchdog``, or the watchdog beside the conf when that is unset."""
    return os.path.join(os.environ.get("XAPID_HOST_DIR") or conf.hostdir, WATCHDOG_SOCKET)


# sun_path holds 108 bytes; longer socket paths are reached through /proc/self/fd/<dir fd>.
UNIX_PATH_MAX = 100


def send_watchdog(path: str, message: str) -> None:
    """Send one message to the watchdog socket; every error is ignored (xapid may be down)."""
    dir_fd = -1
    try:
        target = path
        if len(os.fsencode(path)) >= UNIX_PATH_MAX:
            dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
            target = f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode("ascii", "replace"), target)
    except OSError:
        pass
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


def read_view(conf: Conf, pid: int | None = None) -> dict | None:
    """The daemon's last written view (of heartbeat ``pid`` when given), or None."""
    view = None
    for _ in range(5):
        try:
            with open(os.path.join(conf.hostdir, VIEW_FILE), "rb") as handle:
                view = decode_block(handle.read(MAX_CONF_BYTES))
            break
        except OSError:
            return None
        except (ValueError, UnicodeDecodeError):
            time.sleep(0.002)  # caught mid-write
    if view is None:
        return None
    n = len(conf.hosts)
    if not isinstance(view, dict) or (pid is not None and view.get("pid") != pid):
        return None
    if view.get("status") not in ("Online", "Starting"):
        return None
    for name in ("excluded", "sf_access", "hb_seen", "sf_seen", "on_hb", "on_sf"):
        if not isinstance(view.get(name), list) or len(view[name]) != n:
            return None
    if index_set(view.get("live"), n) is None:
        return None
    return view


# --------------------------------------------------------------------------- heartbeat process


class Daemon:
    """One host's heartbeat process: network and statefile heartbeats, join, survival rules."""

    def __init__(self, conf: Conf) -> None:
        self.conf = conf
        self.n = len(conf.hosts)
        self.me = conf.index
        self.others = [i for i in range(self.n) if i != self.me]
        self.index_of = {host: i for i, host in enumerate(conf.hosts)}
        self.fabric = Fabric(os.environ.get("XAPID_HW_DIR") or None)
        self.fabric.refresh()
        self.watchdog = watchdog_path(conf)
        self.pid = os.getpid()
        self.parent = os.getppid()
        self.inc = os.urandom(8).hex()
        self.seq = 0
        self.state = "starting"
        self.started = time.monotonic()
        self.sf_ok = False
        self.sf_ticks = 0
        self.sf_error = ""
        self.pool_init: bool | None = None
        self.master: str | None = None
        self.master_t = float("-inf")  # when we last read ``master`` from the statefile
        self.peer_master: list[tuple[float, str | None]] = [(float("-inf"), None)] * self.n
        self.view_master: str | None = None
        self.armed = True
        self.watchdog_on = False
        self.excluded = False
        self.clear_excluded = False
        self.excluded_flags = [False] * self.n
        self.claim = False
        self.live: frozenset[int] = frozenset()
        self.live_inc: dict[int, str] = {}
        self.decision = Decision(1, frozenset())
        self.lose_since: float | None = None
        self.my_hears: frozenset[int] = frozenset({self.me})
        # Per host: the latest report by datagram (with its monotonic receipt time) and by slot.
        self.hb: list[Report | None] = [None] * self.n
        self.hb_at: list[float] = [float("-inf")] * self.n
        # Per host: the bytes of its last datagram before ``,"seq":`` (content, not age).
        self.hb_prefix: list[bytes | None] = [None] * self.n
        unique = [a for a in conf.addresses if conf.addresses.count(a) == 1]
        self.by_address = {a: i for i, a in enumerate(conf.addresses) if a in unique and i != self.me}
        self.slot_raw: list[bytes | None] = [None] * self.n
        self.slot: list[Report | None] = [None] * self.n
        self.cur_inc: list[str | None] = [None] * self.n
        self.last_send_wall: float | None = None
        self.last_slot_wall: float | None = None
        self.next_send = 0.0
        self.next_sf = 0.0
        self.next_eval = 0.0
        self.last_sf_tick = float("-inf")
        self.last_pet = time.monotonic()
        self.dirty = True
        self.accelerate = False
        self.sf_accelerate = False
        self.reply_to: set[int] = set()
        self.last_reply = [float("-inf")] * self.n
        # Per peer: whether the last datagram it was sent said we hear it.
        self.told_heard = [False] * self.n
        self.last_eval = float("-inf")
        self.published: tuple = ()
        self.last_wake = float("-inf")
        self.view_fd = -1
        self.view_size = 0
        self.last_accel = float("-inf")
        self.sf_lat: list[int] = []
        self.hb_lat: list[int] = []
        self.last_send_mono: float | None = None
        self.sock: socket.socket | None = None
        self.signals: list[int] = []
        self.wake_r = -1
        self.xapimon: Any = None  # xapi_mon.XapiMon once Online
        self.online_fd = -1  # told "online" once the view shows it (see spawn_heartbeat)

    # -- set-up and the loop ---------------------------------------------------------------

    def bind(self) -> None:
        """Bind the UDP socket on this host's IPaddress:UDPport; Exit 2 if impossible."""
        address = self.conf.addresses[self.me]
        try:
            socket.inet_pton(socket.AF_INET, address)
        except OSError:
            raise Exit(EXIT_INVALID_CONFIG_FILE, f"IPaddress {address!r} is not an IPv4 address") from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((address, self.conf.udp_port))
        except OSError as exc:
            sock.close()
            raise Exit(EXIT_SYSTEM_ERROR, f"cannot bind UDP {address}:{self.conf.udp_port}: {exc}") from None
        sock.setblocking(False)
        self.sock = sock

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGUSR1 disarms, SIGUSR2 re-reads xhad.claim; each wakes
        select() through a pipe."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.wake_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

        def on_signal(signum: int, frame: object) -> None:
            self.signals.append(signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # A fork-server worker resets SIGPIPE to the default; the "online" word to an
        # ha_start_daemon that already saw the view and left must not kill the heartbeat.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def run(self) -> int:
        """Heartbeat until stopped (0), fenced (0) or an error stops us (Exit)."""
        self.bind()
        self.install_signals()
        self.write_view()
        try:
            return self._loop()
        except Exit:
            if self.state != "fencing":
                self.leave("stopped")
            raise
        finally:
            if self.sock is not None:
                self.sock.close()

    def _loop(self) -> int:
        conf = self.conf
        while True:
            now = time.monotonic()
            if self._signals():
                self.leave("stopped")
                _log("stopped by signal")
                return EXIT_SUCCESS
            xapi_fence = self.xapimon.fence_reason if self.xapimon is not None else ""
            if xapi_fence and self.state == "online" and self.armed:
                self.fence(xapi_fence)
            stalled = now - self.last_pet
            if self.state == "online" and self.armed and self.watchdog_on and stalled > conf.watchdog_timeout:
                self.fence(f"the heartbeat stalled for {stalled:.1f} s, beyond the watchdog timeout")
            if self.fabric.refresh():
                _log(f"fabric changed: group {self.fabric.group(conf.local)}")
                self.next_sf = min(self.next_sf, now)
                self.dirty = True
            self.receive(now)
            if now >= self.next_sf or (self.sf_accelerate and now - self.last_sf_tick >= SF_ACCELERATION):
                self.sf_tick(time.time())
                self.sf_accelerate = False
                self.last_sf_tick = now
                self.next_sf = now + conf.statefile_interval
                self.dirty = True
            if self.state == "starting" and os.getppid() != self.parent:
                # ha_start_daemon was killed (a caller's timeout): nobody waits for this join.
                raise Exit(EXIT_BOOTJOIN_TIMEOUT, "ha_start_daemon is gone; giving up the join")
            if self.state == "starting" and self.sf_ticks and not self.sf_ok:
                raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"lost statefile access while starting: {self.sf_error}")
            # Coalesced: a burst of datagrams costs one evaluation, not one each.
            if (self.dirty and now - self.last_eval >= EVAL_INTERVAL) or now >= self.next_eval:
                self.dirty = False
                self.last_eval = now
                self.evaluate(time.monotonic(), time.time())
            ticked = now >= self.next_send
            if ticked or (self.accelerate and now - self.last_accel >= HB_ACCELERATION):
                self.check_ownership()
                self.send(time.time())
                self.last_accel = now
                self.accelerate = False
                self.reply_to.clear()
                if ticked:
                    self.next_send = now + conf.heartbeat_interval
            elif self.reply_to:
                self.send(time.time(), sorted(self.reply_to))
                self.reply_to.clear()
            if ticked and self.state == "online" and self.armed:
                send_watchdog(self.watchdog, f"arm {conf.watchdog_timeout}")
                self.watchdog_on = True
                self.last_pet = time.monotonic()
            if ticked or self.view_key() != self.published:
                self.write_view()
            if self.online_fd >= 0 and self.state == "online":
                self._tell_online()
            deadline = min(self.next_send, self.next_sf, self.next_eval)
            if self.dirty:
                deadline = min(deadline, self.last_eval + EVAL_INTERVAL)
            if self.accelerate:
                deadline = min(deadline, self.last_accel + HB_ACCELERATION)
            if self.sf_accelerate:
                deadline = min(deadline, self.last_sf_tick + SF_ACCELERATION)
            # Datagrams from n - 1 peers arrive spread over each interval: wake at most every
            # MIN_WAKE seconds and take them in batches (HA timing is in seconds).
            pause = self.last_wake + MIN_WAKE - time.monotonic()
            if pause > 0 and deadline - time.monotonic() > pause:
                time.sleep(pause)
            timeout = max(0.0, min(deadline - time.monotonic(), conf.heartbeat_interval))
            assert self.sock is not None
            try:
                select.select([self.sock, self.wake_r], [], [], timeout)
            except InterruptedError:
                pass
            self.last_wake = time.monotonic()

    def _tell_online(self) -> None:
        """Tell the waiting ha_start_daemon that the view now says Online (best effort)."""
        try:
            os.write(self.online_fd, b"online\n")
        except OSError:
            pass
        os.close(self.online_fd)
        self.online_fd = -1

    def _signals(self) -> bool:
        """Handle pending signals; whether a stop was requested."""
        try:
            while os.read(self.wake_r, 64):
                pass
        except (BlockingIOError, OSError):
            pass
        stop = False
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGUSR1:
                self.disarm("ha_disarm_fencing")
            elif signum == signal.SIGUSR2:
                self.dirty = True  # ha_propose_master left news in xhad.claim
            else:
                stop = True
        return stop

    def check_ownership(self) -> None:
        """Exit 0 when the host folder vanished or our pid file names another process."""
        if not os.path.isdir(self.conf.hostdir):
            raise Exit(EXIT_SUCCESS, "host folder is gone")
        if read_pid_file(self.conf.hostdir) != self.pid:
            raise Exit(EXIT_SUCCESS, f"{PID_FILE} no longer names this process")

    # -- watchdog --------------------------------------------------------------------------

    def disarm(self, why: str) -> None:
        """Stop fencing: disarm the watchdog and clear our armed flag (best effort)."""
        if self.armed or self.watchdog_on:
            _log(f"fencing disarmed ({why})")
        self.armed = False
        self.watchdog_on = False
        send_watchdog(self.watchdog, "disarm")
        self.dirty = True
        self.accelerate = True

    def leave(self, state: str) -> None:
        """A clean exit: report ``state`` (stopped) by slot and datagram, disarm the watchdog."""
        self.state = state
        if self.watchdog_on:
            send_watchdog(self.watchdog, "disarm")
            self.watchdog_on = False
        wall = time.time()
        self.write_slot_now(wall, pid=None)
        self.send(wall)
        self.remove_view()

    def fence(self, reason: str) -> None:
        """Self-fence: flag ``fencing`` everywhere, ask the watchdog to reset us, stop (Exit)."""
        self.state = "fencing"
        _log(f"self-fencing: {reason}")
        wall = time.time()
        self.write_slot_now(wall, pid=None)
        self.send(wall)
        self.send(wall)
        send_watchdog(self.watchdog, f"fence {reason}")
        self.remove_view()
        raise Exit(EXIT_SUCCESS, f"self-fenced: {reason}")

    # -- reports ---------------------------------------------------------------------------

    def my_report(self, wall: float) -> Report:
        return Report(
            self.inc,
            self.seq,
            wall,
            self.state,
            self.sf_ok and self.sf_reachable(),
            self.my_hears,
            self.live if self.state == "online" else frozenset(),
            self.state == "fencing",
            self.excluded,
            self.claim,
        )

    def intake(self, i: int, report: Report, channel: str) -> bool:
        """Take a report of host ``i``; whether it changed what we know (not just its age)."""
        cur = self.cur_inc[i]
        if report.inc != cur:
            known = [r.t for r in (self.hb[i], self.slot[i]) if r is not None and r.inc == cur]
            if cur is not None and known and report.t <= max(known):
                return False  # a straggler of the previous incarnation
            if cur is not None:
                _log(f"host {i} has a new incarnation ({report.state})")
            self.cur_inc[i] = report.inc
            if self.hb[i] is not None and self.hb[i].inc != report.inc:
                self.hb[i] = None
                self.hb_at[i] = float("-inf")
            if self.slot[i] is not None and self.slot[i].inc != report.inc:
                self.slot[i] = None
        old = self.hb[i] if channel == "hb" else self.slot[i]
        if channel == "hb":
            self.hb[i] = report
        else:
            if old is not None and report.t < old.t:
                return False
            self.slot[i] = report
        return old is None or _content(old) != _content(report)

    def current(self, i: int, now: float, wall: float) -> Report | None:
        """The newest report of host ``i`` that is still current (heard / slot fresh)."""
        best: Report | None = None
        hb = self.hb[i]
        if hb is not None and now - self.hb_at[i] < self.conf.heartbeat_timeout:
            best = hb
        sl = self.slot[i]
        if sl is not None and wall - sl.t < self.conf.statefile_timeout and (best is None or sl.t > best.t):
            best = sl
        return best

    def latest(self, i: int) -> Report | None:
        """The newest report of host ``i``'s current incarnation, however old."""
        hb, sl = self.hb[i], self.slot[i]
        if hb is None or sl is None:
            return sl if hb is None else hb
        return sl if sl.t > hb.t else hb  # a tie goes to the datagram

    def last_seen(self, i: int) -> float | None:
        """Wall time of the newest evidence that host ``i`` was running."""
        report = self.latest(i)
        return report.t if report is not None else None

    # -- network ---------------------------------------------------------------------------

    def send(self, wall: float, targets: Iterable[int] | None = None) -> None:
        """Send our report to every other host in our network group (or only to ``targets``)."""
        if self.sock is None:
            return
        self.seq += 1
        payload = {"v": 1, "gen": self.conf.generation, "host": self.conf.local}
        payload.update(self.my_report(wall).fields())
        del payload["seq"]
        payload["excluded"] = self.excluded
        # The lock holder as last read from the statefile, for survival under rule 2.
        payload["master"] = self.master
        # What changes with every datagram comes last (see take_datagram).
        payload["seq"] = self.seq
        payload["master_t"] = self.master_t if self.master_t > float("-inf") else None
        payload["t"] = wall
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        local, hears = self.conf.local, self.my_hears
        for i in self.others if targets is None else targets:
            host = self.conf.hosts[i]
            if not self.fabric.connected(local, host):
                continue
            try:
                self.sock.sendto(data, (self.conf.addresses[i], self.conf.udp_port))
            except OSError:
                pass
            self.told_heard[i] = i in hears
        if targets is not None:
            return
        mono = time.monotonic()
        if self.last_send_mono is not None:
            _window(self.hb_lat, int((mono - self.last_send_mono) * 1000))
        self.last_send_mono = mono
        self.last_send_wall = wall

    def receive(self, now: float) -> None:
        """Drain the socket, taking every valid datagram from a host in our network group."""
        if self.sock is None:
            return
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.take_datagram(data, addr, now)

    def take_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        """Validate one datagram and take its report."""
        cut = data.rfind(b',"seq":')
        sender = self.by_address.get(addr[0])
        if sender is not None and cut > 0 and self.hb_prefix[sender] == data[:cut]:
            # Same content as the sender's previous datagram: only its age changed.
            if self._refresh(sender, data, cut + 1, now):
                return
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if not isinstance(obj, dict) or obj.get("v") != 1 or obj.get("gen") != self.conf.generation:
            return
        host = obj.get("host")
        i = self.index_of.get(host) if isinstance(host, str) else None
        if i is None or i == self.me or addr[0] != self.conf.addresses[i]:
            return
        if not self.fabric.connected(self.conf.local, host):
            return
        report = parse_report(obj, self.n, obj.get("t"))
        if report is None:
            return
        was_heard = now - self.hb_at[i] < self.conf.heartbeat_timeout
        previous = self.hb[i]
        if self.intake(i, report, "hb"):
            self.dirty = True
            if previous is None or (previous.inc, previous.state, previous.fencing) != (
                report.inc,
                report.state,
                report.fencing,
            ):
                self.sf_accelerate = True  # its slot tells the hosts outside our network group
        if self.hb[i] is report:
            self.hb_at[i] = now
            holder, read_at = obj.get("master"), obj.get("master_t")
            if (holder is None or holder in self.index_of) and isinstance(read_at, (int, float)):
                self.peer_master[i] = (float(read_at), holder)
            self.hb_prefix[i] = data[:cut] if cut > 0 and self.by_address.get(addr[0]) == i else None
        if not was_heard:
            self.dirty = True
        if (not was_heard or self.me not in report.hears) and now - self.last_reply[i] >= HB_ACCELERATION:
            # Answer a newcomer at once (xhad's hb_send_hb_now), to it alone.
            self.reply_to.add(i)
            self.last_reply[i] = now

    def _refresh(self, i: int, data: bytes, at: int, now: float) -> bool:
        """Take the seq/master_t/t tail (at ``at``) of a datagram whose content is unchanged; False
        if the tail is not as this engine writes it (then the datagram is parsed in full)."""
        if not self.fabric.connected(self.conf.local, self.conf.hosts[i]):
            return True  # ignored, as a full parse would
        report = self.hb[i]
        tail = _DATAGRAM_TAIL.fullmatch(data, at)
        if report is None or tail is None:
            return False
        was_heard = now - self.hb_at[i] < self.conf.heartbeat_timeout
        report.seq, report.t = int(tail[1]), float(tail[3])
        self.hb_at[i] = now
        if tail[2] is not None:
            self.peer_master[i] = (float(tail[2]), self.peer_master[i][1])
        if not was_heard:
            self.dirty = True
            if now - self.last_reply[i] >= HB_ACCELERATION:
                self.reply_to.add(i)
                self.last_reply[i] = now
        return True

    # -- statefile -------------------------------------------------------------------------

    def sf_reachable(self) -> bool:
        return not self.fabric.storage_blocked(self.conf.local, self.conf.statefile)

    def sf_tick(self, wall: float) -> None:
        """Read every slot and the global block, rewrite our slot; sets ``sf_ok``.

        Raises Exit 10 (generation changed), 11 (pool state invalid) or 15 (another heartbeat
        owns our slot)."""
        began = time.monotonic()
        self.sf_ticks += 1
        try:
            if not self.sf_reachable():
                raise OSError(errno.EIO, "I/O error (storage blocked by the fabric)")
            fd = os.open(self.conf.statefile, os.O_RDWR)
            try:
                self._sf_exchange(fd, wall)
            finally:
                os.close(fd)
        except OSError as exc:
            if self.sf_ok or self.sf_ticks == 1:
                _log(f"statefile access failed: {exc}")
            self.sf_ok = False
            self.sf_error = str(exc)
            return
        if not self.sf_ok and self.sf_ticks > 1:
            _log("statefile access restored")
        self.sf_ok = True
        _window(self.sf_lat, int((time.monotonic() - began) * 1000))

    def _sf_exchange(self, fd: int, wall: float) -> None:
        n = self.n
        if os.fstat(fd).st_size != STATEFILE_SIZE:
            raise OSError(errno.EIO, "statefile has the wrong size")
        data = os.pread(fd, (1 + n) * BLOCK_SIZE, 0)
        if len(data) != (1 + n) * BLOCK_SIZE:
            raise OSError(errno.EIO, "short read from statefile")
        block = _decode_retry(fd, 0, data[:BLOCK_SIZE])
        if block is None or not valid_global(block):
            raise OSError(errno.EIO, "statefile global block is missing or corrupt")
        if block["generation"] != self.conf.generation:
            raise Exit(EXIT_GENERATION_UUID_MISMATCH, "the statefile generation changed")
        if block["pool_state"] == "invalid":
            raise Exit(EXIT_INVALID_POOL_STATE, "pool state is invalid")
        if self.pool_init is None:
            self.pool_init = block["pool_state"] == "init"
        self.master = block["master"]
        self.master_t = wall
        for i in self.others:
            if self._refresh_slot(i, data, (1 + i) * BLOCK_SIZE):
                continue
            raw = data[(1 + i) * BLOCK_SIZE : (2 + i) * BLOCK_SIZE]
            try:
                slot = _decode_retry(fd, 1 + i, raw)
            except OSError:
                continue  # keep what we had; a torn read heals at the next tick
            self.slot_raw[i] = None
            if slot is None or slot.get("host") != self.conf.hosts[i] or not valid_slot(slot):
                self.excluded_flags[i] = False
                continue
            self.excluded_flags[i] = bool(slot.get("excluded"))
            if slot.get("gen") != self.conf.generation or slot.get("heartbeat") is None:
                continue
            report = parse_report(slot, n, slot.get("heartbeat"))
            if report is not None and self.intake(i, report, "sf"):
                self.dirty = True
            if report is not None and self.slot[i] is report:
                cut = raw.rfind(b',"seq":')
                self.slot_raw[i] = raw[: cut + 1] if cut > 0 else None
        self._write_own_slot(fd, wall, self.pid)
        if self.state == "online" and block["pool_state"] == "init":
            self._global_update(fd, lambda g: g["pool_state"] == "init", {"pool_state": "active"})
        if self.claim:
            self._settle_claim(fd)

    def _refresh_slot(self, i: int, data: bytes, at: int) -> bool:
        """Take only seq and heartbeat time of the slot at offset ``at`` of ``data`` when its content
        did not change (checksum verified); False when it must be decoded in full.  Nothing is
        copied: this runs for every peer at every statefile tick."""
        prefix, report = self.slot_raw[i], self.slot[i]
        if prefix is None or report is None or not data.startswith(prefix, at):
            return False
        stop = at + BLOCK_SIZE
        tail = _SLOT_TAIL.match(data, at + len(prefix), stop)
        if tail is None:
            return False
        end = tail.end()
        if not data.startswith(_ZEROS_VIEW[: stop - end], end):
            return False  # not NUL padding to the end of the block
        seq, beat, crc = int(tail[1]), float(tail[2]), int(tail[3])
        # The checksum covers the text without its crc member: up to ',"crc":', then "}".
        if zlib.crc32(b"}", zlib.crc32(memoryview(data)[at : tail.start(3) - 7])) != crc:
            return False
        if beat > report.t:
            report.seq, report.t = seq, beat
        return True

    def _write_own_slot(self, fd: int, wall: float, pid: int | None) -> None:
        """Rewrite our slot under its record lock, keeping the flags scripts own."""
        offset = (1 + self.me) * BLOCK_SIZE
        if not _lock_range(fd, offset, BLOCK_SIZE, DAEMON_LOCK_TIMEOUT):
            return
        try:
            try:
                mine = decode_block(os.pread(fd, BLOCK_SIZE, offset))
            except (ValueError, UnicodeDecodeError):
                mine = None
            if mine is not None and mine.get("host") == self.conf.local and valid_slot(mine):
                other = mine.get("pid")
                if (
                    other not in (None, self.pid)
                    and mine.get("inc") not in (None, self.inc)
                    and is_heartbeat(other)
                ):
                    raise Exit(EXIT_DAEMON_IS_PRESENT, f"heartbeat {other} owns this host's slot")
                if self.state != "online":
                    self.excluded = bool(mine["excluded"])
                elif self.clear_excluded:
                    self.clear_excluded = False  # joining clears the flag (ha.md 4.9)
                elif mine["excluded"] and not self.excluded:
                    _log("this host was excluded (ha_set_excluded)")
                    self.excluded = True
                    self.dirty = True
                if not mine["armed"] and self.armed:
                    self.disarm("armed flag cleared in the statefile")
            slot = {"host": self.conf.local, "gen": self.conf.generation, "pid": pid}
            slot.update(self.my_report(wall).fields())
            del slot["seq"]
            slot["sf"] = True
            slot["excluded"] = self.excluded
            slot["armed"] = self.armed
            # What changes at every write comes last (see _read_slot).
            slot["seq"] = self.seq
            slot["heartbeat"] = wall
            data = encode_block(slot)
            if os.pwrite(fd, data.ljust(BLOCK_SIZE, b"\0"), offset) != BLOCK_SIZE:
                raise OSError(errno.EIO, "short write to statefile")
            self.last_slot_wall = wall
        finally:
            _unlock_range(fd, offset, BLOCK_SIZE)

    def _global_update(self, fd: int, condition: Callable[[dict], bool], changes: dict) -> bool:
        """Apply ``changes`` to the global block under its lock if ``condition`` holds there."""
        if not _lock_range(fd, 0, BLOCK_SIZE, DAEMON_LOCK_TIMEOUT):
            return False
        try:
            try:
                block = decode_block(os.pread(fd, BLOCK_SIZE, 0))
            except (ValueError, UnicodeDecodeError):
                return False
            if block is None or not valid_global(block) or not condition(block):
                return False
            block.update(changes)
            os.pwrite(fd, encode_block(block).ljust(BLOCK_SIZE, b"\0"), 0)
            return True
        finally:
            _unlock_range(fd, 0, BLOCK_SIZE)

    def _settle_claim(self, fd: int) -> None:
        """With the statefile back, turn a master claim made under rule 2 into the lock."""
        me = self.conf.local

        def free(block: dict) -> bool:
            holder = block["master"]
            return holder != me and (holder not in self.index_of or self.index_of[holder] not in self.live)

        if self._global_update(fd, free, {"master": me}):
            self.master = me
            _log("master claim written to the statefile")
        self.claim = False
        _unlink(os.path.join(self.conf.hostdir, CLAIM_FILE))

    def write_slot_now(self, wall: float, pid: int | None) -> None:
        """Best effort: write our slot at once (fencing / stopping)."""
        if not self.sf_reachable():
            return
        try:
            fd = os.open(self.conf.statefile, os.O_RDWR)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size == STATEFILE_SIZE:
                self._write_own_slot(fd, wall, pid)
        except (OSError, Exit):
            pass
        finally:
            os.close(fd)

    # -- decisions -------------------------------------------------------------------------

    def evaluate(self, now: float, wall: float) -> None:
        """Recompute what we hear and see, then join or apply the survival rules."""
        conf = self.conf
        self._read_claim_file()
        reports: dict[int, Report] = {}
        for i in self.others:
            report = self.current(i, now, wall)
            if report is not None:
                reports[i] = report
        self.my_hears = frozenset(
            {self.me}
            | {
                i
                for i in self.others
                if self.hb[i] is not None
                and now - self.hb_at[i] < conf.heartbeat_timeout
                and not self.hb[i].gone
            }
        )
        if self.state == "starting":
            # A joining host does not tell everybody each peer it begins to hear (Online hosts do):
            # it tells that peer, which counts it up only once it says so.  Without this, a peer
            # whose last datagram from us predates our hearing it waited for our next tick.
            self.reply_to.update(i for i in self.my_hears if not self.told_heard[i] and i != self.me)
        sf_fresh = {
            i
            for i in self.others
            if self.slot[i] is not None and wall - self.slot[i].t < conf.statefile_timeout and not self.slot[i].gone
        }
        excluded = {i for i in self.others if self.excluded_flags[i] or (i in reports and reports[i].excluded)}
        # While joining, what we hear changes with every newcomer: only Online hosts tell
        # everybody at once (a partition must converge fast); newcomers get direct replies.
        def key() -> tuple:
            hears = self.my_hears if self.state == "online" else None
            return (self.state, self.live, self.decision.rule, self.sf_ok, hears)

        before = key()
        if self.state == "starting":
            self._join(now, wall, reports, sf_fresh, excluded)
        elif self.state == "online":
            self._rules(now, wall, reports, sf_fresh, excluded)
        after = key()
        # A liveset that only grew is news to nobody: a peer's liveset matters to others only while
        # they join ("does an Online host still count me live?"), and it only ever gains Online
        # hosts.  It goes out with the next tick; at enable, 64 hosts going Online one after the
        # other would otherwise each send n - 1 datagrams per change.
        grew = before[0] == after[0] and before[2:] == after[2:] and before[1] < after[1]
        if before != after and not grew:
            self.accelerate = True
            self.sf_accelerate = True
        self.next_eval = self._next_expiry(now, wall)

    def _read_claim_file(self) -> None:
        """Take what ha_propose_master told us through ``xhad.claim`` (``<inc> <mode> <time>``):
        ``lock``: it took the lock in the statefile at that time; ``claim``: it granted the lock
        without statefile (rule 2), to be written there when reachable."""
        path = os.path.join(self.conf.hostdir, CLAIM_FILE)
        try:
            with open(path) as handle:
                words = handle.read().split()
        except OSError:
            return
        if len(words) != 3 or words[0] != self.inc:
            return
        try:
            when = float(words[2])
        except ValueError:
            return
        if words[1] == "claim":
            self.claim = True  # removed once settled in the statefile
            return
        if words[1] == "lock" and when > self.master_t:
            self.master, self.master_t = self.conf.local, when
        _unlink(path)

    def _join(
        self, now: float, wall: float, reports: dict[int, Report], sf_fresh: set[int], excluded: set[int]
    ) -> None:
        if self.pool_init is None or not self.sf_ok:
            return  # no statefile tick yet
        limit = self.conf.join_timeout if self.pool_init else self.conf.boot_join_timeout
        action, code = join_step(
            self.me,
            range(self.n),
            self.pool_init,
            reports,
            self.my_hears,
            sf_fresh,
            excluded,
            self.excluded,
            now - self.started >= limit,
        )
        if action == "exit":
            raise Exit(code, f"cannot start: join failed after {limit} s (exit {code})")
        if action == JOIN_WAIT:
            return
        members = {self.me}
        if action == JOIN:
            members |= {i for i, r in reports.items() if r.online and i not in excluded}
        self.state = "online"
        self.excluded = False
        self.clear_excluded = True
        self.live = frozenset(members)
        self.live_inc = {i: self.cur_inc[i] or "" for i in members if i != self.me}
        self.decision = Decision(1, frozenset(members))
        self.sf_tick(wall)
        if not self.sf_ok:
            raise Exit(EXIT_CAN_NOT_ACCESS_STATEFILE, f"lost statefile access while joining: {self.sf_error}")
        self.next_sf = now + self.conf.statefile_interval
        self.send(wall)
        self.next_send = now + self.conf.heartbeat_interval
        send_watchdog(self.watchdog, f"arm {self.conf.watchdog_timeout}")
        self.watchdog_on = True
        self.last_pet = time.monotonic()
        _log(f"{'joined' if action == JOIN else 'formed'} the liveset {sorted(members)}: Online")
        self.start_xapi_monitor()

    def start_xapi_monitor(self) -> None:
        """xha sm.c start_xapi_monitor: check this host's xapi from now on (xapi_mon.py)."""
        if self.xapimon is not None:
            return
        monitor = xapi_mon().XapiMon(
            self.conf.hostdir,
            self.conf.parameters,
            self.conf.heartbeat_interval,
            restart=lambda: send_watchdog(self.watchdog, "xapi-restart"),
            armed=lambda: self.armed and self.state == "online",
            wake=lambda: os.kill(self.pid, signal.SIGUSR2),
            log=_log,
        )
        self.xapimon = monitor
        monitor.start()

    def _rules(
        self, now: float, wall: float, reports: dict[int, Report], sf_fresh: set[int], excluded: set[int]
    ) -> None:
        conf = self.conf
        sf_now = self.sf_ok and self.sf_reachable()
        decision = decide(self.me, range(self.n), sf_now, self.my_hears, reports, sf_fresh, excluded)
        if self.excluded:
            decision = Decision(0, frozenset(), "excluded")
        gone: set[int] = set()
        for i in self.live:
            if i == self.me:
                continue
            latest = self.latest(i)
            seen = latest.t if latest is not None else None
            if (
                self.live_inc.get(i) != self.cur_inc[i]
                or (latest is not None and latest.gone)
                or i in excluded
                or seen is None
                or wall - seen > conf.silence_limit
            ):
                gone.add(i)
        online = {i for i, r in reports.items() if r.online and i not in excluded}
        live = next_liveset(self.me, self.live, decision, online, gone)
        if live != self.live:
            _log(f"liveset {sorted(self.live)} -> {sorted(live)} (rule {decision.rule})")
        for i in live - self.live:
            self.live_inc[i] = self.cur_inc[i] or ""
        self.live = live
        if decision.rule != self.decision.rule:
            _log(f"survival: {decision!r}")
        self.decision = decision
        claimants = [i for i in sorted(live) if (i == self.me and self.claim) or (i in reports and reports[i].claim)]
        if decision.rule == 2 and claimants:
            self.view_master = conf.hosts[claimants[0]]
        elif decision.rule == 2:
            # The last holder anyone of us read from the statefile.
            known = [(self.master_t, self.master)] + [self.peer_master[i] for i in live if i != self.me]
            self.view_master = max(known, key=lambda pair: pair[0])[1]
        else:
            self.view_master = self.master
        if decision.survive or not self.armed or self.excluded:
            if self.lose_since is not None:
                _log("survival rules met again")
            self.lose_since = None
        elif self.lose_since is None:
            self.lose_since = now
            _log(f"survival rules not met: {decision.reason}; fencing in {conf.settle} s unless that changes")
        elif now - self.lose_since >= conf.settle:
            self.fence(decision.reason)

    def _next_expiry(self, now: float, wall: float) -> float:
        """The next moment at which a timeout changes what we hear, see or decide."""
        conf = self.conf
        times = [now + conf.heartbeat_interval]
        for i in self.others:
            if self.hb[i] is not None:
                at = self.hb_at[i] + conf.heartbeat_timeout
                if at > now:
                    times.append(at)
            if self.slot[i] is not None:
                at = now + (self.slot[i].t + conf.statefile_timeout - wall)
                if at > now:
                    times.append(at)
            if i in self.live:
                latest = self.latest(i)
                if latest is not None:
                    at = now + (latest.t + conf.silence_limit - wall)
                    if at > now:
                        times.append(at + 0.01)
        if self.lose_since is not None:
            times.append(self.lose_since + conf.settle)
        return min(times)

    # -- the view for ha_query_liveset -------------------------------------------------------

    def view_key(self) -> tuple:
        """What of the view matters to the scripts, without the ages (refreshed every tick)."""
        return (
            self.state,
            self.live,
            self.decision.rule,
            self.sf_ok,
            self.armed,
            self.view_master,
            self.master,
            self.excluded,
            tuple(self.excluded_flags),
            # While joining, what we hear changes with every newcomer, and nothing reads it from
            # the view (the liveset of a Starting host is the minimal one): the tick rewrites it.
            self.my_hears if self.state == "online" else None,
        )

    def write_view(self) -> None:
        """Publish our liveset view for the scripts (rewritten in place)."""
        self.published = self.view_key()
        conf, n = self.conf, self.n
        wall = time.time()
        status = "Online" if self.state == "online" else "Starting"
        sf_access, hb_seen, sf_seen, on_hb, on_sf = [], [], [], [], []
        mine = index_mask(self.my_hears)
        for i in range(n):
            if i == self.me:
                sf_access.append(self.sf_ok and self.sf_reachable())
                hb_seen.append(self.last_send_wall)
                sf_seen.append(self.last_slot_wall)
                on_hb.append(mine)
                on_sf.append(mine)
                continue
            latest = self.latest(i)
            sf_access.append(bool(latest is not None and latest.sf))
            hb, sl = self.hb[i], self.slot[i]
            hb_seen.append(hb.t if hb is not None else None)
            sf_seen.append(sl.t if sl is not None else None)
            on_hb.append(hb.hears_mask() if hb is not None else None)
            on_sf.append(sl.hears_mask() if sl is not None else None)
        excluded = [self.excluded if i == self.me else self.excluded_flags[i] for i in range(n)]
        view = {
            "pid": self.pid,
            "inc": self.inc,
            "t": wall,
            "status": status,
            "rule": self.decision.rule if status == "Online" else 0,
            "sf_ok": self.sf_ok and self.sf_reachable(),
            "armed": self.armed,
            "live": sorted(self.live),
            "master": self.view_master if self.state == "online" else self.master,
            "excluded": excluded,
            "sf_access": sf_access,
            "hb_seen": hb_seen,
            "sf_seen": sf_seen,
            "latency": {"sf": _figures(self.sf_lat), "hb": _figures(self.hb_lat)},
            "xapi": self.xapimon.figures() if self.xapimon is not None else None,
            # What each peer hears, as hex bit masks (a 64-host view stays a few kB).
            "on_hb": on_hb,
            "on_sf": on_sf,
        }
        data = encode_text(json.dumps(view, separators=(",", ":")))
        try:
            if self.view_fd < 0:
                self.view_fd = os.open(os.path.join(conf.hostdir, VIEW_FILE), os.O_RDWR | os.O_CREAT, 0o644)
            # Rewritten in place (no new file per tick); readers check the crc and retry.
            os.pwrite(self.view_fd, data.ljust(self.view_size, b"\0"), 0)
            self.view_size = len(data)
        except OSError:
            pass

    def remove_view(self) -> None:
        _unlink(os.path.join(self.conf.hostdir, VIEW_FILE))
        if self.view_fd >= 0:
            os.close(self.view_fd)
            self.view_fd = -1


def _content(report: Report) -> tuple:
    """What of a report matters for decisions (not its age or sequence number)."""
    return (
        report.inc,
        report.state,
        report.sf,
        report.hears,
        report.live,
        report.fencing,
        report.excluded,
        report.claim,
    )


def _window(values: list[int], value: int, size: int = 16) -> None:
    values.append(value)
    del values[:-size]


def _figures(values: list[int]) -> list[int]:
    """[current, min, max] of a latency window (zeros when empty)."""
    return [values[-1], min(values), max(values)] if values else [0, 0, 0]


def _lock_range(fd: int, offset: int, length: int, limit: float) -> bool:
    """Take a POSIX write lock on ``length`` bytes at ``offset``; False if not within ``limit``."""
    deadline = time.monotonic() + limit
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, offset)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def _unlock_range(fd: int, offset: int, length: int) -> None:
    try:
        fcntl.lockf(fd, fcntl.LOCK_UN, length, offset)
    except OSError:
        pass


def _decode_retry(fd: int, index: int, raw: bytes) -> dict | None:
    """Decode a block, re-reading it a few times on a torn read; OSError if it stays bad."""
    for attempt in range(4):
        try:
            return decode_block(raw)
        except (ValueError, UnicodeDecodeError):
            if attempt == 3:
                break
            time.sleep(0.001)
            raw = os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
    raise OSError(errno.EIO, f"statefile block {index} is corrupt")


def heartbeat_main(conf_path: str, parsed: Conf | None = None, online_fd: int = -1) -> int:
    """Body of the heartbeat process; returns its exit status (see the module docstring).
    ``parsed`` is the conf at ``conf_path`` as the forking ha_start_daemon just read it;
    ``online_fd`` is told ``online`` once the view says so (ha_start_daemon waits on it)."""
    conf = parsed if parsed is not None and parsed.path == conf_path else read_conf(conf_path)
    me = os.getpid()
    lock_fd = os.open(os.path.join(conf.hostdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log(f"another heartbeat process holds {LOCK_FILE}")
        return EXIT_DAEMON_IS_PRESENT
    write_pid_file(conf.hostdir, me)
    _log(f"heartbeat {me} started for host {conf.local} (index {conf.index})")
    daemon = Daemon(conf)
    daemon.online_fd = online_fd
    try:
        code = daemon.run()
    except Exit as exc:
        code = exc.code
        _log(exc.message)
    finally:
        remove_pid_file(conf.hostdir, only_if=me)
        daemon.remove_view()
    _log(f"heartbeat {me} exits with {code}")
    return code


def _log(message: str) -> None:
    """Append a timestamped line to the heartbeat log (its stdout)."""
    if message:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        print(f"{stamp}.{int(now * 1000) % 1000:03d} [{os.getpid()}] {message}", flush=True)


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
        with open_statefile(conf, writable=True) as sf:
            sf.lock(0, 0)
            sf.write_block(0, {"pool_state": "init", "generation": conf.generation, "master": None})
            for index in range(MAX_HOSTS):
                sf.write_slot(index, None)
        return EXIT_SUCCESS
    with open_statefile(conf, writable=True) as sf:
        sf.lock(0)
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
    """ha_start_daemon: spawn the heartbeat process and wait until it is Online (exit 0)."""
    conf = read_conf(conf_path)
    if running_pid(conf.path):
        raise Exit(EXIT_DAEMON_IS_PRESENT, "the heartbeat daemon is already running")
    with open_statefile(conf, writable=True) as sf:
        block = checked_global(sf, conf)
        if block["pool_state"] == "invalid":
            raise Exit(EXIT_INVALID_POOL_STATE, "pool state is invalid")
        sf.lock(1 + conf.index)
        slot = sf.slot(conf, conf.index)
        # A new incarnation: arm fencing, forget the previous one.  The daemon clears the
        # excluded flag once it is Online (joining clears it, ha.md 4.9).
        slot.update(host=conf.local, pid=None, inc=None, state="starting", fencing=False, armed=True)
        sf.write_slot(conf.index, slot)
    remove_pid_file(conf.hostdir)
    for name in (VIEW_FILE, CLAIM_FILE):
        _unlink(os.path.join(conf.hostdir, name))
    # The heartbeat says "online" on this pipe (and closes it when done or dead), so the wait
    # below costs no wake-ups; the view stays the authority, looked at on every wake-up.
    told, tell = os.pipe()
    try:
        with open(os.path.join(conf.hostdir, LOG_FILE), "ab") as log:
            proc = spawn_heartbeat(conf, log.fileno(), tell)
    except BaseException:
        os.close(told)
        raise
    finally:
        os.close(tell)
    deadline = time.monotonic() + max(conf.join_timeout, conf.boot_join_timeout) + START_MARGIN
    view_path = os.path.join(conf.hostdir, VIEW_FILE)
    seen: tuple[int, int] | None = None
    try:
        while True:
            code = proc.poll()
            if code is not None:
                if code in PASS_ON:
                    raise Exit(code, f"the heartbeat process exited with {code} (see {LOG_FILE})")
                raise Exit(EXIT_BOOTJOIN_TIMEOUT, f"the heartbeat process exited with {code} (see {LOG_FILE})")
            try:
                st = os.stat(view_path)
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
            except OSError:
                stamp = None
            if stamp is not None and stamp != seen:
                seen = stamp
                view = read_view(conf, proc.pid)
                if view is not None and view["status"] == "Online":
                    return EXIT_SUCCESS
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait()
                return EXIT_BOOTJOIN_TIMEOUT
            if told < 0:
                time.sleep(START_POLL)  # it closed the pipe: it is ending (or Online by now)
                continue
            left = max(0.0, min(START_WAIT, deadline - time.monotonic()))
            if select.select([told], [], [], left)[0]:
                # Read the view again whatever its stamp: two writes within one tick of the
                # file system's clock share an mtime, and the word follows the Online write.
                seen = None
                if not os.read(told, 64):
                    os.close(told)
                    told = -1
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        if told >= 0:
            os.close(told)


def stop_daemon(conf_path: str) -> int:
    """ha_stop_daemon: SIGTERM (then SIGKILL) the heartbeat process; 0 also when none runs."""
    pid = running_pid(conf_path)
    if pid is not None:
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, conf_path, STOP_GRACE):
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, conf_path, STOP_GRACE)
            try:
                conf = read_conf(conf_path)
            except Exit:
                conf = None
            if conf is not None:
                _leave(conf, pid)
                send_watchdog(watchdog_path(conf), "disarm")
                _unlink(os.path.join(conf.hostdir, VIEW_FILE))
    remove_pid_file(os.path.dirname(conf_path))
    return EXIT_SUCCESS


def _leave(conf: Conf, pid: int) -> None:
    """Best effort, for a heartbeat that had to be killed: mark its slot stopped."""
    try:
        with open_statefile(conf, writable=True) as sf:
            sf.lock(1 + conf.index)
            slot = sf.slot(conf, conf.index)
            if slot["pid"] == pid:
                slot.update(pid=None, state="stopped")
                sf.write_slot(conf.index, slot)
    except (Exit, OSError):
        pass


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
        time.sleep(POLL / 2)
    return True


def _require_running(conf: Conf) -> int:
    """This host's heartbeat pid; Exit 14 unless it runs."""
    pid = running_pid(conf.path)
    if pid is None:
        raise Exit(EXIT_DAEMON_IS_NOT_PRESENT, "the heartbeat daemon is not running")
    return pid


class Fresh:
    """What ha_query_liveset / ha_propose_master read from the statefile themselves."""

    def __init__(self, block: dict, excluded: list[bool]) -> None:
        self.block = block
        self.excluded = excluded


def read_fresh(conf: Conf) -> Fresh | None:
    """The global block and excluded flags, or None when the statefile is unreachable for us.

    Exit 14 when the pool state is invalid (the daemon is stopping, as the consul stack does),
    10 on a generation mismatch."""
    try:
        with open_statefile(conf, writable=False) as sf:
            block = checked_global(sf, conf)
            raw = sf.read_raw(1, len(conf.hosts))
    except Exit as exc:
        if exc.code in (EXIT_CAN_NOT_ACCESS_STATEFILE, EXIT_INVALID_STATE_FILE):
            return None
        raise
    if block["pool_state"] == "invalid":
        raise Exit(EXIT_DAEMON_IS_NOT_PRESENT, "pool state is invalid; the daemon is stopping")
    excluded = []
    for i, host in enumerate(conf.hosts):
        data = raw[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
        if b"\\" not in data and _EXCLUDED_TRUE.search(data) is None:
            # Without escapes the member is spelled out: no "excluded": true, no excluded flag.
            excluded.append(False)
            continue
        try:
            slot = decode_block(data)
        except (ValueError, UnicodeDecodeError):
            slot = None
        excluded.append(bool(slot and slot.get("host") == host and slot.get("excluded") is True))
    return Fresh(block, excluded)


def query_liveset(conf_path: str) -> int:
    """ha_query_liveset: print this host's liveset (the daemon's view, ha.md 3.2)."""
    conf = read_conf(conf_path)
    pid = _require_running(conf)
    fresh = read_fresh(conf)
    view = read_view(conf, pid)
    if view is None or view["status"] != "Online":
        sys.stdout.write(render_starting(conf))
    else:
        sys.stdout.write(render_liveset(conf, view, fresh, time.time()))
    sys.stdout.flush()
    return EXIT_SUCCESS


def render_starting(conf: Conf) -> str:
    """The minimal liveset of a host that is still joining."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<ha_liveset_info version="1.0">\n'
        "  <status>Starting</status>\n"
        f"  <localhost><HostID>{escape(conf.local)}</HostID><HostIndex>{conf.index}</HostIndex></localhost>\n"
        "</ha_liveset_info>\n"
    )


def _age_ms(now: float, then: object) -> int:
    if not isinstance(then, (int, float)) or isinstance(then, bool):
        return -1
    return max(0, int((now - then) * 1000))


def _uuids(conf: Conf, indices: object) -> str:
    if not isinstance(indices, list):
        return ""
    return " ".join(conf.hosts[i] for i in indices if _is_int(i) and 0 <= i < len(conf.hosts))


def _uuid_lists(conf: Conf) -> Callable[[object], str]:
    """``escape(_uuids(conf, indices))`` of a view's hex bit mask (or list) of indices, computed
    once per distinct set (in a 64-host pool most hosts report the same 64 peers, 128 times per
    liveset)."""
    done: dict[object, str] = {}

    def text(indices: object) -> str:
        key = tuple(indices) if isinstance(indices, list) else indices
        if not isinstance(key, (str, tuple)):
            return ""
        found = done.get(key)
        if found is None:
            if isinstance(indices, str):
                indices = sorted(index_set(indices, len(conf.hosts)) or ())
            found = done[key] = escape(_uuids(conf, indices))
        return found

    return text


def liveness_table(conf: Conf, view: dict, fresh: Fresh | None) -> list[tuple[bool, bool, bool, bool]]:
    """Per conf host: (liveness, master, statefile_access, excluded) as the liveset shows them."""
    live_set = set(view["live"])
    excluded = fresh.excluded if fresh is not None else [bool(x) for x in view["excluded"]]
    holder = view.get("master")
    if fresh is not None and view.get("rule") != 2:
        holder = fresh.block["master"]
    rows = []
    for i, host in enumerate(conf.hosts):
        live = i in live_set and not excluded[i]
        if i == conf.index:
            access = bool(view["sf_ok"])
        else:
            access = live and bool(view["sf_access"][i])
        rows.append((live, live and holder == host, access, excluded[i]))
    return rows


def render_liveset(conf: Conf, view: dict, fresh: Fresh | None, now: float) -> str:
    """The liveset document of ha.md 3.2 for the daemon's ``view`` at time ``now``."""

    def flag(value: bool) -> str:
        return "TRUE" if value else "FALSE"

    rows = liveness_table(conf, view, fresh)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<ha_liveset_info version="1.0">',
        "  <status>Online</status>",
        f"  <localhost><HostID>{escape(conf.local)}</HostID><HostIndex>{conf.index}</HostIndex></localhost>",
    ]
    for index, (host, (live, master, access, excluded)) in enumerate(zip(conf.hosts, rows, strict=True)):
        out += [
            "  <host>",
            f"    <HostID>{escape(host)}</HostID><HostIndex>{index}</HostIndex>",
            f"    <liveness>{flag(live)}</liveness><master>{flag(master)}</master>",
            f"    <statefile_access>{flag(access)}</statefile_access>",
            "    <statefile_corrupted>FALSE</statefile_corrupted>",
            f"    <excluded>{flag(excluded)}</excluded>",
            "  </host>",
        ]
    latency = view.get("latency") if isinstance(view.get("latency"), dict) else {}
    xapi_lat, xapi_restart_ms, xapi_warn = xapi_mon().liveset_figures(view, now)
    sf_lat = latency.get("sf") if isinstance(latency.get("sf"), list) and len(latency["sf"]) == 3 else [0, 0, 0]
    hb_lat = latency.get("hb") if isinstance(latency.get("hb"), list) and len(latency["hb"]) == 3 else [0, 0, 0]
    out.append("  <raw_status_on_local_host>")
    for name, value in (
        ("statefile_latency", sf_lat[0]),
        ("statefile_latency_min", sf_lat[1]),
        ("statefile_latency_max", sf_lat[2]),
        ("heartbeat_latency", hb_lat[0]),
        ("heartbeat_latency_min", hb_lat[1]),
        ("heartbeat_latency_max", hb_lat[2]),
        ("Xapi_healthcheck_latency", xapi_lat[0]),
        ("Xapi_healthcheck_latency_min", xapi_lat[1]),
        ("Xapi_healthcheck_latency_max", xapi_lat[2]),
    ):
        out.append(f"    <{name}>{int(value) if _is_int(value) else 0}</{name}>")
    restart_ms = {conf.index: xapi_restart_ms}  # xhad knows only its own (sc_func.c)
    uuid_list = _uuid_lists(conf)
    hb_warn = sf_warn = False
    for index, (host, (live, _m, _a, _e)) in enumerate(zip(conf.hosts, rows, strict=True)):
        hb_age = _age_ms(now, view["hb_seen"][index])
        sf_age = _age_ms(now, view["sf_seen"][index])
        if live and index != conf.index:
            hb_warn = hb_warn or hb_age < 0 or hb_age > conf.heartbeat_timeout * 500
            sf_warn = sf_warn or sf_age < 0 or sf_age > conf.statefile_timeout * 500
        # As xhad: a host that is not live reports no peers.
        on_hb = uuid_list(view["on_hb"][index]) if live else ""
        on_sf = uuid_list(view["on_sf"][index]) if live else ""
        out += [
            "    <host_raw_data>",
            f"      <HostID>{escape(host)}</HostID>",
            f"      <time_since_last_update_on_statefile>{sf_age}</time_since_last_update_on_statefile>",
            f"      <time_since_last_heartbeat>{hb_age}</time_since_last_heartbeat>",
            f"      <time_since_xapi_restart_first_attempted>{restart_ms.get(index, -1)}"
            "</time_since_xapi_restart_first_attempted>",
            f"      <heartbeat_active_list_on_heartbeat>{on_hb}</heartbeat_active_list_on_heartbeat>",
            f"      <heartbeat_active_list_on_statefile>{on_sf}</heartbeat_active_list_on_statefile>",
            "    </host_raw_data>",
        ]
    out.append("  </raw_status_on_local_host>")
    lost = not view["sf_ok"]
    warnings = (
        ("statefile_lost", lost),
        ("heartbeat_approaching_timeout", hb_warn),
        ("statefile_approaching_timeout", sf_warn and not lost),
        ("Xapi_healthcheck_approaching_timeout", xapi_warn),
        ("network_bonding_error", False),
    )
    out.append("  <warning_on_local_host>")
    out += [f"    <{name}>{flag(value)}</{name}>" for name, value in warnings]
    out.append("  </warning_on_local_host>")
    out.append("</ha_liveset_info>")
    return "\n".join(out) + "\n"


def propose_master(conf_path: str) -> int:
    """ha_propose_master: take the master lock if no live host (in MY liveset) holds it, or I do;
    print TRUE/FALSE.  Exit 17 unless this host is Online, live and not excluded."""
    conf = read_conf(conf_path)
    pid = _require_running(conf)
    view = read_view(conf, pid)
    if view is None or view["status"] != "Online":
        raise Exit(EXIT_INVALID_LOCALHOST_STATE, f"host {conf.local} is not Online")
    live = set(view["live"])
    try:
        with open_statefile(conf, writable=True) as sf:
            block = checked_global(sf, conf)
            if block["pool_state"] == "invalid":
                raise Exit(EXIT_INVALID_POOL_STATE, "pool state is invalid")
            slot = sf.slot(conf, conf.index)
            if slot["excluded"] or conf.index not in live:
                raise Exit(EXIT_INVALID_LOCALHOST_STATE, f"host {conf.local} is not live")
            sf.lock(0)
            block = checked_global(sf, conf)
            holder = block["master"]
            holder_live = holder in conf.hosts and conf.hosts.index(holder) in live
            granted = holder is None or holder == conf.local or not holder_live
            if granted and holder != conf.local:
                block["master"] = conf.local
                sf.write_block(0, block)
        mode = "lock"
    except Exit as exc:
        if exc.code != EXIT_CAN_NOT_ACCESS_STATEFILE:
            raise
        # Without the statefile (survival rule 2) only the lowest-index live host may hold it.
        if view["excluded"][conf.index] or conf.index not in live:
            raise Exit(EXIT_INVALID_LOCALHOST_STATE, f"host {conf.local} is not live") from None
        granted = view.get("rule") == 2 and conf.index == min(live)
        mode = "claim"
    if granted:
        # As xhad, whose daemon takes the lock itself: the local daemon learns it at once and
        # tells the others in its heartbeats.
        write_atomic(os.path.join(conf.hostdir, CLAIM_FILE), f"{view.get('inc')} {mode} {time.time()!r}\n")
        _signal(pid, signal.SIGUSR2)
    sys.stdout.write("TRUE\n" if granted else "FALSE\n")
    sys.stdout.flush()
    return EXIT_SUCCESS


def disarm_fencing(conf_path: str) -> int:
    """ha_disarm_fencing: clear this host's armed flag, tell the daemon, disarm the watchdog
    (14 if the daemon is not running)."""
    conf = read_conf(conf_path)
    pid = _require_running(conf)
    try:
        with open_statefile(conf, writable=True) as sf:
            sf.lock(1 + conf.index)
            slot = sf.slot(conf, conf.index)
            slot.update(host=conf.local, armed=False)
            sf.write_slot(conf.index, slot)
    except Exit as exc:
        if exc.code != EXIT_CAN_NOT_ACCESS_STATEFILE:
            raise
    _signal(pid, signal.SIGUSR1)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline and is_heartbeat(pid, conf.path):
        view = read_view(conf, pid)
        if view is not None and view.get("armed") is False:
            break
        time.sleep(POLL / 4)
    send_watchdog(watchdog_path(conf), "disarm")
    return EXIT_SUCCESS


def set_excluded(conf_path: str) -> int:
    """ha_set_excluded: set this host's excluded flag straight in the statefile."""
    conf = read_conf(conf_path)
    with open_statefile(conf, writable=True) as sf:
        sf.lock(1 + conf.index)
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
        told = os.environ.pop(ONLINE_FD_VAR, "")
        online_fd = int(told) if told.isdigit() else -1
        if online_fd >= 0:
            try:
                os.set_inheritable(online_fd, False)
            except OSError:
                online_fd = -1
        sys.exit(_guarded(heartbeat_main, os.path.abspath(sys.argv[2]), None, online_fd))
    print(f"usage: {sys.argv[0]} {HEARTBEAT_FLAG} <xhad.conf>", file=sys.stderr)
    sys.exit(EXIT_INVALID_PARAMETER)


# --------------------------------------------------------------------------- fork server
#
# ``xapid-forkserver <folder>`` (in this folder) runs ``forkserver_main``: a process that has imported
# this engine once and forks a worker per script run, so that a run costs a fork instead of an
# interpreter start and the imports.  The ``ha_*`` scripts are POSIX shell shims, so that handing a
# run over costs a shell instead of an interpreter: with ``XAPID_FORKSERVER`` naming a live server's
# folder, a shim reads its answer from a command substitution whose shell (the *waiter*, pid from
# ``/proc/self/stat``) copies its standard output (the pipe the shim reads) to fd 9, writes
# ``xhad-fork-3 <shim pid> <waiter pid> <script> <argc>`` into the FIFO ``requests`` and stops
# itself.  The server opens that pipe anew through ``/proc/<waiter>/fd/9`` and kills the waiter,
# so that the server holds the only write end: no file is made per run.  The answer is
# ``exit <code>``, ``signal <number>`` (the shim then kills itself with it), or ``refused`` (it
# then runs the script in its own interpreter, ``xhad_run.py``, as it does without a server); a
# waiter that could not send says ``unsent``, with the same effect.  The server reads the rest
# from ``/proc/<shim pid>``: the arguments (the last argc words of the command line), environment,
# folder and standard streams, opened anew; a stream that would not behave the same when opened
# anew (a socket, a file written at an offset) makes it refuse.  The answer's write end stays with
# the server until the worker is reaped: a shim that dies (its caller's timeout) leaves the server
# POLLERR there, and the worker is killed; a server that dies leaves the shim end-of-file (exit
# 127).
# A worker heartbeat (``ha_start_daemon``) forks too.
# Hosts' processes are recognised by their command line (``--heartbeat <conf>``) and environment
# (``XAPID_HOST_DIR``), which the kernel reads from the process's original argv and environment
# areas; the server starts with room in both, and every fork rewrites them in place (as
# setproctitle does), so a forked process looks exactly like an executed one.

FORK_PROTOCOL = b"xhad-fork-3"
FORK_REQUESTS = "requests"  # the server's request FIFO, in its folder
FORK_PID = "pid"
# The waiter's copy of its standard output: fd 1 itself is the request FIFO while echo writes.
FORK_ANSWER_FD = 9
FORK_ROOM = 1 << 15
FORK_ROOM_VAR = "XHAD_FORK_ROOM"
FORK_MAX_REQUEST = 4096  # a request line is written whole into the FIFO (PIPE_BUF)
RUN_FILE = "xhad_run.py"  # what the shims run when no server takes the run
_FORKED = False  # True in a fork-server worker: ha_start_daemon forks its heartbeat


def _proc_areas() -> tuple[int, int, int, int] | None:
    """(arg_start, arg_end, env_start, env_end) of this process (``/proc/self/stat`` fields 48-51)."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        a0, a1, e0, e1 = (int(fields[k - 3]) for k in (48, 49, 50, 51))
    except (OSError, IndexError, ValueError):
        return None
    return a0, a1, e0, e1


def _block(items: Iterable[str]) -> bytes:
    return b"".join(os.fsencode(item) + b"\0" for item in items)


def retitle(argv: list[str], env: Mapping[str, str] | None = None, check: bool = False) -> bool:
    """Rewrite what ``/proc/self/cmdline`` (and, given ``env``, ``/proc/self/environ``) show.

    The areas keep their size; the rest is NUL-padded.  False (nothing written) when a block does
    not fit or the kernel refuses; with ``check`` only whether it would fit.
    """
    areas = _proc_areas()
    if areas is None:
        return False
    a0, a1, e0, e1 = areas
    args = _block(argv)
    envs = _block(f"{k}={v}" for k, v in env.items()) if env is not None else b""
    if len(args) > a1 - a0 or len(envs) > e1 - e0:
        return False
    if check:
        return True
    try:
        fd = os.open("/proc/self/mem", os.O_RDWR)
    except OSError:
        return False
    try:
        os.pwrite(fd, args.ljust(a1 - a0, b"\0"), a0)
        if env is not None:
            os.pwrite(fd, envs.ljust(e1 - e0, b"\0"), e0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


class _Forked:
    """The part of ``subprocess.Popen`` that ha_start_daemon uses, for a forked heartbeat."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _pid, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            _signal(self.pid, signal.SIGKILL)


def _exit_forked(code: int) -> None:
    """End a forked child with ``code``, its output flushed, never returning into the parent's code."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def spawn_heartbeat(conf: Conf, log_fd: int, online_fd: int = -1) -> subprocess.Popen[bytes] | _Forked:
    """Start this host's heartbeat process with ``log_fd`` as its output, in a session of its own;
    it writes ``online`` to ``online_fd`` (when given) once Online, then closes it.

    In a fork-server worker it is forked (its command line rewritten to the executed form), else
    executed as ``<python> -S xhad_engine.py --heartbeat <conf>`` (``online_fd`` named in
    ``XHAD_ONLINE_FD``).
    """
    argv = [sys.executable or "python3", "-S", ENGINE_FILE, HEARTBEAT_FLAG, conf.path]
    if not (_FORKED and retitle(argv, check=True)):
        env = dict(os.environ)
        if online_fd >= 0:
            env[ONLINE_FD_VAR] = str(online_fd)
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            cwd=conf.hostdir,
            start_new_session=True,
            close_fds=True,
            pass_fds=(online_fd,) if online_fd >= 0 else (),
            env=env,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = EXIT_INTERNAL_BUG
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        if online_fd >= 0:
            os.dup2(online_fd, 3, inheritable=False)
        os.closerange(3 if online_fd < 0 else 4, 1 << 16)
        os.chdir(conf.hostdir)
        retitle(argv)
        _log("forked by the fork server")
        code = _guarded(heartbeat_main, conf.path, conf, 3 if online_fd >= 0 else -1)
    except BaseException:  # noqa: BLE001 - a forked child never returns into its parent's code
        traceback.print_exc()
    finally:
        _exit_forked(code)


class _Request:
    """One script run a shim asked for: who, what, and where its answer goes."""

    def __init__(self, pid: int, script: str, argc: int, reply: int) -> None:
        self.pid, self.script, self.argc = pid, script, argc
        self.reply = reply  # write end of the pipe the shim reads its answer from


def _parse_request(line: bytes) -> tuple[int, int, str, int] | None:
    """(pid, waiter, script, argc) from ``xhad-fork-3 <pid> <waiter> <script> <argc>``, or None."""
    words = line.split()
    if len(words) != 5 or words[0] != FORK_PROTOCOL or not all(w.isdigit() for w in (words[1], words[2], words[4])):
        return None
    script = words[3].decode("ascii", "replace")
    if script not in SCRIPTS:
        return None
    return int(words[1]), int(words[2]), script, int(words[4])


def _answer_pipe(pid: int, waiter: int, me: int) -> int | None:
    """The write end of the pipe shim ``pid`` reads its answer from, opened anew from its waiter's
    copy of its standard output (fd 9); the waiter (a subshell of the shim, of our user) is then killed, so that the
    server holds the only write end.  None if ``waiter`` is not such a subshell or has no pipe
    there (a waiter that is one is killed all the same: its shim then sees end-of-file)."""
    base = f"/proc/{waiter}"
    try:
        if os.stat(base).st_uid != me:
            return None
        with open(f"{base}/stat", "rb") as handle:
            parent_pid = int(handle.read().rsplit(b")", 1)[1].split()[1])
        with open(f"{base}/cmdline", "rb") as handle:
            waiter_cmdline = handle.read()
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            shim_cmdline = handle.read()
    except (OSError, ValueError, IndexError):
        return None
    # A subshell is a fork of its shell: same parent link, same command line.
    if parent_pid != pid or waiter_cmdline != shim_cmdline:
        return None
    fd: int | None = None
    try:
        fd = os.open(f"{base}/fd/{FORK_ANSWER_FD}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            fd = None
    except OSError:
        fd = None
    _signal(waiter, signal.SIGKILL)
    return fd


def _open_stream(pid: int, n: int) -> int | None:
    """Standard stream ``n`` of process ``pid``, opened anew as it is open there (a pipe, a device,
    a file read or appended to); None where the copy would not behave the same (a socket, a file
    written at an offset the caller's own writes would not see move)."""
    path = f"/proc/{pid}/fd/{n}"
    try:
        with open(f"/proc/{pid}/fdinfo/{n}", "rb") as handle:
            info = dict(line.split(b":", 1) for line in handle.read().splitlines() if b":" in line)
        flags, pos = int(info[b"flags"].strip(), 8), int(info[b"pos"].strip())
        mode = os.stat(path).st_mode
    except (OSError, KeyError, ValueError):
        return None
    if stat.S_ISSOCK(mode) or (stat.S_ISREG(mode) and n > 0 and not flags & os.O_APPEND):
        return None
    try:
        # O_NONBLOCK: a pipe whose other end is gone must not block the server.
        fd = os.open(path, (flags & (os.O_ACCMODE | os.O_APPEND)) | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    os.set_blocking(fd, True)
    if stat.S_ISREG(mode):
        os.lseek(fd, pos, os.SEEK_SET)
    return fd


def _gather(request: _Request, me: int) -> tuple[tuple[str, str, list[str], dict[str, str]], list[int]] | None:
    """The run the shim ``request.pid`` asked for, read from ``/proc``: ((script, cwd, argv, env),
    its standard streams), or None when it is not one of ours or cannot be reproduced."""
    base = f"/proc/{request.pid}"
    try:
        if os.stat(base).st_uid != me:
            return None
        with open(f"{base}/cmdline", "rb") as handle:
            words = handle.read().split(b"\0")[:-1]
        with open(f"{base}/environ", "rb") as handle:
            items = handle.read().split(b"\0")[:-1]
        cwd = os.readlink(f"{base}/cwd")
    except OSError:
        return None
    # The kernel ran the shim as "<shell> <script path> args...": the arguments are the last argc words,
    # and a process that is not that script's shell (a pid from elsewhere) is not served.
    if len(words) < 2 + request.argc:
        return None
    head = words[1 : len(words) - request.argc]
    if not any(os.path.basename(os.fsdecode(w)) == request.script for w in head):
        return None
    argv = [os.fsdecode(w) for w in words[len(words) - request.argc :]] if request.argc else []
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = os.fsdecode(item).partition("=")
        if sep and key:
            env[key] = value
    fds: list[int] = []
    for n in range(3):
        fd = _open_stream(request.pid, n)
        if fd is None:
            for other in fds:
                os.close(other)
            return None
        fds.append(fd)
    return (request.script, cwd, argv, env), fds


def _worker_argv(script: str, argv: list[str]) -> list[str]:
    """The command line a run of ``script argv`` in the shim's own interpreter shows."""
    return [sys.executable or "python3", "-S", os.path.join(os.path.dirname(ENGINE_FILE), RUN_FILE), script, *argv]


def _worker(reply: int, fds: list[int], request: tuple[str, str, list[str], dict[str, str]],
            keep_out: list[int]) -> None:
    """Body of a forked worker: become the script run the client asked for; never returns."""
    global _FORKED
    script, cwd, argv, env = request
    code = EXIT_INTERNAL_BUG
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        for fd in keep_out:
            os.close(fd)
        os.close(reply)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(cwd)
        # unsetenv/putenv give the C environment fresh strings before its area is overwritten.
        os.environ.clear()
        os.environ.update(env)
        title = _worker_argv(script, argv)
        retitle(title, env)
        sys.argv = title[2:]
        _FORKED = True
        code = main(script, argv)
    except BaseException:  # noqa: BLE001 - a forked child never returns into the server loop
        traceback.print_exc()
    finally:
        _exit_forked(code)


def _remove_server_dir(path: str) -> None:
    """Remove the server's folder and what is in it (FIFOs, the pid file); missing is fine."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        _unlink(os.path.join(path, name))
    try:
        os.rmdir(path)
    except OSError:
        pass


def forkserver_main(argv: list[str]) -> int:
    """``xapid-forkserver <folder>``: serve script runs until SIGTERM or until its parent is gone.

    Makes ``<folder>`` (mode 0700) with the request FIFO ``requests`` and the file ``pid``, prints
    ``ready`` once it serves, and removes the folder on the way out, after killing every worker
    still running with its process group.  Only processes of its own user are served.
    """
    if FORK_ROOM_VAR in os.environ and len(argv) == 2:
        argv = argv[:1]  # the padding argument of the restart below
    if len(argv) != 1:
        print("usage: xapid-forkserver <folder>", file=sys.stderr)
        return EXIT_INVALID_PARAMETER
    folder = os.path.abspath(argv[0])
    areas = _proc_areas()
    if FORK_ROOM_VAR not in os.environ and (
        areas is None or areas[1] - areas[0] < FORK_ROOM or areas[3] - areas[2] < FORK_ROOM
    ):
        # Room to rewrite: start again once, with large argv and environment areas.
        script = os.path.abspath(sys.argv[0])
        env = dict(os.environ, **{FORK_ROOM_VAR: "x" * FORK_ROOM})
        os.execve(sys.executable, [sys.executable, "-S", script, folder, "-" * FORK_ROOM], env)
    os.environ.pop(FORK_ROOM_VAR, None)
    retitle([sys.executable or "python3", "-S", os.path.abspath(sys.argv[0]), folder], os.environ)
    parent = os.getppid()
    _remove_server_dir(folder)  # one a killed server left
    os.mkdir(folder, 0o700)
    requests_path = os.path.join(folder, FORK_REQUESTS)
    os.mkfifo(requests_path, 0o600)
    # Read-write: the FIFO never reports end-of-file between two shims' requests.
    requests_fd = os.open(requests_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Every heartbeat and liveset query uses the xapi monitor module: loaded once, here.
    xapi_mon()
    # Objects that exist now stay out of the collector's reach in the forks: a collection there
    # would otherwise touch (and copy) every page the server shares with them.
    gc.collect()
    gc.freeze()
    with open(os.path.join(folder, FORK_PID), "w") as handle:
        handle.write(f"{os.getpid()}\n")
    print("ready", flush=True)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    poller = select.poll()
    poller.register(requests_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    running: dict[int, _Request] = {}  # worker pid -> its request
    by_reply: dict[int, int] = {}  # answer fd -> worker pid
    me = os.getuid()
    buffered = b""

    def answer(request: _Request, message: bytes) -> None:
        if request.reply >= 0:
            try:
                os.write(request.reply, message + b"\n")
            except OSError:
                pass
            by_reply.pop(request.reply, None)
            try:
                poller.unregister(request.reply)
            except KeyError:
                pass
            os.close(request.reply)
            request.reply = -1

    def reap() -> None:
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            request = running.pop(pid, None)
            if request is None:
                continue
            if os.WIFSIGNALED(status):
                answer(request, b"signal %d" % os.WTERMSIG(status))
            else:
                answer(request, b"exit %d" % os.waitstatus_to_exitcode(status))

    def start(request: _Request) -> None:
        """The shim reads its answer now: fork its worker, or refuse."""
        gathered = _gather(request, me)
        # A worker must show its script's environment (fencing finds a host's processes by it).
        if gathered is not None and not retitle(_worker_argv(request.script, gathered[0][2]), gathered[0][3],
                                                check=True):
            for fd in gathered[1]:
                os.close(fd)
            gathered = None
        if gathered is None:
            answer(request, b"refused")
            return
        run, fds = gathered
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            others = [*by_reply, requests_fd, wake_r, wake_w]
            _worker(request.reply, fds, run, others)
        for fd in fds:
            os.close(fd)
        running[pid] = request
        by_reply[request.reply] = pid
        # No events asked: POLLERR alone comes, when the shim (the FIFO's reader) is gone.
        poller.register(request.reply, 0)

    try:
        while not stop:
            if os.getppid() != parent:
                break  # whoever started the server is gone (a crash): so is the server
            events = poller.poll(1000)
            for fd, flags in events:
                if fd == wake_r:
                    try:
                        while os.read(wake_r, 64):
                            pass
                    except OSError:
                        pass
                elif fd == requests_fd:
                    try:
                        buffered += os.read(requests_fd, 1 << 16)
                    except OSError:
                        continue
                    *lines, buffered = buffered.split(b"\n")
                    buffered = buffered[-FORK_MAX_REQUEST:]
                    for line in lines:
                        parsed = _parse_request(line)
                        if parsed is None:
                            continue
                        pid, waiter, script, argc = parsed
                        reply = _answer_pipe(pid, waiter, me)
                        if reply is not None:
                            start(_Request(pid, script, argc, reply))
                elif fd in by_reply and flags & (select.POLLERR | select.POLLHUP):
                    # The shim went away (its caller's timeout killed it): so does its run.
                    _killpg(by_reply[fd])
                    poller.unregister(fd)
            reap()
    finally:
        for pid in list(running):
            _killpg(pid)
        for pid in list(running):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        for request in running.values():
            if request.reply >= 0:
                os.close(request.reply)
        os.close(requests_fd)
        _remove_server_dir(folder)
    return EXIT_SUCCESS


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
