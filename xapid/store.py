"""The persisted object store: one row per object in SQLite, every record in memory.

Reads are served from memory.  Writes go through :meth:`Store.transaction`:
a transaction works on copies; at commit, under the store lock, it swaps the
changed records into memory and queues their rows; then, outside the lock, it
waits until its rows are durable (WAL, ``synchronous=FULL``).  The rows of
every transaction that committed meanwhile are written by one thread in one
SQLite transaction with one fsync (group commit), so concurrent writers share
the fsync and no reader or writer waits on the lock for someone else's disk.
A call that fails leaves nothing behind; a transaction that returned is
durable, and so is everything any reply shows: the server's reply boundary
waits (:meth:`Store.wait_durable`) until the state a reply may have read is on
disk, so a reply sent survives SIGKILL.  The cost of a write depends on the
rows it touches, never on the size of the store.

If a write to disk fails the store is *broken*: the memory holds changes the
disk does not, so every later wait and transaction fails with
``INTERNAL_ERROR`` and the daemon must be restarted (it then loads the last
durable state).

Classes whose schema says ``persist: false`` (session, task, message) live
only in memory, as in xapi.

Start-up: a clean :meth:`Store.close` also writes a *snapshot* of the persisted
tables (``<db>-snapshot``: one ``marshal`` blob, which keeps equal values shared)
and then a random token into the ``meta`` table.  Triggers on ``objects``
delete that token in the same SQLite transaction as any later write to a row,
whoever writes it, so the next open loads the snapshot only while the rows are
exactly what it was made from (token, Python and marshal version, store format,
SQLite and datamodel schema hash, object count and checksum all match);
otherwise it removes the file and loads the rows, which stay the truth.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import json.encoder
import json.scanner
import marshal
import os
import secrets
import sqlite3
import stat
import sys
import threading
import uuid as uuidlib
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import compress, islice
from operator import is_not, itemgetter
from pathlib import Path
from types import TracebackType
from typing import Any

from xapid.errors import ApiError, internal
from xapid.schema import NULL_REF, Schema

Record = dict[str, Any]
Change = tuple[str, str, str, Record | None, Record | None]
Row = tuple[str, str, str | None, bool]  # ref, cls, JSON data (None: delete), existed before

FORMAT_VERSION = 1

# The snapshot file: this line, one line of JSON header, then the marshal body.
SNAPSHOT_MAGIC = b"xapid-snapshot 1\n"
# Any change to a row makes the snapshot stale, in the writer's own transaction (whoever writes).
_SNAPSHOT_TRIGGERS = tuple(
    (f"snapshot_stale_on_{op.lower()}",
     f"CREATE TRIGGER snapshot_stale_on_{op.lower()} AFTER {op} ON objects "
     "BEGIN DELETE FROM meta WHERE key = 'snapshot'; END")
    for op in ("INSERT", "UPDATE", "DELETE"))

_ATOMIC = frozenset({str, int, float, bool, type(None)})
_CONTAINERS = frozenset({dict, list})
# json.dumps(value, separators=(",", ":")) without building an encoder per call (same text).
_encode = json.JSONEncoder(separators=(",", ":")).encode
# The C encoder that call ends in, built once: no circular-reference bookkeeping (records hold no
# cycles), no Python layers per row.  None where the C accelerator is missing.
_c_encoder: Callable[[Any, int], list[str]] | None = (
    json.encoder.c_make_encoder(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None,
                                ":", ",", False, False, True)
    if json.encoder.c_make_encoder is not None else None)
# The C scanner json.loads ends in, without its per-call Python layers (used where it accepts the text).
_scan = json.scanner.make_scanner(json.JSONDecoder())


ROW_PARTS = 1024  # objects whose row parts are kept (Store._row_of)
_encode_str = json.encoder.encode_basestring_ascii


def _part(key: str, value: Any) -> str:
    """``"key":value`` as the row encoder writes that member of a dict."""
    text = _encode_str(value) if type(value) is str else "".join(_c_encoder(value, 0))  # type: ignore[misc]
    return f"{_encode_str(key)}:{text}"


def _copy_value(value: Any) -> Any:
    """A private copy of a JSON-like value: dicts and lists copied at every depth, atomic values shared."""
    t = type(value)
    if t is dict:
        return {k: v if type(v) in _ATOMIC else _copy_value(v) for k, v in value.items()}
    if t is list:
        return [v if type(v) in _ATOMIC else _copy_value(v) for v in value]
    if t in _ATOMIC:
        return value
    return copy.deepcopy(value)


def copy_record(rec: Record) -> Record:
    """A copy of ``rec`` its holder may change at any depth without touching ``rec``
    (what ``copy.deepcopy`` gives for records, at a fraction of its cost)."""
    # Most containers of a record are empty (shared schema defaults): a new empty one is cheapest.
    return {k: v if type(v) not in _CONTAINERS else _copy_value(v) if v else type(v)() for k, v in rec.items()}


_CODE_HASH: list[str] = []


def _code_hash() -> str:
    """A hash of this module's source: a snapshot written by other loading code is not trusted."""
    if not _CODE_HASH:
        try:
            _CODE_HASH.append(hashlib.sha256(Path(__file__).read_bytes()).hexdigest())
        except OSError:
            _CODE_HASH.append(secrets.token_hex(16))  # unknown code: trust no earlier process's snapshot
    return _CODE_HASH[0]


def relation_moves(fields: Sequence[str], sources: Callable[[Record], Any], old: Record | None,
                   new: Record | None) -> list[tuple[int, Any, Any]]:
    """(index in ``fields``, value before, value after) of each of ``fields`` a change moved
    (a missing record holds none); ``sources`` is ``itemgetter(*fields)``, which tells at once
    that a modification moved none of them."""
    if old is not None and new is not None:
        try:
            if sources(old) == sources(new):
                return []
        except KeyError:
            pass  # a record without one of the fields: looked at one by one below
    out = []
    for i, f in enumerate(fields):
        before = old.get(f) if old else None
        after = new.get(f) if new else None
        if before != after:
            out.append((i, before, after))
    return out


class StoreCorrupt(Exception):
    """The store file failed verification; the daemon must not serve from it."""


def new_ref() -> str:
    return f"OpaqueRef:{uuidlib.uuid4()}"


def new_uuid() -> str:
    return str(uuidlib.uuid4())


_ABSENT = object()


class _Shared:
    """Equal values met while loading, kept once (strings up to 64 characters, integers, and lists
    and maps of strings, matched in order so that encodings stay the same)."""

    def __init__(self) -> None:
        self.strs: dict[str, str] = {}
        self.ints: dict[int, int] = {}
        self.containers: dict[tuple[Any, ...], Any] = {}

    def str(self, value: str) -> str:
        return self.strs.setdefault(value, value)

    def container(self, value: list[Any] | dict[str, Any]) -> Any:
        strs = self.strs
        try:
            key: tuple[Any, ...] = ("l", *value) if type(value) is list else ("d", *value.items())
            found = self.containers.get(key)
        except TypeError:  # a list or map holding lists or maps: not shared
            return value
        if found is not None:
            # Only lists and maps of strings are kept, and only strings equal strings (JSON values).
            return found
        if type(value) is list:
            if set(map(type, value)) - {str}:
                return value
        elif set(map(type, value.values())) - {str}:
            return value
        if type(value) is list:
            value = [strs.setdefault(x, x) if len(x) <= 64 else x for x in value]
        else:
            value = {strs.setdefault(k, k): strs.setdefault(x, x) if len(x) <= 64 else x for k, x in value.items()}
        self.containers[key] = value
        return value


class Store:
    """All objects of all classes, indexed by ref, uuid and relation."""

    def __init__(self, schema: Schema, path: Path | None) -> None:
        self.schema = schema
        self.path = path
        self.lock = threading.RLock()
        self._tables: dict[str, dict[str, Record]] = {name: {} for name in schema.classes}
        self._uuids: dict[str, dict[str, str]] = {name: {} for name in schema.classes}
        # (source class, ref field) -> target ref -> set of source refs
        self._inverse: dict[tuple[str, str], dict[str, set[str]]] = {}
        for _cls, _field, src_cls, src_field in schema.relations():
            self._inverse[(src_cls, src_field)] = defaultdict(set)
        # Per class: the ref fields that feed a relation index.
        self._feeds: dict[str, list[tuple[str, dict[str, set[str]]]]] = {
            name: [(f, index) for (c, f), index in self._inverse.items() if c == name] for name in schema.classes
        }
        # Rows hold only the fields that differ from these; loading starts from a copy of them.
        # The default objects are shared between records, which is safe because committed records
        # are never mutated in place (transactions work on deep copies).
        self._defaults: dict[str, Record] = {
            name: {f.name: f.initial() for f in c.stored_fields()} for name, c in schema.classes.items()
        }
        self.generation = 0
        # Group commit: rows queued by commits (under self.lock), written by the waiter that finds no
        # write under way.  Lock order: self.lock may be held when waiting, so the writer never takes it.
        self._pending: list[Row] = []
        self._pending_top = 0  # the generation the queued rows bring the disk to
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # held while rows are written (and by close())
        # Whether a waiter is writing rows now; every write's end is announced on _done.
        self._flushing = False
        self._done = threading.Condition(threading.Lock())
        self._durable = 0  # every generation up to this one is on disk (or needed nothing written)
        # Disk writes so far and the rows they carried (rows / flushes: how well commits batch).
        self.flushes = 0
        self.flushed_rows = 0
        self._broken: str | None = None
        # Threads whose transactions leave the durability wait to their caller (durability_deferred).
        self._deferring = threading.local()
        self._persist = {name: c.persist for name, c in schema.classes.items()}
        # Per class: the fields an index is kept on (uuid, the relation feeds).  A commit that set
        # none of them replaces the record in its table and nothing else.
        self._indexed: dict[str, frozenset[str]] = {
            name: frozenset(["uuid", *(f for f, _index in feeds)]) for name, feeds in self._feeds.items()}
        # The row of each object last written by set_fields() alone, as one JSON "key":value text per
        # stored field in record order: the next such write re-encodes only the fields it set.
        self._row_parts: OrderedDict[str, tuple[Record, dict[str, str]]] = OrderedDict()
        # Called under the store lock after every commit with (generation, changes), each change
        # being (cls, ref, op, old, new) with op "add", "mod" or "del"; the event system subscribes here.
        self.listeners: list[Callable[[int, list[Change]], None]] = []
        # Called with the transaction just before it commits (derived fields such as allowed_operations
        # are brought up to date there, inside the same commit).
        self.pre_commit: list[Callable[[Transaction], None]] = []
        self._db: sqlite3.Connection | None = None
        self._cursor: sqlite3.Cursor | None = None  # the writer's, on _db
        # Persisted records installed since the store was loaded: the snapshot takes them through
        # the row encoding, so that a snapshot load gives exactly what loading the rows gives.
        self._dirty: set[tuple[str, str]] = set()
        self._snapshot_token: str | None = None  # the token of the snapshot loaded, if any
        self.loaded_from = "new"  # "rows" or "snapshot" once a stored file was opened
        self.snapshot_note = ""  # why a snapshot present was not used (for the daemon's log)
        if path is not None:
            self._open(path)

    # -- persistence ---------------------------------------------------------------------------

    def _open(self, path: Path) -> None:
        try:
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # Fresh: no file, or one a crash left before the first commit (no tables, header page
            # only).  A file with data pages but no tables is damaged, not fresh.
            fresh = (db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
                     and db.execute("PRAGMA page_count").fetchone()[0] <= 1)
            if fresh:
                db.execute("BEGIN IMMEDIATE")
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.execute("CREATE TABLE objects (ref TEXT PRIMARY KEY, cls TEXT NOT NULL, data TEXT NOT NULL)")
                db.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
                for _name, sql in _SNAPSHOT_TRIGGERS:
                    db.execute(sql)
                db.execute("COMMIT")
                self._remove_snapshot(path)  # one a crash left beside a file that never had tables
            else:
                check = db.execute("PRAGMA quick_check").fetchone()
                if not check or check[0] != "ok":
                    raise StoreCorrupt(f"{path}: SQLite integrity check failed: {check}")
                row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
                if not row or row[0] != str(FORMAT_VERSION):
                    raise StoreCorrupt(f"{path}: unknown store format {row}")
                self._load(db, path)
        except sqlite3.DatabaseError as e:
            raise StoreCorrupt(f"{path}: {e}") from e
        self._db = db

    def _load(self, db: sqlite3.Connection, path: Path) -> None:
        """Every stored object into memory: from the snapshot when it provably matches the rows,
        else from the rows (the snapshot file then removed)."""
        master = self._sqlite_schema(db)
        if any(name not in master for name, _sql in _SNAPSHOT_TRIGGERS):
            # A store written before snapshots: no token can be trusted until the triggers exist.
            db.execute("BEGIN IMMEDIATE")
            for name, sql in _SNAPSHOT_TRIGGERS:
                if name not in master:
                    db.execute(sql)
            db.execute("DELETE FROM meta WHERE key = 'snapshot'")
            db.execute("COMMIT")
            master = self._sqlite_schema(db)
        row = db.execute("SELECT value FROM meta WHERE key = 'snapshot'").fetchone()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            if row is not None and self._load_snapshot(db, path, row[0], master):
                self.loaded_from = "snapshot"
                self._snapshot_token = row[0]
                return
        finally:
            if was_enabled:
                gc.enable()
        if self._remove_snapshot(path) and row is None:
            self.snapshot_note = "a stale snapshot (rows changed since it was written, or a crash while writing it)"
        self._load_rows(db, path)
        self.loaded_from = "rows"

    def _load_rows(self, db: sqlite3.Connection, path: Path) -> None:
        """Every stored row into memory (the cyclic GC paused: the records hold no cycles, and a
        collection every few thousand new records would rescan all earlier ones)."""
        shared = _Shared()
        shared.strs[NULL_REF] = NULL_REF  # most ref fields hold the default: found by identity below
        tables = self._tables
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for ref, cls, data in db.execute("SELECT ref, cls, data FROM objects"):
                if cls not in self._tables:
                    raise StoreCorrupt(f"{path}: object {ref} of unknown class {cls}")
                try:
                    rec, end = _scan(data, 0)
                    if end != len(data):
                        raise ValueError("trailing text")
                except Exception:  # noqa: BLE001 - json.loads below decides, with its exact rules
                    try:
                        rec = json.loads(data)
                    except ValueError as e:
                        raise StoreCorrupt(f"{path}: object {ref} is not valid JSON: {e}") from e
                if type(rec) is not dict or type(rec.get("uuid")) is not str:
                    raise StoreCorrupt(f"{path}: object {ref} has no uuid")
                tables[cls][shared.str(ref)] = self._complete(cls, rec, shared)
            for cls, table in tables.items():
                if table:
                    self._index(cls, table)
        finally:
            if was_enabled:
                gc.enable()

    def _index(self, cls: str, table: dict[str, Record]) -> None:
        """Index the records of ``table``, all new to the store, by uuid and relation (what
        :meth:`_install` does for each new object, a column at a time)."""
        self._uuids[cls].update(zip(map(itemgetter("uuid"), table.values()), table, strict=True))
        for src_field, index in self._feeds[cls]:
            # Every record holds every stored field (completed from the defaults).
            targets = list(map(itemgetter(src_field), table.values()))
            if targets.count(NULL_REF) == len(targets):
                continue  # most ref fields of most objects hold the default
            for ref, target in zip(table, targets, strict=True):
                if target is not NULL_REF and type(target) is str and target != NULL_REF:
                    index[target].add(ref)

    def _complete(self, cls: str, rec: Record, shared: _Shared) -> Record:
        """A stored row back as a full record: schema defaults for every field the row omits.

        This is also xapi's upgrade rule for fields added since the row was written.  Equal values
        are shared between the records loaded together (100,000 VMs hold many equal strings,
        numbers, lists and maps); that is safe because committed records are never changed in place.
        """
        out = dict(self._defaults[cls])
        strs, ints, container = shared.strs.setdefault, shared.ints.setdefault, shared.container
        for k, v in rec.items():
            t = type(v)
            # An existing key keeps the defaults' key object: every record shares the field names.
            if t is str:
                out[k] = strs(v, v) if len(v) <= 64 else v
            elif t is int:
                out[k] = ints(v, v)
            elif t is list or t is dict:
                out[k] = container(v)
            else:
                out[k] = v
        return out

    def _row(self, cls: str, rec: Record) -> str:
        """The JSON stored for ``rec``: uuid plus every field that differs from its default."""
        get = self._defaults[cls].get
        slim = {k: v for k, v in rec.items() if k == "uuid" or (d := get(k, _ABSENT)) is not v and d != v}
        if _c_encoder is not None:
            return "".join(_c_encoder(slim, 0))
        return _encode(slim)

    def _row_of(self, cls: str, ref: str, new: Record, old: Record | None, fields: set[str] | None) -> str:
        """:meth:`_row` of ``new``, the record that replaces ``old``; ``fields``: the only fields
        that can differ (a write by set_fields() alone), else None.

        The row text is the same either way; for a plain field write it is spliced from the
        previous row's parts (kept for the last :data:`ROW_PARTS` objects written so).
        """
        cache = self._row_parts
        if fields is None or _c_encoder is None:
            cache.pop(ref, None)
            return self._row(cls, new)
        defaults = self._defaults[cls]
        entry = cache.get(ref)
        parts: dict[str, str] | None = None
        if entry is not None and entry[0] is old:
            parts = dict(entry[1])
            for f in fields:
                v = new[f]
                if f != "uuid" and ((d := defaults.get(f, _ABSENT)) is v or d == v):
                    parts.pop(f, None)
                elif f in parts:
                    parts[f] = _part(f, v)
                else:  # a field that joins the row: rebuilt, to keep the record's order
                    parts = None
                    break
        if parts is None:
            get = defaults.get
            parts = {k: _part(k, v) for k, v in new.items()
                     if k == "uuid" or (d := get(k, _ABSENT)) is not v and d != v}
        cache[ref] = (new, parts)
        cache.move_to_end(ref)
        if len(cache) > ROW_PARTS:
            cache.popitem(last=False)
        return "{" + ",".join(parts.values()) + "}"

    def close(self) -> None:
        """Write what is queued, write the snapshot the next start may load, then close the database."""
        with self.lock:
            try:
                self.wait_durable()
            except ApiError:
                pass  # broken: what is on disk is what the next start loads
            with self._flush_lock:
                if self._cursor is not None:
                    self._cursor.close()  # a statement it still held would keep the file open and locked
                    self._cursor = None
                if self._db is not None:
                    if self._broken is None and self.path is not None:
                        self._save_snapshot(self._db, self.path)
                    self._db.close()
                    self._db = None

    # -- the start-up snapshot -------------------------------------------------------------------

    @staticmethod
    def snapshot_path(path: Path) -> Path:
        """The snapshot file of the database at ``path``."""
        return path.with_name(path.name + "-snapshot")

    @staticmethod
    def _sqlite_schema(db: sqlite3.Connection) -> dict[str, tuple[Any, ...]]:
        return {r[1]: tuple(r) for r in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")}

    def _schema_hash(self, master: dict[str, tuple[Any, ...]]) -> str:
        """What the snapshot's meaning depends on besides the rows: tables, triggers, datamodel
        defaults, and this module's code (how rows become records)."""
        persist = sorted(name for name, c in self.schema.classes.items() if c.persist)
        text = repr((FORMAT_VERSION, sorted(master.values(), key=repr), persist, self._defaults, _code_hash()))
        return hashlib.sha256(text.encode()).hexdigest()

    def _snapshot_header(self, token: str, objects: int, body: bytes | memoryview,
                         master: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
        return {"token": token, "store_format": FORMAT_VERSION, "python": sys.version,
                "cache_tag": sys.implementation.cache_tag, "marshal": marshal.version,
                "schema": self._schema_hash(master), "objects": objects, "size": len(body),
                "crc32": zlib.crc32(body)}

    def _remove_snapshot(self, path: Path) -> bool:
        """Remove the snapshot and any half-written one (a crash while closing leaves it); say
        whether there was one."""
        snap = self.snapshot_path(path)
        found = False
        for p in (snap, snap.with_name(snap.name + ".tmp")):
            try:
                os.unlink(p)
                found = True
            except FileNotFoundError:
                pass
            except OSError:
                found = True  # not a file (the daemon refuses to start on that): never loaded either
        return found

    def _load_snapshot(self, db: sqlite3.Connection, path: Path, token: str,
                       master: dict[str, tuple[Any, ...]]) -> bool:
        """Install the snapshot if it is the one ``token`` names and matches this database and
        interpreter in every respect; False (nothing installed) otherwise."""
        snap = self.snapshot_path(path)
        try:
            os.unlink(snap.with_name(snap.name + ".tmp"))  # a close killed while writing the next one
        except OSError:
            pass
        try:
            fd = os.open(snap, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self.snapshot_note = "no snapshot file"
            return False
        except OSError as e:
            self.snapshot_note = f"cannot open the snapshot: {e}"
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self.snapshot_note = "the snapshot is not a regular file"
                return False
            with open(fd, "rb", closefd=False) as f:
                data = memoryview(f.read())
        except OSError as e:
            self.snapshot_note = f"cannot read the snapshot: {e}"
            return False
        finally:
            os.close(fd)
        end = bytes(data[:4096]).find(b"\n", len(SNAPSHOT_MAGIC))
        if data[:len(SNAPSHOT_MAGIC)] != SNAPSHOT_MAGIC or end < 0:
            self.snapshot_note = "not a snapshot file"
            return False
        try:
            header = json.loads(bytes(data[len(SNAPSHOT_MAGIC):end]))
        except ValueError:
            self.snapshot_note = "unreadable snapshot header"
            return False
        body = data[end + 1:]
        objects = db.execute("SELECT count(*) FROM objects").fetchone()[0]
        expected = self._snapshot_header(token, objects, body, master)
        if header != expected:
            differ = sorted(k for k in expected.keys() | (header.keys() if type(header) is dict else set())
                            if type(header) is not dict or header.get(k) != expected.get(k))
            self.snapshot_note = f"the snapshot does not match the database ({', '.join(differ)})"
            return False
        try:
            classes = marshal.loads(body)
            tables: dict[str, dict[str, Record]] = {}
            for cls, rows in classes.items():
                if not self.schema.classes[cls].persist:
                    raise ValueError(f"class {cls} is not persisted")
                defaults = self._defaults[cls]
                # In place: each row is freed as its record is made, so the records reuse its memory.
                for ref, row in rows.items():
                    rows[ref] = {**defaults, **row}
                if set(map(type, map(itemgetter("uuid"), rows.values()))) - {str}:
                    raise ValueError(f"a {cls} without a uuid")
                tables[cls] = rows
        except Exception as e:  # noqa: BLE001 - any surprise in the body: the rows decide
            self.snapshot_note = f"unreadable snapshot body: {e!r}"
            return False
        if sum(map(len, tables.values())) != objects:
            self.snapshot_note = "the snapshot does not hold every row"
            return False
        for cls, table in tables.items():
            self._tables[cls] = table
            self._index(cls, table)
        return True

    def _snapshot_tables(self) -> dict[str, dict[str, Record]]:
        """The persisted tables as their rows decode: each record's fields that differ from the
        defaults.  Records installed since loading go through the row encoding, so that they load
        exactly as their rows would (JSON types, shared values)."""
        shared = _Shared()
        shared.strs[NULL_REF] = NULL_REF
        dirty = self._dirty
        out: dict[str, dict[str, Record]] = {}
        for cls, table in self._tables.items():
            if not self.schema.classes[cls].persist:
                continue
            defaults = self._defaults[cls]
            values, width = defaults.values(), len(defaults)
            rows: dict[str, Record] = {}
            for ref, rec in table.items():
                if (cls, ref) in dirty:
                    row = json.loads(self._row(cls, rec))
                    full = self._complete(cls, row, shared)
                    rows[shared.str(ref)] = {k: v for k, v in full.items() if k in row}
                else:
                    # A loaded record starts with the defaults' fields in their order and holds the
                    # default objects themselves where its row had nothing: keep what is not one.
                    slim = dict(compress(rec.items(), map(is_not, rec.values(), values)))
                    if len(rec) > width:
                        slim.update(islice(rec.items(), width, None))
                    rows[ref] = slim
            out[cls] = rows
        return out

    def _save_snapshot(self, db: sqlite3.Connection, path: Path) -> None:
        """Write the snapshot, then its token (called with every change durable and no commit
        possible).  Never fails: without a snapshot the next start loads the rows."""
        snap = self.snapshot_path(path)
        tmp = snap.with_name(snap.name + ".tmp")
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'snapshot'").fetchone()
            if row is not None and row[0] == self._snapshot_token and os.path.isfile(snap):
                return  # no row changed since that snapshot was loaded: it still matches
            db.execute("DELETE FROM meta WHERE key = 'snapshot'")
            body = marshal.dumps(self._snapshot_tables(), 4)
            token = secrets.token_hex(16)
            objects = db.execute("SELECT count(*) FROM objects").fetchone()[0]
            header = self._snapshot_header(token, objects, body, self._sqlite_schema(db))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.write(SNAPSHOT_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, snap)
            dir_fd = os.open(snap.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            # Only now may the next start trust it: the token commits after the file is durable.
            db.execute("INSERT INTO meta VALUES ('snapshot', ?)", (token,))
        except Exception:  # noqa: BLE001 - a value marshal refuses, a full disk: no snapshot, nothing else
            try:
                db.execute("DELETE FROM meta WHERE key = 'snapshot'")
            except sqlite3.Error:
                pass
            self._remove_snapshot(path)

    # -- memory ----------------------------------------------------------------------------------

    def _install(self, cls: str, ref: str, old: Record | None, new: Record | None) -> None:
        table = self._tables[cls]
        feeds = self._feeds[cls]
        if old is not None:
            self._uuids[cls].pop(old["uuid"], None)
            for src_field, index in feeds:
                target = old.get(src_field)
                if target in index:
                    index[target].discard(ref)
                    if not index[target]:
                        del index[target]
        if new is None:
            table.pop(ref, None)
            return
        self._dirty.add((cls, ref))
        table[ref] = new
        self._uuids[cls][new["uuid"]] = ref
        for src_field, index in feeds:
            target = new.get(src_field)
            if isinstance(target, str) and target != NULL_REF:
                index[target].add(ref)

    # -- reads (committed state) -------------------------------------------------------------------

    def get(self, cls: str, ref: str) -> Record | None:
        """The committed record (shared: callers must not mutate it)."""
        return self._tables[cls].get(ref)

    def exists(self, cls: str, ref: str) -> bool:
        return ref in self._tables[cls]

    def refs(self, cls: str) -> list[str]:
        with self.lock:
            return list(self._tables[cls])

    def items(self, cls: str) -> list[tuple[str, Record]]:
        with self.lock:
            return list(self._tables[cls].items())

    def count(self, cls: str) -> int:
        """How many objects of ``cls`` exist (without copying the table)."""
        return len(self._tables[cls])

    def by_uuid(self, cls: str, uuid: str) -> str | None:
        return self._uuids[cls].get(uuid)

    def referrers(self, src_cls: str, src_field: str, target: str) -> list[str]:
        """Refs of ``src_cls`` objects whose ``src_field`` names ``target`` (sorted)."""
        found = self._inverse[(src_cls, src_field)].get(target)
        if not found:
            return []
        try:
            # Readers do not queue on the store lock; only a commit racing this read retries under it.
            return sorted(found)
        except RuntimeError:
            with self.lock:
                return sorted(found)

    def touch(self, cls: str, ref: str) -> int:
        """Record a modification of ``ref`` without changing it (``event.inject``); return the prior generation."""
        with self.lock:
            before = self.generation
            self.generation += 1
            self._queue(self.generation, [])
            for listener in self.listeners:
                rec = self._tables[cls].get(ref)
                listener(self.generation, [(cls, ref, "mod", rec, rec)])
            return before

    def class_of(self, ref: str) -> str | None:
        for name, table in self._tables.items():
            if ref in table:
                return name
        return None

    def render(self, cls: str, ref: str, rec: Record | None = None) -> Record:
        """The full public record in schema order, derived relation fields filled in."""
        rec = rec if rec is not None else self._tables[cls][ref]
        out: Record = {}
        for name, f in self.schema.classes[cls].fields.items():
            if f.derived_from:
                out[name] = self.referrers(f.derived_from[0], f.derived_from[1], ref)
            else:
                out[name] = rec[name] if name in rec else f.initial()
        return out

    # -- writes ----------------------------------------------------------------------------------

    def transaction(self) -> _Block:
        """Run a block of changes atomically (``with store.transaction() as tx``); nothing is
        visible unless it completes, and it has returned only once its changes are durable."""
        return _Block(self)

    @contextmanager
    def durability_deferred(self) -> Iterator[None]:
        """Within the block, this thread's transactions return at their commit, before their changes
        are durable: the caller promises to answer nothing it did or read before
        :meth:`wait_durable` covers :attr:`generation` as it stands after the block (the event loop
        holds such a reply back; see :mod:`xapid.server`)."""
        self._deferring.on = True
        try:
            yield
        finally:
            self._deferring.on = False

    def wait_durable(self, gen: int | None = None) -> None:
        """Return once every change up to generation ``gen`` (default: the current one) is on disk.

        A waiter finding no write under way writes every queued row in one SQLite transaction;
        those who queued meanwhile wait for it, and each leaves as soon as a write covered its
        rows (a later write does not hold it up).  Raises ``INTERNAL_ERROR`` if the store is
        broken (a write failed).
        """
        target = self.generation if gen is None else gen
        if self._durable >= target and self._broken is None:
            return
        done = self._done
        with done:
            while True:
                if self._broken is not None:
                    raise internal(self._broken)
                if self._durable >= target:
                    return
                if not self._flushing:
                    break
                done.wait()
            self._flushing = True
        top = -1
        try:
            with self._flush_lock:
                with self._pending_lock:
                    rows, self._pending = self._pending, []
                    top = self._pending_top
                if rows:
                    try:
                        self._write(rows)
                    except ApiError as e:
                        self._broken = f"the store is broken, restart the daemon: {e.description[-1]}"
                        top = -1
                        raise
                    self.flushes += 1
                    self.flushed_rows += len(rows)
        finally:
            with done:
                self._flushing = False
                self._durable = max(self._durable, top)
                done.notify_all()

    def _queue(self, gen: int, rows: list[Row]) -> None:
        """Queue the rows of generation ``gen`` (called under self.lock, generations in order)."""
        with self._pending_lock:
            self._pending.extend(rows)
            self._pending_top = gen

    def _write(self, rows: list[Row]) -> None:
        """Write ``rows`` in one SQLite transaction (one WAL commit, one fsync), or raise INTERNAL_ERROR."""
        db = self._db
        if db is None or not rows:
            return
        cur = self._cursor
        if cur is None or cur.connection is not db:
            # The daemon's connection is the file's only user: from its first write on it keeps the
            # lock, so a commit makes no locking system calls (six per commit otherwise).  A crash
            # releases it with the process; the next start recovers the WAL as before.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            cur = self._cursor = db.cursor()
        try:
            if len(rows) == 1:
                # One statement outside BEGIN is a transaction of its own, as atomic and as durable.
                _apply(cur, rows[0])
            else:
                # Within BEGIN: a statement that fails part-way (a FAIL conflict) is rolled back whole.
                cur.execute("BEGIN IMMEDIATE")
                for sql, params in _batch(rows):
                    cur.execute(sql, params)
                cur.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise internal(f"store write failed: {e}") from e


BATCH_ROWS = 500  # rows per statement of a group commit (3 SQL variables each, far under SQLite's cap)
_UPSERT = "INSERT INTO objects (ref, cls, data) VALUES {} ON CONFLICT(ref) DO UPDATE SET data = excluded.data"


def _batch(rows: list[Row]) -> list[tuple[str, list[str]]]:
    """The statements that write ``rows`` in order: each run of new and changed rows as one
    upsert (a changed row is updated in place; of a ref met twice the last row wins, as when
    written one by one), each run of deletions as one DELETE."""
    out: list[tuple[str, list[str]]] = []
    i, n = 0, len(rows)
    while i < n:
        deleting = rows[i][2] is None
        j = i
        while j < n and (rows[j][2] is None) == deleting and j - i < BATCH_ROWS:
            j += 1
        run = rows[i:j]
        if deleting:
            out.append((f"DELETE FROM objects WHERE ref IN ({','.join('?' * len(run))})", [r[0] for r in run]))
        else:
            params: list[str] = []
            for ref, cls, data, _existed in run:
                params += (ref, cls, data)  # type: ignore[list-item]  # data is a str in this run
            out.append((_UPSERT.format(",".join(["(?,?,?)"] * len(run))), params))
        i = j
    return out


def _apply(cur: sqlite3.Cursor, row: Row) -> None:
    """The statement that writes one row."""
    ref, cls, data, existed = row
    if data is None:
        cur.execute("DELETE FROM objects WHERE ref = ?", (ref,))
    elif existed:
        # An UPDATE in place writes a fraction of the WAL frames INSERT OR REPLACE does.
        cur.execute("UPDATE objects SET data = ? WHERE ref = ?", (data, ref))
    else:
        cur.execute("INSERT INTO objects (ref, cls, data) VALUES (?, ?, ?)", (ref, cls, data))


class _Block:
    """The ``with`` block of :meth:`Store.transaction`: the store lock held from entry to commit,
    then (lock released) the wait until the commit is durable.  A block that raises commits nothing."""

    __slots__ = ("store", "tx")

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> Transaction:
        store = self.store
        store.lock.acquire()
        if store._broken is not None:
            store.lock.release()
            raise internal(store._broken)
        self.tx = Transaction(store)
        return self.tx

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        store = self.store
        if exc_type is not None:
            store.lock.release()
            return
        try:
            gen = self.tx._commit()
        finally:
            store.lock.release()
        if getattr(store._deferring, "on", False):
            return  # the caller waits (Store.durability_deferred)
        # A transaction that changed nothing still read state others may not have written yet.
        store.wait_durable(gen or None)


class Transaction:
    """A set of changes on top of the committed state, with read-your-writes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.schema = store.schema
        # Every record this transaction took, created or deleted, in that order (None: deleted),
        # and the same refs by class, so that per-class questions cost that class's changes only.
        self._changes: dict[tuple[str, str], Record | None] = {}
        self._by_cls: dict[str, dict[str, None]] = {}
        # Records taken by set_fields() alone: copies of the top level only (their lists and maps are the
        # committed record's), with the fields set on them, the only ones that can differ.
        self._shallow: dict[tuple[str, str], set[str]] = {}

    def find(self, cls: str, ref: str) -> Record | None:
        """The record as this transaction sees it (a private copy), or None."""
        key = (cls, ref)
        if key in self._changes:
            if key in self._shallow:
                self._private(key)
            return self._changes[key]
        rec = self.store.get(cls, ref)
        if rec is None:
            return None
        rec = copy_record(rec)
        self._put(cls, ref, rec)
        return rec

    def _private(self, key: tuple[str, str]) -> None:
        """Give a record set_fields() took its own lists and maps, in place (whoever holds it keeps it)."""
        fields = self._shallow.pop(key)
        rec = self._changes[key]
        assert rec is not None
        for k, v in rec.items():
            if type(v) in _CONTAINERS and k not in fields:
                rec[k] = _copy_value(v) if v else type(v)()

    def set_fields(self, cls: str, ref: str, **values: Any) -> None:
        """Set fields of an object (``HANDLE_INVALID [cls, ref]`` if it is missing), as :meth:`update`
        does, but without copying the rest of the record: the cheap path of a plain field write.

        The values are kept as given (as :meth:`update` does).  Until :meth:`find` or :meth:`get`
        takes the record (and copies the rest), the transaction knows exactly which fields it changed
        (:meth:`fields_set`).
        """
        key = (cls, ref)
        if key in self._changes:
            rec = self._changes[key]
            if rec is None:
                raise ApiError("HANDLE_INVALID", cls, ref)
            rec.update(values)
            fields = self._shallow.get(key)
            if fields is not None:
                fields.update(values)
            return
        committed = self.store.get(cls, ref)
        if committed is None:
            raise ApiError("HANDLE_INVALID", cls, ref)
        rec = dict(committed)
        rec.update(values)
        self._put(cls, ref, rec)
        self._shallow[key] = set(values)

    def fields_set(self) -> dict[tuple[str, str], set[str]] | None:
        """If every record this transaction holds was changed by :meth:`set_fields` alone: (cls, ref) ->
        the fields set (all that can differ from the committed record).  Otherwise None."""
        if len(self._shallow) != len(self._changes):
            return None
        return self._shallow

    def _put(self, cls: str, ref: str, rec: Record | None) -> None:
        self._changes[(cls, ref)] = rec
        self._by_cls.setdefault(cls, {})[ref] = None

    def _mine(self, cls: str) -> Iterator[str]:
        """Refs of ``cls`` this transaction took, created or deleted."""
        return iter(self._by_cls.get(cls, ()))

    def get(self, cls: str, ref: str) -> Record:
        """Like :meth:`find` but a missing object is ``HANDLE_INVALID [cls, ref]``."""
        rec = self.find(cls, ref)
        if rec is None:
            raise ApiError("HANDLE_INVALID", cls, ref)
        return rec

    def read(self, cls: str, ref: str) -> Record | None:
        """Read without taking a private copy (for records this transaction will not change)."""
        key = (cls, ref)
        if key in self._changes:
            return self._changes[key]
        return self.store.get(cls, ref)

    def refs(self, cls: str) -> list[str]:
        out = [r for r in self.store.refs(cls) if self._changes.get((cls, r), True) is not None]
        for r in self._mine(cls):
            if r not in self.store._tables[cls] and self._changes.get((cls, r)) is not None:
                out.append(r)
        return out

    def items(self, cls: str) -> list[tuple[str, Record]]:
        out = []
        for r in self.refs(cls):
            rec = self.read(cls, r)
            if rec is not None:
                out.append((r, rec))
        return out

    def referrers(self, src_cls: str, src_field: str, target: str) -> list[str]:
        """Refs of ``src_cls`` objects whose ``src_field`` names ``target`` as this transaction sees them."""
        if (src_cls, src_field) not in self.store._inverse:
            return [r for r, rec in self.items(src_cls) if rec.get(src_field) == target]
        refs = set(self.store.referrers(src_cls, src_field, target))
        for ref in self._mine(src_cls):
            rec = self._changes[(src_cls, ref)]
            if rec is not None and rec.get(src_field) == target:
                refs.add(ref)
            else:
                refs.discard(ref)
        return sorted(refs)

    def touched(self, classes: tuple[str, ...]) -> dict[str, list[str]]:
        """Refs of the live objects of ``classes`` this transaction created, changed or took for writing."""
        out: dict[str, list[str]] = {}
        for cls in classes:
            live = [ref for ref in self._mine(cls) if self._changes[(cls, ref)] is not None]
            if live:
                out[cls] = live
        return out

    def by_uuid(self, cls: str, uuid: str) -> str | None:
        for r in self._mine(cls):
            rec = self._changes[(cls, r)]
            if rec is not None and rec.get("uuid") == uuid:
                return r
        ref = self.store.by_uuid(cls, uuid)
        if ref is not None and self.read(cls, ref) is None:
            return None
        return ref

    def create(self, cls: str, values: Record, ref: str | None = None) -> str:
        """Insert a new object: schema defaults for everything not in ``values``."""
        cdef = self.schema.classes[cls]
        rec: Record = {}
        for f in cdef.stored_fields():
            rec[f.name] = _copy_value(values[f.name]) if f.name in values else f.initial()
        if not rec.get("uuid"):
            rec["uuid"] = new_uuid()
        ref = ref or new_ref()
        self._put(cls, ref, rec)
        return ref

    def update(self, cls: str, ref: str, **values: Any) -> Record:
        rec = self.get(cls, ref)
        rec.update(values)
        return rec

    def delete(self, cls: str, ref: str) -> None:
        self.get(cls, ref)
        self._put(cls, ref, None)

    def _commit(self) -> int:
        """Install the changes and queue their rows (under the store lock); return the new
        generation, or 0 when nothing changed."""
        store = self.store
        for hook in store.pre_commit:
            hook(self)
        tables = store._tables
        shallow = self._shallow
        # (cls, ref, op, old, new) of every record that changed, the fields set_fields() set on it
        changed: list[tuple[Change, set[str] | None]] = []
        for (cls, ref), new in self._changes.items():
            old = tables[cls].get(ref)
            if new is None:
                if old is not None:
                    changed.append(((cls, ref, "del", old, None), None))
                continue
            if old is None:
                changed.append(((cls, ref, "add", None, new), None))
                continue
            fields = shallow.get((cls, ref))
            if fields is None:
                if new == old:
                    continue
            else:
                for f in fields:
                    value, before = new[f], old.get(f, _ABSENT)
                    if value is not before and value != before:
                        break
                else:
                    continue  # set_fields() changed these fields only, and none of them changed
            changed.append(((cls, ref, "mod", old, new), fields))
        if not changed:
            return 0
        rows: list[Row] = []
        if store._db is not None:
            persist = store._persist
            for (cls, ref, _op, old, new), fields in changed:
                if persist[cls]:
                    if new is None:
                        store._row_parts.pop(ref, None)
                        rows.append((ref, cls, None, True))
                    else:
                        rows.append((ref, cls, store._row_of(cls, ref, new, old, fields), old is not None))
        # The generation and its rows are published before any record is: a reader (who takes no
        # lock) that sees a new record then waits for that generation, whose rows are queued.
        gen = store.generation + 1
        store._queue(gen, rows)
        store.generation = gen
        indexed, dirty = store._indexed, store._dirty
        for (cls, ref, _op, old, new), fields in changed:
            if fields is not None and indexed[cls].isdisjoint(fields):
                tables[cls][ref] = new  # no indexed field set: the indexes hold as they are
                dirty.add((cls, ref))  # as _install does
            else:
                store._install(cls, ref, old, new)
        ops = [change for change, _fields in changed]
        for listener in store.listeners:
            listener(gen, ops)
        return gen
