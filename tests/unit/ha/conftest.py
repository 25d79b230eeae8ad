"""Shared fixtures for the HA unit tests: hand-written stacks and emulated pools of hosts.

Every process a fixture starts is killed in its finaliser, whether or not the test passed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.ha.support import heartbeat_pids_under
from xapid.ha import conf, liveset
from xapid.ha.scripts import ClusterStackRunner, ScriptResult

REPO = Path(__file__).resolve().parents[3]
STACK_ROOT = REPO / "scripts" / "cluster-stack"
STATEFILE_SIZE = 266240
XAPI_PARAMS = {
    "XapiHealthCheckInterval": 60,
    "XapiHealthCheckTimeout": 120,
    "XapiRestartAttempts": 1,
    "XapiRestartTimeout": 300,
}


def write_script(root: Path, stack: str, name: str, body: str, mode: int = 0o755) -> Path:
    """Create ``<root>/<stack>/<name>`` with ``body`` and ``mode``."""
    path = root / stack / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(mode)
    return path


def live_group_members(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid`` if it still exists."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def without_crc(block: dict) -> dict:
    """A statefile block without its ``crc`` member (the engine's torn-read guard)."""
    block.pop("crc", None)
    return block


def wait_until(predicate: Callable[[], bool], limit: float = 5.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``limit`` seconds passed; its last value."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(step)
    return True


@pytest.fixture
def stack_root(tmp_path: Path) -> Path:
    """An empty cluster-stack root for hand-written test stacks."""
    root = tmp_path / "cluster-stack"
    root.mkdir()
    return root


@pytest.fixture
def make_script(stack_root: Path) -> Callable[..., Path]:
    """``make_script(stack, name, body, mode=0o755, root=stack_root)`` writes a script."""

    def factory(stack: str, name: str, body: str, mode: int = 0o755, root: Path = stack_root) -> Path:
        return write_script(root, stack, name, body, mode)

    return factory


class ProcessGroups:
    """Process groups a test started; all are SIGKILLed at teardown."""

    def __init__(self) -> None:
        self.groups: list[int] = []

    def track(self, pgid: int) -> int:
        self.groups.append(pgid)
        return pgid

    members = staticmethod(live_group_members)
    kill = staticmethod(kill_group)


@pytest.fixture
def process_groups() -> Iterator[ProcessGroups]:
    """Track process groups with ``.track(pgid)``; each is SIGKILLed at teardown."""
    tracker = ProcessGroups()
    yield tracker
    for pgid in tracker.groups:
        kill_group(pgid)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., bool]:
    """The :func:`wait_until` polling helper."""
    return wait_until


@dataclass
class EnginePool:
    """Emulated hosts sharing one statefile, driven through ClusterStackRunner."""

    stack: str
    state: Path
    hosts: list[str]
    generation: str
    runner: ClusterStackRunner
    statefile: Path = field(init=False)
    udp_port: int = 0

    def __post_init__(self) -> None:
        self.statefile = self.state / "statefile"

    def hostdir(self, host: str) -> Path:
        return self.state / host

    def conf(self, host: str) -> Path:
        return self.hostdir(host) / "xhad.conf"

    def addresses(self) -> list[str]:
        return [f"127.0.1.{index + 1}" for index in range(len(self.hosts))]

    def write_confs(self, base_t: object = 10, generation: str | None = None) -> None:
        pairs = list(zip(self.hosts, self.addresses(), strict=True))
        if not self.udp_port:
            self.udp_port = conf.free_udp_port(self.addresses())
        for host in self.hosts:
            text = conf.render(
                generation or self.generation,
                pairs,
                base_t,
                host,
                "xenbr0",
                "eth0",
                str(self.statefile),
                XAPI_PARAMS,
                udp_port=self.udp_port,
            )
            conf.write(self.conf(host), text)

    def run(self, host: str, script: str, *args: str) -> ScriptResult:
        return self.runner.run(self.stack, script, host, self.conf(host), args)

    def pid(self, host: str) -> int | None:
        try:
            return int((self.hostdir(host) / "xhad.pid").read_text())
        except (OSError, ValueError):
            return None

    def slot(self, host: str) -> dict | None:
        index = self.hosts.index(host)
        with self.statefile.open("rb") as handle:
            handle.seek(4096 * (1 + index))
            body = handle.read(4096).rstrip(b"\0")
        return without_crc(json.loads(body)) if body else None

    def global_block(self) -> dict | None:
        with self.statefile.open("rb") as handle:
            body = handle.read(4096).rstrip(b"\0")
        return without_crc(json.loads(body)) if body else None

    def running_heartbeats(self) -> list[int]:
        return heartbeat_pids_under(self.state)

    def stop_all(self) -> None:
        """SIGKILL every heartbeat process of this pool (pid files, then a /proc scan)."""
        running = set(heartbeat_pids_under(self.state))
        from_pid_files = {self.pid(host) for host in self.hosts} & running
        for pid in [*from_pid_files, *(running - from_pid_files)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[Callable[..., EnginePool]]:
    """Factory ``make_pool(stack="xhad", hosts=3)`` for pools on the repository's stacks.

    The statefile is a sparse 266240-byte file and every host has an xhad.conf (T=10).
    All heartbeat processes are killed at teardown.
    """
    pools: list[EnginePool] = []

    def factory(stack: str = "xhad", hosts: int = 3, root: Path = STACK_ROOT, forkserver: bool = False) -> EnginePool:
        state = tmp_path / f"pool{len(pools)}"
        state.mkdir()
        # With a state dir the runner starts the stack's fork server (xapid-forkserver), as xapid's does.
        pool = EnginePool(
            stack=stack,
            state=state,
            hosts=[str(uuid.uuid4()) for _ in range(hosts)],
            generation=str(uuid.uuid4()),
            runner=ClusterStackRunner(root, timeout=20.0, start_timeout=30.0,
                                      state_dir=state / "xapid" if forkserver else None),
        )
        with pool.statefile.open("wb") as handle:
            handle.truncate(STATEFILE_SIZE)
        pool.write_confs()
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.runner.close()
        pool.stop_all()
    for pool in pools:
        assert wait_until(lambda pool=pool: not heartbeat_pids_under(pool.state), 5.0)


# --------------------------------------------------------------------------- clusters with fabric and watchdogs

# A hand-written timing profile: the same rules as T=10, three times faster (seconds).
FAST_PARAMETERS = {
    "HeartbeatInterval": 1,
    "HeartbeatTimeout": 3,
    "StateFileInterval": 1,
    "StateFileTimeout": 3,
    "HeartbeatWatchdogTimeout": 3,
    "StateFileWatchdogTimeout": 5,
    "BootJoinTimeout": 6,
    "EnableJoinTimeout": 6,
}


class Watchdog:
    """A Unix datagram socket bound at a host's ``watchdog`` path, recording what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # sun_path holds 108 bytes: bind a long path through the folder's /proc/self/fd entry.
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
        finally:
            os.close(dir_fd)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append((time.monotonic(), data.decode("ascii", "replace")))

    def received(self) -> list[str]:
        with self.lock:
            return [text for _, text in self.messages]

    def since(self, moment: float) -> list[str]:
        with self.lock:
            return [text for at, text in self.messages if at >= moment]

    def fences(self) -> list[str]:
        return [text for text in self.received() if text.startswith("fence ")]

    def close(self) -> None:
        self.closed.set()
        self.sock.close()
        self.thread.join(2.0)


class Cluster:
    """Emulated hosts run WITHOUT xapid: confs, a statefile in an SR folder, a fabric file and one
    test-bound watchdog socket per host.  Scripts run with the full hw-contract environment."""

    def __init__(self, root: Path, hosts: int, base_t: int | None, stack: str = "xhad") -> None:
        self.root = root
        self.stack_dir = STACK_ROOT / stack
        self.hosts = [f"{index:02d}{str(uuid.uuid4())[2:]}" for index in range(hosts)]
        self.addresses = [f"127.0.1.{index + 1}" for index in range(hosts)]
        self.generation = str(uuid.uuid4())
        self.sr_dir = root / "sr" / str(uuid.uuid4())
        self.sr_dir.mkdir(parents=True)
        self.statefile = self.sr_dir / "statefile"
        with self.statefile.open("wb") as handle:
            handle.truncate(STATEFILE_SIZE)
        self.hw_dir = root / "hw"
        self.hw_dir.mkdir()
        self.port = conf.free_udp_port(self.addresses)
        self.base_t = base_t
        self.watchdogs: dict[str, Watchdog] = {}
        for host in self.hosts:
            self.hostdir(host).mkdir(parents=True)
            self.watchdogs[host] = Watchdog(self.hostdir(host) / "watchdog")
        self.write_confs()
        self.set_fabric({}, {})

    def hostdir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def conf(self, host: str) -> Path:
        return self.hostdir(host) / "xhad.conf"

    def write_confs(self) -> None:
        pairs = list(zip(self.hosts, self.addresses, strict=True))
        for host in self.hosts:
            text = conf.render(
                self.generation,
                pairs,
                self.base_t or 10,
                host,
                "xenbr0",
                "eth0",
                str(self.statefile),
                XAPI_PARAMS,
                udp_port=self.port,
            )
            if self.base_t is None:
                for name, value in FAST_PARAMETERS.items():
                    text = re.sub(f"<{name}>[0-9]+</{name}>", f"<{name}>{value}</{name}>", text)
            conf.write(self.conf(host), text)

    @property
    def timing(self) -> dict[str, int]:
        return dict(FAST_PARAMETERS) if self.base_t is None else conf.timeouts(self.base_t)

    @property
    def settle(self) -> float:
        """Seconds a host fails both survival rules before it fences (the engine's rule)."""
        t = self.timing
        return 2 * max(t["HeartbeatInterval"], t["StateFileInterval"]) + 1

    @property
    def silence_limit(self) -> float:
        """Seconds of silence after which the others drop a host."""
        t = self.timing
        return t["HeartbeatWatchdogTimeout"] + t["HeartbeatInterval"]

    def env(self, host: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", os.defpath),
            "XHAD_CONF": str(self.conf(host)),
            "XAPI_HOST_UUID": host,
            "XAPID_HOST_DIR": str(self.hostdir(host)),
            "XAPID_POOL_DIR": str(self.root / "pool"),
            "XAPID_HW_DIR": str(self.hw_dir),
        }

    def run(self, host: str, script: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.stack_dir / script), *args],
            env=self.env(host),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.stack_dir,
        )

    def code(self, host: str, script: str, *args: str) -> int:
        return self.run(host, script, *args).returncode

    def start(self, hosts: list[str] | None = None) -> list[int]:
        """``ha_start_daemon`` on ``hosts`` (default all) in parallel; their exit codes."""
        chosen = self.hosts if hosts is None else hosts
        with ThreadPoolExecutor(len(chosen)) as executor:
            return list(executor.map(lambda host: self.code(host, "ha_start_daemon"), chosen))

    def enable(self) -> None:
        assert self.code(self.hosts[0], "ha_set_pool_state", "init") == 0
        assert self.start() == [0] * len(self.hosts)

    def query(self, host: str) -> liveset.Liveset:
        result = self.run(host, "ha_query_liveset")
        assert result.returncode == 0, (result.returncode, result.stderr)
        return liveset.parse(result.stdout)

    def live(self, viewer: str) -> dict[str, bool]:
        return {host: status.liveness for host, status in self.query(viewer).hosts.items()}

    def live_set(self, viewer: str) -> set[str]:
        return {host for host, up in self.live(viewer).items() if up}

    def pid(self, host: str) -> int | None:
        try:
            return int((self.hostdir(host) / "xhad.pid").read_text())
        except (OSError, ValueError):
            return None

    def running(self, host: str) -> bool:
        pid = self.pid(host)
        return pid is not None and pid in heartbeat_pids_under(self.hostdir(host))

    def log(self, host: str) -> str:
        try:
            return (self.hostdir(host) / "xhad.log").read_text()
        except OSError:
            return ""

    def set_fabric(self, network: dict[str, str], storage_blocked: dict[str, list[str]]) -> None:
        """Replace fabric.json atomically, as xapid does."""
        tmp = self.hw_dir / ".fabric.json.tmp"
        tmp.write_text(json.dumps({"network": network, "storage_blocked": storage_blocked}))
        os.replace(tmp, self.hw_dir / "fabric.json")

    def partition(self, *groups: list[str]) -> None:
        self.set_fabric({host: str(number) for number, group in enumerate(groups) for host in group}, {})

    def block_statefile(self, hosts: list[str]) -> None:
        self.set_fabric({}, {host: [str(self.sr_dir)] for host in hosts})

    def signal(self, host: str, signum: int) -> int:
        pid = self.pid(host)
        assert pid is not None
        os.kill(pid, signum)
        return pid

    def stop_all(self) -> None:
        for pid in heartbeat_pids_under(self.root):
            for signum in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        self.stop_all()
        for watchdog in self.watchdogs.values():
            watchdog.close()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Factory ``make_cluster(hosts=3, base_t=None)``: ``base_t=None`` is the fast profile
    (FAST_PARAMETERS), an integer the timeouts xapid writes for that T.  Every heartbeat process
    is killed and every watchdog socket closed at teardown."""
    clusters: list[Cluster] = []

    def factory(hosts: int = 3, base_t: int | None = None, stack: str = "xhad") -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(clusters)}", hosts, base_t, stack)
        clusters.append(cluster)
        return cluster

    yield factory
    for cluster in clusters:
        cluster.close()
    for cluster in clusters:
        assert wait_until(lambda cluster=cluster: not heartbeat_pids_under(cluster.root), 5.0)
