"""Bad values inside well-formed calls get xapi's error codes (wire.md 4.3 steps 6 and 10, 4.4),
the same on XML-RPC and JSON-RPC, and change nothing; then random calls over HTTP never leak
a ``<fault>``, a traceback or an unknown code.

Codes: INTERNAL_ERROR for anything that does not unmarshal to the declared type (bad enum,
int64 overflow, wrong map value, nil), HANDLE_INVALID for a ref that is not an object of the
declared class, UUID_INVALID for an unknown uuid, INVALID_VALUE where the value is well typed
but semantically wrong (negative sizes and counts, an SR uuid that would name a path).
"""

from __future__ import annotations

import json
import threading
import xmlrpc.client
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Xapid
from tests.integration.hardening.conftest import clean_log, post
from tests.unit.hardening.support import KNOWN_CODES, UNSAFE
from xapid.schema import NULL_REF

INT64_MAX = 2**63 - 1


class Client:
    """Raw calls over both protocols; returns the ErrorDescription or the value."""

    def __init__(self, xapid: Xapid) -> None:
        self.url = xapid.url
        self.xml_session = self.xml("session.login_with_password", "root", xapid.password)
        self.json_session = self.json("session.login_with_password", "root", xapid.password)

    def xml(self, method: str, *params: Any) -> Any:
        resp = post(self.url, "/", xmlrpc.client.dumps(params, method, allow_none=True).encode())
        assert resp.status == 200 and b"<fault>" not in resp.body, resp.body[:300]
        (envelope,), _ = xmlrpc.client.loads(resp.body.decode())
        if method == "system.listMethods":
            return envelope  # the bare array (wire.md 2.7)
        assert isinstance(envelope, dict) and envelope["Status"] in ("Success", "Failure"), envelope
        if envelope["Status"] == "Success":
            return envelope["Value"]
        return Failure(envelope["ErrorDescription"])

    def json(self, method: str, *params: Any) -> Any:
        doc = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 7}
        resp = post(self.url, "/jsonrpc", json.dumps(doc).encode(), "application/json")
        assert resp.status == 200, resp.body[:300]
        answer = resp.json()
        assert answer["jsonrpc"] == "2.0" and answer["id"] == 7 and ("error" in answer) != ("result" in answer)
        if "error" in answer:
            return Failure([answer["error"]["message"], *answer["error"]["data"]])
        return answer["result"]

    def both(self, method: str, *params: Any) -> list[str]:
        """The failure of ``method(session, *params)`` on both protocols (they must agree)."""
        over_xml = self.xml(method, self.xml_session, *params)
        over_json = self.json(method, self.json_session, *params)
        assert isinstance(over_xml, Failure) and isinstance(over_json, Failure), (over_xml, over_json)
        assert over_xml.details[0] == over_json.details[0]
        return over_json.details


class Failure:
    def __init__(self, details: list[str]) -> None:
        self.details = [str(d) for d in details]

    def __repr__(self) -> str:
        return f"Failure({self.details})"


@pytest.fixture(scope="module")
def client(shared_xapid: Xapid) -> Client:
    return Client(shared_xapid)


@pytest.fixture(scope="module")
def objects(shared_xapid: Xapid, vm_args: Callable[..., dict[str, Any]]) -> Iterator[dict[str, str]]:
    s = shared_xapid.session()
    x = s.xenapi
    vm = x.VM.create(vm_args("hardening bad values"))
    out = {
        "vm": vm, "host": x.host.get_all()[0], "pool": x.pool.get_all()[0],
        "sr": x.pool.get_default_SR(x.pool.get_all()[0]),
    }
    yield out
    x.VM.destroy(vm)
    s.xenapi.session.logout()


def test_refs_of_the_wrong_class_or_unknown_are_handle_invalid(client: Client, objects: dict[str, str]) -> None:
    vm, host, sr = objects["vm"], objects["host"], objects["sr"]
    assert client.both("VM.get_record", host) == ["HANDLE_INVALID", "VM", host]
    assert client.both("SR.get_name_label", NULL_REF) == ["HANDLE_INVALID", "SR", NULL_REF]
    assert client.both("VM.get_power_state", "not a ref at all") == ["HANDLE_INVALID", "VM", "not a ref at all"]
    # A ref field set to an object of another class: refused, unchanged.
    assert client.both("VM.set_affinity", vm, sr) == ["HANDLE_INVALID", "host", sr]
    assert client.json("VM.get_affinity", client.json_session, vm) == NULL_REF
    pbd = {"host": vm, "SR": sr, "device_config": {}}
    assert client.both("PBD.create", pbd) == ["HANDLE_INVALID", "host", vm]
    assert client.both("VDI.create", {"SR": host, "virtual_size": "1", "type": "user", "sharable": False,
                                      "read_only": False, "other_config": {}}) == ["HANDLE_INVALID", "SR", host]


def test_unknown_and_oversized_uuids_are_uuid_invalid(client: Client) -> None:
    zero = "00000000-0000-0000-0000-000000000000"
    assert client.both("VM.get_by_uuid", zero) == ["UUID_INVALID", "VM", zero]
    huge = "u" * 200_000
    assert client.both("host.get_by_uuid", huge) == ["UUID_INVALID", "host", huge]


@pytest.mark.parametrize("value", ["explode", "", "Destroy;rm -rf /"])
def test_unknown_enum_values_are_internal_error(client: Client, objects: dict[str, str], value: str) -> None:
    before = client.json("VM.get_actions_after_crash", client.json_session, objects["vm"])
    details = client.both("VM.set_actions_after_crash", objects["vm"], value)
    assert details[0] == "INTERNAL_ERROR" and "Unhandled pattern" in details[1]
    assert client.json("VM.get_actions_after_crash", client.json_session, objects["vm"]) == before


def test_enum_given_as_a_number_is_internal_error(client: Client, objects: dict[str, str]) -> None:
    details = client.both("VM.set_actions_after_crash", objects["vm"], 3)
    assert details == ["INTERNAL_ERROR", "(Failure \"Expected string, got 'I(3)'\")"]


@pytest.mark.parametrize("value", [
    str(INT64_MAX + 1), str(-(2**63) - 1), "1" + "0" * 5000, "12abc", "0x10", "", "1.5",
])
def test_int64_overflow_and_non_numbers_are_internal_error(client: Client, objects: dict[str, str], value: str) -> None:
    before = client.json("VM.get_memory_static_max", client.json_session, objects["vm"])
    details = client.both("VM.set_memory_static_max", objects["vm"], value)
    assert details[0] == "INTERNAL_ERROR" and "Expected int" in details[1]
    assert client.json("VM.get_memory_static_max", client.json_session, objects["vm"]) == before


def test_int64_extremes_are_accepted_over_both_protocols(client: Client, objects: dict[str, str]) -> None:
    vm = objects["vm"]
    # An int field no rule constrains (memory fields obey xapi's memory constraints).
    before = client.json("VM.get_user_version", client.json_session, vm)
    for value in (INT64_MAX, -(2**63)):
        assert client.json("VM.set_user_version", client.json_session, vm, value) == ""
        assert client.xml("VM.get_user_version", client.xml_session, vm) == str(value)
        assert client.xml("VM.set_user_version", client.xml_session, vm, str(value)) == ""
        assert client.json("VM.get_user_version", client.json_session, vm) == value
    # A JSON number beyond int64, and one beyond even a double, are type errors too.
    over = client.json("VM.set_user_version", client.json_session, vm, INT64_MAX + 1)
    assert isinstance(over, Failure) and over.details[0] == "INTERNAL_ERROR"
    beyond_double = client.json("task.set_progress", client.json_session, NULL_REF, 10**400)
    assert isinstance(beyond_double, Failure) and beyond_double.details[0] == "INTERNAL_ERROR"
    client.json("VM.set_user_version", client.json_session, vm, before)


def test_negative_sizes_and_counts_are_invalid_value(client: Client, objects: dict[str, str]) -> None:
    pool, host, sr = objects["pool"], objects["host"], objects["sr"]
    assert client.both("pool.set_ha_host_failures_to_tolerate", pool, "-1") == [
        "INVALID_VALUE", "ha_host_failures_to_tolerate", "-1"]
    vdi = {"SR": sr, "virtual_size": "-1", "type": "user", "sharable": False, "read_only": False,
           "other_config": {}, "name_label": "negative"}
    assert client.both("VDI.create", vdi) == ["INVALID_VALUE", "virtual_size", "-1"]
    assert client.both("SR.create", host, {}, "-1", "neg", "", "ext", "", False, {}) == [
        "INVALID_VALUE", "physical_size", "-1"]
    assert client.json("VDI.get_by_name_label", client.json_session, "negative") == []
    assert client.json("SR.get_by_name_label", client.json_session, "neg") == []


@pytest.mark.parametrize("value", [{"a": 1}, {"a": {"b": "c"}}, {"a": None}, [["a", "b"]], "a=b", {"a": ["b"]}])
def test_maps_with_values_of_the_wrong_type_are_internal_error(
    client: Client, objects: dict[str, str], value: Any
) -> None:
    before = client.json("VM.get_other_config", client.json_session, objects["vm"])
    over_json = client.json("VM.set_other_config", client.json_session, objects["vm"], value)
    assert isinstance(over_json, Failure) and over_json.details[0] == "INTERNAL_ERROR"
    assert client.json("VM.get_other_config", client.json_session, objects["vm"]) == before


def test_maps_keyed_by_an_enum_refuse_unknown_keys(client: Client, objects: dict[str, str]) -> None:
    vm = objects["vm"]
    details = client.both("VM.set_blocked_operations", vm, {"not_an_operation": "x"})
    assert details[0] == "INTERNAL_ERROR" and "Unhandled pattern" in details[1]
    assert client.json("VM.set_blocked_operations", client.json_session, vm, {"start": "no"}) == ""
    assert client.xml("VM.get_blocked_operations", client.xml_session, vm) == {"start": "no"}
    assert client.json("VM.set_blocked_operations", client.json_session, vm, {}) == ""


def test_nil_and_non_string_sessions_are_internal_error(client: Client, objects: dict[str, str]) -> None:
    assert client.both("VM.get_record", None) == ["INTERNAL_ERROR", "(Failure \"Expected string, got 'N'\")"]
    over_json = client.json("VM.get_record", 12, objects["vm"])
    assert isinstance(over_json, Failure) and over_json.details == [
        "INTERNAL_ERROR", "(Failure \"Expected string, got 'I(12)'\")"]


def test_oversized_strings_round_trip_or_are_refused_by_name(client: Client, objects: dict[str, str]) -> None:
    vm = objects["vm"]
    big = "\u00e9" * 40_000  # 240 kB as JSON escapes: under the 300 KiB request cap
    assert client.json("VM.set_name_label", client.json_session, vm, big) == ""
    assert client.xml("VM.get_name_label", client.xml_session, vm) == big
    client.json("VM.set_name_label", client.json_session, vm, "hardening bad values")
    # A stack name is a folder name: long ones never reach the filesystem.
    stack = "s" * 10_000
    assert client.both("pool.enable_ha", [], {}, stack) == ["UNKNOWN_CLUSTER_STACK", stack]
    assert client.json("pool.get_ha_enabled", client.json_session, objects["pool"]) is False
    assert client.json("pool.get_current_operations", client.json_session, objects["pool"]) == {}


def test_a_string_xml_cannot_carry_never_poisons_xml_readers(
    shared_xapid: Xapid, client: Client, objects: dict[str, str]
) -> None:
    """JSON-RPC can store U+FFFE, U+FFFF and control characters; XML-RPC readers must still parse every
    record (they are dropped on the way out, as control characters are)."""
    vm = objects["vm"]
    poison = "a\ufffe\uffff\x01\x1fb"
    assert client.json("VM.set_name_description", client.json_session, vm, poison) == ""
    assert client.json("VM.get_name_description", client.json_session, vm) == poison
    s = shared_xapid.session()  # the SDK parses the XML: an unparsable answer raises ExpatError here
    assert s.xenapi.VM.get_name_description(vm) == "ab"
    assert s.xenapi.VM.get_all_records()[vm]["name_description"] == "ab"
    s.xenapi.VM.set_name_description(vm, "")
    s.xenapi.session.logout()


@pytest.mark.parametrize("uuid", ["..", ".", "../../escape", "a/b", "x\x01y", "u" * 300])
def test_sr_introduce_refuses_a_uuid_that_would_name_a_path(
    shared_xapid: Xapid, client: Client, uuid: str
) -> None:
    """The SR uuid names its folder under the state dir; '..' once let SR.destroy wipe the whole state dir."""
    args = (uuid, "evil", "", "ext", "", False, {})
    if uuid.isprintable():
        assert client.both("SR.introduce", *args) == ["INVALID_VALUE", "uuid", uuid]
    else:  # XML cannot carry control characters; JSON can
        refused = client.json("SR.introduce", client.json_session, *args)
        assert isinstance(refused, Failure) and refused.details == ["INVALID_VALUE", "uuid", uuid]
    assert client.json("SR.get_by_name_label", client.json_session, "evil") == []
    assert (shared_xapid.state_dir / "xapid.db").exists() and (shared_xapid.state_dir / "users.json").exists()


def test_event_from_with_an_infinite_timeout_waits_for_a_change(shared_xapid: Xapid, objects: dict[str, str]) -> None:
    """An unbounded timeout means "until something happens", not a crash of the call."""
    waiter = Client(shared_xapid)
    token = waiter.json("event.from", waiter.json_session, ["pool"], "", 0.0)["token"]  # caught up
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(
        waiter.json("event.from", waiter.json_session, ["pool"], token, 1e308)), daemon=True)
    t.start()
    t.join(1.0)
    assert t.is_alive(), f"event.from returned early: {result}"
    s = shared_xapid.session()
    label = s.xenapi.pool.get_name_label(objects["pool"])
    s.xenapi.pool.set_name_label(objects["pool"], label + "!")
    t.join(10.0)
    s.xenapi.pool.set_name_label(objects["pool"], label)
    assert not t.is_alive() and result and not isinstance(result[0], Failure), result
    assert [ev["class"] for ev in result[0]["events"]] == ["pool"]
    clean_log(shared_xapid)


# -- random calls over HTTP ------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=16), st.sampled_from([NULL_REF, "OpaqueRef:bogus", "", "-1", str(2**64)])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
XML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**31), 2**31 - 1), st.floats(allow_nan=False),
              st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=16)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=6), inner, max_size=3)),
    max_leaves=6,
)
SDK_CALLS = {"n": 0}
# What xmlrpc.client can put in a methodName unescaped (it does not escape it).
NAME_CHARS = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="<>&")


@pytest.fixture(scope="module")
def served(client: Client) -> list[str]:
    names = client.xml("system.listMethods")
    return [n for n in names if n not in UNSAFE]


def checked(result: Any) -> None:
    if isinstance(result, Failure):
        assert result.details[0] in KNOWN_CODES, result.details
        assert not any("Traceback" in d for d in result.details)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_calls_over_both_protocols_answer_envelopes_with_known_codes(
    shared_xapid: Xapid, client: Client, served: list[str], data: st.DataObject
) -> None:
    name = data.draw(st.one_of(st.sampled_from(served), st.sampled_from(served).map(lambda n: "Async." + n),
                               st.text(alphabet=NAME_CHARS, min_size=1, max_size=20)), label="method")
    json_args = data.draw(st.lists(JSON_VALUES, max_size=4), label="json args")
    xml_args = data.draw(st.lists(XML_VALUES, max_size=4), label="xml args")
    if name.endswith("event.from"):
        json_args, xml_args = [["pool"], "", 0.0], [["pool"], "", 0.0]
    SDK_CALLS["n"] += 2
    checked(client.json(name, client.json_session, *json_args))  # asserts HTTP 200 and the JSON shape
    checked(client.xml(name, client.xml_session, *xml_args))      # asserts HTTP 200, no <fault>, parsable


def test_the_random_calls_left_a_clean_log_and_a_consistent_pool(shared_xapid: Xapid, schema: Any) -> None:
    from tests.integration.hardening.conftest import invariants

    s = shared_xapid.session()
    assert invariants(s.xenapi, schema) == []
    s.xenapi.session.logout()
    clean_log(shared_xapid)
    print(f"\nrandom HTTP calls: {SDK_CALLS['n']}")
