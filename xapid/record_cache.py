"""Encoded records, kept per object version so unchanged records are not encoded again.

``get_record``, ``get_all_records`` and ``get_all_records_where`` answer
:class:`Encoded` values; the encoders (:mod:`xapid.wire`) splice their cached
XML-RPC or JSON text where a fresh encoding would go, byte for byte the same.

An entry belongs to one committed record object (records are replaced, never
changed in place, on every commit) and is dropped by the store's commit hook
when the object, or a relation field that fills one of its derived fields
(``VM.VBDs`` from ``VBD.VM``...), changes.  An encoding made while a commit
ran is not kept.  The cache is bounded (``record-cache-size`` MiB, the oldest
entries out first), so memory does not grow with the store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from operator import itemgetter
from typing import TYPE_CHECKING

from xapid.schema import NULL_REF, Type
from xapid.store import relation_moves
from xapid.wire import Preencoded, dumps_value

if TYPE_CHECKING:
    from xapid.store import Change, Record, Store
    from xapid.wire import Encoder


OVERHEAD = 256  # bytes an entry costs beyond its text and its rendered record's table


class Encoded(Preencoded):
    """One rendered record and its wire forms, each made on first use.

    The XML-RPC form is kept as UTF-8 bytes, spliced into replies as they are (no copy, no
    encoding per call).  Once a form is made the rendered record is let go (only the stored
    record, shared with the store, is kept): a second form, seldom asked for, renders it again.
    """

    __slots__ = ("_base", "_json", "_xml", "cache", "cls", "encoder", "owner", "rec", "record", "ref")

    def __init__(self, encoder: Encoder, cls: str, ref: str, record: Record, owner: RecordCache | None,
                 rec: Record | None = None) -> None:
        self.encoder = encoder
        self.cls = cls
        self.ref = ref
        self.record: Record | None = record
        self.rec = rec  # the stored record ``record`` was rendered from (None: keep ``record``)
        self.owner = owner
        self.cache = owner  # to render again (``owner`` is cleared when the entry leaves the cache)
        self._xml: bytes | None = None
        self._json: str | None = None
        self._base = OVERHEAD

    def _rendered(self) -> tuple[Record, int]:
        """The rendered record and the store generation it holds for (-1: not known)."""
        record = self.record
        if record is not None:
            return record, -1
        cache = self.cache
        assert self.rec is not None and cache is not None
        generation = cache.store.generation
        return cache.store.render(self.cls, self.ref, self.rec), generation

    def _made(self, slot: str, text: bytes | str, generation: int) -> None:
        if self.owner is None:
            setattr(self, slot, text)
        else:
            self.owner._keep(self, slot, text, generation)
            if self.rec is not None and self.owner is not None:
                self.record = None  # kept: the stored record is enough to render it again

    def xml_bytes(self) -> bytes:
        """The XML-RPC ``<value>`` of the record, UTF-8 encoded."""
        data = self._xml
        if data is None:
            owner = self.owner
            record, generation = self._rendered()
            data = self.encoder.xml(record, Type("record", name=self.cls)).encode("utf-8")
            if owner is not None and self.owner is None:  # dropped meanwhile: answer, keep nothing
                return data
            self._made("_xml", data, generation)
        return data

    def xml(self) -> str:
        """The XML-RPC ``<value>`` of the record."""
        return self.xml_bytes().decode("utf-8")

    def json(self) -> str:
        """The JSON text of the record (``json.dumps`` spacing)."""
        text = self._json
        if text is None:
            owner = self.owner
            record, generation = self._rendered()
            text = dumps_value(self.encoder.json(record, Type("record", name=self.cls)))
            if owner is not None and self.owner is None:
                return text
            self._made("_json", text, generation)
        return text

    def size(self) -> int:
        return len(self._xml or b"") + len(self._json or "") + self._base


class RecordCache:
    """Encoded records by ref, for the committed state of ``store``."""

    def __init__(self, store: Store, encoder: Encoder, budget_bytes: int) -> None:
        self.store = store
        self.encoder = encoder
        self.budget = budget_bytes
        self._entries: OrderedDict[str, tuple[Record, Encoded]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._relations: dict[str, list[str]] = {}  # source class -> its fields that fill derived fields
        for _cls, _field, src_cls, src_field in store.schema.relations():
            self._relations.setdefault(src_cls, []).append(src_field)
        # All of a class's relation fields at once: a change that moved none of them (most) is
        # told by one comparison.
        self._sources = {cls: itemgetter(*fields) for cls, fields in self._relations.items()}
        with store.lock:
            store.listeners.append(self._on_commit)

    def encoded(self, cls: str, ref: str, rec: Record) -> Encoded:
        """The record ``rec`` (committed state of ``ref``) rendered, from the cache when it is current."""
        entry = self._entries.get(ref)
        if entry is not None and entry[0] is rec:
            return entry[1]
        if self.budget <= 0:
            return Encoded(self.encoder, cls, ref, self.store.render(cls, ref, rec), None)
        generation = self.store.generation
        enc = Encoded(self.encoder, cls, ref, self.store.render(cls, ref, rec), self, rec)
        with self._lock:
            if self.store.generation == generation:  # no commit meanwhile: the derived fields hold
                self._drop(ref)
                self._entries[ref] = (rec, enc)
                self._bytes += enc.size()
                self._trim()
            else:
                enc.owner = None
                enc.rec = None  # not cached: it keeps its rendered record
        return enc

    @property
    def size(self) -> int:
        """Bytes the cache accounts for now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _keep(self, enc: Encoded, slot: str, text: bytes | str, generation: int = -1) -> None:
        """Keep a form of ``enc`` made from a rendering at ``generation`` (-1: the entry's own)."""
        with self._lock:
            if getattr(enc, slot) is not None:
                return
            entry = self._entries.get(enc.ref)
            if generation >= 0 and self.store.generation != generation:
                entry = None  # rendered again while a commit ran: its derived fields may not hold
            if entry is not None and entry[1] is enc:
                setattr(enc, slot, text)
                self._bytes += len(text)
                self._trim()
            else:
                enc.owner = None
                setattr(enc, slot, text)

    def _trim(self) -> None:
        while self._bytes > self.budget and self._entries:
            _ref, (_rec, victim) = self._entries.popitem(last=False)
            self._bytes -= victim.size()
            victim.owner = None

    def _drop(self, ref: str) -> None:
        old = self._entries.pop(ref, None)
        if old is not None:
            self._bytes -= old[1].size()
            old[1].owner = None

    def _on_commit(self, _gen: int, changes: list[Change]) -> None:
        with self._lock:
            for cls, ref, _op, old, new in changes:
                self._drop(ref)
                fields = self._relations.get(cls)
                if fields is None:
                    continue
                for _i, before, after in relation_moves(fields, self._sources[cls], old, new):
                    for target in (before, after):
                        if isinstance(target, str) and target != NULL_REF:
                            self._drop(target)
