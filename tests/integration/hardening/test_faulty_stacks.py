"""Half-written cluster stacks: every fault in a script ends ``pool.enable_ha`` as a clean XenAPI
error that names the stack and the script, and leaves nothing half-enabled: ``ha_enabled``
false, no pool operation pending, no heartbeat or script process left, no host armed.

As documented (README "HA and cluster stacks", ha.md 4.1), the fields written before the
failure (``pool.ha_cluster_stack``, ``ha_statefiles``, ``ha_configuration``) stay, as in xapi,
so that the next enable reuses the statefile VDIs.

Each fault lives in its own stack folder ``faulty-<name>`` whose scripts behave like xhad
except the faulty one (on one host, or on all).  One daemon serves the whole module.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.conftest import SHIPPED_STACKS, Xapid, kill_heartbeats, write_conf
from tests.integration.ha.conftest import SCRIPTS, running_heartbeats
from tests.integration.hardening.conftest import armed_hosts, clean_log, daemon_alive

SCRIPT_TIMEOUT = 8  # generous for a loaded 2-core box: the hang fault costs this much

WRAPPER = """#!/bin/sh
here=$(dirname "$0")
if [ -z "{victim}" ] || [ "$XAPI_HOST_UUID" = "{victim}" ]; then
{fault}
fi
exec "{xhad}/$(basename "$0")" "$@"
"""


@dataclass(frozen=True)
class Fault:
    name: str
    script: str
    fault: str                 # shell lines run in place of the script ("" for file-level faults)
    victim: int | None         # index of the host it hits (None: every host)
    expect: str                # text the INTERNAL_ERROR message must contain
    kind: str = "shell"        # shell | no-exec | missing | symlink-outside


FAULTS = [
    Fault("hang", "ha_set_pool_state", "sleep 60", 0, f"timed out after {SCRIPT_TIMEOUT} seconds"),
    Fault("signal", "ha_start_daemon", "kill -SEGV $$", 1, "killed by SIGSEGV"),
    Fault("garbage", "ha_query_liveset", "echo '<<< not a liveset &&& TRUE'; exit 0", None, "malformed liveset"),
    Fault("megabytes", "ha_propose_master", "head -c 4194304 /dev/zero | tr '\\0' T; exit 0", 0,
          "did not print TRUE"),
    Fault("exit42", "ha_query_liveset", "exit 42", 2, "Unrecognised MTC exit code 42"),
    Fault("noexec", "ha_start_daemon", "", None, "is not executable", kind="no-exec"),
    Fault("missing", "ha_propose_master", "", None, "does not exist", kind="missing"),
    Fault("symlink", "ha_start_daemon", "", None, "resolves outside the cluster-stack root", kind="symlink-outside"),
]
INJECTED: list[str] = []


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("faulty") / "cluster-stack"
    shutil.copytree(SHIPPED_STACKS, d, ignore=shutil.ignore_patterns("__pycache__"))
    return d


@pytest.fixture(scope="module")
def daemon(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xapid]:
    tmp = tmp_path_factory.mktemp("faulty-state")
    conf = write_conf(tmp / "state.conf", root, **{"ha-script-timeout": str(SCRIPT_TIMEOUT),
                                                   "ha-start-daemon-timeout": "30"})
    d = Xapid(tmp / "state", conf, ["--hosts", "3"])
    d.start()
    yield d
    d.stop()
    kill_heartbeats(d.state_dir)
    print(f"\nfaulty stacks: {len(INJECTED)} faults injected: {', '.join(INJECTED)}")


@pytest.fixture
def api(daemon: Xapid) -> Iterator[Any]:
    s = daemon.session()
    yield s.xenapi
    s.xenapi.session.logout()


def make_stack(root: Path, fault: Fault, host_uuids: list[str], outside: Path) -> str:
    name = f"faulty-{fault.name}"
    d = root / name
    d.mkdir()
    xhad = root / "xhad"
    victim = host_uuids[fault.victim] if fault.victim is not None else ""
    for script in SCRIPTS:
        p = d / script
        body = fault.fault if script == fault.script and fault.kind == "shell" else ":"
        p.write_text(WRAPPER.format(victim=victim if script == fault.script else "", fault=body, xhad=xhad))
        p.chmod(0o755)
    target = d / fault.script
    if fault.kind == "no-exec":
        target.chmod(0o644)
    elif fault.kind == "missing":
        target.unlink()
    elif fault.kind == "symlink-outside":
        outside.mkdir(exist_ok=True)
        real = outside / fault.script
        shutil.copy(target, real)
        real.chmod(0o755)
        target.unlink()
        target.symlink_to(real)
    return name


def processes_touching(path: Path) -> list[str]:
    """Live processes whose working directory or command line lies under ``path``."""
    found = []
    text = str(path)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if not cmdline:  # zombie
            continue
        if cwd.startswith(text) or text in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()} (cwd {cwd})")
    return found


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_faulty_script_fails_enable_cleanly(daemon: Xapid, api: Any, root: Path, fault: Fault,
                                            tmp_path: Path) -> None:
    hosts = api.host.get_all()
    uuids = [api.host.get_uuid(h) for h in hosts]
    pool = api.pool.get_all()[0]
    stack = make_stack(root, fault, uuids, tmp_path / "outside")
    INJECTED.append(f"{fault.name} ({fault.script})")
    start = time.monotonic()
    with pytest.raises(XenAPI.Failure) as caught:
        api.pool.enable_ha([], {"timeout": "10"}, stack)
    elapsed = time.monotonic() - start
    details = list(caught.value.details)
    assert details[0] == "INTERNAL_ERROR", details
    message = details[1]
    assert stack in message and fault.script in message and fault.expect in message, message
    assert "Traceback" not in message and len(message) < 2000
    assert elapsed < 60, f"enable took {elapsed:.1f} s"
    # Nothing half-enabled.
    rec = api.pool.get_record(pool)
    assert rec["ha_enabled"] is False
    assert rec["current_operations"] == {}
    assert "ha_enable" in rec["allowed_operations"]
    assert running_heartbeats(daemon) == []
    assert armed_hosts(daemon) == []
    assert processes_touching(daemon.state_dir / "hosts") == []
    assert processes_touching(root / stack) == []
    # The documented policy: what was written before the failure stays (the VDIs are reused).
    assert rec["ha_cluster_stack"] == stack
    # The daemon is healthy and said nothing unexpected.
    assert daemon_alive(daemon)
    clean_log(daemon)


def test_after_every_fault_a_good_stack_enables_and_disables(daemon: Xapid, api: Any) -> None:
    """No fault left anything behind that stops a clean enable (statefile VDIs reused, not duplicated)."""
    pool = api.pool.get_all()[0]
    statefiles_before = api.pool.get_ha_statefiles(pool)
    vdis_before = len(api.VDI.get_all())
    api.pool.enable_ha([], {"timeout": "10"}, "xhad")
    assert api.pool.get_ha_enabled(pool) is True
    assert len(running_heartbeats(daemon)) == 3
    assert len(api.VDI.get_all()) == vdis_before
    if statefiles_before:
        assert api.pool.get_ha_statefiles(pool) == statefiles_before
    api.pool.disable_ha()
    assert running_heartbeats(daemon) == []
    assert armed_hosts(daemon) == []
    clean_log(daemon)
