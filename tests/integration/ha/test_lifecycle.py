"""The HA life of a host: start-up and rejoin (ha.md 4.8, xapi_ha.ml on_server_restart), clean shutdown and
reboot with HA (4.7, xapi_ha.ml before_clean_shutdown_or_reboot), emergency disable on the host a call is
sent to (4.6), and the slave join during enable (4.3, xapi_ha.ml join_liveset)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid
from tests.integration.ha.conftest import HaPool, calls, fist, heartbeat_pid, running_heartbeats, wait_for

BOOT = 40.0  # seconds for a host to boot and rejoin (a loaded machine included)


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def error_of(fn: Any, *args: Any) -> list[str] | None:
    """The call's error, or None if it succeeded (for polling a state that is still arriving)."""
    try:
        fn(*args)
    except XenAPI.Failure as e:
        return list(e.details)
    return None


def status(p: HaPool, name: str) -> dict[str, str]:
    """``xapid fault status`` of host ``name`` as a dict (power, network, statefile, armed, live)."""
    for line in p.fault.status():
        fields = line.split()
        if fields[0] == name:
            return dict(f.split("=", 1) for f in fields[2:])
    raise AssertionError(f"no status line for {name}")


def scripts_run(xapid: Xapid, host_uuid: str) -> list[str]:
    """The cluster-stack scripts xapid ran for one host, in order (from its structured log)."""
    out = []
    for line in xapid.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "ha_script" and entry.get("host") == host_uuid:
            out.append(str(entry["script"]))
    return out


def rejoined(p: HaPool, name: str) -> bool:
    s = status(p, name)
    return (s["power"] == "on" and s["armed"] == "true" and p.live(name)
            and bool(p.api.host.get_enabled(p.hosts[name])))


def test_clean_reboot_leaves_ha_and_rejoins(ha_pool: HaPool) -> None:
    """Disarm, stop, set excluded (in that order); the VMs move away; the host is dead at once with no
    HA_HOST_FAILED; it reboots, rejoins and enables itself, with no HA_HOST_WAS_FENCED."""
    p = ha_pool
    x = p.api
    vm = p.vm("protected", "restart", on="host3")
    uuid = p.uuid("host3")
    assert failure(x.host.reboot, p.hosts["host3"]) == ["HOST_NOT_DISABLED"]
    x.host.disable(p.hosts["host3"])
    before = len(scripts_run(p.xapid, uuid))
    x.host.reboot(p.hosts["host3"])
    steps = [s for s in scripts_run(p.xapid, uuid)[before:] if s != "ha_query_liveset"]
    assert steps[:3] == ["ha_disarm_fencing", "ha_stop_daemon", "ha_set_excluded"]
    assert p.where(vm)[0] == "Running" and p.where(vm)[1] in ("host1", "host2")
    wait_for(lambda: rejoined(p, "host3"), timeout=BOOT, what="host3 to reboot and rejoin")
    assert heartbeat_pid(p.xapid, uuid) is not None
    assert p.messages("HA_HOST_FAILED") == []
    assert p.messages("HA_HOST_WAS_FENCED") == []
    assert p.where(vm)[1] in ("host1", "host2")  # it was migrated, not restarted
    assert x.host.get_current_operations(p.hosts["host3"]) == {}


def test_clean_shutdown_then_power_on(ha_pool: HaPool) -> None:
    p = ha_pool
    x = p.api
    host2 = p.hosts["host2"]
    x.host.disable(host2)
    x.host.shutdown(host2)
    assert status(p, "host2")["power"] == "off"
    assert status(p, "host2")["armed"] == "true"  # HA stays armed on a clean shutdown (ha.md 4.7)
    assert p.live("host2") is False
    assert heartbeat_pid(p.xapid, p.uuid("host2")) is None
    # The survivors go on: a host failure is still noticed and acted on.
    vm = p.vm("on-host3", "restart", on="host3")
    p.fault.crash("host3")
    wait_for(lambda: p.where(vm) == ("Running", "host1"), timeout=BOOT, what="host3's VM restarted on host1")
    assert [m["obj_uuid"] for m in p.messages("HA_HOST_FAILED")] == [p.uuid("host3")]
    x.host.power_on(host2)
    wait_for(lambda: rejoined(p, "host2"), timeout=BOOT, what="host2 to rejoin")
    assert p.messages("HA_HOST_WAS_FENCED") == []


def test_host_that_crashed_reports_it_was_fenced_when_it_boots(ha_pool: HaPool) -> None:
    """xapi_host_crashdump.ml: HA on, no clean shutdown before the boot -> HA_HOST_WAS_FENCED (4, Host)."""
    p = ha_pool
    p.fault.crash("host2")
    wait_for(lambda: not p.live("host2"), timeout=BOOT, what="host2 declared dead")
    p.fault.boot("host2")
    wait_for(lambda: rejoined(p, "host2"), timeout=BOOT, what="host2 to rejoin")
    fenced = p.messages("HA_HOST_WAS_FENCED")
    assert [(m["obj_uuid"], m["cls"], int(m["priority"]), m["body"]) for m in fenced] == [
        (p.uuid("host2"), "Host", 4, "")]


def test_failure_past_the_commit_point_fences_the_host(ha_pool: HaPool) -> None:
    """ha.md 4.7: an error after fencing was disarmed makes the host fence itself; it boots again and
    rejoins (still armed), and says it was fenced."""
    p = ha_pool
    x = p.api
    uuid = p.uuid("host3")
    x.host.disable(p.hosts["host3"])
    point = fist(p.xapid, uuid, "ha_set_excluded", "exit 2")
    details = failure(x.host.shutdown, p.hosts["host3"])
    assert details[0] == "INTERNAL_ERROR" and "fenced" in details[1]
    point.unlink()
    assert status(p, "host3")["power"] in ("fenced", "on")
    wait_for(lambda: rejoined(p, "host3"), timeout=BOOT, what="the fenced host to boot and rejoin")
    assert [m["obj_uuid"] for m in p.messages("HA_HOST_WAS_FENCED")] == [uuid]
    assert "host fenced" in p.xapid.log()


def test_shutdown_without_statefile_access_is_refused(ha_pool_factory: Any, stack_root: Path) -> None:
    """ha.md 4.7 pre-check: the host's own liveset must show statefile access, else HA_LOST_STATEFILE and
    nothing happens."""
    query = stack_root / "xhad" / "ha_query_liveset"
    query.rename(query.with_name("ha_query_liveset.real"))
    query.write_text("""#!/bin/sh
# The real liveset, with this host's view of the statefile gone when its folder holds "no-statefile".
out=$("$(dirname "$0")/ha_query_liveset.real"); rc=$?
if [ -e "$XAPID_HOST_DIR/no-statefile" ]; then
  out=$(printf '%s\\n' "$out" | sed 's|<statefile_access>TRUE<|<statefile_access>FALSE<|')
fi
printf '%s\\n' "$out"
exit $rc
""")
    query.chmod(0o755)
    p = ha_pool_factory(**{"cluster-stack-root": str(stack_root)})
    x = p.api
    x.host.disable(p.hosts["host2"])
    (p.xapid.state_dir / "hosts" / p.uuid("host2") / "no-statefile").write_text("")
    assert failure(x.host.shutdown, p.hosts["host2"]) == ["HA_LOST_STATEFILE"]
    assert failure(x.host.reboot, p.hosts["host2"]) == ["HA_LOST_STATEFILE"]
    assert status(p, "host2")["power"] == "on"
    assert heartbeat_pid(p.xapid, p.uuid("host2")) is not None
    assert x.host.get_current_operations(p.hosts["host2"]) == {}
    (p.xapid.state_dir / "hosts" / p.uuid("host2") / "no-statefile").unlink()
    wait_for(lambda: p.live("host2"), what="host2 live again")
    x.host.shutdown(p.hosts["host2"])
    assert status(p, "host2")["power"] == "off"


def test_shutting_down_the_master_elects_a_new_one(ha_pool: HaPool) -> None:
    """The master leaves the liveset cleanly; the survivors' master-failure procedure picks a new master;
    the old one powers on as a slave."""
    p = ha_pool
    x = p.api
    vm = p.vm("on-master", "restart", on="host1")
    x.host.disable(p.hosts["host1"])
    x.host.shutdown(p.hosts["host1"])
    assert status(p, "host1")["power"] == "off"
    wait_for(lambda: p.master() != "host1", timeout=BOOT, what="a new master")
    assert p.master() in ("host2", "host3")
    assert [m["obj_uuid"] for m in p.messages("POOL_MASTER_TRANSITION")] == [p.uuid(p.master())]
    assert p.where(vm)[0] == "Running" and p.where(vm)[1] in ("host2", "host3")
    assert p.messages("HA_HOST_FAILED") == []
    x.host.power_on(p.hosts["host1"])
    wait_for(lambda: rejoined(p, "host1"), timeout=BOOT, what="the old master to rejoin")
    assert p.master() != "host1"


def test_emergency_ha_disable_takes_out_the_host_the_call_reaches(ha_pool: HaPool) -> None:
    """ha.md 4.6: the call acts on the host it is sent to (the master here); the survivors elect a new
    master, which the next call reaches: every host can be taken out in turn, the pool database untouched."""
    p = ha_pool
    x = p.api
    out: list[str] = []
    for _ in range(3):
        master = p.master()
        x.host.emergency_ha_disable(False)
        out.append(master)
        assert status(p, master)["armed"] == "false"
        assert heartbeat_pid(p.xapid, p.uuid(master)) is None
        if len(out) < 3:
            wait_for(lambda m=master: p.master() != m, timeout=BOOT, what="the next master")
    assert sorted(out) == ["host1", "host2", "host3"]
    assert running_heartbeats(p.xapid) == []
    assert x.pool.get_ha_enabled(p.pool) is True
    assert failure(x.host.emergency_ha_disable, False) == ["HA_NOT_ENABLED"]
    x.pool.disable_ha()
    assert x.pool.get_ha_enabled(p.pool) is False


def test_boot_in_emergency_mode_until_the_heartbeat_starts(ha_pool: HaPool) -> None:
    """ha.md 4.8: ha_start_daemon exit 8 with HA still on -> emergency mode (the host answers
    HA_HOST_CANNOT_ACCESS_STATEFILE) and a retry every ha-boot-retry-delay; once it starts, the host rejoins."""
    p = ha_pool
    x = p.api
    uuid = p.uuid("host3")
    point = fist(p.xapid, uuid, "ha_start_daemon", "exit 8")
    p.fault.crash("host3")
    wait_for(lambda: not p.live("host3"), timeout=BOOT, what="host3 declared dead")
    p.fault.boot("host3")
    wait_for(lambda: scripts_run(p.xapid, uuid).count("ha_start_daemon") >= 3, what="retries")
    wait_for(lambda: error_of(x.host.enable, p.hosts["host3"]) == ["HA_HOST_CANNOT_ACCESS_STATEFILE"],
             what="emergency mode")
    assert not p.live("host3")
    assert status(p, "host3")["armed"] == "true"
    point.write_text("exit 42\n")
    wait_for(lambda: error_of(x.host.disable, p.hosts["host3"]) == ["HA_HEARTBEAT_DAEMON_STARTUP_FAILED"],
             what="the other emergency error")
    point.unlink()
    wait_for(lambda: rejoined(p, "host3"), timeout=BOOT, what="host3 to rejoin")

    def answers() -> bool:
        try:
            x.host.disable(p.hosts["host3"])
            return True
        except XenAPI.Failure:
            return False

    wait_for(answers, what="host3 out of emergency mode, answering its calls")
    assert x.host.get_enabled(p.hosts["host3"]) is False


def test_invalid_pool_state_at_boot_disarms_the_host(ha_pool: HaPool) -> None:
    """ha_start_daemon exit 11 -> ha.armed := false; the pool still has HA on, so the slave is in emergency
    mode with HA_POOL_IS_ENABLED_BUT_HOST_IS_DISABLED (xapi.ml resynchronise_ha_state)."""
    p = ha_pool
    x = p.api
    uuid = p.uuid("host2")
    fist(p.xapid, uuid, "ha_start_daemon", "exit 11")
    p.fault.crash("host2")
    wait_for(lambda: not p.live("host2"), timeout=BOOT, what="host2 declared dead")
    p.fault.boot("host2")
    wait_for(lambda: status(p, "host2")["armed"] == "false", what="host2 disarmed")
    wait_for(lambda: error_of(x.host.enable, p.hosts["host2"]) == ["HA_POOL_IS_ENABLED_BUT_HOST_IS_DISABLED"],
             what="emergency mode")
    assert x.pool.get_ha_enabled(p.pool) is True
    # The way back: HA off, restart the host (its xapi leaves emergency mode), HA on again.
    (p.xapid.state_dir / "hosts" / uuid / "fist" / "ha_start_daemon").unlink()
    x.pool.disable_ha()
    assert failure(x.pool.enable_ha, [], {"timeout": "10"}) == ["HOST_OFFLINE", p.hosts["host2"]]
    p.fault.crash("host2")
    p.fault.boot("host2")
    wait_for(lambda: p.live("host2"), what="host2 live after its restart")
    x.host.enable(p.hosts["host2"])
    x.pool.enable_ha([], {"timeout": "10"})
    wait_for(lambda: rejoined(p, "host2"), what="host2 back in HA")


def test_ha_xapi_healthcheck_and_emergency_mode_of_the_host_called(ha_pool: HaPool) -> None:
    x = ha_pool.api
    assert x.host.ha_xapi_healthcheck() is True
    assert x.host.is_in_emergency_mode() is False


def test_slave_join_waits_while_its_liveset_is_starting(xapid_factory: Any, stack_root: Path) -> None:
    """xapi_ha.ml join_liveset: a slave looks at the master's entry only once its liveset is Online (a
    Starting liveset lists no host; it used to give INTERNAL_ERROR "the master is missing")."""
    query = stack_root / "xhad" / "ha_query_liveset"
    query.rename(query.with_name("ha_query_liveset.real"))
    query.write_text("""#!/bin/sh
# The first three answers on each host are what xhad prints while it starts: status and localhost only.
here=$(dirname "$0"); count="$XAPID_HOST_DIR/starting-count"
n=$(cat "$count" 2>/dev/null || echo 0)
if [ "$n" -lt 3 ]; then
  echo $((n + 1)) > "$count"
  echo "$(basename "$0") starting host=$XAPI_HOST_UUID" >> "$here/calls.log"
  printf '<?xml version="1.0"?>\\n<ha_liveset_info version="1.0"><status>Starting</status>'
  printf '<localhost><HostID>%s</HostID></localhost></ha_liveset_info>\\n' "$XAPI_HOST_UUID"
  exit 0
fi
exec "$here/ha_query_liveset.real"
""")
    query.chmod(0o755)
    d = xapid_factory(stack_root=stack_root)
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    x.pool.enable_ha([], {"timeout": "10"})
    assert x.pool.get_ha_enabled(pool) is True
    master_uuid = x.host.get_uuid(x.pool.get_master(pool))
    starting = [c for c in calls(stack_root / "xhad") if "starting" in c]
    slaves = {x.host.get_uuid(h) for h in x.host.get_all()} - {master_uuid}
    assert {c.split("host=")[1] for c in starting} >= slaves
    x.pool.disable_ha()
    assert running_heartbeats(d) == []
