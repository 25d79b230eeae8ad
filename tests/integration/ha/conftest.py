"""Helpers for HA tests: extra SM drivers, recording stacks, fist points, heartbeat pids."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Xapid
from xapid.hw.faults import FaultClient

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


# -- "a pool with HA on" ---------------------------------------------------------------------------

GIB = 1024**3


@dataclass
class HaPool:
    """A running daemon with HA enabled (T = 10) and the handles tests use to break and watch it."""

    xapid: Xapid
    api: Any
    pool: str
    hosts: dict[str, str]  # name-label -> ref
    fault: FaultClient

    def uuid(self, name: str) -> str:
        return str(self.api.host.get_uuid(self.hosts[name]))

    def live(self, name: str) -> bool:
        return bool(self.api.host_metrics.get_live(self.api.host.get_metrics(self.hosts[name])))

    def master(self) -> str:
        """The name-label of the current master."""
        return str(self.api.host.get_name_label(self.api.pool.get_master(self.pool)))

    def vm(self, name: str, priority: str = "", on: str | None = None, memory_gib: int = 2, order: int = 0,
           start_delay: int = 0) -> str:
        """A VM with ``priority``, started on host ``on`` (None: left halted)."""
        x = self.api
        ref = x.VM.create(vm_record(name, memory_gib))
        x.VM.set_order(ref, str(order))
        x.VM.set_start_delay(ref, str(start_delay))
        x.VM.set_ha_restart_priority(ref, priority)
        if on is not None:
            x.VM.start_on(ref, self.hosts[on], False, False)
        return str(ref)

    def where(self, vm: str) -> tuple[str, str]:
        """(power state, name-label of the resident host or "-")."""
        host = self.api.VM.get_resident_on(vm)
        return (self.api.VM.get_power_state(vm),
                "-" if host == "OpaqueRef:NULL" else str(self.api.host.get_name_label(host)))

    def messages(self, name: str) -> list[dict[str, Any]]:
        return [m for m in self.api.message.get_all_records().values() if m["name"] == name]


def vm_record(name: str, memory_gib: int) -> dict[str, Any]:
    """A complete VM.create record (every constructor field, as xe and the SDK examples send)."""
    mem = str(memory_gib * GIB)
    return {"name_label": name, "name_description": "", "user_version": "1", "is_a_template": False,
            "affinity": "OpaqueRef:NULL", "memory_static_max": mem, "memory_dynamic_max": mem,
            "memory_dynamic_min": mem, "memory_static_min": str(GIB // 2), "VCPUs_params": {}, "VCPUs_max": "1",
            "VCPUs_at_startup": "1", "actions_after_shutdown": "destroy", "actions_after_reboot": "restart",
            "actions_after_crash": "restart", "PV_bootloader": "", "PV_kernel": "", "PV_ramdisk": "", "PV_args": "",
            "PV_bootloader_args": "", "PV_legacy_args": "", "HVM_boot_policy": "BIOS order", "HVM_boot_params": {},
            "platform": {}, "PCI_bus": "", "other_config": {}, "recommendations": ""}


HaPoolFactory = Callable[..., HaPool]


@pytest.fixture
def ha_pool_factory(xapid_factory: Any) -> HaPoolFactory:
    """``ha_pool_factory(hosts=3, **conf)``: a daemon with HA enabled on the shared SR, T = 10."""

    def make(hosts: int = 3, timeout: int = 10, **conf: str) -> HaPool:
        conf.setdefault("fence-reboot-delay", "1")
        d = xapid_factory(hosts=hosts, **conf)
        s = d.session()
        x = s.xenapi
        pool = x.pool.get_all()[0]
        x.pool.enable_ha([x.pool.get_default_SR(pool)], {"timeout": str(timeout)})
        names = {x.host.get_name_label(h): h for h in x.host.get_all()}
        return HaPool(d, x, pool, names, FaultClient(d.state_dir))

    return make


@pytest.fixture
def ha_pool(ha_pool_factory: HaPoolFactory) -> HaPool:
    """A 3-host pool with HA on (T = 10, monitor every 0.5 s, fenced hosts reboot after 1 s)."""
    return ha_pool_factory()
