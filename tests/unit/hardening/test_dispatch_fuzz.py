"""Property: whatever a client sends, the dispatcher answers a reply or a clean XenAPI failure.

Hypothesis drives a real in-process :class:`~xapid.daemon.Daemon` (store, seeded pool,
sessions, every handler) with random method names (served, ``Async.``, underscore aliases,
garbage), arities and argument types (well-typed values of the declared types, wrong types,
int64 edges, NaN, bytes, lone surrogates, dicts with odd keys, refs of the wrong class).
Each call must end as a :class:`~xapid.dispatch.Reply` that encodes to a parsable XML-RPC
envelope (and JSON) or as an :class:`~xapid.errors.ApiError` whose code is known; a failed
call must leave the store exactly as it was (its generation does not move).
"""

from __future__ import annotations

import json
import math
import os
import xmlrpc.client
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.unit.hardening.support import KNOWN_CODES, SESSIONLESS, UNSAFE, in_process_daemon
from xapid.daemon import Daemon
from xapid.dispatch import Reply
from xapid.errors import ApiError
from xapid.generic import constructor_fields
from xapid.schema import NULL_REF, Type
from xapid.wire import XDateTime, dumps_value, xml_bare, xml_success

INT_EDGES = [0, 1, -1, 2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30, -(10**30)]
ODD_STRINGS = [
    "", " ", " 1 ", "1e3", "nan", "inf", "-0", "0x10", "\u0661\u0662", "9" * 5000, "true", "OpaqueRef:NULL",
    "OpaqueRef:bogus", "\ud800", "a\udfffb", "\x00\x01", "\ufffe\uffff", "../..", "..", "/", "x" * 300,
    "20250101T00:00:00Z", "field \"x\" = \"y\"", "not not (true)", "*",
]
STATS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = in_process_daemon(tmp_path_factory.mktemp("fuzz"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def root(daemon: Daemon) -> str:
    return daemon.sessions.login("root", "", "fuzz", local=True)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(f"\ndispatch fuzz: {sum(STATS.values())} calls; outcomes {dict(STATS.most_common())}")


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(INT_EDGES),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(ODD_STRINGS),
        st.binary(max_size=8), st.builds(XDateTime, st.sampled_from(["20250101T00:00:00Z", "garbage", ""])),
        st.uuids().map(str),
    )


def anything() -> st.SearchStrategy[Any]:
    keys = st.one_of(st.text(max_size=8), st.integers(-3, 3), st.sampled_from(ODD_STRINGS))
    return st.recursive(
        scalars(),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
        max_leaves=8,
    )


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices``, each picked with its weight (``one_of`` has no weights)."""
    slots = [i for i, (w, _s) in enumerate(choices) for _ in range(w)]
    return st.sampled_from(slots).flatmap(lambda i: choices[i][1])


class Typed:
    """Strategies for values of declared types, mostly valid.

    Refs and uuids are drawn as indexes and resolved against the live store when drawn, so the
    shape of the generated data never depends on what earlier examples created or destroyed.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.classes = sorted(name for name, c in daemon.schema.classes.items() if c.in_db)

    def _pick(self, cls: str | None, i: int) -> str:
        store = self.d.store
        if cls is not None and cls not in self.classes:  # a ref to a class xapid does not model
            return f"OpaqueRef:{i:08d}-0000-4000-8000-000000000000"
        refs = store.refs(cls) if cls is not None else [r for c in self.classes for r in store.refs(c)]
        return refs[i % len(refs)] if refs else NULL_REF

    def ref(self, cls: str | None) -> st.SearchStrategy[str]:
        return st.integers(0, 1 << 16).map(lambda i: self._pick(cls, i))

    def uuid(self) -> st.SearchStrategy[str]:
        def pick(i: int) -> str:
            ref = self._pick(None, i)
            cls = self.d.store.class_of(ref)
            rec = self.d.store.get(cls, ref) if cls else None
            return str(rec["uuid"]) if rec else "x"

        return st.integers(0, 1 << 16).map(pick)

    def of(self, ty: Type, depth: int = 0) -> st.SearchStrategy[Any]:
        k = ty.kind
        bad = anything() if depth == 0 else scalars()
        if k == "string":
            good = st.one_of(st.text(max_size=12), self.uuid(), self.ref(None), st.sampled_from(ODD_STRINGS))
        elif k == "ref":
            good = weighted((6, self.ref(ty.name)), (1, self.ref(None)), (1, st.just(NULL_REF)))
        elif k == "int":
            good = st.one_of(st.integers(-3, 4096).map(str), st.integers(-3, 4096),
                             st.sampled_from(INT_EDGES).map(str))
        elif k == "float":
            good = st.one_of(st.floats(-1e6, 1e6), st.integers(-3, 10), st.sampled_from(["0.5", "inf", "nan"]))
        elif k == "bool":
            good = st.booleans()
        elif k == "enum":
            good = st.sampled_from(self.d.schema.enums.get(ty.name) or ["x"])
        elif k == "datetime":
            good = st.sampled_from(["20250101T00:00:00Z", "2025-01-01T00:00:00Z", "20250101T00:00:00+02:00"])
        elif k == "set" and ty.elem is not None:
            good = st.lists(self.of(ty.elem, depth + 1), max_size=3)
        elif k == "map" and ty.key is not None and ty.value is not None:
            good = st.dictionaries(self.of(ty.key, depth + 1), self.of(ty.value, depth + 1), max_size=3)
        elif k == "record":
            fields = constructor_fields(self.d.schema.classes[ty.name])
            mandatory = {f.name: self.of(f.type, depth + 1) for f in fields if not f.has_default}
            optional = {f.name: self.of(f.type, depth + 1) for f in fields if f.has_default}
            good = st.fixed_dictionaries(mandatory, optional=optional)
        else:
            good = bad
        # Mostly valid (so the handlers run), sometimes wrong; inside records and maps rarely wrong.
        return weighted((8 if depth == 0 else 40, good), (1, bad))


def method_names(daemon: Daemon) -> st.SearchStrategy[str]:
    served = [m for m in daemon.dispatcher.list_methods() if m not in UNSAFE]
    garbage = ["", ".", "Async.", "InternalAsync.", "system.isAlive:x", "VM.", "VM.get_record.x",
               "Async.Async.VM.start", "vm.get_record", "session.login_with_password "]
    return weighted(
        (16, st.sampled_from(served)),
        (1, st.sampled_from(served).map(lambda m: "Async." + m)),
        (1, st.sampled_from(served).map(lambda m: m.replace(".", "_", 1))),
        (1, st.text(max_size=24)),
        (1, st.sampled_from(garbage)),
    )


def base_name(daemon: Daemon, name: str) -> str | None:
    for prefix in ("Async.", "InternalAsync."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    m = daemon.dispatcher.resolve(name)
    return m.name if m is not None else None


def json_native(v: Any) -> bool:
    if isinstance(v, (bytes, XDateTime)):
        return False
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(json_native(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and json_native(x) for k, x in v.items())
    return True


def check_encodes(daemon: Daemon, reply: Reply, params: list[Any]) -> None:
    value = daemon.encoder.xml(reply.value, reply.type)
    body = xml_bare(value) if reply.bare else xml_success(value)
    assert b"<fault>" not in body
    xmlrpc.client.loads(body.decode("utf-8"))  # what the SDK does with it: must parse
    if json_native(params):
        json.loads(dumps_value(daemon.encoder.json(reply.value, reply.type)))  # what a JSON-RPC reply carries


FUZZ = {"deadline": None, "database": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}


@settings(max_examples=int(os.environ.get("XAPID_FUZZ_EXAMPLES", "300")), **FUZZ)
@given(data=st.data())
def test_any_call_is_a_reply_or_a_known_failure_and_failures_change_nothing(
    daemon: Daemon, root: str, data: st.DataObject
) -> None:
    one_call(daemon, root, data)


@pytest.mark.slow
@settings(max_examples=10_000, **FUZZ)
@given(data=st.data())
def test_ten_thousand_calls(daemon: Daemon, root: str, data: st.DataObject) -> None:
    one_call(daemon, root, data)


def one_call(daemon: Daemon, root: str, data: st.DataObject) -> None:
    name = data.draw(method_names(daemon), label="method")
    resolved = base_name(daemon, name)
    assume(resolved not in UNSAFE)
    method = daemon.dispatcher.table.get(resolved) if resolved else None
    typed = Typed(daemon)
    if method is not None and data.draw(weighted((9, st.just(True)), (1, st.just(False))), label="typed"):
        args = [data.draw(typed.of(p.type), label=p.name) for p in method.params]
        cut = data.draw(weighted((10, st.just(0)), (1, st.just(-1)), (1, st.just(1))), label="arity change")
        if cut < 0 and args:
            args.pop()
        elif cut > 0:
            args.append(data.draw(anything(), label="surplus"))
    else:
        args = data.draw(st.lists(anything(), max_size=5), label="args")
    params = list(args)
    if method is None or method.session:
        session = data.draw(st.one_of(st.just(root), st.just(root), st.just(root), st.just("OpaqueRef:bogus"),
                                      anything()), label="session")
        params = [session, *args]
    if resolved == "event.from" and len(params) >= 4:
        params[3] = 0.0  # never block
    before = daemon.store.generation
    try:
        reply = daemon.dispatcher.dispatch(name, params)
    except ApiError as e:
        STATS[e.code] += 1
        assert e.code in KNOWN_CODES, e.description
        assert all(isinstance(p, str) for p in e.params)
        assert daemon.store.generation == before, f"{name} failed with {e.description} but changed the store"
    else:
        STATS["Success"] += 1
        check_encodes(daemon, reply, params)
        if daemon.store.generation != before and method is not None and method.cls in daemon.store._tables:
            # What the write stored must read back through the SDK: every record of its class.
            store = daemon.store
            records = {r: store.render(method.cls, r, rec) for r, rec in store.items(method.cls)}
            check_encodes(daemon, Reply(records, Type("map", key=Type("ref", name=method.cls),
                                                      value=Type("record", name=method.cls))), [])
    finally:
        daemon.tasks.wait_all(30.0)
    assert Path(daemon.state_dir / "xapid.db").exists(), "the store file must never be removed by a call"
    assert (daemon.state_dir / "users.json").exists()


def test_sessionless_set_is_what_the_table_says(daemon: Daemon) -> None:
    """The fuzzer and the access tests rely on this list: only the login family skips the session."""
    table = daemon.dispatcher.table
    assert {n for n, m in table.items() if not m.session and (m.impl is not None)} <= SESSIONLESS
    assert not table["session.login_with_password"].session
