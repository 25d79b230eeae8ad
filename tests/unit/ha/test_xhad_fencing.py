"""The shipped xhad emulation fences like xhad: real heartbeat processes for 2-4 fake hosts,
run WITHOUT xapid.  The test writes the confs, the statefile, the fabric file (hw-contract.md)
and binds each host's watchdog socket itself to see arm/disarm/fence messages.

Every scenario runs with a fast hand-written timing profile (the T=10 rules three times
faster); the ``T10`` variants use the timeouts xapid writes for T=10 and are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Cluster

MakeCluster = Callable[..., "Cluster"]
PROFILES = [pytest.param(None, id="fast"), pytest.param(10, id="T10", marks=pytest.mark.slow)]


def wait(predicate: Callable[[], object], limit: float, step: float = 0.1) -> float:
    """Seconds until ``predicate`` held; fails the test after ``limit`` seconds."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > limit:
            raise AssertionError(f"condition not met within {limit} s")
        time.sleep(step)
    return time.monotonic() - began


def view(cluster: Cluster, host: str) -> dict:
    """The daemon's published view (xhad.view, a NUL-padded JSON object) of ``host``."""
    for _ in range(5):
        try:
            return json.loads((cluster.hostdir(host) / "xhad.view").read_bytes().rstrip(b"\0"))
        except ValueError:
            time.sleep(0.01)  # caught mid-write
    raise AssertionError("unreadable view")


def arms(cluster: Cluster, host: str, since: float = 0.0) -> list[str]:
    return [m for m in cluster.watchdogs[host].since(since) if m.startswith("arm ")]


@pytest.mark.parametrize("base_t", PROFILES)
def test_crash_is_dropped_after_the_watchdog_timeout(make_cluster: MakeCluster, base_t: int | None) -> None:
    cluster = make_cluster(3, base_t)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    wd = cluster.timing["HeartbeatWatchdogTimeout"]
    # Online hosts arm their watchdog with HeartbeatWatchdogTimeout and re-arm every tick.
    began = time.monotonic()
    wait(lambda: len(arms(cluster, h0, began)) >= 2, 3 * cluster.timing["HeartbeatInterval"])
    assert set(arms(cluster, h0)) == {f"arm {wd}"}
    cluster.signal(h2, signal.SIGKILL)
    killed = time.monotonic()
    # A silent host stays live until it is certain to be fenced: watchdog timeout + one interval.
    time.sleep(cluster.silence_limit * 0.6)
    assert cluster.live_set(h0) == {h0, h1, h2}
    elapsed = wait(lambda: cluster.live_set(h0) == {h0, h1} and cluster.live_set(h1) == {h0, h1}, 10.0)
    elapsed += cluster.silence_limit * 0.6
    assert cluster.silence_limit - cluster.timing["HeartbeatInterval"] - 0.5 <= elapsed <= cluster.silence_limit + 2
    result = cluster.query(h0)
    assert result.hosts[h2].statefile_access is False and result.hosts[h0].statefile_access is True
    assert result.raw is not None and sorted(result.raw[h0].heartbeat_active_list_on_heartbeat) == sorted([h0, h1])
    assert all(not cluster.watchdogs[h].fences() for h in cluster.hosts)
    assert cluster.running(h0) and cluster.running(h1)
    assert time.monotonic() - killed < cluster.silence_limit + 5
    # The crashed host re-joins (what xapi's start-up does on a rebooted host).
    assert cluster.start([h2]) == [0]
    wait(lambda: cluster.live_set(h0) == set(cluster.hosts), 5.0)


@pytest.mark.parametrize("base_t", PROFILES)
def test_partition_one_two_fences_the_single_host(make_cluster: MakeCluster, base_t: int | None) -> None:
    cluster = make_cluster(3, base_t)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    # The larger side wins even though the single host has the lowest index.
    cluster.partition([h0], [h1, h2])
    limit = cluster.timing["HeartbeatTimeout"] + cluster.settle + 4
    wait(lambda: cluster.watchdogs[h0].fences(), limit)
    assert cluster.watchdogs[h0].fences() == ["fence not in the winning partition [1, 2] (rule 1)"]
    wait(lambda: not cluster.running(h0), 3.0)
    wait(lambda: cluster.live_set(h1) == {h1, h2} and cluster.live_set(h2) == {h1, h2}, 3.0)
    assert not cluster.watchdogs[h1].fences() and not cluster.watchdogs[h2].fences()
    assert cluster.run(h0, "ha_query_liveset").returncode == 14
    # After the heal, the fenced host re-joins.
    cluster.partition([h0, h1, h2])
    assert cluster.start([h0]) == [0]
    wait(lambda: cluster.live_set(h1) == set(cluster.hosts), 5.0)


@pytest.mark.parametrize("base_t", PROFILES)
def test_partition_two_two_lowest_index_side_survives(make_cluster: MakeCluster, base_t: int | None) -> None:
    cluster = make_cluster(4, base_t)
    cluster.enable()
    h0, h1, h2, h3 = cluster.hosts
    cluster.partition([h1, h2], [h3, h0])
    limit = cluster.timing["HeartbeatTimeout"] + cluster.settle + 4
    wait(lambda: cluster.watchdogs[h1].fences() and cluster.watchdogs[h2].fences(), limit)
    wait(lambda: cluster.live_set(h0) == {h0, h3} and cluster.live_set(h3) == {h0, h3}, 3.0)
    assert not cluster.watchdogs[h0].fences() and not cluster.watchdogs[h3].fences()
    assert cluster.watchdogs[h1].fences() == ["fence not in the winning partition [0, 3] (rule 1)"]
    assert cluster.running(h0) and cluster.running(h3)


@pytest.mark.slow
def test_partition_healed_before_anyone_fences(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    cluster.partition([h0], [h1, h2])
    # Healed within HeartbeatTimeout: nobody noticed, nobody fences.
    time.sleep(cluster.timing["HeartbeatTimeout"] - 1.5)
    cluster.partition([h0, h1, h2])
    time.sleep(cluster.settle + 2)
    assert all(not cluster.watchdogs[h].fences() for h in cluster.hosts)
    assert all(cluster.live_set(h) == set(cluster.hosts) for h in cluster.hosts)


@pytest.mark.parametrize("base_t", PROFILES)
def test_statefile_blocked_for_one_host_fences_it(make_cluster: MakeCluster, base_t: int | None) -> None:
    cluster = make_cluster(3, base_t)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    cluster.block_statefile([h1])
    wait(lambda: cluster.watchdogs[h1].fences(), cluster.timing["StateFileInterval"] + cluster.settle + 3)
    assert cluster.watchdogs[h1].fences() == ["fence statefile lost and survival rule 2 not met"]
    wait(lambda: cluster.live_set(h0) == {h0, h2} and cluster.live_set(h2) == {h0, h2}, 3.0)
    result = cluster.query(h0)
    assert [s.statefile_access for s in result.hosts.values()] == [True, False, True]
    assert result.warnings is not None and not result.warnings["statefile_lost"]
    assert not cluster.watchdogs[h0].fences() and not cluster.watchdogs[h2].fences()
    # The blocked host cannot even start again (ha_start_daemon: 8).
    assert cluster.code(h1, "ha_start_daemon") == 8


@pytest.mark.parametrize("base_t", PROFILES)
def test_statefile_lost_by_all_hosts_survive_by_rule_2(make_cluster: MakeCluster, base_t: int | None) -> None:
    cluster = make_cluster(3, base_t)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    assert cluster.run(h1, "ha_propose_master").stdout == "TRUE\n"
    cluster.block_statefile(cluster.hosts)
    began = time.monotonic()
    time.sleep(cluster.timing["StateFileInterval"] + cluster.settle + 2)
    assert all(not cluster.watchdogs[h].fences() for h in cluster.hosts)
    for viewer in cluster.hosts:
        result = cluster.query(viewer)
        assert {h: (s.liveness, s.statefile_access) for h, s in result.hosts.items()} == dict.fromkeys(
            cluster.hosts, (True, False)
        )
        assert result.warnings is not None and result.warnings["statefile_lost"] is True
        assert [h for h, s in result.hosts.items() if s.master] == [h1]  # the last holder read
        assert arms(cluster, viewer, began)  # still petting


@pytest.mark.slow
def test_rule_2_needs_every_non_excluded_host(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    cluster.block_statefile(cluster.hosts)
    wait(lambda: all(view(cluster, h)["rule"] == 2 for h in cluster.hosts), 5.0)
    # A host that stops without being excluded (it cannot reach the statefile to set the
    # flag) breaks rule 2 for the others: they fence, as xhad.
    assert cluster.code(h1, "ha_disarm_fencing") == 0
    assert cluster.code(h1, "ha_stop_daemon") == 0
    assert cluster.code(h1, "ha_set_excluded") == 8
    wait(lambda: cluster.watchdogs[h0].fences() and cluster.watchdogs[h2].fences(), cluster.settle + 2)
    assert cluster.watchdogs[h0].fences() == ["fence statefile lost and survival rule 2 not met"]


def test_rule_2_master_lock_and_recovery(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    cluster.block_statefile(cluster.hosts)
    wait(lambda: all(cluster.query(h).warnings["statefile_lost"] for h in cluster.hosts), 5.0)
    wait(lambda: all(view(cluster, h)["rule"] == 2 for h in cluster.hosts), 5.0)
    assert cluster.run(h2, "ha_propose_master").stdout == "FALSE\n"
    assert cluster.run(h0, "ha_propose_master").stdout == "TRUE\n"
    wait(lambda: [h for h, s in cluster.query(h2).hosts.items() if s.master] == [h0], 3.0)
    # The statefile comes back: access returns, and the claim becomes the lock in the statefile.
    cluster.block_statefile([])
    wait(lambda: all(s.statefile_access for s in cluster.query(h1).hosts.values()), 5.0)
    assert cluster.query(h1).warnings["statefile_lost"] is False
    with cluster.statefile.open("rb") as handle:
        assert json.loads(handle.read(4096).rstrip(b"\0"))["master"] == h0
    assert cluster.run(h1, "ha_propose_master").stdout == "FALSE\n"
    assert all(not cluster.watchdogs[h].fences() for h in cluster.hosts)


def test_statefile_moved_away_is_statefile_loss(make_cluster: MakeCluster) -> None:
    # ha-gaps.md bug 3: losing the statefile must not kill every heartbeat.
    cluster = make_cluster(3)
    cluster.enable()
    aside = cluster.statefile.with_name("aside")
    os.replace(cluster.statefile, aside)
    time.sleep(cluster.timing["StateFileInterval"] + cluster.settle + 1)
    assert all(cluster.running(h) and not cluster.watchdogs[h].fences() for h in cluster.hosts)
    assert all(not s.statefile_access for s in cluster.query(cluster.hosts[2]).hosts.values())
    os.replace(aside, cluster.statefile)
    wait(lambda: all(s.statefile_access for s in cluster.query(cluster.hosts[2]).hosts.values()), 5.0)


@pytest.mark.parametrize("base_t", PROFILES)
def test_hung_heartbeat_is_dropped_and_stops_petting(make_cluster: MakeCluster, base_t: int | None) -> None:
    cluster = make_cluster(3, base_t)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    cluster.signal(h2, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        both = {h0, h1}
        wait(lambda: cluster.live_set(h0) == both and cluster.live_set(h1) == both, cluster.silence_limit + 3)
        assert time.monotonic() - stopped >= cluster.silence_limit - cluster.timing["HeartbeatInterval"] - 0.5
        # xapid's watchdog would have fenced it: no pet reached it after the stop.
        assert arms(cluster, h2, stopped + 0.2) == []
    finally:
        cluster.signal(h2, signal.SIGCONT)
    # Woken after its watchdog timeout, it fences itself at once: the others dropped it.
    wait(lambda: cluster.watchdogs[h2].fences(), 3.0)
    assert "stalled" in cluster.watchdogs[h2].fences()[0]
    assert not cluster.watchdogs[h0].fences() and not cluster.watchdogs[h1].fences()


def test_disarm_stop_and_invalid_pool_state_disarm_the_watchdog(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    assert cluster.code(h2, "ha_disarm_fencing") == 0
    disarmed = time.monotonic()
    assert cluster.watchdogs[h2].received()[-1] == "disarm"
    assert cluster.code(h1, "ha_stop_daemon") == 0
    assert cluster.watchdogs[h1].received()[-1] == "disarm"
    assert cluster.live_set(h0) == {h0, h2}  # a clean stop leaves at once
    assert cluster.code(h0, "ha_set_pool_state", "invalid") == 0
    wait(lambda: not cluster.running(h0) and not cluster.running(h2), 2 * cluster.timing["StateFileInterval"] + 1)
    assert cluster.watchdogs[h0].received()[-1] == "disarm"
    assert arms(cluster, h2, disarmed) == []  # disarmed: never re-armed
    assert all(not cluster.watchdogs[h].fences() for h in cluster.hosts)


@pytest.mark.slow
def test_a_disarmed_host_does_not_fence(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    assert cluster.code(h2, "ha_disarm_fencing") == 0
    # Losing, it does not fence (xha self_fence acts only when armed) ...
    cluster.partition([h0, h1], [h2])
    time.sleep(cluster.timing["HeartbeatTimeout"] + cluster.settle + 1)
    assert not cluster.watchdogs[h2].fences() and cluster.running(h2)
    # ... so the others, who still see its slot, cannot be sure it is gone: it stays live.
    assert cluster.live_set(h0) == set(cluster.hosts)


def test_join_is_given_up_when_ha_start_daemon_is_killed(make_cluster: MakeCluster) -> None:
    # A caller's timeout kills ha_start_daemon: its heartbeat must not linger (holding the port).
    cluster = make_cluster(2)
    h0, _ = cluster.hosts
    assert cluster.code(h0, "ha_set_pool_state", "init") == 0
    starter = subprocess.Popen([str(cluster.stack_dir / "ha_start_daemon")], env=cluster.env(h0))
    try:
        wait(lambda: cluster.running(h0), 5.0)  # waiting for h1, which never starts
        time.sleep(0.5)
        assert cluster.running(h0)
    finally:
        starter.kill()
        starter.wait()
    wait(lambda: not cluster.running(h0), 3.0)
    assert "ha_start_daemon is gone" in cluster.log(h0)


@pytest.mark.slow
def test_join_refused_across_a_partition(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    assert cluster.code(h2, "ha_stop_daemon") == 0
    cluster.partition([h0, h1], [h2])
    began = time.monotonic()
    # It sees the Online hosts on the statefile but cannot hear them: 13 after BootJoinTimeout.
    assert cluster.code(h2, "ha_start_daemon") == 13
    assert time.monotonic() - began >= cluster.timing["BootJoinTimeout"] - 0.5
    assert cluster.watchdogs[h2].since(began) == []  # a joining host never arms (nor fences)
    assert cluster.live_set(h0) == {h0, h1}


def test_heartbeat_datagrams(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    cluster.enable()
    h0, h1, h2 = cluster.hosts
    assert cluster.code(h2, "ha_stop_daemon") == 0
    # The test takes h2's address and port: it receives what h0 and h1 send to h2.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((cluster.addresses[2], cluster.port))
    sock.settimeout(5.0)
    try:
        seen: dict[str, list[dict]] = {h0: [], h1: []}
        while min(len(v) for v in seen.values()) < 2:
            data, addr = sock.recvfrom(65536)
            message = json.loads(data)
            assert addr[0] == cluster.addresses[cluster.hosts.index(message["host"])]
            seen[message["host"]].append(message)
        for messages in seen.values():
            first, second = messages[:2]
            assert first["gen"] == cluster.generation and second["seq"] > first["seq"]
            assert second["state"] == "online" and second["sf"] is True and second["fencing"] is False
            # Sets of conf indices travel as hex bit masks: {0, 1} is "3".
            assert second["hears"] == "3" and second["live"] == "3" and second["excluded"] is False
        # Forged datagrams from "h2": foreign generation, malformed, another network group.
        forged = dict(seen[h0][-1], host=h2, hears=[0, 1, 2], state="starting", live=[], inc="forged")
        cluster.partition([h0, h1], [h2])
        time.sleep(0.3)
        forged["t"] = time.time()
        for bad in (dict(forged, gen="another"), dict(forged, hears="all"), dict(forged, seq=None), forged):
            sock.sendto(json.dumps(bad).encode(), (cluster.addresses[0], cluster.port))
        sock.sendto(b"\x00\x01 not json", (cluster.addresses[0], cluster.port))
        time.sleep(0.5)
        raw = cluster.query(h0).raw
        assert raw is not None and sorted(raw[h0].heartbeat_active_list_on_heartbeat) == sorted([h0, h1])
        # The same valid datagram within the group is taken: h2 is heard (but not live: starting).
        cluster.partition([h0, h1, h2])
        time.sleep(0.3)
        for _ in range(3):
            forged["t"] = time.time()
            sock.sendto(json.dumps(forged).encode(), (cluster.addresses[0], cluster.port))
            time.sleep(0.2)
        raw = cluster.query(h0).raw
        assert raw is not None and sorted(raw[h0].heartbeat_active_list_on_heartbeat) == sorted(cluster.hosts)
        assert cluster.live_set(h0) == {h0, h1}
    finally:
        sock.close()
