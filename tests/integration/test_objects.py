"""The seeded pool and the generic object messages every class gets (wire.md 2.3-2.5, 4.1, 4.6, 7)."""

from __future__ import annotations

import ipaddress
import xmlrpc.client
from collections.abc import Callable
from typing import Any

import pytest
import XenAPI

from xapid.schema import Schema

Raw = Callable[..., dict[str, Any]]
TIB = 1024**4


def failure(result: dict[str, Any]) -> list[str]:
    assert result["Status"] == "Failure", result
    return list(result["ErrorDescription"])


# -- the seeded pool ---------------------------------------------------------------------------------------


def test_one_pool_whose_master_is_host1(shared_api: Any) -> None:
    pools = shared_api.pool.get_all()
    assert len(pools) == 1
    master = shared_api.pool.get_master(pools[0])
    assert shared_api.host.get_hostname(master) == "host1"


def test_three_hosts_on_loopback_with_distinct_uuids(shared_api: Any) -> None:
    hosts = shared_api.host.get_all_records()
    assert len(hosts) == 3
    assert sorted(h["hostname"] for h in hosts.values()) == ["host1", "host2", "host3"]
    assert sorted(h["name_label"] for h in hosts.values()) == ["host1", "host2", "host3"]
    assert len({h["uuid"] for h in hosts.values()}) == 3
    addresses = [h["address"] for h in hosts.values()]
    assert len(set(addresses)) == 3
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses)
    for ref, h in hosts.items():
        assert h["enabled"] is True
        assert shared_api.host.get_by_uuid(h["uuid"]) == ref


def test_host_metrics_are_live(shared_api: Any) -> None:
    for ref, h in shared_api.host.get_all_records().items():
        m = shared_api.host_metrics.get_record(h["metrics"])
        assert m["live"] is True, ref
        assert int(m["memory_total"]) > 0
        assert isinstance(m["last_updated"], xmlrpc.client.DateTime) and m["last_updated"].value.endswith("Z")


def test_api_version_is_at_least_2_21(shared_xapid: Any) -> None:
    """wire.md 1.4: the SDK's API_version property derives it from the pool master."""
    s = shared_xapid.session()
    major, minor = (int(x) for x in s.API_version.split("."))
    assert (major, minor) >= (2, 21)
    host = s.xenapi.pool.get_master(s.xenapi.pool.get_all()[0])
    assert s.xenapi.host.get_API_version_vendor(host)


def test_software_version_has_the_keys_clients_read(shared_api: Any) -> None:
    """wire.md 9.2: ansible splits product_version on '.' into ints."""
    for h in shared_api.host.get_all_records().values():
        sv = h["software_version"]
        for key in ("product_version", "product_brand", "platform_name", "platform_version", "build_number",
                    "hostname", "xapi", "xen", "linux"):
            assert isinstance(sv.get(key), str) and sv[key], key
        assert [int(x) for x in sv["product_version"].split(".")]
        assert sv["hostname"] == h["hostname"]


def test_shared_nfs_sr_is_the_default_and_attached_on_every_host(shared_api: Any) -> None:
    pool = shared_api.pool.get_all()[0]
    sr = shared_api.pool.get_default_SR(pool)
    rec = shared_api.SR.get_record(sr)
    assert rec["type"] == "nfs" and rec["shared"] is True
    assert rec["physical_size"] == str(TIB)
    hosts = set(shared_api.host.get_all())
    pbds = [shared_api.PBD.get_record(p) for p in rec["PBDs"]]
    assert {p["host"] for p in pbds} == hosts and len(pbds) == len(hosts)
    assert all(p["currently_attached"] is True and p["SR"] == sr for p in pbds)


def test_every_host_has_its_own_attached_local_ext_sr(shared_api: Any) -> None:
    for host in shared_api.host.get_all():
        local = []
        for pbd in shared_api.host.get_PBDs(host):
            p = shared_api.PBD.get_record(pbd)
            sr = shared_api.SR.get_record(p["SR"])
            if sr["type"] == "ext":
                local.append((pbd, p, sr))
        assert len(local) == 1, host
        pbd, p, sr = local[0]
        assert p["currently_attached"] is True and p["host"] == host
        assert sr["shared"] is False and sr["PBDs"] == [pbd]
        assert sr["physical_size"].isdigit() and int(sr["physical_size"]) > 0


def test_every_record_has_every_schema_field_in_order(shared_api: Any, schema: Schema) -> None:
    """wire.md 2.5: records carry every non-internal field, in declaration order."""
    seen = 0
    for cdef in schema.classes.values():
        if not cdef.get_all:
            continue
        records = getattr(shared_api, cdef.name).get_all_records()
        for ref, rec in records.items():
            assert list(rec) == list(cdef.fields), (cdef.name, ref)
            seen += 1
        for ref in list(records)[:1]:
            assert getattr(shared_api, cdef.name).get_record(ref) == records[ref]
    assert seen > 20


def test_ints_are_strings_floats_are_floats_datetimes_are_datetime_with_z(shared_api: Any) -> None:
    """wire.md 1.5: what Python sees from xapi."""
    host = shared_api.host.get_all()[0]
    assert shared_api.host.get_API_version_major(host) == "2"
    dom0 = shared_api.host.get_control_domain(host)
    vm = shared_api.VM.get_record(dom0)
    assert vm["domid"] == "0" and vm["memory_static_max"].isdigit() and int(vm["memory_static_max"]) > 2**31
    assert isinstance(vm["HVM_shadow_multiplier"], float)
    assert isinstance(vm["is_control_domain"], bool) and vm["is_control_domain"] is True
    assert isinstance(vm["snapshot_time"], xmlrpc.client.DateTime)
    assert vm["snapshot_time"].value == "19700101T00:00:00Z"


# -- generic getters ----------------------------------------------------------------------------------------


def test_get_by_uuid_and_record_and_field_getters_agree(shared_api: Any) -> None:
    for ref, rec in shared_api.SR.get_all_records().items():
        assert shared_api.SR.get_by_uuid(rec["uuid"]) == ref
        assert shared_api.SR.get_name_label(ref) == rec["name_label"]
        assert shared_api.SR.get_physical_size(ref) == rec["physical_size"]
        assert sorted(shared_api.SR.get_PBDs(ref)) == sorted(rec["PBDs"])


def test_get_by_name_label_is_exact_and_case_sensitive(shared_api: Any) -> None:
    """wire.md 4.1/4.5: a ref set; ``[]`` when nothing matches."""
    h1 = [r for r, h in shared_api.host.get_all_records().items() if h["name_label"] == "host1"]
    assert shared_api.host.get_by_name_label("host1") == h1 and len(h1) == 1
    assert shared_api.host.get_by_name_label("HOST1") == []
    assert shared_api.host.get_by_name_label("host") == []
    assert shared_api.VM.get_by_name_label("nope") == []


def test_handle_invalid_and_uuid_invalid_params(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 2.4, 4.4: HANDLE_INVALID [Class, ref as given], also for a ref of another class."""
    s = shared_xapid.session()
    host = s.xenapi.host.get_all()[0]
    assert failure(call_raw(s, "VM.get_record", s.handle, "OpaqueRef:NULL")) == [
        "HANDLE_INVALID", "VM", "OpaqueRef:NULL"]
    assert failure(call_raw(s, "VM.get_record", s.handle, host)) == ["HANDLE_INVALID", "VM", host]
    assert failure(call_raw(s, "SR.get_name_label", s.handle, "garbage")) == ["HANDLE_INVALID", "SR", "garbage"]
    assert failure(call_raw(s, "host.set_name_label", s.handle, "OpaqueRef:x", "n")) == [
        "HANDLE_INVALID", "host", "OpaqueRef:x"]
    assert failure(call_raw(s, "VM.get_by_uuid", s.handle, "nope")) == ["UUID_INVALID", "VM", "nope"]
    uuid = s.xenapi.host.get_uuid(host)
    assert failure(call_raw(s, "VM.get_by_uuid", s.handle, uuid)) == ["UUID_INVALID", "VM", uuid]
    assert failure(call_raw(s, "host.get_by_uuid", s.handle, uuid.upper())) == ["UUID_INVALID", "host",
                                                                                uuid.upper()]


def test_get_all_and_get_all_records_agree(shared_api: Any) -> None:
    refs = shared_api.PBD.get_all()
    records = shared_api.PBD.get_all_records()
    assert sorted(refs) == sorted(records) and len(refs) == 6


# -- filter expressions ------------------------------------------------------------------------------------


def test_get_all_records_where_and_get_all_where(shared_api: Any) -> None:
    """wire.md 4.6 with the column names of the database (``name__label``)."""
    h1 = shared_api.host.get_by_name_label("host1")
    where = shared_api.host.get_all_records_where('field "name__label" = "host1"')
    assert list(where) == h1 and where[h1[0]]["hostname"] == "host1"
    assert shared_api.host.get_all_where('field "name__label" = "host1"') == h1
    assert sorted(shared_api.host.get_all_where("true")) == sorted(shared_api.host.get_all())
    assert shared_api.host.get_all_where("false") == []
    assert len(shared_api.host.get_all_where('not field "name__label" = "host1"')) == 2
    assert len(shared_api.host.get_all_where('field "name__label" = "host1" or field "hostname" = "host2"')) == 2


def test_filter_compares_stored_serialisations(shared_api: Any) -> None:
    dom0s = shared_api.VM.get_all_records_where('field "is_control_domain" = "true"')
    assert len(dom0s) == 3 and all(r["is_control_domain"] for r in dom0s.values())
    ansible = ('field "is_a_template" = "false" and field "is_a_snapshot" = "false" '
               'and field "is_control_domain" = "false"')
    assert all(not r["is_control_domain"] for r in shared_api.VM.get_all_records_where(ansible).values())
    assert len(shared_api.VM.get_all_where('field "power_state" = "Running" and field "domid" = "0"')) == 3
    assert len(shared_api.SR.get_all_where(f'field "physical_size" = "{TIB}"')) == 1
    assert len(shared_api.SM.get_all_records_where('field "type" = "ext"')) == 1


def test_filter_errors(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.6: parse error → INVALID_VALUE [expr, reason]; unknown column → INTERNAL_ERROR."""
    s = shared_xapid.session()
    expr = 'field "name__label" == "x"'
    err = failure(call_raw(s, "host.get_all_records_where", s.handle, expr))
    assert err[:2] == ["INVALID_VALUE", expr] and len(err) == 3
    assert failure(call_raw(s, "host.get_all_where", s.handle, 'field "nonsense" = "x"')) == [
        "INTERNAL_ERROR", "missing field", "nonsense", ""]
    # An empty table never looks at the column.
    assert s.xenapi.Cluster.get_all_records_where('field "nonsense" = "x"') == {}


# -- setters ------------------------------------------------------------------------------------------------


def test_field_set_and_get_round_trip(shared_api: Any) -> None:
    pool = shared_api.pool.get_all()[0]
    old = shared_api.pool.get_name_label(pool)
    shared_api.pool.set_name_label(pool, "renamed & <quoted> \"pool\" é")
    assert shared_api.pool.get_name_label(pool) == "renamed & <quoted> \"pool\" é"
    assert shared_api.pool.get_record(pool)["name_label"] == "renamed & <quoted> \"pool\" é"
    shared_api.pool.set_name_label(pool, old)
    assert shared_api.pool.get_name_label(pool) == old


def test_int_setter_accepts_big_values_as_strings(shared_api: Any) -> None:
    sr = shared_api.pool.get_default_SR(shared_api.pool.get_all()[0])
    host = shared_api.host.get_all()[0]
    shared_api.host.set_name_description(host, "x")
    assert shared_api.host.get_name_description(host) == "x"
    size = shared_api.SR.get_physical_size(sr)
    shared_api.SR.set_physical_size(sr, str(2 * TIB))
    assert shared_api.SR.get_physical_size(sr) == str(2 * TIB)
    shared_api.SR.set_physical_size(sr, size)


def test_map_add_remove_and_duplicate_key(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.1/4.4: MAP_DUPLICATE_KEY [Class, field, ref, key]; removing a missing key is a no-op."""
    s = shared_xapid.session()
    api = s.xenapi
    pool = api.pool.get_all()[0]
    api.pool.add_to_other_config(pool, "test:key", "v1")
    assert api.pool.get_other_config(pool)["test:key"] == "v1"
    with pytest.raises(XenAPI.Failure) as e:
        api.pool.add_to_other_config(pool, "test:key", "v2")
    assert e.value.details == ["MAP_DUPLICATE_KEY", "pool", "other_config", pool, "test:key"]
    assert api.pool.get_other_config(pool)["test:key"] == "v1"
    api.pool.remove_from_other_config(pool, "test:key")
    assert "test:key" not in api.pool.get_other_config(pool)
    api.pool.remove_from_other_config(pool, "test:key")            # no-op, no error
    api.pool.add_to_other_config(pool, "test:key", "v3")           # XO's remove-then-add works
    assert api.pool.get_other_config(pool)["test:key"] == "v3"
    api.pool.remove_from_other_config(pool, "test:key")
    old = api.pool.get_other_config(pool)
    api.pool.set_other_config(pool, {"a": "1"})
    assert api.pool.get_other_config(pool) == {"a": "1"}
    api.pool.set_other_config(pool, old)


def test_vm_other_config_has_its_custom_setters(shared_api: Any) -> None:
    """wire.md 4.1 and 11 #13: VM.other_config is SRO but has set_/add_to_/remove_from_ messages."""
    dom0 = shared_api.host.get_control_domain(shared_api.host.get_all()[0])
    shared_api.VM.add_to_other_config(dom0, "folder", "/test")
    assert shared_api.VM.get_other_config(dom0)["folder"] == "/test"
    shared_api.VM.remove_from_other_config(dom0, "folder")
    assert "folder" not in shared_api.VM.get_other_config(dom0)


def test_set_add_and_remove_are_idempotent(shared_api: Any) -> None:
    """wire.md 4.1: adding an existing member and removing a missing one are no-ops."""
    host = shared_api.host.get_all()[1]
    shared_api.host.set_tags(host, [])
    shared_api.host.add_tags(host, "a")
    shared_api.host.add_tags(host, "b")
    shared_api.host.add_tags(host, "a")
    assert shared_api.host.get_tags(host) == ["a", "b"]
    shared_api.host.remove_tags(host, "a")
    shared_api.host.remove_tags(host, "zzz")
    assert shared_api.host.get_tags(host) == ["b"]
    shared_api.host.set_tags(host, [])
    assert shared_api.host.get_tags(host) == []


def test_setters_reject_wrong_types(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 2.3: strings do not accept ints, bools do not accept strings."""
    s = shared_xapid.session()
    pool = s.xenapi.pool.get_all()[0]
    vm = s.xenapi.VM.get_all()[0]
    assert failure(call_raw(s, "pool.set_name_label", s.handle, pool, 5))[0] == "INTERNAL_ERROR"
    assert failure(call_raw(s, "VM.set_is_a_template", s.handle, vm, "true"))[0] == "INTERNAL_ERROR"
    assert failure(call_raw(s, "pool.add_to_other_config", s.handle, pool, "k", 1))[0] == "INTERNAL_ERROR"
    assert "k" not in s.xenapi.pool.get_other_config(pool)
