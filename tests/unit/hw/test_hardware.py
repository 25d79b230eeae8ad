"""Host power and the fabric file (xapid/hw/__init__.py, fabric.py, processes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from xapid.hw import Hardware
from xapid.hw.processes import processes_of


def spawn(host_dir: Path) -> subprocess.Popen[bytes]:
    """A process of the emulated host (its environment names the host folder), with a child of its own."""
    env = dict(os.environ, XAPID_HOST_DIR=str(host_dir))
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "time.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def test_crash_kills_every_process_of_the_host_and_only_those(tmp_path: Path) -> None:
    hw = Hardware(tmp_path, reboot_delay=0)
    hw.attach(["a", "b"])
    a, b = spawn(hw.host_dir("a")), spawn(hw.host_dir("b"))
    try:
        deadline = time.monotonic() + 5
        while len(processes_of(hw.host_dir("a"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(processes_of(hw.host_dir("a"))) == 2
        changes: list[tuple[str, str, str]] = []
        hw.on_power_change(lambda *c: changes.append(c))
        hw.crash("a")
        assert processes_of(hw.host_dir("a")) == []
        assert a.wait(5) == -9
        assert len(processes_of(hw.host_dir("b"))) == 2 and b.poll() is None
        assert hw.power("a") == "off" and changes == [("a", "on", "off")]
        assert hw.last_stop("a") == (False, "power cut")
        # Power states survive a restart of the emulator.
        assert Hardware(tmp_path, reboot_delay=0).power("a") == "off"
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
        hw.crash("b")
        hw.stop()


def test_hang_stops_processes_and_thaw_resumes_them(tmp_path: Path) -> None:
    hw = Hardware(tmp_path, reboot_delay=0)
    hw.attach(["a"])
    p = spawn(hw.host_dir("a"))
    try:
        time.sleep(0.3)
        hw.hang("a", seconds=0.5)
        state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "T" and hw.power("a") == "hung" and not hw.is_running("a")
        time.sleep(1.0)
        state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in ("S", "R") and hw.power("a") == "on"
    finally:
        hw.crash("a")
        hw.stop()


def test_fence_reboots_after_the_delay_and_runs_startup(tmp_path: Path) -> None:
    hw = Hardware(tmp_path, reboot_delay=0.3)
    hw.attach(["a"])
    booted: list[str] = []
    hw.on_boot(booted.append)
    hw.fence("a", "test")
    assert hw.power("a") == "fenced"
    deadline = time.monotonic() + 5
    while not booted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert booted == ["a"] and hw.power("a") == "on"
    assert hw.boot("a") is False  # already on
    hw.stop()


def test_fabric_file_is_what_stacks_read(tmp_path: Path) -> None:
    hw = Hardware(tmp_path, reboot_delay=0)
    hw.attach(["a", "b", "c"])
    hw.fabric.partition([["a"], ["b"]], ["a", "b", "c"])
    doc = json.loads((tmp_path / "hw" / "fabric.json").read_text())
    assert doc["network"]["a"] != doc["network"]["b"]
    assert doc["network"]["c"] not in (doc["network"]["a"], doc["network"]["b"])
    hw.fabric.block_storage(["a"], ["/x/sr/1"])
    assert json.loads((tmp_path / "hw" / "fabric.json").read_text())["storage_blocked"] == {"a": ["/x/sr/1"]}
    hw.fabric.restore_storage(["a"])
    hw.fabric.heal()
    assert json.loads((tmp_path / "hw" / "fabric.json").read_text()) == {"network": {}, "storage_blocked": {}}
    hw.stop()
