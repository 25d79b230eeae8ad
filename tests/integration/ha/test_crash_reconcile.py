"""A daemon SIGKILLed in the middle of pool.enable_ha or pool.disable_ha comes back reconciled (ha-gaps
"Bugs"): no stale operation (xapi cancels every task at start), HA fully on (every armed host's heartbeat
adopted or restarted) or fully off (no heartbeat at all), and a clean enable and disable work after it."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

import pytest

from tests.conftest import SHIPPED_STACKS, Xapid
from tests.integration.ha.conftest import fist, heartbeat_pid, running_heartbeats, wait_for


def uuids(x: Any) -> list[str]:
    return [x.host.get_uuid(h) for h in x.host.get_all()]


def call_in_background(xapid: Xapid, method: str, *args: Any) -> threading.Thread:
    """Start ``pool.<method>`` on a session of its own; the daemon may die under it."""
    x = xapid.session().xenapi

    def run() -> None:
        try:
            getattr(x.pool, method)(*args)
        except Exception:  # noqa: BLE001 - the daemon is killed mid-call on purpose
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def assert_reconciled(xapid: Xapid) -> Any:
    """After a restart: no stale operation, HA fully on or fully off; returns the SDK handle."""
    x = xapid.session().xenapi
    pool = x.pool.get_all()[0]
    assert x.pool.get_current_operations(pool) == {}
    hosts = x.host.get_all()
    for h in hosts:
        assert x.host.get_current_operations(h) == {}
    # Every host enables itself at the end of its start-up (ha.md 4.8): then the outcome is final.
    wait_for(lambda: all(x.host.get_enabled(h) for h in hosts), timeout=30, what="every start-up done")
    if x.pool.get_ha_enabled(pool):
        assert all(heartbeat_pid(xapid, u) for u in uuids(x)), "every heartbeat adopted or restarted"
        assert "ha_disable" in x.pool.get_allowed_operations(pool)
        assert x.pool.get_ha_enabled(pool) is True
    else:
        assert running_heartbeats(xapid) == []
        assert "ha_enable" in x.pool.get_allowed_operations(pool)
        time.sleep(1.5)  # a script of the killed daemon would have started its heartbeat by now
        assert running_heartbeats(xapid) == []
    return x


def clean_cycle(xapid: Xapid, x: Any) -> None:
    """A clean enable (when off) and disable work, and leave nothing running."""
    pool = x.pool.get_all()[0]
    if not x.pool.get_ha_enabled(pool):
        x.pool.enable_ha([], {"timeout": "10"})
        assert len(running_heartbeats(xapid)) == 3
    x.pool.disable_ha()
    assert x.pool.get_ha_enabled(pool) is False
    assert x.pool.get_current_operations(pool) == {}
    assert running_heartbeats(xapid) == []


@pytest.mark.parametrize("delay", [0.05, 0.4, 0.9, 1.6])
def test_sigkill_during_enable(xapid: Xapid, api: Any, delay: float) -> None:
    """Killed at several moments of the enable (the slaves' joins are slowed by fist points)."""
    hosts = uuids(api)
    for uuid in hosts[1:]:
        fist(xapid, uuid, "ha_start_daemon", "sleep 1")
    t = call_in_background(xapid, "enable_ha", [], {"timeout": "10"})
    time.sleep(delay)
    xapid.kill()
    t.join(10)
    for uuid in hosts[1:]:
        (xapid.state_dir / "hosts" / uuid / "fist" / "ha_start_daemon").unlink()
    xapid.start()
    x = assert_reconciled(xapid)
    clean_cycle(xapid, x)


@pytest.mark.parametrize("delay", [0.05, 0.5, 1.2, 2.0])
def test_sigkill_during_disable(xapid: Xapid, api: Any, delay: float) -> None:
    """Killed before the pool state is set invalid, after it, and while the daemons are stopped."""
    api.pool.enable_ha([], {"timeout": "10"})
    hosts = uuids(api)
    master = api.host.get_uuid(api.pool.get_master(api.pool.get_all()[0]))
    fist(xapid, master, "ha_set_pool_state", "sleep 0.8")
    for uuid in hosts:
        fist(xapid, uuid, "ha_stop_daemon", "sleep 1")
    t = call_in_background(xapid, "disable_ha")
    time.sleep(delay)
    xapid.kill()
    t.join(10)
    for point in (xapid.state_dir / "hosts").glob("*/fist/*"):
        point.unlink()
    xapid.start()
    x = assert_reconciled(xapid)
    clean_cycle(xapid, x)


def test_sigkill_right_after_the_pool_state_went_invalid(xapid: Xapid, api: Any) -> None:
    """The exact state a kill between disable's ``invalid`` step and ``ha_enabled := false`` leaves:
    the daemons leave, ha_enabled is still true.  The restart must end with HA off and no heartbeat."""
    api.pool.enable_ha([], {"timeout": "10"})
    pool = api.pool.get_all()[0]
    master = api.host.get_uuid(api.pool.get_master(pool))
    xapid.kill()
    assert len(running_heartbeats(xapid)) == 3  # the heartbeats outlive the daemon
    # What the killed daemon's script did: the stack author's way, by hand with xapid's environment.
    conf = xapid.state_dir / "hosts" / master / "xhad.conf"
    subprocess.run([str(SHIPPED_STACKS / "xhad" / "ha_set_pool_state"), "invalid"], check=True, timeout=30,
                   env={"PATH": os.environ["PATH"], "XHAD_CONF": str(conf), "XAPI_HOST_UUID": master})
    xapid.start()
    x = xapid.session().xenapi
    wait_for(lambda: x.pool.get_ha_enabled(pool) is False, timeout=30, what="HA off after the restart")
    wait_for(lambda: running_heartbeats(xapid) == [], timeout=30, what="no heartbeat left")
    x = assert_reconciled(xapid)
    clean_cycle(xapid, x)


def test_restart_adopts_running_heartbeats(xapid: Xapid, api: Any) -> None:
    """A SIGKILLed daemon leaves the heartbeats running; the next start adopts them (exit 15), not restarts."""
    api.pool.enable_ha([], {"timeout": "10"})
    before = {u: heartbeat_pid(xapid, u) for u in uuids(api)}
    xapid.kill()
    xapid.start()
    x = assert_reconciled(xapid)
    assert {u: heartbeat_pid(xapid, u) for u in uuids(x)} == before
    clean_cycle(xapid, x)
