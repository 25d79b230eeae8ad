"""xapid and the xhad fork server: started at the first script run, stopped with the daemon, and
reclaimed after a SIGKILL of the daemon (it notices its parent is gone; the next start kills what a
recorded server left)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from tests.conftest import Xapid
from tests.integration.ha.conftest import heartbeat_pid, running_heartbeats, wait_for
from tests.unit.ha.support import servers_under


def test_the_daemon_stops_its_fork_server(xapid: Xapid, api: Any) -> None:
    assert servers_under(xapid.state_dir) == []  # none before the first script run
    api.pool.enable_ha([], {"timeout": "10"})
    assert len(servers_under(xapid.state_dir)) == 1
    assert len(running_heartbeats(xapid)) == 3
    api.pool.disable_ha()
    assert running_heartbeats(xapid) == []
    assert xapid.stop() == 0
    assert servers_under(xapid.state_dir) == []
    assert not list((xapid.state_dir / "run" / "forkservers").glob("*.server"))  # its path goes with it


def test_sigkill_of_the_daemon_reclaims_the_fork_server(xapid: Xapid, api: Any) -> None:
    api.pool.enable_ha([], {"timeout": "10"})
    [server] = servers_under(xapid.state_dir)
    hosts = [api.host.get_uuid(h) for h in api.host.get_all()]
    before = {u: heartbeat_pid(xapid, u) for u in hosts}
    xapid.kill()
    started = time.monotonic()
    wait_for(lambda: servers_under(xapid.state_dir) == [], timeout=5, what=f"fork server {server} to go")
    assert time.monotonic() - started < 5
    # The heartbeats outlive the daemon (and the server), as xhad's daemons outlive xapi.
    assert {u: heartbeat_pid(xapid, u) for u in hosts} == before
    xapid.start()
    x = xapid.session().xenapi
    pool = x.pool.get_all()[0]
    wait_for(lambda: all(x.host.get_enabled(h) for h in x.host.get_all()), timeout=30, what="start-ups done")
    assert x.pool.get_ha_enabled(pool) is True
    assert {u: heartbeat_pid(xapid, u) for u in hosts} == before  # adopted
    x.pool.disable_ha()
    assert running_heartbeats(xapid) == []
    assert xapid.stop() == 0
    assert servers_under(xapid.state_dir) == []


def test_a_server_killed_with_the_daemon_leaves_nothing_after_the_next_start(xapid: Xapid, api: Any) -> None:
    api.pool.enable_ha([], {"timeout": "10"})
    [server] = servers_under(xapid.state_dir)
    xapid.kill()
    os.kill(server, signal.SIGKILL)  # before it notices its parent is gone: no time to clean up
    wait_for(lambda: servers_under(xapid.state_dir) == [], timeout=5, what=f"fork server {server} to go")
    folder = xapid.state_dir / "run" / "forkservers" / "xhad.server"
    assert (folder / "requests").exists()
    xapid.start()
    x = xapid.session().xenapi
    wait_for(lambda: all(x.host.get_enabled(h) for h in x.host.get_all()), timeout=30, what="start-ups done")
    x.pool.disable_ha()
    assert xapid.stop() == 0
    assert not folder.exists() and servers_under(xapid.state_dir) == []
