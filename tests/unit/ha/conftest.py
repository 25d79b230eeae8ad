"""Shared fixtures for the HA unit tests: hand-written stacks and emulated pools of hosts.

Every process a fixture starts is killed in its finaliser, whether or not the test passed.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xapid.ha import conf
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


def heartbeat_pids_under(directory: Path) -> list[int]:
    """Pids of running heartbeat processes whose xhad.conf lies below ``directory``."""
    marker = str(directory).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parts = cmdline.split(b"\0")
        if b"--heartbeat" in parts and any(part.startswith(marker) for part in parts):
            found.append(int(entry))
    return found


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

    def __post_init__(self) -> None:
        self.statefile = self.state / "statefile"

    def hostdir(self, host: str) -> Path:
        return self.state / host

    def conf(self, host: str) -> Path:
        return self.hostdir(host) / "xhad.conf"

    def write_confs(self, base_t: object = 10, generation: str | None = None) -> None:
        pairs = [(host, f"127.0.0.{index + 1}") for index, host in enumerate(self.hosts)]
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
        return json.loads(body) if body else None

    def global_block(self) -> dict | None:
        with self.statefile.open("rb") as handle:
            body = handle.read(4096).rstrip(b"\0")
        return json.loads(body) if body else None

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

    def factory(stack: str = "xhad", hosts: int = 3, root: Path = STACK_ROOT) -> EnginePool:
        state = tmp_path / f"pool{len(pools)}"
        state.mkdir()
        pool = EnginePool(
            stack=stack,
            state=state,
            hosts=[str(uuid.uuid4()) for _ in range(hosts)],
            generation=str(uuid.uuid4()),
            runner=ClusterStackRunner(root, timeout=20.0, start_timeout=30.0),
        )
        with pool.statefile.open("wb") as handle:
            handle.truncate(STATEFILE_SIZE)
        pool.write_confs()
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.stop_all()
    for pool in pools:
        assert wait_until(lambda pool=pool: not heartbeat_pids_under(pool.state), 5.0)
