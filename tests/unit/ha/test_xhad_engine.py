"""The reference stacks (xhad and melio) end to end, through ClusterStackRunner, with real processes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from tests.unit.ha.support import code
from xapid.errors import ApiError
from xapid.ha import conf, liveset
from xapid.ha.scripts import ClusterStackRunner, ScriptError

if TYPE_CHECKING:
    from conftest import Cluster, EnginePool

MakePool = Callable[..., "EnginePool"]
REPO_STACKS = Path(__file__).resolve().parents[3] / "scripts" / "cluster-stack"
SCRIPT_NAMES = (
    "ha_start_daemon",
    "ha_stop_daemon",
    "ha_query_liveset",
    "ha_propose_master",
    "ha_set_pool_state",
    "ha_disarm_fencing",
    "ha_set_excluded",
)



def start_all(pool: EnginePool, hosts: list[str]) -> list[int]:
    with ThreadPoolExecutor(len(hosts)) as executor:
        return list(executor.map(lambda host: code(pool, host, "ha_start_daemon"), hosts))


def live(pool: EnginePool, viewer: str) -> dict[str, bool]:
    result = pool.runner.query_liveset(pool.stack, viewer, pool.conf(viewer))
    return {host: status.liveness for host, status in result.hosts.items()}


def enabled_pool(make_pool: MakePool, stack: str = "xhad", hosts: int = 3) -> EnginePool:
    pool = make_pool(stack, hosts)
    assert code(pool, pool.hosts[0], "ha_set_pool_state", "init") == 0
    assert start_all(pool, pool.hosts) == [0] * hosts
    return pool


def load_engine() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "xhad_engine_under_test", REPO_STACKS / "xhad" / "xhad_engine.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stack_layout() -> None:
    for stack in ("xhad", "melio"):
        for name in SCRIPT_NAMES:
            path = REPO_STACKS / stack / name
            assert path.is_file() and not path.is_symlink()
            assert path.stat().st_mode & 0o777 == 0o755
            text = path.read_text()
            # xhad's are POSIX shell (a run handed to the fork server starts no interpreter); melio's
            # start Python with -S: no site import, the engine needs only the standard library.
            assert text.startswith("#!/bin/sh\n" if stack == "xhad" else "#!/usr/bin/env -S python3 -S\n")
            assert len(text.splitlines()) < 25  # a shim, not a copy of the engine
    assert (REPO_STACKS / "melio" / "ha_supported_srs").read_text() == "melio\n"
    assert not (REPO_STACKS / "melio" / "xhad_engine.py").exists()
    runner = ClusterStackRunner(REPO_STACKS)
    assert runner.supported_srs("melio") == ["melio"]
    assert runner.supported_srs("xhad") is None


def test_xhad_full_flow(make_pool: MakePool, wait_until: Callable[..., bool]) -> None:
    engine = load_engine()
    pool = make_pool("xhad", 3)
    h1, h2, h3 = pool.hosts
    assert code(pool, h1, "ha_set_pool_state", "init") == 0
    assert pool.global_block() == {"pool_state": "init", "generation": pool.generation, "master": None}
    assert pool.statefile.stat().st_size == 266240

    assert start_all(pool, pool.hosts) == [0, 0, 0]
    assert pool.global_block()["pool_state"] == "active"
    for index, host in enumerate(pool.hosts):  # slot N at byte 4096 * (N + 1) belongs to the N-th conf host
        slot = pool.slot(host)
        assert slot is not None and slot["host"] == host and slot["pid"] == pool.pid(host)
        assert slot["armed"] is True and slot["excluded"] is False and slot["fencing"] is False
        assert slot["state"] == "online" and slot["sf"] is True and index in engine.index_set(slot["hears"], 3)
    # The slots carry the hosts each heartbeat hears on the network (all three, once heard), as the
    # hex bit mask "7".
    assert wait_until(lambda: all(pool.slot(host)["hears"] == "7" for host in pool.hosts), 5.0)

    result = pool.runner.query_liveset("xhad", h1, pool.conf(h1))
    assert (result.status, result.local_host) == ("Online", h1)
    assert list(result.hosts) == pool.hosts
    assert all(s.liveness and s.statefile_access and not s.excluded for s in result.hosts.values())
    assert result.raw is not None and sorted(result.raw) == sorted(pool.hosts)
    assert all(sorted(raw.heartbeat_active_list_on_heartbeat) == sorted(pool.hosts) for raw in result.raw.values())
    assert all(0 <= raw.time_since_last_heartbeat < 3000 for raw in result.raw.values())
    assert all(0 <= raw.time_since_last_update_on_statefile < 3000 for raw in result.raw.values())
    assert result.warnings == dict.fromkeys(liveset.WARNINGS, False)

    assert pool.runner.propose_master("xhad", h1, pool.conf(h1)) is True
    assert pool.runner.propose_master("xhad", h2, pool.conf(h2)) is False
    assert pool.runner.propose_master("xhad", h1, pool.conf(h1)) is True
    masters = pool.runner.query_liveset("xhad", h2, pool.conf(h2)).hosts
    assert [host for host, status in masters.items() if status.master] == [h1]

    # A clean stop leaves every liveset at once (the stopped daemon says so); a crash takes
    # the watchdog timeout (test_xhad_fencing.py).
    assert code(pool, h3, "ha_stop_daemon") == 0
    result = pool.runner.query_liveset("xhad", h1, pool.conf(h1))
    assert {h: s.liveness for h, s in result.hosts.items()} == {h1: True, h2: True, h3: False}
    assert result.hosts[h3].statefile_access is False
    assert result.raw is not None and result.raw[h3].heartbeat_active_list_on_heartbeat == []
    assert sorted(result.raw[h1].heartbeat_active_list_on_heartbeat) == sorted([h1, h2])
    assert wait_until(lambda: live(pool, h2) == {h1: True, h2: True, h3: False}, 3.0)

    assert code(pool, h3, "ha_start_daemon") == 0
    assert live(pool, h3) == {h1: True, h2: True, h3: True}
    assert wait_until(lambda: live(pool, h1) == {h1: True, h2: True, h3: True}, 3.0)
    assert code(pool, h3, "ha_start_daemon") == 15

    assert code(pool, h1, "ha_set_pool_state", "invalid") == 0
    assert pool.global_block()["pool_state"] == "invalid"
    assert code(pool, h1, "ha_query_liveset") == 14
    assert wait_until(lambda: not pool.running_heartbeats(), 5.0)
    assert [pool.pid(host) for host in pool.hosts] == [None, None, None]
    assert code(pool, h1, "ha_query_liveset") == 14
    assert code(pool, h2, "ha_stop_daemon") == 0
    assert code(pool, h2, "ha_start_daemon") == 11
    assert not pool.running_heartbeats()


def test_master_lock_moves_only_once_its_holder_is_dropped(
    make_cluster: Callable[..., Cluster], wait_until: Callable[..., bool]
) -> None:
    cluster = make_cluster(2)
    cluster.enable()
    h1, h2 = cluster.hosts
    assert cluster.run(h1, "ha_propose_master").stdout == "TRUE\n"
    cluster.signal(h1, signal.SIGKILL)
    # Until h1 is certainly fenced it stays live in h2's liveset, and keeps the lock.
    assert cluster.run(h2, "ha_propose_master").stdout == "FALSE\n"
    assert wait_until(lambda: not cluster.live(h2)[h1], 10.0, 0.2)
    assert cluster.run(h2, "ha_propose_master").stdout == "TRUE\n"
    hosts = cluster.query(h2).hosts
    assert (hosts[h1].master, hosts[h2].master) == (False, True)


def test_melio_basic_flow(make_pool: MakePool, wait_until: Callable[..., bool]) -> None:
    pool = make_pool("melio", 2)
    h1, h2 = pool.hosts
    assert code(pool, h1, "ha_set_pool_state", "init") == 0
    assert start_all(pool, pool.hosts) == [0, 0]
    assert live(pool, h2) == {h1: True, h2: True}
    assert pool.runner.propose_master("melio", h2, pool.conf(h2)) is True
    assert pool.runner.propose_master("melio", h1, pool.conf(h1)) is False
    assert code(pool, h1, "ha_stop_daemon") == 0
    assert live(pool, h2) == {h1: False, h2: True}
    assert code(pool, h1, "ha_query_liveset") == 14
    assert code(pool, h1, "ha_set_pool_state", "invalid") == 0
    assert wait_until(lambda: not pool.running_heartbeats(), 5.0)


def test_stop_daemon_stops_and_cleans_up(make_pool: MakePool) -> None:
    pool = enabled_pool(make_pool, hosts=2)
    h1, h2 = pool.hosts
    pid = pool.pid(h1)
    assert pid in pool.running_heartbeats()
    assert code(pool, h1, "ha_stop_daemon") == 0
    assert pid not in pool.running_heartbeats()
    assert pool.pid(h1) is None
    assert pool.slot(h1)["pid"] is None
    assert code(pool, h1, "ha_query_liveset") == 14
    assert code(pool, h1, "ha_propose_master") == 14
    assert code(pool, h1, "ha_disarm_fencing") == 14
    assert code(pool, h1, "ha_stop_daemon") == 0
    assert live(pool, h2) == {h1: False, h2: True}


def test_excluded_host_is_not_live_until_it_rejoins(make_pool: MakePool, wait_until: Callable[..., bool]) -> None:
    pool = enabled_pool(make_pool, hosts=2)
    h1, h2 = pool.hosts
    assert code(pool, h2, "ha_disarm_fencing") == 0
    assert pool.slot(h2)["armed"] is False
    assert code(pool, h2, "ha_stop_daemon") == 0
    assert code(pool, h2, "ha_set_excluded") == 0
    assert pool.slot(h2)["excluded"] is True
    hosts = pool.runner.query_liveset("xhad", h1, pool.conf(h1)).hosts
    assert (hosts[h2].liveness, hosts[h2].excluded) == (False, True)

    assert code(pool, h2, "ha_start_daemon") == 0
    assert pool.slot(h2)["excluded"] is False and pool.slot(h2)["armed"] is True
    assert wait_until(lambda: live(pool, h1) == {h1: True, h2: True}, 3.0)

    assert code(pool, h2, "ha_set_excluded") == 0  # while running: no longer live
    assert code(pool, h2, "ha_propose_master") == 17
    assert live(pool, h1) == {h1: True, h2: False}
    assert wait_until(lambda: live(pool, h2) == {h1: True, h2: False}, 5.0)


def test_heartbeat_exits_when_its_host_folder_vanishes(
    make_pool: MakePool, wait_until: Callable[..., bool]
) -> None:
    pool = enabled_pool(make_pool, hosts=2)
    for host in pool.hosts:
        shutil.rmtree(pool.hostdir(host))
    assert wait_until(lambda: not pool.running_heartbeats(), 5.0)  # one HeartbeatInterval (2 s)


@pytest.mark.parametrize(
    ("damage", "script", "expected"),
    [
        ("no conf", "ha_start_daemon", 6),
        ("bad conf", "ha_start_daemon", 7),
        ("foreign host", "ha_start_daemon", 16),
        ("no statefile", "ha_start_daemon", 8),
        ("short statefile", "ha_set_excluded", 8),
        ("uninitialised", "ha_start_daemon", 9),
        ("corrupt global", "ha_start_daemon", 9),
        ("corrupt slot", "ha_set_excluded", 9),
        ("new generation", "ha_start_daemon", 10),
        ("missing argument", "ha_set_pool_state", 1),
        ("bad argument", "ha_set_pool_state", 1),
        ("extra argument", "ha_query_liveset", 1),
    ],
)
def test_failure_exit_codes(make_pool: MakePool, damage: str, script: str, expected: int) -> None:
    pool = make_pool("xhad", 2)
    h1, h2 = pool.hosts
    host, args, conf_path = h1, [], pool.conf(h1)
    if damage != "uninitialised":
        assert code(pool, h1, "ha_set_pool_state", "init") == 0
    if damage == "no conf":
        pool.conf(h1).unlink()
    elif damage == "bad conf":
        pool.conf(h1).write_text("<xhad-config><common-config>")
    elif damage == "foreign host":
        host = h2
    elif damage == "no statefile":
        pool.statefile.unlink()
    elif damage == "short statefile":
        os.truncate(pool.statefile, 4096)
    elif damage in ("corrupt global", "corrupt slot"):
        with pool.statefile.open("r+b") as handle:
            handle.seek(0 if damage == "corrupt global" else 4096)
            handle.write(b"{not json")
    elif damage == "new generation":
        pool.write_confs(generation="another-generation")
    elif damage == "bad argument":
        args = ["enable"]
    elif damage == "extra argument":
        args = ["now"]
    if script == "ha_set_pool_state" and damage == "missing argument":
        args = []
    with pytest.raises(ScriptError) as caught:
        pool.runner.run("xhad", script, host, conf_path, args)
    assert caught.value.exit_code == expected
    assert not pool.running_heartbeats()


def test_init_refuses_while_the_daemon_runs(make_pool: MakePool) -> None:
    pool = enabled_pool(make_pool, hosts=1)
    assert code(pool, pool.hosts[0], "ha_set_pool_state", "init") == 15


def test_fist_points(make_pool: MakePool) -> None:
    pool = make_pool("xhad", 1)
    (host,) = pool.hosts
    fist = pool.hostdir(host) / "fist"
    fist.mkdir()
    (fist / "ha_start_daemon").write_text("exit 12\n")
    assert code(pool, host, "ha_set_pool_state", "init") == 0
    assert code(pool, host, "ha_start_daemon") == 12
    assert not pool.running_heartbeats()

    (fist / "ha_query_liveset").write_text("garbage\n")
    error = pytest.raises(ApiError, pool.runner.query_liveset, "xhad", host, pool.conf(host)).value
    assert error.code == "INTERNAL_ERROR" and not isinstance(error, ScriptError)

    (fist / "ha_set_excluded").write_text("\nsleep 0.2\nexit 3\n")
    started = time.monotonic()
    assert code(pool, host, "ha_set_excluded") == 3
    assert time.monotonic() - started >= 0.2

    (fist / "ha_disarm_fencing").write_text("sleep 30\n")
    started = time.monotonic()
    with pytest.raises(ApiError) as caught:
        pool.runner.run("xhad", "ha_disarm_fencing", host, pool.conf(host), timeout=0.5)
    assert "timed out" in caught.value.params[0] and time.monotonic() - started < 5

    (fist / "ha_stop_daemon").write_text("explode\n")
    assert code(pool, host, "ha_stop_daemon") == 1

    (fist / "ha_start_daemon").unlink()
    assert code(pool, host, "ha_start_daemon") == 0


def test_shim_without_engine_exits_127(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "lonely").mkdir(parents=True)
    shutil.copy2(REPO_STACKS / "xhad" / "ha_query_liveset", root / "lonely" / "ha_query_liveset")
    with pytest.raises(ScriptError) as caught:
        ClusterStackRunner(root).run("lonely", "ha_query_liveset", "h", tmp_path / "xhad.conf")
    assert caught.value.exit_code == 127


def test_unexpected_exception_is_exit_127(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = load_engine()

    def broken(path: str) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "read_conf", broken)
    monkeypatch.setenv("XHAD_CONF", str(tmp_path / "xhad.conf"))
    monkeypatch.delenv("XAPI_HOST_UUID", raising=False)
    assert engine.main("ha_query_liveset", []) == 127
    assert "RuntimeError: boom" in capsys.readouterr().err
    assert engine.main("ha_no_such_script", []) == 1
    monkeypatch.delenv("XHAD_CONF")
    assert engine.main("ha_query_liveset", []) == 6


def test_engine_conf_reader_agrees_with_xapid(tmp_path: Path) -> None:
    engine = load_engine()
    hosts = [("h1", "10.0.0.1"), ("h&2", "10.0.0.2")]
    params = {
        "XapiHealthCheckInterval": 60,
        "XapiHealthCheckTimeout": 120,
        "XapiRestartAttempts": 1,
        "XapiRestartTimeout": 300,
    }
    text = conf.render("gen", hosts, 30, "h&2", "xenbr0", "eth0", "/sf", params)
    path = tmp_path / "xhad.conf"
    conf.write(path, text)
    theirs = engine.read_conf(str(path))
    ours = conf.parse(text)
    assert (theirs.generation, theirs.hosts, theirs.local, theirs.statefile, theirs.parameters) == (
        ours.generation,
        [uuid for uuid, _ in ours.hosts],
        ours.local_host_uuid,
        ours.statefile,
        ours.parameters,
    )
    assert (theirs.addresses, theirs.udp_port) == ([address for _, address in ours.hosts], ours.udp_port)
    # T=30: HeartbeatInterval 3, StateFileInterval 2: fence after 2 * 3 + 1 s of failing rules;
    # a silent peer is certainly fenced after HeartbeatWatchdogTimeout + HeartbeatInterval.
    assert (theirs.statefile_interval, theirs.watchdog_timeout, theirs.settle, theirs.silence_limit) == (2, 30, 7, 33)
    assert (theirs.index, theirs.heartbeat_interval, theirs.heartbeat_timeout, theirs.join_timeout) == (
        1,
        3,
        30,
        90,
    )


@pytest.mark.parametrize("forkserver", [False, True], ids=["executed", "forked"])
def test_start_daemon_returns_as_soon_as_the_heartbeat_is_online(make_pool: MakePool, forkserver: bool) -> None:
    """The heartbeat tells ha_start_daemon "online" on a pipe (xhad_engine.py spawn_heartbeat): the
    script returns right after the join instead of at its next look at the view (START_WAIT)."""
    pool = make_pool("xhad", 1, forkserver=forkserver)
    host = pool.hosts[0]
    assert code(pool, host, "ha_set_pool_state", "init") == 0
    assert code(pool, host, "ha_start_daemon") == 0
    returned = time.time()
    lines = (pool.conf(host).parent / "xhad.log").read_text().splitlines()
    formed = [line for line in lines if "formed the liveset" in line]
    assert formed, lines
    stamp = formed[0].split(" ", 1)[0]
    online = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + int(stamp[20:23]) / 1000
    engine = load_engine()
    assert returned - online < engine.START_WAIT / 2
    # The word may find ha_start_daemon gone (it also looks at the view): the heartbeat ignores
    # SIGPIPE, or a late word would kill it (a fork-server worker resets SIGPIPE to the default).
    pid = pool.pid(host)
    assert pid is not None
    ignored = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1))
