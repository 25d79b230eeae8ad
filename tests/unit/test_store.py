"""The SQLite-backed object store: atomicity, durability, indexes and corruption detection."""

from __future__ import annotations

import gc
import itertools
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from xapid import schema as schema_mod
from xapid.errors import ApiError
from xapid.schema import NULL_REF, Schema
from xapid.store import Store, StoreCorrupt, copy_record


@pytest.fixture(scope="module")
def schema() -> Schema:
    return schema_mod.load()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "xapid.db"


_copies = itertools.count()


def on_disk(db: Path) -> Path:
    """A copy of the store's files as they are on disk now, what a SIGKILL would leave: the
    database and its WAL, without the shared-memory index (rebuilt from the WAL on opening).

    The daemon's connection holds the database exclusively while it runs, so nothing else opens it.
    """
    dest = db.parent / f"on-disk-{next(_copies)}"
    dest.mkdir()
    for suffix in ("", "-wal"):
        src = db.with_name(db.name + suffix)
        if src.exists():
            shutil.copyfile(src, dest / (db.name + suffix))
    return dest / db.name


def damage_pages(db: Path) -> None:
    """Overwrite the start of every page but the first (the header stays readable)."""
    size = db.stat().st_size
    with open(db, "r+b") as f:
        for page in range(1, size // 4096):
            f.seek(page * 4096)
            f.write(b"\x00\xff" * 64)


def make_sr(store: Store, label: str = "sr") -> str:
    with store.transaction() as tx:
        return tx.create("SR", {"name_label": label, "type": "nfs", "physical_size": 1024})


def test_create_fills_every_field_and_a_fresh_uuid(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    ref = make_sr(store)
    assert ref.startswith("OpaqueRef:") and ref != NULL_REF
    rec = store.render("SR", ref)
    assert list(rec) == list(schema.classes["SR"].fields)
    assert rec["name_label"] == "sr" and rec["physical_size"] == 1024
    assert len(rec["uuid"]) == 36 and store.by_uuid("SR", rec["uuid"]) == ref
    assert make_sr(store) != ref


def test_committed_writes_survive_reopening(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    a, b = make_sr(store, "a"), make_sr(store, "b")
    with store.transaction() as tx:
        tx.update("SR", a, name_label="a2", other_config={"k": "v"})
        tx.delete("SR", b)
    uuid_a = store.get("SR", a)["uuid"]  # type: ignore[index]
    store.close()
    again = Store(schema, db)
    assert again.refs("SR") == [a]
    rec = again.get("SR", a)
    assert rec is not None and rec["name_label"] == "a2" and rec["other_config"] == {"k": "v"}
    assert again.by_uuid("SR", uuid_a) == a


def test_commit_is_durable_without_a_clean_close(schema: Schema, db: Path) -> None:
    """What is on disk (as after SIGKILL: no close, WAL not checkpointed) holds every commit."""
    store = Store(schema, db)
    ref = make_sr(store, "kept")
    other = Store(schema, on_disk(db))
    rec = other.get("SR", ref)
    assert rec is not None and rec["name_label"] == "kept"
    other.close()
    store.close()


def test_failed_transaction_leaves_nothing(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    kept = make_sr(store, "kept")
    generation = store.generation
    with pytest.raises(ApiError), store.transaction() as tx:
        new = tx.create("SR", {"name_label": "ghost"})
        tx.update("SR", kept, name_label="changed")
        raise ApiError("INTERNAL_ERROR", "boom")
    assert store.get("SR", new) is None
    assert store.get("SR", kept)["name_label"] == "kept"  # type: ignore[index]
    assert store.generation == generation
    store.close()
    again = Store(schema, db)
    assert again.refs("SR") == [kept]
    assert again.get("SR", kept)["name_label"] == "kept"  # type: ignore[index]


def test_transaction_reads_its_own_writes_and_others_do_not(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    with store.transaction() as tx:
        ref = tx.create("SR", {"name_label": "x"})
        assert tx.get("SR", ref)["name_label"] == "x"
        assert ref in tx.refs("SR")
        assert tx.by_uuid("SR", tx.get("SR", ref)["uuid"]) == ref
        assert store.get("SR", ref) is None  # not committed yet
    assert store.get("SR", ref) is not None


def test_missing_object_is_handle_invalid(schema: Schema) -> None:
    store = Store(schema, None)
    with pytest.raises(ApiError) as e, store.transaction() as tx:
        tx.get("VM", "OpaqueRef:nope")
    assert e.value.description == ["HANDLE_INVALID", "VM", "OpaqueRef:nope"]


def test_derived_relation_fields_follow_the_ref_side(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    sr1, sr2 = make_sr(store, "1"), make_sr(store, "2")
    with store.transaction() as tx:
        host = tx.create("host", {"name_label": "h"})
        p1 = tx.create("PBD", {"SR": sr1, "host": host})
        p2 = tx.create("PBD", {"SR": sr1, "host": host})
    assert sorted(store.render("SR", sr1)["PBDs"]) == sorted([p1, p2])
    assert sorted(store.render("host", host)["PBDs"]) == sorted([p1, p2])
    assert store.render("SR", sr2)["PBDs"] == []
    with store.transaction() as tx:
        tx.update("PBD", p2, SR=sr2)
    assert store.render("SR", sr1)["PBDs"] == [p1]
    assert store.render("SR", sr2)["PBDs"] == [p2]
    with store.transaction() as tx:
        tx.delete("PBD", p1)
    assert store.render("SR", sr1)["PBDs"] == []
    # Derived fields are computed, never stored, and rebuilt on reopening.
    store.close()
    again = Store(schema, db)
    assert again.render("SR", sr2)["PBDs"] == [p2]
    assert again.render("host", host)["PBDs"] == [p2] and again.render("SR", sr1)["PBDs"] == []
    raw = sqlite3.connect(db).execute("SELECT data FROM objects WHERE ref = ?", (sr2,)).fetchone()[0]
    assert '"PBDs"' not in raw


def test_by_uuid_misses_and_follows_deletes(schema: Schema) -> None:
    store = Store(schema, None)
    ref = make_sr(store)
    uuid = store.get("SR", ref)["uuid"]  # type: ignore[index]
    assert store.by_uuid("SR", uuid) == ref
    assert store.by_uuid("VM", uuid) is None
    assert store.by_uuid("SR", uuid.upper()) is None  # exact match (wire.md 2.4)
    with store.transaction() as tx:
        tx.delete("SR", ref)
        assert tx.by_uuid("SR", uuid) is None
    assert store.by_uuid("SR", uuid) is None


def test_memory_only_classes_are_not_written(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    with store.transaction() as tx:
        session = tx.create("session", {"auth_user_name": "root"})
        task = tx.create("task", {"name_label": "t"})
    assert store.get("session", session) is not None and store.get("task", task) is not None
    store.close()
    again = Store(schema, db)
    assert again.refs("session") == [] and again.refs("task") == []


def test_rows_written_later_by_an_older_schema_get_defaults(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    ref = make_sr(store)
    store.close()
    con = sqlite3.connect(db)
    con.execute("UPDATE objects SET data = ? WHERE ref = ?", ('{"uuid": "u-1", "name_label": "old"}', ref))
    con.commit()
    con.close()
    rec = Store(schema, db).render("SR", ref)
    assert rec["name_label"] == "old" and rec["other_config"] == {} and rec["shared"] is False


@pytest.mark.parametrize("text", ['  {"uuid": "u-1", "name_label": "old"}\n', '{ "name_label" : "old", "uuid":"u-1" }'])
def test_rows_of_any_json_spacing_load(schema: Schema, db: Path, text: str) -> None:
    """Rows need not be in this version's compact spelling (the loader's fast path falls back to json.loads)."""
    store = Store(schema, db)
    ref = make_sr(store)
    store.close()
    con = sqlite3.connect(db)
    con.execute("UPDATE objects SET data = ? WHERE ref = ?", (text, ref))
    con.commit()
    con.close()
    again = Store(schema, db)
    assert again.get("SR", ref)["name_label"] == "old" and again.by_uuid("SR", "u-1") == ref  # type: ignore[index]


def test_rows_keep_the_compact_json_spelling(schema: Schema, db: Path) -> None:
    """The on-disk format is unchanged: uuid plus the fields that differ from their defaults, compact JSON."""
    store = Store(schema, db)
    with store.transaction() as tx:
        ref = tx.create("SR", {"name_label": "sr", "other_config": {"b": "1", "a": "2"}, "physical_size": 7})
    store.close()
    data = sqlite3.connect(db).execute("SELECT data FROM objects WHERE ref = ?", (ref,)).fetchone()[0]
    rec = json.loads(data)
    assert data == json.dumps(rec, separators=(",", ":"))
    assert rec == {"uuid": rec["uuid"], "name_label": "sr", "other_config": {"b": "1", "a": "2"}, "physical_size": 7}


def test_copy_record_is_private_at_every_depth() -> None:
    rec = {"a": 1, "m": {"k": ["x", {"deep": "v"}]}, "s": ["p"], "e": [], "d": {}, "t": "text"}
    copy = copy_record(rec)
    assert copy == rec
    copy["m"]["k"][1]["deep"] = "changed"
    copy["m"]["k"].append("y")
    copy["s"].append("q")
    copy["e"].append(1)
    copy["d"]["new"] = 1
    assert rec == {"a": 1, "m": {"k": ["x", {"deep": "v"}]}, "s": ["p"], "e": [], "d": {}, "t": "text"}


def test_loaded_records_share_equal_values_yet_change_alone(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    same = {"other_config": {"a": "b", "c": "d"}, "tags": ["t1", "t2"], "memory_target": 3 << 30}
    with store.transaction() as tx:
        one = tx.create("VM", {"name_label": "one", **same})
        two = tx.create("VM", {"name_label": "two", **same})
        three = tx.create("VM", {"name_label": "three", "other_config": {"c": "d", "a": "b"}})
    store.close()
    again = Store(schema, db)
    r1, r2, r3 = (again.get("VM", r) for r in (one, two, three))
    assert r1 is not None and r2 is not None and r3 is not None
    for field in same:  # one object for equal values: 100,000 VMs hold few distinct ones
        assert r1[field] == same[field] and r1[field] is r2[field]
    # Equal maps in another order stay apart: a record's encoding keeps its order.
    assert r3["other_config"] is not r1["other_config"] and list(r3["other_config"]) == ["c", "a"]
    with again.transaction() as tx:
        tx.get("VM", one)["other_config"]["x"] = "y"
        tx.get("VM", one)["tags"].append("t3")
    assert again.get("VM", two)["other_config"] == {"a": "b", "c": "d"}  # type: ignore[index]
    assert again.get("VM", two)["tags"] == ["t1", "t2"]  # type: ignore[index]
    assert again.get("VM", one)["tags"] == ["t1", "t2", "t3"]  # type: ignore[index]


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_leaves_the_collector_as_it_found_it(schema: Schema, db: Path, enabled: bool) -> None:
    populated(schema, db, rows=3)
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        Store(schema, db).close()
        assert gc.isenabled() is enabled
        con = sqlite3.connect(db)
        con.execute("UPDATE objects SET data = '{bad' WHERE rowid = 2")
        con.commit()
        con.close()
        with pytest.raises(StoreCorrupt):
            Store(schema, db)
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def wal_bytes_for_one_update(schema: Schema, path: Path, rows: int) -> int:
    store = Store(schema, path)
    with store.transaction() as tx:
        refs = [tx.create("VM", {"name_label": f"vm{i}", "other_config": {"pad": "x" * 200}})
                for i in range(rows)]
    assert store._db is not None  # the only connection: the store holds the file exclusively
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size == 0
    with store.transaction() as tx:
        tx.update("VM", refs[rows // 2], name_label="renamed")
    written = wal.stat().st_size
    store.close()
    return written


def test_a_write_costs_the_rows_it_touches_not_the_store_size(schema: Schema, tmp_path: Path) -> None:
    small = wal_bytes_for_one_update(schema, tmp_path / "small.db", 50)
    large = wal_bytes_for_one_update(schema, tmp_path / "large.db", 2000)
    large_db_size = (tmp_path / "large.db").stat().st_size
    assert small > 0
    # One row touched: a handful of pages, whatever the size of the store.
    assert large <= small + 2 * 4096 + 64
    assert large < large_db_size / 20


# -- opening and corruption ------------------------------------------------------------------------


@pytest.mark.parametrize("left_by", ["connect", "journal_mode"])
def test_existing_file_without_tables_opens_as_fresh(schema: Schema, db: Path, left_by: str) -> None:
    """A crash between creating the file and its first commit must not brick the daemon."""
    con = sqlite3.connect(db, isolation_level=None)
    if left_by == "journal_mode":
        con.execute("PRAGMA journal_mode=WAL")  # writes the header page
    con.close()
    store = Store(schema, db)
    ref = make_sr(store)
    store.close()
    assert Store(schema, db).get("SR", ref) is not None


def populated(schema: Schema, db: Path, rows: int = 300) -> None:
    store = Store(schema, db)
    with store.transaction() as tx:
        for i in range(rows):
            tx.create("VM", {"name_label": f"vm{i}", "other_config": {"pad": "y" * 300}})
    store.close()


def test_garbage_file_is_store_corrupt(schema: Schema, db: Path) -> None:
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreCorrupt, match=str(db)):
        Store(schema, db)


def test_overwritten_header_is_store_corrupt(schema: Schema, db: Path) -> None:
    populated(schema, db)
    with open(db, "r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 25)
    with pytest.raises(StoreCorrupt):
        Store(schema, db)


def test_overwritten_pages_are_store_corrupt(schema: Schema, db: Path) -> None:
    populated(schema, db)
    assert db.stat().st_size > 8 * 4096
    damage_pages(db)
    with pytest.raises(StoreCorrupt):
        Store(schema, db)


@pytest.mark.parametrize(("sql", "match"), [
    ("UPDATE objects SET data = '{not json' WHERE rowid = 1", "not valid JSON"),
    ("UPDATE objects SET data = '[1, 2]' WHERE rowid = 1", "no uuid"),
    ("UPDATE objects SET cls = 'Nonsense' WHERE rowid = 1", "unknown class"),
    ("UPDATE meta SET value = '99' WHERE key = 'format'", "format"),
    ("DROP TABLE objects", "objects"),
])
def test_damaged_rows_are_store_corrupt(schema: Schema, db: Path, sql: str, match: str) -> None:
    populated(schema, db, rows=3)
    con = sqlite3.connect(db)
    con.execute(sql)
    con.commit()
    con.close()
    with pytest.raises(StoreCorrupt, match=match):
        Store(schema, db)


# -- group commit ------------------------------------------------------------------------------------


class CountingStore(Store):
    """A store that counts its SQLite transactions and makes each one as slow as a real fsync."""

    def __init__(self, schema: Schema, path: Path, delay: float) -> None:
        self.batches: list[int] = []
        self.delay = delay
        super().__init__(schema, path)

    def _write(self, rows: list) -> None:  # type: ignore[type-arg]
        time.sleep(self.delay)
        super()._write(rows)
        self.batches.append(len(rows))


def test_concurrent_writers_share_one_disk_write(schema: Schema, db: Path) -> None:
    store = CountingStore(schema, db, delay=0.05)
    refs = [make_sr(store, f"sr{i}") for i in range(16)]
    store.batches.clear()
    start = threading.Barrier(16)

    def rename(i: int) -> None:
        start.wait()
        with store.transaction() as tx:
            tx.update("SR", refs[i], name_label=f"renamed{i}")

    threads = [threading.Thread(target=rename, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(store.batches) == 16
    assert len(store.batches) < 8, store.batches  # one fsync each would be 16
    other = Store(schema, on_disk(db))  # no clean close of `store`: what a SIGKILL would leave
    names = sorted(other.get("SR", r)["name_label"] for r in refs)  # type: ignore[index]
    assert names == sorted(f"renamed{i}" for i in range(16))
    other.close()
    store.close()


def test_a_transaction_returns_only_once_durable(schema: Schema, db: Path) -> None:
    store = CountingStore(schema, db, delay=0.02)
    ref = make_sr(store, "before")
    seen: list[str] = []

    def write() -> None:
        with store.transaction() as tx:
            tx.update("SR", ref, name_label="after")
        other = Store(schema, on_disk(db))
        seen.append(other.get("SR", ref)["name_label"])  # type: ignore[index]
        other.close()

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["after"] * 4
    store.close()


def test_readers_wait_for_what_they_may_have_seen(schema: Schema, db: Path) -> None:
    """A change is in memory before it is on disk; wait_durable is what a reply waits for."""
    store = CountingStore(schema, db, delay=0.3)
    ref = make_sr(store, "before")

    def write() -> None:
        with store.transaction() as tx:
            tx.update("SR", ref, name_label="after")

    t = threading.Thread(target=write)
    t.start()
    deadline = time.monotonic() + 5
    while store.get("SR", ref)["name_label"] != "after" and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.005)
    # Visible in memory while its fsync runs; a reader that saw it waits until it is on disk.
    store.wait_durable()
    other = Store(schema, on_disk(db))
    assert other.get("SR", ref)["name_label"] == "after"  # type: ignore[index]
    other.close()
    t.join()
    store.close()


def test_a_failed_disk_write_breaks_the_store(schema: Schema, db: Path) -> None:
    store = Store(schema, db)
    ref = make_sr(store, "kept")
    assert store._db is not None
    store._db.execute("CREATE TRIGGER no_updates BEFORE UPDATE ON objects BEGIN SELECT RAISE(FAIL, 'disk'); END")
    with pytest.raises(ApiError) as e:
        with store.transaction() as tx:
            tx.update("SR", ref, name_label="lost")
    assert e.value.code == "INTERNAL_ERROR"
    # Memory and disk now differ: the store refuses everything until a restart loads the disk.
    with pytest.raises(ApiError):
        store.wait_durable()
    with pytest.raises(ApiError):
        make_sr(store, "refused")
    store.close()
    again = Store(schema, db)
    assert [again.get("SR", r)["name_label"] for r in again.refs("SR")] == ["kept"]  # type: ignore[index]
    again.close()


# -- plain field writes ------------------------------------------------------------------------------


def test_set_fields_shares_nothing_the_transaction_may_change(schema: Schema) -> None:
    store = Store(schema, None)
    with store.transaction() as tx:
        ref = tx.create("VM", {"name_label": "a", "other_config": {"k": "v"}, "tags": ["t"]})
    committed = store.get("VM", ref)
    with store.transaction() as tx:
        tx.set_fields("VM", ref, name_label="b")
        assert tx.fields_set() == {("VM", ref): {"name_label"}}
        rec = tx.get("VM", ref)  # taken whole: its lists and maps become its own, in place
        assert tx.fields_set() is None and rec is tx.read("VM", ref)
        rec["other_config"]["k2"] = "v2"
        rec["tags"].append("u")
        assert committed["other_config"] == {"k": "v"} and committed["tags"] == ["t"]  # type: ignore[index]
    after = store.get("VM", ref)
    assert after["name_label"] == "b" and after["other_config"] == {"k": "v", "k2": "v2"}  # type: ignore[index]
    assert after["tags"] == ["t", "u"] and committed["name_label"] == "a"  # type: ignore[index]
    with pytest.raises(ApiError) as e:
        with store.transaction() as tx:
            tx.set_fields("VM", "OpaqueRef:missing", name_label="x")
    assert e.value.description == ["HANDLE_INVALID", "VM", "OpaqueRef:missing"]
    generation = store.generation
    with store.transaction() as tx:
        tx.set_fields("VM", ref, name_label="b")  # the same value: nothing changes, no commit
    assert store.generation == generation and store.get("VM", ref) is after
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.set_fields("VM", ref, name_label="never")
            raise RuntimeError("the call failed")
    assert store.get("VM", ref) is after


class CheckingStore(Store):
    """A store that checks every row it writes against the whole encoding of the committed record."""

    checked = 0

    def _write(self, rows: list) -> None:  # type: ignore[type-arg]
        for ref, cls, data, _existed in rows:
            rec = self.get(cls, ref)
            if data is not None and rec is not None:
                assert data == self._row(cls, rec), (data, self._row(cls, rec))
                self.checked += 1
        super()._write(rows)


def test_rows_spliced_from_parts_are_the_rows_written_whole(schema: Schema, db: Path) -> None:
    """Property: after random plain field writes (fields joining, leaving and staying in the row)
    and whole-record writes, every row written is the full encoding of its record, byte for byte."""
    import random

    rng = random.Random(16)
    store = CheckingStore(schema, db)
    with store.transaction() as tx:
        refs = [tx.create("VM", {"name_label": f"vm{i}"}) for i in range(4)]
    values: dict[str, list[object]] = {
        "name_label": ["", "a", "long \u00e9 \"quoted\" \\ name \ud800", "vm0"], "name_description": ["", "d"],
        "tags": [[], ["x"], ["x", "y"]], "other_config": [{}, {"k": "v"}, {"k": "v", "\u00fc": "1"}],
        "VCPUs_max": [1, 4, 1 << 70], "memory_overhead": [0, 7], "is_a_template": [False, True],
        "HVM_shadow_multiplier": [1.0, 2.5, 1e300, float("inf")], "ha_restart_priority": ["", "restart"],
    }
    for step in range(600):
        ref = rng.choice(refs)
        with store.transaction() as tx:
            if step % 9 == 0:
                tx.get("VM", ref)["name_label"] = f"whole{step}"
            else:
                picked = rng.sample(sorted(values), rng.randint(1, 3))
                tx.set_fields("VM", ref, **{f: rng.choice(values[f]) for f in picked})
    assert store.checked > 500
    store.close()
    again = Store(schema, db)  # and the rows load back as the records they were made from
    for ref in refs:
        assert again.get("VM", ref) == store.get("VM", ref)
    again.close()


def test_a_group_commit_writes_its_rows_in_order_and_whole(schema: Schema, db: Path) -> None:
    """The rows of many commits go to disk as a few statements: creations, changes (the last of a ref
    met twice wins) and deletions in their order, all or nothing."""
    store = Store(schema, db)
    a, b = make_sr(store, "a"), make_sr(store, "b")
    data = {ref: store._row("SR", store.get("SR", ref)) for ref in (a, b)}  # type: ignore[arg-type]
    c = "OpaqueRef:c"
    rows = [(a, "SR", data[a].replace('"a"', '"a1"'), True), (b, "SR", None, True),
            (c, "SR", data[b].replace('"b"', '"c"'), False), (a, "SR", data[a].replace('"a"', '"a2"'), True),
            (c, "SR", None, False)]
    store._write(rows)  # type: ignore[arg-type]
    con = sqlite3.connect(on_disk(db))
    assert dict(con.execute("SELECT ref, data FROM objects WHERE cls = 'SR'").fetchall()) == {
        a: data[a].replace('"a"', '"a2"')}
    con.close()
    assert store._db is not None
    store._db.execute("CREATE TRIGGER no_b BEFORE UPDATE ON objects WHEN new.data LIKE '%\"b2\"%' "
                      "BEGIN SELECT RAISE(FAIL, 'disk'); END")
    d = make_sr(store, "d")
    rows = [(a, "SR", data[a].replace('"a"', '"a3"'), True), (d, "SR", None, True),
            (a, "SR", data[a].replace('"a"', '"b2"'), True)]
    with pytest.raises(ApiError):
        store._write(rows)  # type: ignore[arg-type]
    con = sqlite3.connect(on_disk(db))
    found = dict(con.execute("SELECT ref, data FROM objects WHERE cls = 'SR'").fetchall())
    con.close()
    assert found[a] == data[a].replace('"a"', '"a2"') and d in found  # nothing of the failed batch
    store.close()


def test_set_fields_keeps_the_indexes_of_the_fields_it_sets(schema: Schema) -> None:
    store = Store(schema, None)
    sr1, sr2 = make_sr(store, "one"), make_sr(store, "two")
    with store.transaction() as tx:
        pbd = tx.create("PBD", {"SR": sr1, "host": NULL_REF})
    with store.transaction() as tx:
        tx.set_fields("PBD", pbd, SR=sr2, other_config={"k": "v"})
    assert store.render("SR", sr1)["PBDs"] == [] and store.render("SR", sr2)["PBDs"] == [pbd]
    with store.transaction() as tx:
        tx.set_fields("SR", sr1, uuid="u-new", name_label="renamed")
    assert store.by_uuid("SR", "u-new") == sr1 and store.get("SR", sr1)["name_label"] == "renamed"  # type: ignore[index]
    with store.transaction() as tx:
        tx.set_fields("PBD", pbd, device_config={"a": "b"})  # no indexed field: the index stays
    assert store.render("SR", sr2)["PBDs"] == [pbd] and store.get("PBD", pbd)["device_config"] == {"a": "b"}  # type: ignore[index]


@pytest.mark.parametrize("plain", [True, False])
def test_a_record_becomes_visible_only_after_the_generation_that_makes_it_durable(schema: Schema, db: Path,
                                                                                  plain: bool) -> None:
    """Readers take no lock: one that sees a new record waits for store.generation, so that
    generation (and its queued rows) must exist before the record is installed."""
    store = Store(schema, db)
    sr = make_sr(store)
    seen: list[tuple[int, int]] = []
    table = store._tables["SR"]

    class Watching(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: str, value: object) -> None:
            seen.append((store.generation, store._pending_top))
            super().__setitem__(key, value)

    store._tables["SR"] = Watching(table)
    before = store.generation
    with store.transaction() as tx:
        if plain:
            tx.set_fields("SR", sr, name_label="renamed")  # the fast path: no index touched
        else:
            tx.update("SR", sr, name_label="renamed")
    assert seen and all(gen == before + 1 and top == before + 1 for gen, top in seen), (before, seen)
    store.close()
