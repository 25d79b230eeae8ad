"""The emulated xhad's decisions as pure functions: partition winner, survival rules 1 and 2
(ha.md 4.9; xenserver/xha daemon/sm.c test_Survival_Rule, am_I_in_largest_partition), the
join of a starting host (sm.c test_Start_Criteria), the liveset update, and the formats the
engine reads from other hosts (statefile blocks, datagrams, the fabric file)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ENGINE_PATH = Path(__file__).resolve().parents[3] / "scripts" / "cluster-stack" / "xhad" / "xhad_engine.py"


def load_engine() -> ModuleType:
    spec = importlib.util.spec_from_file_location("xhad_engine_rules", ENGINE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


E = load_engine()


def report(
    hears: Iterable[int],
    sf: bool = True,
    state: str = "online",
    live: Iterable[int] = (),
    excluded: bool = False,
    fencing: bool = False,
    inc: str = "inc",
) -> object:
    return E.Report(inc, 1, 100.0, state, sf, frozenset(hears), frozenset(live), fencing, excluded)


class World:
    """Hosts 0..n-1 split into network groups; each host hears exactly its own group."""

    def __init__(
        self,
        groups: list[list[int]],
        no_sf: Iterable[int] = (),
        excluded: Iterable[int] = (),
        down: Iterable[int] = (),
        starting: Iterable[int] = (),
    ) -> None:
        self.n = sum(len(g) for g in groups) + len(list(down))
        self.group = {h: frozenset(g) for g in groups for h in g}
        self.no_sf = set(no_sf)
        self.excluded = set(excluded)
        self.down = set(down)
        self.starting = set(starting)

    def decide(self, me: int) -> object:
        """What host ``me`` decides: it knows the reports of the hosts it hears (datagrams) and,
        if it has the statefile, the slots of the hosts that can write it."""
        my_sf = me not in self.no_sf
        reports = {}
        sf_fresh = set()
        for i in range(self.n):
            if i == me or i in self.down:
                continue
            heard = i in self.group[me]
            on_sf = my_sf and i not in self.no_sf
            if not heard and not on_sf:
                continue
            state = "starting" if i in self.starting else "online"
            reports[i] = report(self.group[i], sf=i not in self.no_sf, state=state, excluded=i in self.excluded)
            if on_sf:
                sf_fresh.add(i)
        return E.decide(me, range(self.n), my_sf, self.group[me], reports, sf_fresh, self.excluded)


@pytest.mark.parametrize(
    ("groups", "winner"),
    [
        ([[0, 1, 2]], {0, 1, 2}),
        ([[0], [1, 2]], {1, 2}),
        ([[0, 1], [2]], {0, 1}),
        ([[0, 1], [2, 3]], {0, 1}),  # 2|2: the tie goes to the partition holding index 0
        ([[2, 3], [0, 1]], {0, 1}),
        ([[0, 3], [1, 2]], {0, 3}),
        ([[1, 2], [0, 3]], {0, 3}),
        ([[2, 3], [0], [1]], {2, 3}),  # 2|1|1: the largest wins whatever its indices
        ([[0, 1], [2], [3]], {0, 1}),
        ([[1], [0]], {0}),
        ([[3], [1], [2]], {1}),
        ([[0, 1, 2], [3, 4, 5, 6]], {3, 4, 5, 6}),
    ],
)
def test_winning_partition(groups: list[list[int]], winner: set[int]) -> None:
    hears = {h: frozenset(g) for g in groups for h in g}
    assert E.winning_partition(hears, hears) == winner


def test_winning_partition_needs_mutual_hearing_and_candidates() -> None:
    # 0 hears 1 but 1 does not hear 0: no partition holds both.
    assert E.winning_partition({0, 1}, {0: {0, 1}, 1: {1}}) == {0}
    # Only candidates (hosts that can write the statefile) count, whoever they hear.
    assert E.winning_partition({1, 2}, {0: {0, 1, 2}, 1: {0, 1, 2}, 2: {0, 1, 2}}) == {1, 2}
    assert E.winning_partition(set(), {}) == frozenset()


@pytest.mark.parametrize(
    ("name", "world", "survivors", "rule"),
    [
        ("all well", World([[0, 1, 2]]), {0, 1, 2}, 1),
        ("partition 1|2", World([[0], [1, 2]]), {1, 2}, 1),
        ("partition 2|1", World([[0, 1], [2]]), {0, 1}, 1),
        ("partition 2|2 lowest index wins", World([[0, 1], [2, 3]]), {0, 1}, 1),
        ("partition 2|2 other order", World([[2, 3], [0, 1]]), {0, 1}, 1),
        ("partition 2|1|1", World([[2, 3], [0], [1]]), {2, 3}, 1),
        ("partition 1|1|1", World([[2], [1], [0]]), {0}, 1),
        ("statefile lost by one host", World([[0, 1, 2]], no_sf=[1]), {0, 2}, 1),
        ("statefile lost by the lowest index", World([[0, 1, 2]], no_sf=[0]), {1, 2}, 1),
        ("statefile lost by all", World([[0, 1, 2]], no_sf=[0, 1, 2]), {0, 1, 2}, 2),
        ("statefile lost by all and a partition", World([[0], [1, 2]], no_sf=[0, 1, 2]), set(), 0),
        ("statefile lost by all and a host down", World([[0, 1]], no_sf=[0, 1], down=[2]), set(), 0),
        (
            "statefile lost by all, the down host excluded",
            World([[0, 1]], no_sf=[0, 1], down=[2], excluded=[2]),
            {0, 1},
            2,
        ),
        ("statefile lost by two of three", World([[0, 1, 2]], no_sf=[0, 1]), {2}, 1),
        ("partition 1|2, the single host without statefile", World([[0], [1, 2]], no_sf=[0]), {1, 2}, 1),
        ("partition 2|2, lowest side without statefile", World([[0, 1], [2, 3]], no_sf=[0, 1]), {2, 3}, 1),
        ("an excluded host does not count", World([[0, 1], [2, 3]], excluded=[1], down=[]), {2, 3}, 1),
        ("a joining host does not count", World([[0, 1], [2, 3]], starting=[1]), {2, 3}, 1),
        (
            "a joining host without statefile counts as up in rule 2",
            World([[0, 1, 2]], no_sf=[0, 1, 2], starting=[2]),
            {0, 1},
            2,
        ),
    ],
)
def test_survival_rules(name: str, world: World, survivors: set[int], rule: int) -> None:
    absent = world.down | world.excluded | world.starting
    deciders = [h for h in range(world.n) if h not in absent]
    decisions = {h: world.decide(h) for h in deciders}
    assert {h for h, d in decisions.items() if d.survive} == survivors, decisions
    for h in survivors:
        assert decisions[h].rule == rule
        assert h in decisions[h].core
    for d in decisions.values():
        if not d.survive:
            assert d.rule == 0 and d.core == frozenset() and d.reason


def test_rule1_core_is_the_partition_and_rule2_core_all_non_excluded() -> None:
    assert World([[0], [1, 2]]).decide(1).core == {1, 2}
    assert World([[0, 1, 2]], no_sf=[0, 1, 2]).decide(0).core == {0, 1, 2}
    assert World([[0, 1]], no_sf=[0, 1], down=[2], excluded=[2]).decide(1).core == {0, 1}


def test_rule2_needs_every_peer_to_report_no_statefile_and_to_hear_everyone() -> None:
    hosts = range(3)
    everyone = frozenset(hosts)
    assert E.rule2(0, False, hosts, set(), {0: everyone, 1: everyone, 2: everyone}, {1: False, 2: False}) == everyone
    assert E.rule2(0, True, hosts, set(), {0: everyone, 1: everyone, 2: everyone}, {1: False, 2: False}) is None
    assert E.rule2(0, False, hosts, set(), {0: everyone, 1: everyone, 2: everyone}, {1: False, 2: True}) is None
    assert E.rule2(0, False, hosts, set(), {0: everyone, 1: everyone, 2: {1, 2}}, {1: False, 2: False}) is None
    assert E.rule2(0, False, hosts, set(), {0: {0, 1}, 1: everyone}, {1: False}) is None
    assert E.rule2(0, False, hosts, {2}, {0: {0, 1}, 1: {0, 1}}, {1: False}) == {0, 1}


def test_rule1_needs_the_statefile() -> None:
    hears = {0: frozenset({0, 1}), 1: frozenset({0, 1})}
    assert E.rule1(0, True, {0, 1}, hears) == {0, 1}
    assert E.rule1(0, False, {0, 1}, hears) is None
    assert E.rule1(1, True, {0}, {0: frozenset({0}), 1: frozenset({1})}) is None


def test_next_liveset() -> None:
    survive = E.Decision(1, frozenset({0, 1, 3}))
    lose = E.Decision(0, frozenset(), "lost")
    # Members stay until certainly fenced; Online hosts of my partition join.
    assert E.next_liveset(0, {0, 1, 2}, survive, online={1, 2, 3}, gone=set()) == {0, 1, 2, 3}
    assert E.next_liveset(0, {0, 1, 2}, survive, online={1, 2, 3}, gone={2}) == {0, 1, 3}
    # A starting host of my partition is not live until it is Online.
    assert E.next_liveset(0, {0}, survive, online={1}, gone=set()) == {0, 1}
    # While losing, nobody is added; members still leave only when certainly gone.
    assert E.next_liveset(0, {0, 1}, lose, online={1, 3}, gone=set()) == {0, 1}
    assert E.next_liveset(0, {0, 1}, lose, online={1, 3}, gone={1}) == {0}
    # I am always in my own liveset (the rendering hides me when I am excluded).
    assert E.next_liveset(2, set(), lose, online=set(), gone=set()) == {2}


def up(me: int, others: dict[int, str], live: dict[int, set[int]] | None = None) -> tuple[dict, set, set]:
    """Reports, hears and fresh slots of hosts that are all mutually visible, with given states."""
    reports = {
        i: report({me, *others}, state=state, live=(live or {}).get(i, {i} if state == "online" else ()))
        for i, state in others.items()
    }
    return reports, {me, *others}, set(others)


def step(me: int, reports: dict, hears: set, fresh: set, **kw: object) -> tuple[str, int]:
    args = {"pool_init": False, "excluded": set(), "my_excluded": False, "timed_out": False, "hosts": None}
    args.update(kw)
    hosts = args.pop("hosts") or range(1 + max([me, *reports]))
    return E.join_step(
        me,
        hosts,
        args["pool_init"],
        reports,
        hears,
        fresh,
        args["excluded"],
        args["my_excluded"],
        args["timed_out"],
    )


def test_join_forms_when_everyone_is_up_at_enable() -> None:
    reports, hears, fresh = up(0, {1: "starting", 2: "starting"})
    assert step(0, reports, hears, fresh, pool_init=True) == (E.FORM, 0)
    # One host missing: wait, then fail with 12 (init needs every host).
    assert step(0, reports, hears - {2}, fresh, pool_init=True) == (E.JOIN_WAIT, 0)
    assert step(0, reports, hears - {2}, fresh, pool_init=True, timed_out=True) == ("exit", 12)
    # Up means mutual: a host that does not hear me is not up.
    reports[2] = report({1, 2}, state="starting")
    assert step(0, reports, hears, fresh, pool_init=True) == (E.JOIN_WAIT, 0)
    # ... and a fresh slot.
    reports, hears, fresh = up(0, {1: "starting", 2: "starting"})
    assert step(0, reports, hears, fresh - {1}, pool_init=True) == (E.JOIN_WAIT, 0)


def test_join_an_existing_liveset() -> None:
    reports, hears, fresh = up(2, {0: "online", 1: "online"})
    assert step(2, reports, hears, fresh) == (E.JOIN, 0)
    # An Online host still counting my previous incarnation live: wait until it drops it.
    reports, hears, fresh = up(2, {0: "online", 1: "online"}, live={0: {0, 1, 2}})
    assert step(2, reports, hears, fresh) == (E.JOIN_WAIT, 0)
    assert step(2, reports, hears, fresh, timed_out=True) == ("exit", 13)
    # An Online host I cannot hear (partition): 13 at the timeout.
    reports, hears, fresh = up(2, {0: "online", 1: "online"})
    assert step(2, reports, hears - {0}, fresh, timed_out=True) == ("exit", 13)
    # A fencing host is no liveset to join, and not up: forming waits for the timeout.
    reports, hears, fresh = up(2, {0: "online", 1: "starting"})
    reports[0] = report({0, 1, 2}, fencing=True, live={0})
    assert step(2, reports, hears, fresh) == (E.JOIN_WAIT, 0)
    assert step(2, reports, hears, fresh, timed_out=True) == (E.FORM, 0)


def test_form_after_a_total_restart() -> None:
    # Pool active, nobody Online: form once every non-excluded host is up.
    reports, hears, fresh = up(0, {1: "starting"})
    assert step(0, reports, hears, fresh, hosts=range(3), excluded={2}) == (E.FORM, 0)
    assert step(0, reports, hears, fresh, hosts=range(3)) == (E.JOIN_WAIT, 0)
    # At the timeout: the winning partition of the starting hosts forms ...
    assert step(0, reports, hears, fresh, hosts=range(3), timed_out=True) == (E.FORM, 0)
    # ... a host outside it does not (13), an excluded host never forms alone (18).
    reports, hears, fresh = up(2, {})
    reports.update({0: report({0, 1}, state="starting"), 1: report({0, 1}, state="starting")})
    fresh |= {0, 1}
    assert step(2, reports, hears, fresh, hosts=range(3), timed_out=True) == ("exit", 13)
    reports, hears, fresh = up(0, {})
    assert step(0, reports, hears, fresh, hosts=range(2), timed_out=True, my_excluded=True) == ("exit", 18)
    assert step(0, reports, hears, fresh, hosts=range(2), timed_out=True, my_excluded=False) == (E.FORM, 0)


def test_blocks_carry_a_checksum() -> None:
    block = {"host": "h", "heartbeat": 1.5, "hears": [0, 2], "excluded": False}
    data = E.encode_block(block)
    assert json.loads(data)["crc"] > 0
    assert E.decode_block(data.ljust(4096, b"\0")) == block
    assert E.decode_block(b"\0" * 4096) is None
    assert E.decode_block(json.dumps(block).encode()) == block  # written by hand: no crc
    other = E.encode_block({**block, "heartbeat": 2.5, "hears": [0, 1, 2]})
    torn = data[:28] + other[28:]  # the first half of a write of 1.5 -> 2.5
    assert b'"heartbeat":1.5' in torn
    with pytest.raises(ValueError):
        E.decode_block(torn)
    with pytest.raises(ValueError):
        E.decode_block(data.replace(b"1.5", b"9.5"))
    assert E.decode_block(E.encode_block({})) == {}


def test_reports_are_validated() -> None:
    good = {"inc": "a1", "seq": 3, "state": "online", "sf": True, "hears": [0, 1], "live": [0], "fencing": False}
    parsed = E.parse_report(good, 2, 12.5)
    assert parsed is not None and parsed.hears == {0, 1} and parsed.online and not parsed.gone
    for change in (
        {"hears": [0, 2]},
        {"hears": [True]},
        {"hears": "0 1"},
        {"seq": "3"},
        {"state": "dead"},
        {"sf": 1},
        {"inc": ""},
        {"fencing": "no"},
        {"live": [5]},
    ):
        assert E.parse_report({**good, **change}, 2, 12.5) is None, change
    assert E.parse_report(good, 2, None) is None
    assert E.parse_report({**good, "fencing": True}, 2, 1.0).gone
    assert E.parse_report({**good, "state": "stopped"}, 2, 1.0).gone
    assert not E.parse_report({**good, "excluded": True}, 2, 1.0).online


def test_index_sets_travel_as_hex_masks() -> None:
    """Reports carry sets of conf indices as lower-case hex bit masks; a list is still read."""
    assert E.index_mask(frozenset()) == "0"
    assert E.index_mask({0, 2}) == "5"
    assert E.index_mask(frozenset(range(64))) == "f" * 16
    for indices in (set(), {0}, {1, 5, 9}, set(range(64)), {63}):
        assert E.index_set(E.index_mask(indices), 64) == indices
    assert E.index_set("5", 3) == {0, 2}
    assert E.index_set([2, 0], 3) == {0, 2}
    # Bits beyond the pool, other spellings int() would take, and non-strings are refused.
    for bad in ("8", "0x7", " 7", "7 ", "-1", "+7", "7_0", "A", "", "1" * 17, 7, None, ["1"], [True]):
        assert E.index_set(bad, 3) is None, bad
    good = {"inc": "a1", "seq": 3, "state": "online", "sf": True, "hears": "3", "live": "1", "fencing": False}
    parsed = E.parse_report(good, 2, 12.5)
    assert parsed is not None and parsed.hears == {0, 1} and parsed.live == {0}
    assert E.parse_report({**good, "hears": "4"}, 2, 12.5) is None
    fields = E.Report("a1", 3, 1.0, "online", True, {0, 1}, {1}).fields()
    assert (fields["hears"], fields["live"]) == ("3", "2")


def test_fabric_groups_blocks_and_reload(tmp_path: Path) -> None:
    fabric = E.Fabric(str(tmp_path))
    assert not fabric.refresh() and fabric.group("a") == "0" and fabric.connected("a", "b")
    sr = tmp_path / "sr" / "one"
    sr.mkdir(parents=True)
    (tmp_path / "link").symlink_to(sr)
    path = tmp_path / "fabric.json"
    path.write_text(json.dumps({"network": {"a": "1", "b": "2"}, "storage_blocked": {"a": [str(sr)]}}))
    assert fabric.refresh()
    assert (fabric.group("a"), fabric.group("b"), fabric.group("c")) == ("1", "2", "0")
    assert not fabric.connected("a", "b") and fabric.connected("b", "b") and not fabric.connected("c", "a")
    assert fabric.storage_blocked("a", str(sr / "statefile"))
    assert fabric.storage_blocked("a", str(tmp_path / "link" / "statefile"))
    assert not fabric.storage_blocked("b", str(sr / "statefile"))
    assert not fabric.storage_blocked("a", str(tmp_path / "sr" / "onetwo" / "statefile"))
    assert not fabric.refresh()  # unchanged file: not re-parsed
    tmp = tmp_path / "fabric.tmp"
    tmp.write_text("{not json")
    os.replace(tmp, path)
    assert fabric.refresh() and fabric.group("a") == "0" and not fabric.storage_blocked("a", str(sr / "x"))
    for bad in ([1], {"network": []}, {"network": {"a": 1}}, {"storage_blocked": {"a": "/x"}}):
        path.write_text(json.dumps(bad))
        os.utime(path, ns=(1, len(json.dumps(bad)) * 1000))
        fabric.refresh()
        assert fabric.network == {} and fabric.blocked == {}, bad
    path.unlink()
    fabric.refresh()
    assert fabric.network == {}
    assert E.Fabric(None).storage_blocked("a", "/x") is False


def test_daemon_takes_only_valid_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAPID_HW_DIR", str(tmp_path))
    (tmp_path / "fabric.json").write_text(json.dumps({"network": {"h2": "far"}}))
    hosts = ["h0", "h1", "h2"]
    addresses = ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    conf = E.Conf(str(tmp_path / "xhad.conf"), "gen", hosts, "h0", str(tmp_path / "sf"), {}, addresses, 7000)
    daemon = E.Daemon(conf)

    def datagram(**change: object) -> bytes:
        body = {"v": 1, "gen": "gen", "host": "h1", "t": 5.0, "inc": "i1", "seq": 1, "state": "online",
                "sf": True, "hears": [0, 1], "live": [0, 1], "fencing": False, "excluded": False, "claim": False}
        body.update(change)
        return json.dumps(body).encode()

    src = ("127.0.1.2", 7000)
    for data, addr in (
        (datagram(gen="other"), src),
        (datagram(), ("127.0.1.9", 7000)),  # spoofed: not h1's address
        (datagram(host="h0"), ("127.0.1.1", 7000)),  # myself
        (datagram(host="h2", t=6.0), ("127.0.1.3", 7000)),  # another network group
        (datagram(hears=[7]), src),
        (b"\xff garbage", src),
        (b"[1, 2]", src),
        (datagram(v=2), src),
    ):
        daemon.take_datagram(data, addr, 100.0)
        assert daemon.hb == [None, None, None], data
    daemon.take_datagram(datagram(), src, 100.0)
    assert daemon.hb[1] is not None and daemon.hb[1].hears == {0, 1} and daemon.hb_at[1] == 100.0
    # A straggler of an older incarnation does not replace the newer one.
    daemon.take_datagram(datagram(inc="i2", t=9.0), src, 101.0)
    daemon.take_datagram(datagram(inc="i1", t=8.0), src, 102.0)
    assert daemon.hb[1].inc == "i2" and daemon.hb_at[1] == 101.0


@pytest.mark.parametrize(
    "data",
    [
        b"\0" * 4096,
        b"",
        b'{"a":1}' + b"\0" * 4089,
        b'{"a":1}',
        b'{"a":"}"}' + b"\0" * 10,
        b'{"a":1} x' + b"\0" * 10,  # garbage after the object: kept, so that decoding fails
        b'{"a":1}\0\0\x01' + b"\0" * 10,
        b"no brace at all\0\0",
        b"}" + b"\0" * 5000,  # more padding than a block
    ],
)
def test_block_body_is_rstrip_of_the_padding(data: bytes) -> None:
    assert E.block_body(data) == data.rstrip(b"\0")


def _slot_daemon(tmp_path: Path) -> tuple[ModuleType, Any, int, Callable[..., bytes]]:
    hosts = ["h0", "h1"]
    conf = E.Conf(str(tmp_path / "xhad.conf"), "gen", hosts, "h0", str(tmp_path / "sf"), {},
                  ["127.0.1.1", "127.0.1.2"], 7000)
    daemon = E.Daemon(conf)
    path = tmp_path / "sf"
    path.write_bytes(b"\0" * E.STATEFILE_SIZE)
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, E.encode_block({"pool_state": "active", "generation": "gen", "master": None}), 0)

    def slot(seq: int, beat: float, hears: list[int]) -> bytes:
        block = {"host": "h1", "gen": "gen", "pid": 7, "inc": "i1", "state": "online", "sf": True, "hears": hears,
                 "live": [0, 1], "fencing": False, "claim": False, "excluded": False, "armed": True, "seq": seq,
                 "heartbeat": beat}
        data = E.encode_block(block).ljust(E.BLOCK_SIZE, b"\0")
        os.pwrite(fd, data, 2 * E.BLOCK_SIZE)
        return data

    return E, daemon, fd, slot


def test_unchanged_slot_takes_only_its_age_and_a_bad_checksum_is_decoded_in_full(tmp_path: Path) -> None:
    _e, daemon, fd, slot = _slot_daemon(tmp_path)
    try:
        now = 1000.0
        slot(1, now, [0, 1])
        daemon._sf_exchange(fd, now)
        first = daemon.slot[1]
        assert first is not None and first.t == now and first.hears == {0, 1}
        # Same content, later heartbeat: the same report, only seq and time move.
        slot(2, now + 1.5, [0, 1])
        daemon._sf_exchange(fd, now + 2)
        assert daemon.slot[1] is first and (first.seq, first.t) == (2, now + 1.5)
        # A torn tail (checksum wrong) is never taken as an age update.
        torn = slot(3, now + 3.5, [0, 1]).replace(b'"seq":3', b'"seq":4')
        os.pwrite(fd, torn, 2 * E.BLOCK_SIZE)
        assert daemon._refresh_slot(1, torn, 0) is False
        # So is a block with anything but NUL padding after the object, wherever it is read from.
        good = slot(3, now + 3.5, [0, 1])
        assert daemon._refresh_slot(1, bytes(E.BLOCK_SIZE) + good, E.BLOCK_SIZE) is True
        dirty = good[:-1] + b"x"
        assert daemon._refresh_slot(1, dirty, 0) is False
        assert daemon._refresh_slot(1, bytes(E.BLOCK_SIZE) + dirty + bytes(E.BLOCK_SIZE), E.BLOCK_SIZE) is False
        os.pwrite(fd, torn, 2 * E.BLOCK_SIZE)
        # Changed content is decoded in full: a new report.
        slot(5, now + 4.5, [1])
        daemon._sf_exchange(fd, now + 5)
        assert daemon.slot[1] is not first and daemon.slot[1].hears == {1} and daemon.slot[1].t == now + 4.5
    finally:
        os.close(fd)


def test_unchanged_datagram_takes_only_its_age(tmp_path: Path) -> None:
    hosts = ["h0", "h1"]
    conf = E.Conf(str(tmp_path / "xhad.conf"), "gen", hosts, "h0", str(tmp_path / "sf"), {},
                  ["127.0.1.1", "127.0.1.2"], 7000)
    daemon = E.Daemon(conf)

    def datagram(seq: int, t: float, master_t: float | None, hears: list[int]) -> bytes:
        body = {"v": 1, "gen": "gen", "host": "h1", "inc": "i1", "state": "online", "sf": True, "hears": hears,
                "live": [0, 1], "fencing": False, "claim": False, "excluded": False, "master": None, "seq": seq,
                "master_t": master_t, "t": t}
        return json.dumps(body, separators=(",", ":")).encode()

    src = ("127.0.1.2", 7000)
    daemon.take_datagram(datagram(1, 5.0, None, [0, 1]), src, 100.0)
    first = daemon.hb[1]
    daemon.take_datagram(datagram(2, 6.5, 4.25, [0, 1]), src, 101.0)
    assert daemon.hb[1] is first and (first.seq, first.t) == (2, 6.5) and daemon.hb_at[1] == 101.0
    assert daemon.peer_master[1][0] == 4.25
    # A tail this engine would not write (a string time) is parsed in full, and refused.
    daemon.take_datagram(datagram(3, 7.5, None, [0, 1]).replace(b'"t":7.5', b'"t":"7.5"'), src, 102.0)
    assert daemon.hb[1] is first and first.t == 6.5 and daemon.hb_at[1] == 101.0
    daemon.take_datagram(datagram(4, 8.5, None, [1]), src, 103.0)
    assert daemon.hb[1] is not first and daemon.hb[1].hears == {1}


def test_excluded_flags_read_without_decoding_every_slot(tmp_path: Path) -> None:
    hosts = ["h0", "h1", "h2"]
    conf = E.Conf(str(tmp_path / "xhad.conf"), "gen", hosts, "h0", str(tmp_path / "sf"), {},
                  ["127.0.1.1", "127.0.1.2", "127.0.1.3"], 7000)
    path = tmp_path / "sf"
    path.write_bytes(b"\0" * E.STATEFILE_SIZE)
    with open(path, "r+b") as handle:
        handle.write(E.encode_block({"pool_state": "active", "generation": "gen", "master": None}))
        handle.seek(2 * E.BLOCK_SIZE)
        handle.write(E.encode_block({"host": "h1", "excluded": True}))
        # Written by hand, with the member name escaped: still excluded.
        handle.seek(3 * E.BLOCK_SIZE)
        handle.write(b'{"host": "h2", "\\u0065xcluded" :  true}')
    fresh = E.read_fresh(conf)
    assert fresh is not None and fresh.excluded == [False, True, True]


def test_view_lists_every_peers_reports(tmp_path: Path) -> None:
    hosts = ["h0", "h1", "h2"]
    conf = E.Conf(str(tmp_path / "xhad.conf"), "gen", hosts, "h0", str(tmp_path / "sf"), {},
                  ["127.0.1.1", "127.0.1.2", "127.0.1.3"], 7000)
    daemon = E.Daemon(conf)
    daemon.my_hears = frozenset({0, 2})
    daemon.hb[1] = report([2, 1, 0], live=[0, 1])
    daemon.slot[1] = report([1])
    daemon.slot[2] = report([2, 0], sf=False)
    daemon.write_view()
    view = E.read_view(conf, daemon.pid)
    assert view is not None and E.decode_block((tmp_path / "xhad.view").read_bytes()) == view
    # What each peer hears, as hex bit masks: {0, 2} is "5", {0, 1, 2} "7", {1} "2".
    assert view["on_hb"] == ["5", "7", None] and view["on_sf"] == ["5", "2", "5"]
    assert view["sf_access"] == [False, True, False] and view["status"] == "Starting"
    # Rewritten in place: a shorter view leaves only padding behind.
    daemon.hb[1] = None
    daemon.write_view()
    assert E.read_view(conf, daemon.pid)["on_hb"] == ["5", None, None]
    daemon.remove_view()


def test_a_joining_host_tells_each_peer_it_begins_to_hear(tmp_path: Path) -> None:
    """xha sm.c join: a joining host's heartbeats say whom it hears.  A peer whose last datagram from
    us predates our hearing it must get a new one, or it counts us not up (we do not hear it, as
    far as it knows) until our next tick: 3 s of a 3-host enable at T = 30, one time in 15."""
    conf = E.Conf(str(tmp_path / "xhad.conf"), "gen", ["h0", "h1"], "h0", str(tmp_path / "sf"), {},
                  ["127.0.1.1", "127.0.1.2"], 7000)
    daemon = E.Daemon(conf)
    daemon.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        body = {"v": 1, "gen": "gen", "host": "h1", "inc": "i1", "state": "starting", "sf": True, "hears": [1],
                "live": [], "fencing": False, "claim": False, "excluded": False, "master": None, "seq": 1,
                "master_t": None, "t": 5.0}
        daemon.take_datagram(json.dumps(body).encode(), ("127.0.1.2", 7000), 100.0)
        assert daemon.reply_to == {1}  # a newcomer: answered at once ...
        daemon.send(5.0, sorted(daemon.reply_to))  # ... before we evaluate, so not yet as heard
        daemon.reply_to.clear()
        daemon.evaluate(100.05, 5.05)
        assert 1 in daemon.my_hears and daemon.state == "starting"
        assert daemon.reply_to == {1}
        daemon.send(5.05, sorted(daemon.reply_to))
        daemon.reply_to.clear()
        daemon.evaluate(100.2, 5.2)
        assert daemon.reply_to == set()  # told once: no datagram per evaluation
    finally:
        daemon.sock.close()
