"""Names and addresses of the emulated cluster network (xapid/hw/netns.py), without root."""

from __future__ import annotations

from pathlib import Path

from xapid.hw.netns import ClusterNetwork, address, prefix_for


def test_prefix_is_short_stable_and_distinct_per_state_dir(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert prefix_for(a) == prefix_for(a) == prefix_for(tmp_path / "x" / ".." / "a")
    assert prefix_for(a) != prefix_for(b)
    net = ClusterNetwork(a, tmp_path)
    names = [net.hub, net.netns_of(0), net.netns_of(63)]
    assert all(n.startswith(prefix_for(a)) and len(n) <= 15 for n in names), names
    assert len(set(names)) == 3


def test_addresses_are_private_and_distinct() -> None:
    addrs = [address(i) for i in range(300)]
    assert addrs[0] == "10.213.0.1" and addrs[249] == "10.213.0.250" and addrs[250] == "10.213.1.1"
    assert len(set(addrs)) == 300 and all(a.startswith("10.213.") for a in addrs)


def test_a_network_that_was_never_made_knows_no_host(tmp_path: Path) -> None:
    net = ClusterNetwork(tmp_path / "state", tmp_path)
    assert not net.exists() and net.host_netns("some-uuid") is None and net.index_of("some-uuid") is None
    net.apply({"some-uuid": "1"})  # nothing to regroup: no error, nothing made
    assert not (tmp_path / "netns.json").exists()
