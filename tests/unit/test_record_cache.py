"""Encoded-record cache: cached and fresh encodings are byte-identical after any sequence of writes."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xapid import schema as schema_mod
from xapid.record_cache import RecordCache
from xapid.schema import NULL_REF, Type
from xapid.store import Store
from xapid.wire import Encoder, JsonCall, dumps_value, json_success, xml_success, xml_success_parts

SCHEMA = schema_mod.load()

# One step: (kind, a, b, text) with a/b picking objects by index among those that exist.
steps = st.lists(st.tuples(st.sampled_from(["vm", "vbd", "rename", "attach", "detach", "other", "delete"]),
                           st.integers(0, 7), st.integers(0, 7), st.text(max_size=12)), max_size=40)


def fresh_xml(enc: Encoder, store: Store, cls: str, ref: str) -> str:
    return enc.xml(store.render(cls, ref), Type("record", name=cls))


def fresh_json(enc: Encoder, store: Store, cls: str, ref: str) -> str:
    return json.dumps(enc.json(store.render(cls, ref), Type("record", name=cls)), allow_nan=False)


def apply(store: Store, kind: str, a: int, b: int, text: str) -> None:
    vms, vbds = store.refs("VM"), store.refs("VBD")
    with store.transaction() as tx:
        if kind == "vm" or not vms:
            tx.create("VM", {"name_label": text})
        elif kind == "vbd":
            tx.create("VBD", {"VM": vms[a % len(vms)], "userdevice": str(b)})
        elif kind == "rename":
            tx.update("VM", vms[a % len(vms)], name_label=text)
        elif kind == "attach" and vbds:
            tx.update("VBD", vbds[a % len(vbds)], VM=vms[b % len(vms)])
        elif kind == "detach" and vbds:
            tx.update("VBD", vbds[a % len(vbds)], VM=NULL_REF)
        elif kind == "other":
            tx.update("VM", vms[a % len(vms)], other_config={text: str(b), "k": text})
        elif kind == "delete" and vbds and b % 2:
            tx.delete("VBD", vbds[a % len(vbds)])
        elif kind == "delete":
            tx.delete("VM", vms[a % len(vms)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.sampled_from([0, 6000, 1 << 20]))
def test_cached_and_fresh_encodings_are_identical_after_random_writes(ops: list, budget: int) -> None:  # type: ignore[type-arg]
    store = Store(SCHEMA, None)
    enc = Encoder(SCHEMA)
    cache = RecordCache(store, enc, budget)
    for op in ops:
        apply(store, *op)
        for cls in ("VM", "VBD"):
            for ref, rec in store.items(cls):
                for _ in range(2):  # the second read is served from the cache when it fits
                    got = cache.encoded(cls, ref, rec)
                    assert got.xml() == fresh_xml(enc, store, cls, ref)
                    assert got.json() == fresh_json(enc, store, cls, ref)
        assert 0 <= cache.size <= max(budget, 0) or len(cache) <= 1


def test_a_change_of_a_relation_reaches_the_record_it_derives() -> None:
    store = Store(SCHEMA, None)
    enc = Encoder(SCHEMA)
    cache = RecordCache(store, enc, 1 << 20)
    with store.transaction() as tx:
        vm = tx.create("VM", {"name_label": "vm"})
    before = cache.encoded("VM", vm, store.get("VM", vm)).xml()  # type: ignore[arg-type]
    with store.transaction() as tx:
        vbd = tx.create("VBD", {"VM": vm})
    # The VM record object is unchanged; its derived VBDs field is not.
    after = cache.encoded("VM", vm, store.get("VM", vm)).xml()  # type: ignore[arg-type]
    assert vbd in after and vbd not in before
    assert after == fresh_xml(enc, store, "VM", vm)


def test_json_replies_splice_records_exactly_as_json_dumps_writes_them() -> None:
    store = Store(SCHEMA, None)
    enc = Encoder(SCHEMA)
    cache = RecordCache(store, enc, 1 << 20)
    with store.transaction() as tx:
        refs = [tx.create("VM", {"name_label": f"vm {i} \u00e9\"", "VCPUs_max": i}) for i in range(3)]
    records = {r: cache.encoded("VM", r, store.get("VM", r)) for r in refs}  # type: ignore[arg-type]
    plain = {r: enc.json(store.render("VM", r), Type("record", name="VM")) for r in refs}
    for v2 in (False, True):
        call = JsonCall(method="VM.get_all_records", params=[], id=7, v2=v2)
        spliced = json_success(call, enc.json(records, Type("map", key=Type("ref", name="VM"),
                                                            value=Type("record", name="VM"))))
        doc = {"jsonrpc": "2.0", "result": plain, "id": 7} if v2 else {"result": plain, "error": None, "id": 7}
        assert spliced == json.dumps(doc, allow_nan=False).encode("utf-8")
    assert dumps_value(records[refs[0]]) == json.dumps(plain[refs[0]])


def test_spliced_replies_are_byte_identical_to_encoded_ones() -> None:
    """``get_record`` and ``get_all_records`` answers spliced from cached bytes (xml_success_parts)
    equal the envelope of a fresh type-directed encoding, names needing escapes included."""
    store = Store(SCHEMA, None)
    enc = Encoder(SCHEMA)
    cache = RecordCache(store, enc, 1 << 20)
    with store.transaction() as tx:
        refs = [tx.create("VM", {"name_label": f"vm <{i}> & \u00e9", "other_config": {"k&": "<v>"}}) for i in range(3)]
        refs.append(tx.create("VM", {"name_label": "odd ref"}, ref="OpaqueRef:a<b>&c"))
    rec_t = Type("record", name="VM")
    for _ in range(2):  # the second time from the cache
        records = {r: cache.encoded("VM", r, store.get("VM", r)) for r in refs}  # type: ignore[arg-type]
        whole = xml_success_parts(records)
        assert whole is not None and len(whole) == 2 * len(refs) + 2
        fresh = {r: store.render("VM", r) for r in refs}
        assert b"".join(whole) == xml_success(enc.xml(fresh, Type("map", key=Type("ref", name="VM"), value=rec_t)))
        one = xml_success_parts(records[refs[0]])
        assert one is not None and b"".join(one) == xml_success(fresh_xml(enc, store, "VM", refs[0]))
    assert xml_success_parts({}) is None and xml_success_parts({"a": "b"}) is None and xml_success_parts("x") is None
