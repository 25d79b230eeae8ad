"""Livesets a stack should never print, fed to the HA monitor through a stack whose
``ha_query_liveset`` prints a scripted file (otherwise it is xhad).

* a liveset that drops the master (or any host) is ignored with a log line: nobody flips dead;
* one that lists unknown hosts is applied for the known ones, the unknown ones are logged;
* one that flips between valid and invalid never stops the monitor: the valid ones keep
  being applied and the daemon keeps serving.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHIPPED_STACKS, Xapid, kill_heartbeats, write_conf
from tests.integration.ha.conftest import SCRIPTS, running_heartbeats, wait_for
from tests.integration.hardening.conftest import clean_log, daemon_alive

SCRIPTED = """#!/bin/sh
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(basename "$0")" = ha_query_liveset ] && [ -f "$here/liveset.xml" ]; then
    if [ -f "$here/flip" ]; then
        n=$(cat "$here/count" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$here/count"
        if [ $((n % 2)) -eq 1 ]; then echo '<ha_liveset_info><status>Bogus</status>'; exit 0; fi
    fi
    cat "$here/liveset.xml"
    exit 0
fi
exec "$here/../xhad/$(basename "$0")" "$@"
"""


def liveset(local: str, hosts: dict[str, bool], master: str) -> str:
    entries = "".join(
        f"<host><HostID>{h}</HostID><liveness>{'TRUE' if live else 'FALSE'}</liveness>"
        f"<master>{'TRUE' if h == master else 'FALSE'}</master>"
        f"<statefile_access>{'TRUE' if live else 'FALSE'}</statefile_access>"
        "<statefile_corrupted>FALSE</statefile_corrupted><excluded>FALSE</excluded></host>"
        for h, live in hosts.items()
    )
    return (f'<?xml version="1.0" encoding="UTF-8"?><ha_liveset_info version="1.0"><status>Online</status>'
            f"<localhost><HostID>{local}</HostID></localhost>{entries}</ha_liveset_info>\n")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("liveset") / "cluster-stack"
    shutil.copytree(SHIPPED_STACKS, root, ignore=shutil.ignore_patterns("__pycache__"))
    d = root / "scripted"
    d.mkdir()
    for script in SCRIPTS:
        (d / script).write_text(SCRIPTED)
        (d / script).chmod(0o755)
    return d


@pytest.fixture(scope="module")
def daemon(stack: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xapid]:
    tmp = tmp_path_factory.mktemp("liveset-state")
    d = Xapid(tmp / "state", write_conf(tmp / "state.conf", stack.parent), ["--hosts", "3"])
    d.start()
    s = d.session()
    s.xenapi.pool.enable_ha([], {"timeout": "10"}, "scripted")
    s.xenapi.session.logout()
    yield d
    for name in ("liveset.xml", "flip", "count"):
        (stack / name).unlink(missing_ok=True)
    try:
        s = d.session()
        s.xenapi.pool.disable_ha()
        assert running_heartbeats(d) == []
    finally:
        d.stop()
        kill_heartbeats(d.state_dir)


@pytest.fixture
def x(daemon: Xapid) -> Iterator[Any]:
    s = daemon.session()
    yield s.xenapi
    s.xenapi.session.logout()


def lives(x: Any) -> dict[str, bool]:
    return {x.host.get_uuid(h): bool(x.host_metrics.get_live(x.host.get_metrics(h))) for h in x.host.get_all()}


def uuids(x: Any) -> tuple[str, list[str]]:
    master = x.host.get_uuid(x.pool.get_master(x.pool.get_all()[0]))
    return master, [x.host.get_uuid(h) for h in x.host.get_all()]


def log_count(daemon: Xapid, text: str) -> int:
    return daemon.log().count(text)


def write(stack: Path, text: str) -> None:
    tmp = stack / "liveset.tmp"
    tmp.write_text(text)
    tmp.replace(stack / "liveset.xml")


def test_a_liveset_without_the_master_is_ignored(daemon: Xapid, stack: Path, x: Any) -> None:
    master, hosts = uuids(x)
    others = [h for h in hosts if h != master]
    assert all(lives(x).values())
    # If this liveset were applied, others[1] would turn dead.
    marker = "liveset does not list every host; ignored"
    seen = log_count(daemon, marker)
    write(stack, liveset(others[0], {others[0]: True, others[1]: False}, others[0]))
    wait_for(lambda: log_count(daemon, marker) >= seen + 4, timeout=30, what="several ignored livesets")
    assert all(lives(x).values()), lives(x)
    assert daemon_alive(daemon)


def test_a_liveset_with_unknown_hosts_is_applied_for_the_known_ones(daemon: Xapid, stack: Path, x: Any) -> None:
    master, hosts = uuids(x)
    victim = hosts[2] if hosts[2] != master else hosts[1]
    strangers = {"bbbbbbbb-0000-4000-8000-000000000001": True, "bbbbbbbb-0000-4000-8000-000000000002": False}
    write(stack, liveset(master, {**{h: h != victim for h in hosts}, **strangers}, master))
    wait_for(lambda: lives(x)[victim] is False, timeout=30, what="the known dead host to be marked dead")
    assert all(live for h, live in lives(x).items() if h != victim)
    assert "liveset lists unknown hosts" in daemon.log()
    assert len(x.host.get_all()) == 3  # strangers never become hosts


def test_a_flapping_liveset_never_stops_the_monitor(daemon: Xapid, stack: Path, x: Any) -> None:
    master, hosts = uuids(x)
    a, b = [h for h in hosts if h != master]
    write(stack, liveset(master, {h: True for h in hosts}, master))
    (stack / "flip").write_text("")
    failures = "liveset query failed"
    seen = log_count(daemon, failures)
    wait_for(lambda: all(lives(x).values()), timeout=30, what="the valid liveset (all live) to be applied")
    wait_for(lambda: log_count(daemon, failures) >= seen + 3, timeout=30, what="invalid livesets to be logged")
    # Still applying the valid half: now b is dead, then alive again.
    write(stack, liveset(master, {master: True, a: True, b: False}, master))
    wait_for(lambda: lives(x)[b] is False, timeout=30, what="b marked dead between invalid livesets")
    write(stack, liveset(master, {h: True for h in hosts}, master))
    wait_for(lambda: lives(x)[b] is True, timeout=30, what="b alive again")
    assert daemon_alive(daemon)
    assert x.pool.get_ha_enabled(x.pool.get_all()[0]) is True
    clean_log(daemon)
    # Back to the real liveset: the real heartbeats say everybody is live.
    for name in ("liveset.xml", "flip", "count"):
        (stack / name).unlink(missing_ok=True)
    wait_for(lambda: all(lives(x).values()), timeout=30, what="the real liveset")
