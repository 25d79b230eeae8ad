"""``xapid fault`` as users run it: a subprocess talking to the daemon's local socket."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO, Xapid
from tests.integration.ha.conftest import add_recording_stack, wait_for


def fault(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "fault", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_status_crash_boot_hang_thaw_round_trip(xapid: Xapid, api: Any) -> None:
    status = fault(xapid.state_dir, "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("host2 ") and "power=on network=0 statefile=ok armed=false live=true" in lines[1]
    host2 = api.host.get_by_name_label("host2")[0]
    uuid = api.host.get_uuid(host2)
    crashed = fault(xapid.state_dir, "crash", uuid)
    assert (crashed.returncode, crashed.stdout) == (0, "host2: on -> off\n")
    assert "power=off" in fault(xapid.state_dir, "status").stdout.splitlines()[1]
    assert fault(xapid.state_dir, "boot", "host2").stdout == "host2: off -> on\n"
    assert fault(xapid.state_dir, "hang", "host3", "--seconds", "30").stdout == "host3: on -> hung\n"
    assert fault(xapid.state_dir, "thaw", "host3").stdout == "host3: hung -> on\n"


def test_mistakes_exit_2_with_a_clear_message(xapid: Xapid, tmp_path: Path) -> None:
    unknown = fault(xapid.state_dir, "crash", "no-such-host")
    assert unknown.returncode == 2 and "unknown host 'no-such-host'" in unknown.stderr
    bad = fault(xapid.state_dir, "explode", "host1")
    assert bad.returncode == 2 and "unknown fault 'explode'" in bad.stderr
    empty = fault(xapid.state_dir, "crash")
    assert empty.returncode == 2 and "needs at least one HOST" in empty.stderr
    no_ha = fault(xapid.state_dir, "statefile-loss", "host1")
    assert no_ha.returncode == 2 and "no heartbeat SR" in no_ha.stderr
    gone = fault(tmp_path / "nowhere", "status")
    assert gone.returncode == 2 and "xapid is not running" in gone.stderr
    assert "Traceback" not in unknown.stderr + bad.stderr + gone.stderr


def test_partition_a_stack_cannot_feel_is_refused(xapid_factory: Any, stack_root: Path) -> None:
    add_recording_stack(stack_root, "foo")
    d = xapid_factory(stack_root=stack_root)
    s = d.session()
    s.xenapi.pool.enable_ha([], {"timeout": "10"}, "foo")
    refused = fault(d.state_dir, "partition", "host1", "--", "host2")
    assert refused.returncode == 2
    assert "cluster stack 'foo' cannot feel network partitions" in refused.stderr
    s.xenapi.pool.disable_ha()
    allowed = fault(d.state_dir, "partition", "host1", "--", "host2")
    assert allowed.returncode == 0 and allowed.stdout.startswith("network partitioned:")


def test_without_ha_a_crashed_host_is_assumed_dead_after_the_interval(xapid_factory: Any) -> None:
    d = xapid_factory(**{"host-assumed-dead-interval": "1"})
    x = d.session().xenapi
    host3 = x.host.get_by_name_label("host3")[0]

    def live() -> bool:
        return bool(x.host_metrics.get_live(x.host.get_metrics(host3)))

    assert fault(d.state_dir, "crash", "host3").returncode == 0
    assert live()  # xapi waits for the host heartbeat to time out
    wait_for(lambda: not live(), timeout=10, what="the host to be assumed dead")
    assert fault(d.state_dir, "boot", "host3").returncode == 0
    wait_for(live, timeout=10, what="the booted host to say hello")


def test_a_state_dir_too_long_for_a_unix_address_still_has_its_local_socket(xapid_factory: Any) -> None:
    """AF_UNIX addresses hold 107 bytes; a deeper state dir binds and reaches xapi.sock through its folder."""
    name = "state-" + "d" * 100
    d = xapid_factory(name=name)
    assert len(str(d.state_dir / "xapi.sock")) > 107
    assert (d.state_dir / "xapi.sock").exists()
    status = fault(d.state_dir, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("host1 ")
    assert fault(d.state_dir, "crash", "host2").stdout == "host2: on -> off\n"
