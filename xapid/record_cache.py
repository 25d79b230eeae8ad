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

import sys
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from xapid.schema import NULL_REF, Type
from xapid.wire import Preencoded, dumps_value

if TYPE_CHECKING:
    from xapid.store import Change, Record, Store
    from xapid.wire import Encoder


OVERHEAD = 256  # bytes an entry costs beyond its text and its rendered record's table


class Encoded(Preencoded):
    """One rendered record and its wire forms, each made on first use."""

    __slots__ = ("_base", "_json", "_xml", "cls", "encoder", "owner", "record", "ref")

    def __init__(self, encoder: Encoder, cls: str, ref: str, record: Record, owner: RecordCache | None) -> None:
        self.encoder = encoder
        self.cls = cls
        self.ref = ref
        self.record = record
        self.owner = owner
        self._xml: str | None = None
        self._json: str | None = None
        self._base = sys.getsizeof(record) + OVERHEAD  # the values are shared with the stored record

    def xml(self) -> str:
        """The XML-RPC ``<value>`` of the record."""
        text = self._xml
        if text is None:
            text = self.encoder.xml(self.record, Type("record", name=self.cls))
            if self.owner is None:
                self._xml = text
            else:
                self.owner._keep(self, "_xml", text)
        return text

    def json(self) -> str:
        """The JSON text of the record (``json.dumps`` spacing)."""
        text = self._json
        if text is None:
            text = dumps_value(self.encoder.json(self.record, Type("record", name=self.cls)))
            if self.owner is None:
                self._json = text
            else:
                self.owner._keep(self, "_json", text)
        return text

    def size(self) -> int:
        return len(self._xml or "") + len(self._json or "") + self._base


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
        enc = Encoded(self.encoder, cls, ref, self.store.render(cls, ref, rec), self)
        with self._lock:
            if self.store.generation == generation:  # no commit meanwhile: the derived fields hold
                self._drop(ref)
                self._entries[ref] = (rec, enc)
                self._bytes += enc.size()
                self._trim()
            else:
                enc.owner = None
        return enc

    @property
    def size(self) -> int:
        """Bytes the cache accounts for now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _keep(self, enc: Encoded, slot: str, text: str) -> None:
        with self._lock:
            if getattr(enc, slot) is not None:
                return
            setattr(enc, slot, text)
            entry = self._entries.get(enc.ref)
            if entry is not None and entry[1] is enc:
                self._bytes += len(text)
                self._trim()
            else:
                enc.owner = None

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
                for src_field in self._relations.get(cls, ()):
                    before = old.get(src_field) if old else None
                    after = new.get(src_field) if new else None
                    if before != after:
                        for target in (before, after):
                            if isinstance(target, str) and target != NULL_REF:
                                self._drop(target)
