"""Helpers for HA tests: extra SM drivers, recording stacks, fist points, heartbeat pids."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Xapid

SCRIPTS = ("ha_set_pool_state", "ha_start_daemon", "ha_stop_daemon", "ha_query_liveset", "ha_propose_master",
           "ha_disarm_fencing", "ha_set_excluded")

# A stack that records each call, then behaves exactly like xhad (the design's stack "foo").
RECORDING_SCRIPT = """#!/bin/sh
here=$(dirname "$0")
echo "$(basename "$0") $* host=$XAPI_HOST_UUID conf=$XHAD_CONF" >> "$here/calls.log"
exec "$here/../xhad/$(basename "$0")" "$@"
"""


@pytest.fixture
def sm_dir(tmp_path: Path) -> Path:
    """A copy of the shipped SM descriptors plus ``foosr`` (requires stack ``foo``)."""
    d = tmp_path / "sm.d"
    shutil.copytree(REPO / "etc" / "sm.d", d)
    add_driver(d, "foosr", ["foo"])
    return d


def add_driver(sm_dir: Path, sr_type: str, stacks: list[str]) -> None:
    doc = json.loads((sm_dir / "nfs.json").read_text())
    doc.update(type=sr_type, name_label=sr_type, required_cluster_stack=stacks)
    (sm_dir / f"{sr_type}.json").write_text(json.dumps(doc))


def add_recording_stack(root: Path, name: str, supported: list[str] | None = None) -> Path:
    d = root / name
    d.mkdir()
    for script in SCRIPTS:
        p = d / script
        p.write_text(RECORDING_SCRIPT)
        p.chmod(0o755)
    if supported is not None:
        (d / "ha_supported_srs").write_text("\n".join(supported) + "\n")
    return d


def calls(stack_dir: Path) -> list[str]:
    log = stack_dir / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def host_dir(xapid: Xapid, host_uuid: str) -> Path:
    return xapid.state_dir / "hosts" / host_uuid


def fist(xapid: Xapid, host_uuid: str, script: str, text: str) -> Path:
    """Make the reference stack misbehave for ``script`` on one host (see xhad_engine's docstring)."""
    d = host_dir(xapid, host_uuid) / "fist"
    d.mkdir(parents=True, exist_ok=True)
    p = d / script
    p.write_text(text + "\n")
    return p


def heartbeat_pid(xapid: Xapid, host_uuid: str) -> int | None:
    p = host_dir(xapid, host_uuid) / "xhad.pid"
    try:
        pid = int(p.read_text().strip())
        # A killed process may linger as a zombie here (PID 1 does not reap); its cmdline is empty.
        if not Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        return pid
    except (OSError, ValueError):
        return None


def running_heartbeats(xapid: Xapid) -> list[int]:
    out = []
    for p in (xapid.state_dir / "hosts").glob("*/xhad.pid"):
        pid = heartbeat_pid(xapid, p.parent.name)
        if pid is not None:
            out.append(pid)
    return out


def kill_heartbeat(xapid: Xapid, host_uuid: str) -> None:
    pid = heartbeat_pid(xapid, host_uuid)
    assert pid is not None, "no heartbeat process to kill"
    os.kill(pid, signal.SIGKILL)


def run_script(stack_root: Path, stack: str, script: str, xapid: Xapid, host_uuid: str) -> int:
    """Run a stack script by hand, as a stack author would, with xapid's environment."""
    env = {"PATH": os.environ["PATH"] + os.pathsep + str(stack_root / stack),
           "XHAD_CONF": str(host_dir(xapid, host_uuid) / "xhad.conf"), "XAPI_HOST_UUID": host_uuid}
    return subprocess.run([str(stack_root / stack / script)], env=env, capture_output=True, timeout=60).returncode


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
