"""Shared fixtures: a real running ``xapid`` and a temporary cluster-stack root.

``xapid_factory`` starts ``xapid serve --listen 127.0.0.1:0`` as a subprocess in
a temporary state dir and stops it (and every heartbeat process it left) at
teardown.  Tests talk to it only through the official XenAPI SDK or ``xe``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import XenAPI

REPO = Path(__file__).resolve().parents[1]
SHIPPED_STACKS = REPO / "scripts" / "cluster-stack"
SHIPPED_CONF = REPO / "etc" / "xapi.conf"

# Fast but faithful settings for tests: no 5 s login delay, quick monitor.
TEST_CONF = {
    "login-failure-delay": "0.2",
    "ha-monitor-interval": "0.5",
    "ha-script-timeout": "20",
    "ha-start-daemon-timeout": "30",
    "ha-disable-retry-delay": "0.2",
    "ha-boot-retry-delay": "0.3",
    "guest-agent-delay": "0.2",
    "nbd-port": "0",  # parallel daemons: every host's NBD service on a free port
}


# CI sets XAPID_CI=1: a test that would skip (no root, no namespaces, no browser) fails instead.
CI = os.environ.get("XAPID_CI") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"


def kill_heartbeats(state_dir: Path) -> None:
    """Kill every heartbeat process whose pid file lies under ``state_dir``."""
    for pid_file in state_dir.glob("hosts/*/*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGKILL)
        except (ValueError, OSError):
            pass


@dataclass
class Xapid:
    """A running daemon under test."""

    state_dir: Path
    config: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    log_path: Path | None = None

    @property
    def password(self) -> str:
        return (self.state_dir / "root-password").read_text().strip()

    def start(self, timeout: float = 30.0) -> None:
        url_file = self.state_dir / "url"
        if url_file.exists():
            url_file.unlink()
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xapid.cli.xapid", "serve", "--config", str(self.config),
             "--state-dir", str(self.state_dir), "--listen", "127.0.0.1:0", *self.extra_args],
            stdout=log, stderr=log, cwd=REPO,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if url_file.exists():
                self.url = url_file.read_text().strip()
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"xapid exited with {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"xapid did not become ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def session(self, user: str = "root", password: str | None = None) -> XenAPI.Session:
        s = XenAPI.Session(self.url)
        s.login_with_password(user, self.password if password is None else password, "2.21", "pytest")
        return s


def write_conf(path: Path, stack_root: Path | None = None, **overrides: str) -> Path:
    values = dict(TEST_CONF)
    values["sm-dir"] = str(REPO / "etc" / "sm.d")
    values["cluster-stack-root"] = str(stack_root or SHIPPED_STACKS)
    values.update(overrides)
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


@pytest.fixture
def stack_root(tmp_path: Path) -> Path:
    """A temporary cluster-stack root holding copies of the shipped stacks; tests add their own."""
    root = tmp_path / "cluster-stack"
    shutil.copytree(SHIPPED_STACKS, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture
def xapid_factory(tmp_path: Path) -> Iterator[object]:
    """Start daemons: ``xapid_factory(stack_root=..., hosts=3, **conf_overrides)``; all stopped at teardown."""
    started: list[Xapid] = []

    def make(stack_root: Path | None = None, hosts: int = 3, name: str = "state", **overrides: str) -> Xapid:
        state = tmp_path / name
        conf = write_conf(tmp_path / f"{name}.conf", stack_root, **overrides)
        d = Xapid(state, conf, ["--hosts", str(hosts)])
        started.append(d)
        d.start()
        return d

    yield make
    for d in started:
        d.stop()
        kill_heartbeats(d.state_dir)


@pytest.fixture
def xapid(xapid_factory: object) -> Xapid:
    """A running daemon with the shipped stacks and a 3-host demo pool."""
    return xapid_factory()  # type: ignore[operator]


def root_api(daemon: Xapid) -> Iterator[object]:
    """Yield ``session.xenapi`` of a fresh root session on ``daemon``; log out afterwards."""
    s = daemon.session()
    yield s.xenapi
    try:
        s.xenapi.session.logout()
    except Exception:  # noqa: BLE001 - the daemon may be gone, or the test logged out already
        pass


@pytest.fixture
def api(xapid: Xapid) -> Iterator[object]:
    """``session.xenapi`` of a root session on :func:`xapid`."""
    yield from root_api(xapid)
