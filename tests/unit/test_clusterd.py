"""The emulated xapi-clusterd's pure parts: corosync.conf and corosync-quorumtool's answer."""

from __future__ import annotations

from xapid.clusterd import parse_quorumtool, render_conf

QUORATE = """Quorum information
------------------
Date:             Tue Dec  1 12:30:19 2026
Quorum provider:  corosync_votequorum
Nodes:            2
Node ID:          1
Ring ID:          1.9
Quorate:          Yes

Votequorum information
----------------------
Expected votes:   3
Highest expected: 3
Total votes:      2
Quorum:           2
Flags:            Quorate AutoTieBreaker

Membership information
----------------------
    Nodeid      Votes Name
         1          1 n1 (local)
         3          1 n3
"""

BLOCKED = QUORATE.replace("Quorate:          Yes", "Quorate:          No").replace(
    "Quorum:           2", "Quorum:           2 Activity blocked")


def test_quorumtool_parsed() -> None:
    assert parse_quorumtool(QUORATE) == {"quorate": True, "quorum": 2, "expected": 3, "members": [1, 3]}
    assert parse_quorumtool(BLOCKED)["quorate"] is False
    assert parse_quorumtool(BLOCKED)["quorum"] == 2
    assert parse_quorumtool("") == {"quorate": False, "quorum": 0, "expected": 0, "members": []}


def test_conf_carries_xapis_token_and_one_node_per_line() -> None:
    text = render_conf([(2, "10.213.0.2"), (1, "10.213.0.1")], 1000, 650, "/l", "/s", "c")
    assert "    token: 1000\n" in text and "    token_coefficient: 650\n" in text
    assert text.index("nodeid: 1") < text.index("nodeid: 2")  # sorted by node id
    assert "ring0_addr: 10.213.0.2" in text and "auto_tie_breaker: 1" in text and "blackbox: off" in text
    # corosync refuses several options on one line (research pitfall 3).
    assert not any(line.count(":") > 1 for line in text.splitlines() if not line.lstrip().startswith("#"))
