"""The event system: ``event.from``, ``event.inject`` and the legacy register/next (wire.md 6).

Every store commit reports its changes here.  For each object the module keeps
the generation it was created at, last changed at, and whether it is gone;
``event.from`` answers from that table, which gives xapi's coalescing for free
(created and changed since the token: one ``add``; created and deleted: nothing).
Changing a ref field also changes the derived set on the object it points to
(``PBD.SR`` -> ``SR.PBDs``), so that object gets a ``mod`` too, as in xapi.
Waiting clients sleep on a condition variable; nobody polls.

Parked calls (``event.from`` and ``event.next`` waiting for a change) are counted: at most
``max-waiting-calls`` at once and ``max-waiting-calls-per-user`` per user name.  A call that
would exceed a limit wakes the oldest parked call of that user (or of anyone, for the global
limit), which answers as if its timeout had elapsed: an empty batch and the current token.
At shutdown every parked call is answered the same way (see :meth:`Events.shutdown`).
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from xapid.errors import ApiError
from xapid.schema import NULL_REF, Type
from xapid.store import Change, Store, relation_moves
from xapid.wire import I4, Typed

if TYPE_CHECKING:
    from xapid.auth import Sessions

HIDDEN = frozenset({"session"})  # xapi never reports sessions as events
MAX_TOMBSTONES = 100_000
LEGACY_QUEUE = 10_000
_TOKEN = re.compile(r"^(\d{1,20}),(\d{1,20})$")


@dataclass
class Entry:
    created: int
    modified: int
    deleted: bool = False


@dataclass(eq=False)
class Waiter:
    """One parked call; ``woken`` makes it answer now, as at its timeout."""

    user: str
    woken: bool = False


@dataclass
class Legacy:
    """A session's ``event.register`` subscriptions and the generation it has seen."""

    classes: set[str]
    seen: int
    counter: int = 0


class Events:
    def __init__(self, store: Store, sessions: Sessions) -> None:
        self.store = store
        self.sessions = sessions
        self.cv = threading.Condition(store.lock)
        # Objects changed since start-up; every other object counts as Entry(0, 0) (present at start).
        self.entries: dict[tuple[str, str], Entry] = {}
        # Every mark in generation order, so a client's catch-up costs what changed, not the table size.
        self.log_gens: list[int] = []
        self.log_keys: list[tuple[str, str]] = []
        self.tombstones: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.lowercase = {name.lower(): name for name, c in store.schema.classes.items() if c.in_db}
        self.legacy: dict[str, Legacy] = {}
        self.relations = [(src_cls, src_field, cls) for cls, _f, src_cls, src_field in store.schema.relations()
                          if cls not in HIDDEN]  # task.session -> session.tasks: sessions stay unreported
        # The same by source class, so that a commit looks only at the relations its classes feed.
        self.fed_by: dict[str, list[tuple[str, str]]] = {}
        for src_cls, src_field, target_cls in self.relations:
            self.fed_by.setdefault(src_cls, []).append((src_field, target_cls))
        # All of a class's relation fields at once: a change that moved none of them is told by one comparison.
        self._fields = {cls: [f for f, _t in fed] for cls, fed in self.fed_by.items()}
        self._sources = {cls: itemgetter(*fields) for cls, fields in self._fields.items()}
        self.parked: list[Waiter] = []  # oldest first
        self.max_waiting = 256
        self.max_waiting_per_user = 64
        self.stopping = False
        with store.lock:
            store.listeners.append(self._on_commit)

    # -- recording --------------------------------------------------------------------------------

    def _mark(self, gen: int, cls: str, ref: str, op: str) -> None:
        key = (cls, ref)
        entry = self.entries.get(key)
        if op == "add":
            self.entries[key] = Entry(gen, gen)
            self.tombstones.pop(key, None)
        elif entry is None:  # first change of an object present at start-up
            entry = self.entries[key] = Entry(0, gen, op == "del")
            if entry.deleted:
                self.tombstones[key] = None
        elif op == "del":
            entry.modified, entry.deleted = gen, True
            self.tombstones[key] = None
            while len(self.tombstones) > MAX_TOMBSTONES:
                old, _ = self.tombstones.popitem(last=False)
                self.entries.pop(old, None)
        elif not entry.deleted:
            entry.modified = gen
        self.log_gens.append(gen)
        self.log_keys.append(key)
        if len(self.log_gens) > 4 * len(self.entries) + 1024:
            live = sorted(self.entries.items(), key=lambda item: item[1].modified)
            self.log_gens = [e.modified for _k, e in live]
            self.log_keys = [k for k, _e in live]

    def _on_commit(self, gen: int, changes: list[Change]) -> None:
        for cls, ref, op, old, new in changes:
            if cls in HIDDEN:
                continue
            self._mark(gen, cls, ref, op)
            fed = self.fed_by.get(cls)
            if fed is None:
                continue
            for i, before, after in relation_moves(self._fields[cls], self._sources[cls], old, new):
                target_cls = fed[i][1]
                for target in (before, after):
                    if isinstance(target, str) and target != NULL_REF and self.store.exists(target_cls, target):
                        self._mark(gen, target_cls, target, "mod")
        if self.parked:  # every call waiting on cv is parked (event.from, event.next)
            self.cv.notify_all()

    # -- helpers ----------------------------------------------------------------------------------

    def _subscription(self, classes: list[str]) -> tuple[bool, set[str], set[tuple[str, str]]]:
        everything = False
        names: set[str] = set()
        objects: set[tuple[str, str]] = set()
        for c in classes:
            c = c.strip()
            if c == "*":
                everything = True
            elif "/" in c:
                name, ref = c.split("/", 1)
                real = self.lowercase.get(name.lower())
                if real:
                    objects.add((real, ref))
            else:
                real = self.lowercase.get(c.lower())
                if real:
                    names.add(real)
        return everything, names, objects

    def _event(self, cls: str, ref: str, entry: Entry, since: int, event_id: str,
               timestamp: str) -> dict[str, Any] | None:
        if entry.deleted:
            if entry.created > since:
                return None
            op = "del"
        else:
            op = "add" if entry.created > since else "mod"
        ev: dict[str, Any] = {"id": event_id, "timestamp": timestamp, "class": cls.lower(), "operation": op,
                              "ref": ref}
        if op != "del":
            rec = self.store.get(cls, ref)
            if rec is None:
                return None
            ev["snapshot"] = Typed(self.store.render(cls, ref, rec), Type("record", name=cls))
        return ev

    def _collect(self, since: int, sub: tuple[bool, set[str], set[tuple[str, str]]],
                 legacy_ids: Legacy | None = None) -> list[dict[str, Any]]:
        everything, names, objects = sub
        out = []
        changed = []
        if since < 0:  # token "": every object that exists now
            unchanged = Entry(0, 0)
            for cls, c in self.store.schema.classes.items():
                if c.in_db and cls not in HIDDEN:
                    changed.extend(((cls, ref), self.entries.get((cls, ref), unchanged))
                                   for ref in self.store.refs(cls))
            changed.sort(key=lambda item: item[1].modified)
        else:
            start = bisect.bisect_right(self.log_gens, since)
            for gen, key in zip(self.log_gens[start:], self.log_keys[start:], strict=True):
                entry = self.entries.get(key)
                if entry is not None and entry.modified == gen:
                    changed.append((key, entry))
        for (cls, ref), entry in changed:
            if not (everything or cls in names or (cls, ref) in objects):
                continue
            if legacy_ids is not None:
                legacy_ids.counter += 1
                ev = self._event(cls, ref, entry, since, str(legacy_ids.counter), f"{time.time():.0f}.")
            else:
                ev = self._event(cls, ref, entry, since, str(entry.modified), "0.0")
            if ev is not None:
                out.append(ev)
        return out

    def token(self, gen: int) -> str:
        return f"{gen:020d},{0:020d}"

    def _counts(self) -> dict[str, I4]:
        return {name.lower(): I4(len(self.store.refs(name))) for name, c in self.store.schema.classes.items()
                if c.in_db and name not in HIDDEN}

    # -- parking ----------------------------------------------------------------------------------

    def limit_waiting(self, total: int, per_user: int) -> None:
        """Set the most calls parked at once, overall and per user name (both at least 1)."""
        with self.cv:
            self.max_waiting, self.max_waiting_per_user = max(1, total), max(1, per_user)

    def _park(self, session: str) -> Waiter:
        """Register a call about to wait (``cv`` held); make room by waking the oldest over a limit."""
        waiter = Waiter(self.sessions.user(session))
        mine = [w for w in self.parked if w.user == waiter.user and not w.woken]
        if len(mine) >= self.max_waiting_per_user:
            mine[0].woken = True
        awake = [w for w in self.parked if not w.woken]
        if len(awake) >= self.max_waiting:
            awake[0].woken = True
        self.parked.append(waiter)
        self.cv.notify_all()
        return waiter

    def _unpark(self, waiter: Waiter) -> None:
        self.parked.remove(waiter)

    def waiting(self) -> int:
        """How many calls are parked now (woken ones that have not answered yet excluded)."""
        with self.cv:
            return sum(1 for w in self.parked if not w.woken)

    def shutdown(self) -> None:
        """Answer every parked call now, and every later one at once: the daemon is stopping.

        xapi's ``event.from`` ends its wait when its timer expires and returns the batch it has
        (``ocaml/xapi/xapi_event.ml``, ``From.wait2``); a stop is treated as that timer expiring,
        so clients get a valid, empty answer rather than a dropped connection.
        """
        with self.cv:
            self.stopping = True
            for w in self.parked:
                w.woken = True
            self.cv.notify_all()

    # -- the API ------------------------------------------------------------------------------------

    def event_from(self, session: str, classes: list[str], token: str, timeout: float) -> dict[str, Any]:
        if token == "":
            since = -1
        else:
            m = _TOKEN.match(token)
            if not m:
                raise ApiError("EVENT_FROM_TOKEN_PARSE_FAILURE", token)
            since = int(m.group(1))
        sub = self._subscription(classes)
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self.cv:
            waiter: Waiter | None = None
            try:
                while True:
                    if not self.sessions.alive(session):
                        raise ApiError("SESSION_INVALID", session)
                    events = self._collect(since, sub)
                    now = time.monotonic()
                    if events or now >= deadline or self.stopping or (waiter is not None and waiter.woken):
                        return {"events": events, "valid_ref_counts": self._counts(),
                                "token": self.token(self.store.generation)}
                    if waiter is None:
                        waiter = self._park(session)
                    self.cv.wait(min(deadline - now, threading.TIMEOUT_MAX))  # an infinite timeout is "forever"
            finally:
                if waiter is not None:
                    self._unpark(waiter)

    def inject(self, cls: str, ref: str) -> str:
        real = self.lowercase.get(cls.lower()) if cls not in self.store.schema.classes else cls
        if real is None or not self.store.exists(real, ref):
            raise ApiError("HANDLE_INVALID", cls, ref)
        return self.token(self.store.touch(real, ref))

    def register(self, session: str, classes: list[str]) -> None:
        with self.cv:
            entry = self.legacy.setdefault(session, Legacy(set(), self.store.generation))
            entry.classes.update(c.strip() for c in classes)

    def unregister(self, session: str, classes: list[str]) -> None:
        with self.cv:
            entry = self.legacy.get(session)
            if entry is not None:
                entry.classes.difference_update(c.strip() for c in classes)

    def next(self, session: str) -> list[dict[str, Any]]:
        """The legacy blocking call: the next batch of events, possibly empty (as XenAPI documents)
        when the call is woken to make room or because the daemon stops."""
        with self.cv:
            waiter: Waiter | None = None
            try:
                while True:
                    entry = self.legacy.get(session)
                    if entry is None:
                        raise ApiError("SESSION_NOT_REGISTERED", session[:18])
                    if not self.sessions.alive(session):
                        self.legacy.pop(session, None)
                        raise ApiError("SESSION_INVALID", session)
                    pending = len(self.log_gens) - bisect.bisect_right(self.log_gens, entry.seen)
                    if pending > LEGACY_QUEUE:
                        entry.seen = self.store.generation
                        raise ApiError("EVENTS_LOST")
                    events = self._collect(entry.seen, self._subscription(sorted(entry.classes)), entry)
                    entry.seen = self.store.generation
                    if events or self.stopping or (waiter is not None and waiter.woken):
                        return events
                    if waiter is None:
                        waiter = self._park(session)
                    self.cv.wait(60.0)
            finally:
                if waiter is not None:
                    self._unpark(waiter)

    def current_id(self) -> int:
        return self.store.generation

