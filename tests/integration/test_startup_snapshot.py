"""The start-up snapshot with the real daemon: used after a clean stop, never after SIGKILL
once a write was acknowledged (README, state dir)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sources(log: str) -> list[str]:
    """Where each start loaded the store from, in order (the daemon's ``store loaded`` lines)."""
    out = []
    for line in log.splitlines():
        if '"store loaded"' in line:
            out.append(json.loads(line)["source"])
    return out


def token(state: Path) -> str | None:
    """The snapshot token as the files on disk hold it now (read from a copy: a running daemon
    holds its database exclusively)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("xapid.db", "xapid.db-wal"):
            if (state / name).exists():
                shutil.copyfile(state / name, Path(tmp) / name)
        con = sqlite3.connect(Path(tmp) / "xapid.db")
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'snapshot'").fetchone()
        finally:
            con.close()
    return row[0] if row else None


def test_clean_restart_loads_the_snapshot_and_sigkill_after_a_write_never_does(
        xapid_factory: Callable[..., Any]) -> None:
    d = xapid_factory()
    api = d.session().xenapi
    vm = api.VM.get_all()[0]
    d.stop()
    assert (d.state_dir / "xapid.db-snapshot").is_file() and token(d.state_dir) is not None
    d.start()
    api = d.session().xenapi
    before = {cls: getattr(api, cls).get_all_records() for cls in ("VM", "host", "SR", "VDI", "PBD", "network")}
    api.VM.set_name_label(vm, "acknowledged before SIGKILL")  # the reply came: it is durable
    assert token(d.state_dir) is None  # gone in the same SQLite transaction as that write
    d.kill()
    d.start()
    api = d.session().xenapi
    assert api.VM.get_name_label(vm) == "acknowledged before SIGKILL"
    after = {cls: getattr(api, cls).get_all_records() for cls in before}
    before["VM"][vm]["name_label"] = "acknowledged before SIGKILL"
    for cls in before:
        for ref, rec in before[cls].items():
            assert ref in after[cls], (cls, ref)
            # Fields a start refreshes (metrics, heartbeats) may move; the stored ones may not.
            assert rec["uuid"] == after[cls][ref]["uuid"] and rec.get("name_label") == after[cls][ref].get("name_label")
    assert not (d.state_dir / "xapid.db-snapshot.tmp").exists()
    d.stop()
    assert sources(d.log()) == ["new", "snapshot", "rows"]
