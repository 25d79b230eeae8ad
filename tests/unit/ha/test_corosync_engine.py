"""The corosync stack's pure decisions (scripts/cluster-stack/corosync/corosync_engine.py).

Liveness: a member, or a node that left less than W + 1.5 s ago without a clean stop (it is not
yet certainly fenced); the watchdog and token figures derived from xhad.conf's T.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ENGINE = Path(__file__).resolve().parents[3] / "scripts" / "cluster-stack" / "corosync" / "corosync_engine.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("corosync_engine_unit", ENGINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


C = load()
HOSTS = ["h0", "h1", "h2"]


def conf(tmp_path: Path, t: int = 10) -> object:
    params = {"HeartbeatTimeout": t, "HeartbeatWatchdogTimeout": t}
    return C.xe.Conf(str(tmp_path / "xhad.conf"), "gen", HOSTS, "h0", str(tmp_path / "sf"), params)


def test_timings_follow_t(tmp_path: Path) -> None:
    assert C.token_ms(conf(tmp_path, 10)) == 500
    assert C.token_ms(conf(tmp_path, 60)) == 3000
    assert C.watchdog_seconds(conf(tmp_path, 10)) == 5
    assert C.watchdog_seconds(conf(tmp_path, 30)) == 15


def test_liveness_waits_for_certain_fencing(tmp_path: Path) -> None:
    c = conf(tmp_path)
    view = {"members": [1, 2], "left": {"3": 100.0}}
    assert C.liveness(c, view, {"hosts": {}}, 100.0 + 6.4) == [True, True, True]   # W 5 + 1.5 not passed
    assert C.liveness(c, view, {"hosts": {}}, 100.0 + 6.6) == [True, True, False]
    # A node that stopped cleanly is dead at once; an excluded one is never live.
    assert C.liveness(c, view, {"hosts": {"h2": {"stopped": True}}}, 101.0) == [True, True, False]
    assert C.liveness(c, view, {"hosts": {"h1": {"excluded": True}}}, 101.0) == [True, False, True]
    # A node never seen is dead.
    assert C.liveness(c, {"members": [1], "left": {}}, None, 0.0) == [True, False, False]


def test_corosync_conf_lists_every_host_by_node_id(tmp_path: Path) -> None:
    nodes = {"h0": (1, "10.213.0.1"), "h1": (2, "10.213.0.2"), "h2": (3, "10.213.0.3")}
    text = C.render_corosync_conf(conf(tmp_path), nodes, 500, "/log", "/state")
    assert text.count("nodeid:") == 3 and "token: 500" in text and "knet_ping_timeout: 400" in text
    assert "auto_tie_breaker: 1" in text and "sched_rr: no" in text
