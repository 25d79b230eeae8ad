"""The liveset monitor (ha.md 4.9) and HA across daemon restarts (ha.md 4.8)."""

from __future__ import annotations

from typing import Any

from tests.conftest import SHIPPED_STACKS, Xapid
from tests.integration.ha.conftest import (
    fist,
    heartbeat_pid,
    kill_heartbeat,
    run_script,
    running_heartbeats,
    wait_for,
)


def live(x: Any, host: str) -> bool:
    return bool(x.host_metrics.get_live(x.host.get_metrics(host)))


def test_dead_heartbeat_marks_host_dead_and_back(xapid: Xapid, api: Any) -> None:
    api.pool.enable_ha([], {"timeout": "10"})
    hosts = api.host.get_all()
    victim = hosts[1]
    victim_uuid = api.host.get_uuid(victim)
    wait_for(lambda: len(api.host.get_ha_network_peers(hosts[0])) == 3, what="peers to be known")
    kill_heartbeat(xapid, victim_uuid)
    wait_for(lambda: not live(api, victim), what="host marked dead")
    assert live(api, hosts[0]) and live(api, hosts[2])
    wait_for(lambda: victim_uuid not in api.host.get_ha_network_peers(hosts[0]), what="peers to drop the host")
    assert api.host.get_ha_statefiles(victim) == []
    # The host comes back when its heartbeat is started again (what xapi does at its boot).
    assert run_script(SHIPPED_STACKS, "xhad", "ha_start_daemon", xapid, victim_uuid) == 0
    wait_for(lambda: live(api, victim), what="host back alive")
    wait_for(lambda: victim_uuid in api.host.get_ha_network_peers(hosts[0]), what="peers to include it again")
    assert api.host.get_ha_statefiles(victim) == api.pool.get_ha_statefiles(api.pool.get_all()[0])
    api.pool.disable_ha()
    assert running_heartbeats(xapid) == []


def test_garbage_liveset_never_crashes_the_daemon(xapid: Xapid, api: Any) -> None:
    api.pool.enable_ha([], {"timeout": "10"})
    hosts = api.host.get_all()
    master_uuid = api.host.get_uuid(api.pool.get_master(api.pool.get_all()[0]))
    point = fist(xapid, master_uuid, "ha_query_liveset", "garbage")
    wait_for(lambda: "could not" in xapid.log() or "liveset query failed" in xapid.log(), what="a logged failure")
    assert len(api.host.get_all()) == 3  # still serving
    point.unlink()
    kill_heartbeat(xapid, api.host.get_uuid(hosts[2]))
    wait_for(lambda: not live(api, hosts[2]), what="monitor to resume and see the dead host")
    assert xapid.proc is not None and xapid.proc.poll() is None
    assert "Traceback" not in xapid.log()


def test_restart_with_ha_enabled_rearms_every_host(xapid: Xapid, api: Any) -> None:
    api.pool.enable_ha([], {"timeout": "10"})
    pool = api.pool.get_all()[0]
    uuids = [api.host.get_uuid(h) for h in api.host.get_all()]
    xapid.restart()
    x = xapid.session().xenapi
    assert x.pool.get_ha_enabled(pool) is True
    wait_for(lambda: all(heartbeat_pid(xapid, u) for u in uuids), what="every heartbeat restarted")
    hosts = x.host.get_all()
    # A host enables itself at the end of its start-up (ha.md 4.8); before that it may still retry.
    wait_for(lambda: all(x.host.get_enabled(h) for h in hosts), what="every host's start-up done")
    kill_heartbeat(xapid, uuids[2])
    wait_for(lambda: not live(x, hosts[2]), what="monitor running after restart")
    x.pool.disable_ha()
    assert running_heartbeats(xapid) == []


def test_daemon_stop_leaves_no_heartbeat_process(xapid: Xapid, api: Any) -> None:
    api.pool.enable_ha([], {"timeout": "10"})
    assert len(running_heartbeats(xapid)) == 3
    xapid.stop()
    assert running_heartbeats(xapid) == []
