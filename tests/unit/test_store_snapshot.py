"""The start-up snapshot: written at a clean close, loaded only while it provably matches the rows.

Every test compares against what loading the rows gives (the rows stay the truth): a store loaded
from its snapshot must be identical, field by field and type by type, and any doubt (a write since,
a crash while writing it, a different interpreter or schema, a damaged file) must load the rows
and remove the file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_store import damage_pages
from xapid import schema as schema_mod
from xapid.schema import NULL_REF, Schema
from xapid.store import SNAPSHOT_MAGIC, Store, StoreCorrupt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema() -> Schema:
    return schema_mod.load()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "xapid.db"


def snap_of(db: Path) -> Path:
    return db.with_name(db.name + "-snapshot")


def token(db: Path) -> str | None:
    """The snapshot token as the files on disk hold it now (read from a copy: an open store that
    has written holds its database exclusively)."""
    copy = db.parent.parent / "token-copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for suffix in ("", "-wal"):
        if db.with_name(db.name + suffix).exists():
            shutil.copyfile(db.with_name(db.name + suffix), copy / (db.name + suffix))
    con = sqlite3.connect(copy / db.name)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'snapshot'").fetchone()
    finally:
        con.close()
        shutil.rmtree(copy, ignore_errors=True)
    return row[0] if row else None


def varied_store(schema: Schema, db: Path) -> dict[str, str]:
    """A store with many kinds of values, updates, deletes and relations; closed cleanly."""
    db.parent.mkdir(exist_ok=True)
    store = Store(schema, db)
    refs: dict[str, str] = {}
    with store.transaction() as tx:
        host = refs["host"] = tx.create("host", {"name_label": "h0", "address": "127.0.0.5"})
        sr = refs["sr"] = tx.create("SR", {"name_label": "sr", "type": "nfs", "physical_size": 1 << 40})
        tx.create("PBD", {"host": host, "SR": sr, "device_config": {"path": "/x"}, "currently_attached": True})
        for i in range(40):
            metrics = tx.create("VM_metrics", {"memory_actual": 1 << 30, "VCPUs_number": 2,
                                               "VCPUs_utilisation": {"0": 0.25, "1": 0.5}})
            refs[f"vm{i}"] = tx.create("VM", {
                "name_label": f"vm-{i}", "name_description": "é ünïcode ✓ " + "long " * 20,
                "other_config": {"folder": "/a", "n": str(i % 3)}, "tags": ["t1", "t2"] if i % 2 else [],
                "memory_static_max": (1 << 34) + i, "VCPUs_max": 2, "metrics": metrics,
                "resident_on": host if i % 4 == 0 else NULL_REF, "power_state": "Running" if i % 4 == 0 else "Halted",
                "is_a_template": i == 7, "HVM_shadow_multiplier": 1.5 + i,
            })
        tx.create("session", {"this_host": host})  # memory only: in neither the rows nor the snapshot
    with store.transaction() as tx:
        tx.update("VM", refs["vm1"], name_label="renamed", other_config={"changed": "yes"})
        tx.delete("VM", refs["vm2"])
        tx.update("host", host, other_config={"k": "v"}, tags=["x"])
    store.close()
    store = Store(schema, db)  # a second life: records from the first snapshot, a few changed since
    with store.transaction() as tx:
        tx.update("VM", refs["vm3"], name_label="third", blocked_operations={"start": "no"})
    store.close()
    return refs


def rows_loaded(schema: Schema, db: Path, tmp_path: Path) -> Store:
    """The store as its rows load (a copy of the database without the snapshot)."""
    other = tmp_path / "rows-only"
    other.mkdir()
    shutil.copy(db, other / db.name)
    for suffix in ("-wal", "-shm"):
        if db.with_name(db.name + suffix).exists():
            shutil.copy(db.with_name(db.name + suffix), other / (db.name + suffix))
    store = Store(schema, other / db.name)
    assert store.loaded_from == "rows"
    return store


def same_value(a: Any, b: Any) -> bool:
    """Equal, with the same types at every depth and maps in the same order."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) or (a != a and b != b)


def assert_identical(one: Store, two: Store) -> None:
    for cls, table in two._tables.items():
        if not one.schema.classes[cls].persist:
            continue
        assert list(one._tables[cls]) == list(table), cls  # same objects, same order
        for ref, rec in table.items():
            mine = one._tables[cls][ref]
            assert list(mine) == list(rec), (cls, ref)
            for name, value in rec.items():
                assert same_value(mine[name], value), (cls, ref, name, mine[name], value)
        assert one._uuids[cls] == two._uuids[cls], cls
    assert {k: dict(v) for k, v in one._inverse.items()} == {k: dict(v) for k, v in two._inverse.items()}


def test_a_clean_close_writes_a_snapshot_that_loads_identical_records(schema: Schema, db: Path,
                                                                      tmp_path: Path) -> None:
    refs = varied_store(schema, db)
    assert snap_of(db).is_file() and token(db) is not None
    fast = Store(schema, db)
    assert fast.loaded_from == "snapshot", fast.snapshot_note
    assert_identical(fast, rows_loaded(schema, db, tmp_path))
    assert fast.get("VM", refs["vm1"])["name_label"] == "renamed"  # type: ignore[index]
    assert fast.get("VM", refs["vm3"])["blocked_operations"] == {"start": "no"}  # type: ignore[index]
    assert fast.get("VM", refs["vm2"]) is None and fast.refs("session") == []
    assert fast.referrers("VM", "resident_on", refs["host"]) == sorted(refs[f"vm{i}"] for i in range(0, 40, 4))
    assert fast.render("host", refs["host"])["resident_VMs"] == fast.referrers("VM", "resident_on", refs["host"])


def test_values_a_transaction_set_load_from_the_snapshot_as_from_their_rows(schema: Schema, db: Path,
                                                                            tmp_path: Path) -> None:
    """Memory may hold what JSON turns into something else (a tuple, a map with int keys): the
    snapshot gives what the rows give, not what memory held."""
    db.parent.mkdir()
    store = Store(schema, db)
    with store.transaction() as tx:
        vm = tx.create("VM", {"name_label": "odd", "tags": ("a", "b"), "other_config": {1: "one"},
                              "VCPUs_params": {"weight": "1"}})
    assert type(store.get("VM", vm)["tags"]) is tuple  # type: ignore[index]
    store.close()
    fast = Store(schema, db)
    assert fast.loaded_from == "snapshot"
    rec = fast.get("VM", vm)
    assert rec is not None and rec["tags"] == ["a", "b"] and rec["other_config"] == {"1": "one"}
    assert_identical(fast, rows_loaded(schema, db, tmp_path))


def test_snapshot_records_share_equal_values_as_loaded_rows_do(schema: Schema, db: Path) -> None:
    db.parent.mkdir()
    store = Store(schema, db)
    same = {"other_config": {"a": "b"}, "tags": ["t"], "name_description": "shared text"}
    with store.transaction() as tx:
        one = tx.create("VM", {"name_label": "one", **same})
        two = tx.create("VM", {"name_label": "two", **same})
    store.close()
    fast = Store(schema, db)
    assert fast.loaded_from == "snapshot"
    r1, r2 = fast.get("VM", one), fast.get("VM", two)
    assert r1 is not None and r2 is not None
    for field in same:
        assert r1[field] == same[field] and r1[field] is r2[field]
    assert r1["metrics"] is r2["metrics"] is NULL_REF or r1["metrics"] == NULL_REF
    with fast.transaction() as tx:
        tx.get("VM", one)["tags"].append("t2")
    assert fast.get("VM", two)["tags"] == ["t"]  # type: ignore[index]


def test_the_first_write_after_loading_makes_the_snapshot_stale_in_its_own_transaction(
        schema: Schema, db: Path) -> None:
    refs = varied_store(schema, db)
    store = Store(schema, db)
    assert store.loaded_from == "snapshot" and token(db) is not None
    with store.transaction() as tx:
        tx.update("VM", refs["vm5"], name_label="after")
    assert token(db) is None  # committed with the row: a SIGKILL now cannot bring the snapshot back
    # No close: what SIGKILL leaves, the files as they are (a copy: the open store holds the database).
    left = db.parent.parent / "left"
    left.mkdir()
    for suffix in ("", "-wal", "-snapshot"):
        if db.with_name(db.name + suffix).exists():
            shutil.copyfile(db.with_name(db.name + suffix), left / (db.name + suffix))
    assert snap_of(left / db.name).exists()
    again = Store(schema, left / db.name)
    assert again.loaded_from == "rows" and not snap_of(left / db.name).exists()
    assert again.get("VM", refs["vm5"])["name_label"] == "after"  # type: ignore[index]


@pytest.mark.parametrize("sql", [
    "UPDATE objects SET data = replace(data, 'vm-6', 'edited') WHERE data LIKE '%\"vm-6\"%'",
    "DELETE FROM objects WHERE data LIKE '%\"vm-6\"%'",
    "INSERT INTO objects VALUES ('OpaqueRef:x', 'network', '{\"uuid\":\"u-x\",\"name_label\":\"edited\"}')",
])
def test_a_write_by_another_program_makes_the_snapshot_stale(schema: Schema, db: Path, sql: str) -> None:
    varied_store(schema, db)
    con = sqlite3.connect(db)
    con.execute(sql)
    con.commit()
    con.close()
    assert token(db) is None
    store = Store(schema, db)
    assert store.loaded_from == "rows" and not snap_of(db).exists()
    labels = [r["name_label"] for cls in ("VM", "network") for _ref, r in store.items(cls)]
    assert ("vm-6" in labels) is sql.startswith("INSERT") and ("edited" in labels) is not sql.startswith("DELETE")


def tamper_header(path: Path, **changes: Any) -> None:
    data = path.read_bytes()
    end = data.index(b"\n", len(SNAPSHOT_MAGIC))
    header = json.loads(data[len(SNAPSHOT_MAGIC):end])
    header.update(changes)
    path.write_bytes(SNAPSHOT_MAGIC + json.dumps(header).encode() + data[end:])


@pytest.mark.parametrize("damage", ["python", "marshal", "schema", "token", "objects", "body", "truncated",
                                    "garbage", "magic", "header", "empty", "symlink", "dir"])
def test_a_snapshot_that_does_not_match_is_ignored_and_removed(schema: Schema, db: Path, tmp_path: Path,
                                                              damage: str) -> None:
    varied_store(schema, db)
    snap = snap_of(db)
    if damage == "python":
        tamper_header(snap, python="2.7.18 (a different interpreter)")
    elif damage == "marshal":
        tamper_header(snap, marshal=3)
    elif damage == "schema":
        tamper_header(snap, schema="0" * 64)
    elif damage == "token":
        tamper_header(snap, token="f" * 32)
    elif damage == "objects":
        tamper_header(snap, objects=1)
    elif damage == "body":
        data = bytearray(snap.read_bytes())
        data[-100] ^= 0x55
        snap.write_bytes(bytes(data))
    elif damage == "truncated":
        snap.write_bytes(snap.read_bytes()[:-1000])
    elif damage == "garbage":
        snap.write_bytes(os.urandom(5000))
    elif damage == "magic":
        snap.write_bytes(b"xapid-snapshot 9\n" + snap.read_bytes()[len(SNAPSHOT_MAGIC):])
    elif damage == "header":
        data = snap.read_bytes()
        snap.write_bytes(SNAPSHOT_MAGIC + b"{not json" + data[data.index(b"\n", len(SNAPSHOT_MAGIC)):])
    elif damage == "empty":
        snap.write_bytes(b"")
    elif damage == "symlink":
        target = tmp_path / "elsewhere"
        snap.rename(target)
        snap.symlink_to(target)
    elif damage == "dir":
        snap.unlink()
        snap.mkdir()
    store = Store(schema, db)
    assert store.loaded_from == "rows", damage
    assert store.snapshot_note
    if damage != "dir":
        assert not os.path.lexists(snap)
    assert_identical(store, rows_loaded(schema, db, tmp_path))
    if damage == "symlink":
        assert (tmp_path / "elsewhere").exists()  # the link went, never what it names


def test_a_store_schema_change_makes_the_snapshot_stale(schema: Schema, db: Path) -> None:
    varied_store(schema, db)
    con = sqlite3.connect(db)
    con.execute("CREATE INDEX by_cls ON objects (cls)")
    con.commit()
    con.close()
    store = Store(schema, db)
    assert store.loaded_from == "rows" and "schema" in store.snapshot_note


def test_a_snapshot_written_by_other_loading_code_is_not_trusted(schema: Schema, db: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    varied_store(schema, db)
    monkeypatch.setattr("xapid.store._CODE_HASH", ["another version of xapid/store.py"])
    store = Store(schema, db)
    assert store.loaded_from == "rows" and "schema" in store.snapshot_note and not snap_of(db).exists()


def test_a_store_written_before_snapshots_gets_its_triggers(schema: Schema, db: Path) -> None:
    """A version-1 store of an older xapid (no triggers): a token in it cannot be trusted."""
    refs = varied_store(schema, db)
    con = sqlite3.connect(db)
    for op in ("insert", "update", "delete"):
        con.execute(f"DROP TRIGGER snapshot_stale_on_{op}")
    con.execute("UPDATE objects SET data = replace(data, '\"renamed\"', '\"by old xapid\"')")
    con.commit()
    con.close()
    assert token(db) is not None  # nothing took it away: only the new triggers do
    store = Store(schema, db)
    assert store.loaded_from == "rows" and not snap_of(db).exists() and token(db) is None
    assert store.get("VM", refs["vm1"])["name_label"] == "by old xapid"  # type: ignore[index]
    con = sqlite3.connect(db)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    con.close()
    assert names == {"snapshot_stale_on_insert", "snapshot_stale_on_update", "snapshot_stale_on_delete"}
    store.close()
    assert Store(schema, db).loaded_from == "snapshot"


def test_a_damaged_database_is_refused_even_with_a_valid_snapshot(schema: Schema, db: Path) -> None:
    varied_store(schema, db)
    assert snap_of(db).is_file() and token(db) is not None
    damage_pages(db)
    with pytest.raises(StoreCorrupt):
        Store(schema, db)


def test_an_unchanged_store_keeps_its_snapshot_at_close(schema: Schema, db: Path) -> None:
    varied_store(schema, db)
    before = (token(db), snap_of(db).stat().st_mtime_ns, snap_of(db).read_bytes())
    store = Store(schema, db)
    with store.transaction() as tx:
        tx.create("session", {})  # memory only: no row, the snapshot still matches
    store.close()
    assert (token(db), snap_of(db).stat().st_mtime_ns, snap_of(db).read_bytes()) == before
    assert Store(schema, db).loaded_from == "snapshot"


def test_a_broken_store_writes_no_snapshot(schema: Schema, db: Path) -> None:
    refs = varied_store(schema, db)
    store = Store(schema, db)
    store._broken = "test: a disk write failed"
    store.close()
    assert token(db) is not None  # the loaded snapshot's: nothing was written since
    store = Store(schema, db)
    with store.transaction() as tx:
        tx.update("VM", refs["vm4"], name_label="x")
    store._broken = "test: a disk write failed"
    store.close()
    assert token(db) is None
    assert Store(schema, db).loaded_from == "rows"


# -- SIGKILL at every step ---------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sqlite3, sys
    from pathlib import Path
    from xapid import schema as schema_mod
    import xapid.store as store_mod
    db, step = Path(sys.argv[1]), sys.argv[2]

    def die_at(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_fsync, real_open = os.replace, os.fsync, os.open
    def replace(src, dst):
        die_at("before-rename")
        real_replace(src, dst)
        die_at("after-rename")
    def fsync(fd):
        die_at("before-fsync")
        real_fsync(fd)
    os.replace, os.fsync = replace, fsync

    class Killing(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("INSERT INTO meta VALUES ('snapshot'"):
                die_at("before-token")
                out = super().execute(sql, *args)
                die_at("after-token")
                return out
            return super().execute(sql, *args)
    real_connect = sqlite3.connect
    sqlite3.connect = lambda *a, **k: real_connect(*a, factory=Killing, **k)

    store = store_mod.Store(schema_mod.load(), db)
    print(store.loaded_from, flush=True)
    with store.transaction() as tx:
        ref = tx.create("VM", {"name_label": "written-" + step})
    print(ref, flush=True)
    die_at("after-write")
    store.close()
    die_at("after-close")
""")


@pytest.mark.parametrize("step", ["before-fsync", "before-rename", "after-rename", "before-token", "after-token",
                                  "after-write", "after-close"])
def test_sigkill_at_any_step_never_loads_a_stale_snapshot(schema: Schema, db: Path, tmp_path: Path,
                                                          step: str) -> None:
    varied_store(schema, db)  # a valid snapshot to begin with: the child loads it, writes, closes
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(db), step], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    source, ref = proc.stdout.split()
    assert source == "snapshot"
    store = Store(schema, db)
    # The write the child acknowledged survives; the snapshot is used only if it was completed.
    assert store.get("VM", ref)["name_label"] == "written-" + step  # type: ignore[index]
    complete = step in ("after-token", "after-close")
    assert store.loaded_from == ("snapshot" if complete else "rows"), store.snapshot_note
    assert os.path.exists(snap_of(db)) is complete
    assert not os.path.exists(str(snap_of(db)) + ".tmp")  # no orphan either way
    assert_identical(store, rows_loaded(schema, db, tmp_path))


def test_a_snapshot_that_cannot_be_written_leaves_a_clean_close(schema: Schema, db: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    refs = varied_store(schema, db)
    store = Store(schema, db)
    with store.transaction() as tx:
        tx.update("VM", refs["vm4"], name_label="kept")

    def full_disk(*_args: Any) -> bytes:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("xapid.store.marshal.dumps", full_disk)
    store.close()
    monkeypatch.undo()
    assert store._db is None and token(db) is None and not snap_of(db).exists()
    again = Store(schema, db)
    assert again.loaded_from == "rows" and again.get("VM", refs["vm4"])["name_label"] == "kept"  # type: ignore[index]
