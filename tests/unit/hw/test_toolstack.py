"""Each host's xapi as its software sees it (xapid/hw/toolstack.py): faults, restarts, the files in the host
folder that xhad's xapi watchdog reads (ptoken, xapi.json)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from xapid.hw import toolstack as toolstack_mod
from xapid.hw.toolstack import Toolstacks

Fixture = tuple[Toolstacks, list[tuple[str, str]], dict[str, bool]]


@pytest.fixture
def stacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fixture:
    monkeypatch.setattr(toolstack_mod, "RESTART_DOWNTIME", 0.0)
    power = {"h1": True}
    t = Toolstacks(lambda uuid: power.get(uuid, False))
    events: list[tuple[str, str]] = []
    t.on_change(lambda uuid, event: events.append((uuid, event)))
    (tmp_path / "h1").mkdir()
    t.attach("h1", tmp_path / "h1")
    t.set_url("h1", "http://127.0.1.1:8080/")
    return t, events, power


def status_file(tmp_path: Path) -> dict[str, object]:
    return json.loads((tmp_path / "h1" / "xapi.json").read_text())


def test_files_in_the_host_folder(stacks: Fixture, tmp_path: Path) -> None:
    t, _events, _power = stacks
    token = tmp_path / "h1" / "ptoken"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert t.check_secret(token.read_text().strip())
    assert not t.check_secret("guess") and not t.check_secret(None)
    assert status_file(tmp_path) == {"url": "http://127.0.1.1:8080/", "requested": 0, "completed": 0,
                                     "result": "none", "fault": None, "persistent": False}


def test_faults_move_the_address_and_heal_brings_it_back(stacks: Fixture) -> None:
    t, events, _power = stacks
    t.inject("h1", "hang")
    assert t.frozen("h1") and t.serving("h1") and not t.healthy("h1") and t.describe("h1") == "hang"
    t.inject("h1", "crash", persistent=True)
    assert not t.serving("h1") and t.describe("h1") == "crash+persistent"
    assert t.heal("h1") == "crash"
    assert t.healthy("h1") and t.serving("h1") and not t.frozen("h1")
    assert events == [("h1", "freeze"), ("h1", "thaw"), ("h1", "down"), ("h1", "up")]
    t.inject("h1", "fail")
    assert t.serving("h1") and not t.frozen("h1") and not t.healthy("h1")
    with pytest.raises(ValueError):
        t.inject("h1", "explode")


def test_a_restart_clears_a_transient_fault_but_not_a_persistent_one(
        stacks: Fixture, tmp_path: Path) -> None:
    t, events, _power = stacks
    t.inject("h1", "fail")
    events.clear()
    assert t.restart("h1", "test") is True
    assert events == [("h1", "down"), ("h1", "up")] and t.healthy("h1")
    assert status_file(tmp_path)["completed"] == 1 and status_file(tmp_path)["result"] == "ok"
    t.inject("h1", "hang", persistent=True)
    events.clear()
    assert t.restart("h1", "test") is True  # it starts, then hangs again
    assert events == [("h1", "down"), ("h1", "up"), ("h1", "freeze")] and t.frozen("h1")
    t.inject("h1", "crash", persistent=True)
    events.clear()
    assert t.restart("h1", "test") is False
    assert events == [("h1", "down")]
    assert status_file(tmp_path)["result"] == "failed" and t.restarts("h1") == 3


def test_a_restart_of_a_host_without_power_fails_and_a_boot_resets(stacks: Fixture) -> None:
    t, _events, power = stacks
    t.inject("h1", "fail", persistent=True)
    power["h1"] = False
    assert t.restart("h1", "test") is False
    t.reset("h1")
    assert t.healthy("h1") and t.describe("h1") == "ok"
    assert t.restart("nosuch", "test") is False
