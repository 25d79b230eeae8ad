"""pool.enable_ha / disable_ha / host.emergency_ha_disable end to end (ha.md 4.1-4.6)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid
from tests.integration.ha.conftest import fist, heartbeat_pid, running_heartbeats, wait_for


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def uuids(x: Any) -> list[str]:
    return [x.host.get_uuid(h) for h in x.host.get_all()]


def test_enable_then_disable(xapid: Xapid, api: Any) -> None:
    pool = api.pool.get_all()[0]
    assert "ha_enable" in api.pool.get_allowed_operations(pool)
    assert "ha_disable" not in api.pool.get_allowed_operations(pool)
    api.pool.enable_ha([], {"timeout": "10"})
    rec = api.pool.get_record(pool)
    assert rec["ha_enabled"] is True and rec["ha_plan_exists_for"] == "0"
    assert rec["current_operations"] == {}
    assert "ha_disable" in rec["allowed_operations"] and "ha_enable" not in rec["allowed_operations"]
    assert len(running_heartbeats(xapid)) == 3
    for h in api.host.get_all():
        assert api.host.get_ha_statefiles(h) == rec["ha_statefiles"]
    assert failure(api.pool.enable_ha, [], {}) == ["HA_IS_ENABLED"]
    api.pool.disable_ha()
    assert api.pool.get_ha_enabled(pool) is False
    assert running_heartbeats(xapid) == []
    assert failure(api.pool.disable_ha) == ["HA_NOT_ENABLED"]


def test_xhad_conf_matches_the_pool(xapid: Xapid, api: Any) -> None:
    api.pool.enable_ha([], {"timeout": "30"})
    for h in api.host.get_all():
        uuid = api.host.get_uuid(h)
        conf = (xapid.state_dir / "hosts" / uuid / "xhad.conf").read_text()
        assert conf.startswith('<?xml version="1.0" encoding="utf-8"?>')
        assert f"<localhost><HostID>{uuid}</HostID>" in conf.replace("\n", "").replace(" ", "")
        for other in api.host.get_all():
            assert f"<IPaddress>{api.host.get_address(other)}</IPaddress>" in conf
        assert "<HeartbeatTimeout>30</HeartbeatTimeout>" in conf
        assert "<HeartbeatInterface>xenbr0</HeartbeatInterface>" in conf
    api.pool.disable_ha()


@pytest.mark.parametrize(("code", "error"), [("12", "HA_FAILED_TO_FORM_LIVESET"),
                                             ("8", "HA_HOST_CANNOT_ACCESS_STATEFILE")])
def test_join_failure_on_one_host_rolls_back(xapid: Xapid, api: Any, code: str, error: str) -> None:
    """ha.md 4.1 step 22: a host failing to join makes the master disable HA and re-raise."""
    pool = api.pool.get_all()[0]
    fist(xapid, uuids(api)[1], "ha_start_daemon", f"exit {code}")
    assert failure(api.pool.enable_ha, [], {"timeout": "10"}) == [error]
    assert api.pool.get_ha_enabled(pool) is False
    assert api.pool.get_current_operations(pool) == {}
    assert running_heartbeats(xapid) == []
    # Fields written before the per-host stage stay (ha.md 4.1 failure policy).
    assert api.pool.get_ha_cluster_stack(pool) == "xhad"
    assert len(api.pool.get_ha_statefiles(pool)) == 1


def test_unknown_exit_code_is_internal_error_naming_the_script(xapid: Xapid, api: Any) -> None:
    fist(xapid, uuids(api)[2], "ha_start_daemon", "exit 42")
    details = failure(api.pool.enable_ha, [], {"timeout": "10"})
    assert details[0] == "INTERNAL_ERROR"
    assert "42" in details[1] and "xhad" in details[1] and "ha_start_daemon" in details[1]
    assert running_heartbeats(xapid) == []


def test_hanging_script_is_killed_at_its_timeout(xapid_factory: Any) -> None:
    d = xapid_factory(**{"ha-start-daemon-timeout": "2"})
    x = d.session().xenapi
    fist(d, uuids(x)[1], "ha_start_daemon", "sleep 60")
    start = time.monotonic()
    details = failure(x.pool.enable_ha, [], {"timeout": "10"})
    assert time.monotonic() - start < 30
    assert details[0] == "INTERNAL_ERROR" and "ha_start_daemon" in details[1] and "2" in details[1]
    assert x.pool.get_ha_enabled(x.pool.get_all()[0]) is False
    assert running_heartbeats(d) == []


def test_failed_set_pool_state_aborts_without_rollback(xapid: Xapid, api: Any) -> None:
    """ha.md 2.2: a failing ``ha_set_pool_state init`` aborts enable; no host was started."""
    fist(xapid, uuids(api)[0], "ha_set_pool_state", "exit 2")
    assert failure(api.pool.enable_ha, [], {"timeout": "10"})[0] == "INTERNAL_ERROR"
    assert running_heartbeats(xapid) == []


def test_second_enable_while_one_runs(xapid: Xapid, api: Any) -> None:
    pool = api.pool.get_all()[0]
    fist(xapid, uuids(api)[1], "ha_start_daemon", "sleep 2")
    worker = xapid.session().xenapi  # one SDK session per thread: ServerProxy is not thread-safe
    t = threading.Thread(target=lambda: worker.pool.enable_ha([], {"timeout": "10"}))
    t.start()
    wait_for(lambda: api.pool.get_current_operations(pool), what="enable to start")
    assert list(api.pool.get_current_operations(pool).values()) == ["ha_enable"]
    second = xapid.session().xenapi
    assert failure(second.pool.enable_ha, [], {}) == ["HA_ENABLE_IN_PROGRESS"]
    assert failure(second.pool.disable_ha) == ["HA_ENABLE_IN_PROGRESS"]
    t.join()
    assert api.pool.get_ha_enabled(pool) is True
    fist(xapid, uuids(api)[0], "ha_set_pool_state", "sleep 2")
    t = threading.Thread(target=worker.pool.disable_ha)
    t.start()
    wait_for(lambda: api.pool.get_current_operations(pool), what="disable to start")
    assert failure(second.pool.disable_ha) == ["HA_DISABLE_IN_PROGRESS"]
    assert failure(second.pool.enable_ha, [], {}) == ["HA_DISABLE_IN_PROGRESS"]
    t.join()
    assert api.pool.get_ha_enabled(pool) is False


def test_host_offline_refuses_enable(xapid: Xapid, api: Any) -> None:
    api.pool.enable_ha([], {"timeout": "10"})
    hosts = api.host.get_all()
    victim = hosts[2]
    pid = heartbeat_pid(xapid, api.host.get_uuid(victim))
    assert pid is not None
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    metrics = api.host.get_metrics(victim)
    wait_for(lambda: api.host_metrics.get_live(metrics) is False, what="host to be marked dead")
    api.pool.disable_ha()
    assert failure(api.pool.enable_ha, [], {"timeout": "10"}) == ["HOST_OFFLINE", victim]


def test_emergency_ha_disable(xapid: Xapid, api: Any) -> None:
    pool = api.pool.get_all()[0]
    master_uuid = api.host.get_uuid(api.pool.get_master(pool))
    assert failure(api.host.emergency_ha_disable, False) == ["HA_NOT_ENABLED"]
    api.host.emergency_ha_disable(True)  # soft on an unarmed host: quietly nothing
    api.pool.enable_ha([], {"timeout": "10"})
    api.host.emergency_ha_disable(False)
    assert heartbeat_pid(xapid, master_uuid) is None
    # ha.md 4.6: the pool database is not touched.
    assert api.pool.get_ha_enabled(pool) is True
    assert failure(api.host.emergency_ha_disable, False) == ["HA_NOT_ENABLED"]
    api.pool.disable_ha()
    assert api.pool.get_ha_enabled(pool) is False
    assert running_heartbeats(xapid) == []


def test_emergency_ha_disable_soft_keeps_host_armed(xapid: Xapid, api: Any) -> None:
    pool = api.pool.get_all()[0]
    master_uuid = api.host.get_uuid(api.pool.get_master(pool))
    api.pool.enable_ha([], {"timeout": "10"})
    api.host.emergency_ha_disable(True)
    assert heartbeat_pid(xapid, master_uuid) is None
    xapid.restart()  # armed hosts re-join at start-up (ha.md 4.8)
    x = xapid.session().xenapi
    wait_for(lambda: heartbeat_pid(xapid, master_uuid), what="master heartbeat back")
    x.pool.disable_ha()


def test_enable_ha_unknown_sr(api: Any) -> None:
    assert failure(api.pool.enable_ha, ["OpaqueRef:nope"], {}) == ["HANDLE_INVALID", "SR", "OpaqueRef:nope"]


