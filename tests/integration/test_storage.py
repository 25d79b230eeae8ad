"""SR, PBD and VDI: creation, plugging, forgetting and the files behind them (wire.md 4.4, 7.3, 7.5)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import XenAPI

Raw = Callable[..., dict[str, Any]]
GIB = 1024**3


def failure(result: dict[str, Any]) -> list[str]:
    assert result["Status"] == "Failure", result
    return list(result["ErrorDescription"])


def make_sr(api: Any, shared: bool, sr_type: str = "nfs", host: str | None = None, label: str = "") -> str:
    host = host or api.host.get_all()[0]
    return str(api.SR.create(host, {"server": "127.0.0.1", "serverpath": "/x"}, str(10 * GIB),
                             label or f"sr-{uuid.uuid4()}", "test SR", sr_type, "user", shared, {}))


def vdi_args(sr: str, size: int, **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"name_label": "disk", "name_description": "", "SR": sr, "virtual_size": str(size),
                            "type": "user", "sharable": False, "read_only": False, "other_config": {}}
    args.update(extra)
    return args


def sr_dir(d: Any, api: Any, sr: str) -> Path:
    return Path(d.state_dir) / "sr" / api.SR.get_uuid(sr)


# -- SR.create ---------------------------------------------------------------------------------------------


def test_shared_sr_gets_an_attached_pbd_on_every_host(shared_xapid: Any, shared_api: Any) -> None:
    sr = make_sr(shared_api, shared=True)
    rec = shared_api.SR.get_record(sr)
    assert rec["shared"] is True and rec["type"] == "nfs" and rec["physical_size"] == str(10 * GIB)
    pbds = [shared_api.PBD.get_record(p) for p in rec["PBDs"]]
    assert sorted(p["host"] for p in pbds) == sorted(shared_api.host.get_all())
    assert all(p["currently_attached"] is True and p["SR"] == sr for p in pbds)
    assert all(p["device_config"] == {"server": "127.0.0.1", "serverpath": "/x"} for p in pbds)
    assert sr_dir(shared_xapid, shared_api, sr).is_dir()
    assert sr in shared_api.SR.get_by_name_label(rec["name_label"])


def test_non_shared_sr_gets_one_pbd_on_the_given_host(shared_api: Any) -> None:
    host = shared_api.host.get_all()[2]
    sr = make_sr(shared_api, shared=False, sr_type="ext", host=host)
    pbds = shared_api.SR.get_PBDs(sr)
    assert len(pbds) == 1
    p = shared_api.PBD.get_record(pbds[0])
    assert p["host"] == host and p["currently_attached"] is True
    assert pbds[0] in shared_api.host.get_PBDs(host)


def test_unknown_driver_is_refused_and_creates_nothing(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.4: SR_UNKNOWN_DRIVER [driver]."""
    s = shared_xapid.session()
    api = s.xenapi
    srs, pbds = sorted(api.SR.get_all()), sorted(api.PBD.get_all())
    host = api.host.get_all()[0]
    err = failure(call_raw(s, "SR.create", s.handle, host, {}, "0", "bad", "", "zfs-magic", "user", True, {}))
    assert err == ["SR_UNKNOWN_DRIVER", "zfs-magic"]
    assert sorted(api.SR.get_all()) == srs and sorted(api.PBD.get_all()) == pbds
    assert api.SR.get_by_name_label("bad") == []
    assert "nfs" in api.SR.get_supported_types() and "zfs-magic" not in api.SR.get_supported_types()


def test_sr_create_on_a_bad_host_is_handle_invalid(shared_xapid: Any, call_raw: Raw) -> None:
    s = shared_xapid.session()
    err = failure(call_raw(s, "SR.create", s.handle, "OpaqueRef:nope", {}, "0", "x", "", "nfs", "user", True, {}))
    assert err == ["HANDLE_INVALID", "host", "OpaqueRef:nope"]


# -- SR.forget / SR.destroy ------------------------------------------------------------------------------


def unplug_all(api: Any, sr: str) -> None:
    for pbd in api.SR.get_PBDs(sr):
        api.PBD.unplug(pbd)


@pytest.mark.parametrize("op", ["forget", "destroy"])
def test_forget_and_destroy_need_every_pbd_unplugged(shared_xapid: Any, call_raw: Raw, op: str) -> None:
    """wire.md 4.4: SR_HAS_PBD [sr] while any PBD is attached; then the SR and its PBDs go."""
    s = shared_xapid.session()
    api = s.xenapi
    sr = make_sr(api, shared=True)
    pbds = api.SR.get_PBDs(sr)
    assert failure(call_raw(s, f"SR.{op}", s.handle, sr)) == ["SR_HAS_PBD", sr]
    api.PBD.unplug(pbds[0])
    assert failure(call_raw(s, f"SR.{op}", s.handle, sr)) == ["SR_HAS_PBD", sr]   # one attached is enough
    assert api.SR.get_record(sr)["uuid"]                                          # nothing was removed
    unplug_all(api, sr)
    folder = sr_dir(shared_xapid, api, sr)
    getattr(api.SR, op)(sr)
    assert sr not in api.SR.get_all()
    assert not set(pbds) & set(api.PBD.get_all())
    for host in api.host.get_all():
        assert not set(pbds) & set(api.host.get_PBDs(host))
    assert failure(call_raw(s, "SR.get_record", s.handle, sr)) == ["HANDLE_INVALID", "SR", sr]
    assert folder.exists() is (op == "forget")          # destroy removes the SR's data, forget keeps it


def test_destroying_the_default_sr_clears_the_pool_reference(xapid: Any, api: Any) -> None:
    pool = api.pool.get_all()[0]
    sr = make_sr(api, shared=True)
    api.pool.set_default_SR(pool, sr)
    unplug_all(api, sr)
    api.SR.destroy(sr)
    assert api.pool.get_default_SR(pool) == "OpaqueRef:NULL"


# -- PBD ----------------------------------------------------------------------------------------------


def test_pbd_create_plug_unplug_are_idempotent(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.4: PBD_EXISTS [sr, host, pbd]; plug/unplug on an attached/detached PBD are no-ops."""
    s = shared_xapid.session()
    api = s.xenapi
    h1, h2 = api.host.get_all()[:2]
    sr = make_sr(api, shared=False, host=h1)
    existing = api.SR.get_PBDs(sr)[0]
    assert failure(call_raw(s, "PBD.create", s.handle, {"host": h1, "SR": sr, "device_config": {}})) == [
        "PBD_EXISTS", sr, h1, existing]
    pbd = api.PBD.create({"host": h2, "SR": sr, "device_config": {"k": "v"}, "other_config": {}})
    rec = api.PBD.get_record(pbd)
    assert rec["currently_attached"] is False and rec["host"] == h2 and rec["device_config"] == {"k": "v"}
    assert sorted(api.SR.get_PBDs(sr)) == sorted([existing, pbd])
    api.PBD.plug(pbd)
    assert api.PBD.get_currently_attached(pbd) is True
    api.PBD.plug(pbd)
    assert api.PBD.get_currently_attached(pbd) is True
    assert failure(call_raw(s, "PBD.destroy", s.handle, pbd))[0] == "OPERATION_NOT_ALLOWED"
    api.PBD.unplug(pbd)
    api.PBD.unplug(pbd)
    assert api.PBD.get_currently_attached(pbd) is False
    api.PBD.destroy(pbd)
    assert api.SR.get_PBDs(sr) == [existing]


def test_pbd_create_needs_existing_sr_and_host(shared_xapid: Any, call_raw: Raw) -> None:
    s = shared_xapid.session()
    host = s.xenapi.host.get_all()[0]
    assert failure(call_raw(s, "PBD.create", s.handle, {"host": host, "SR": "OpaqueRef:gone",
                                                         "device_config": {}})) == [
        "HANDLE_INVALID", "SR", "OpaqueRef:gone"]
    assert failure(call_raw(s, "PBD.create", s.handle, {"host": host, "SR": "OpaqueRef:gone"})) == [
        "INTERNAL_ERROR", 'Server_helpers.Dispatcher_FieldNotFound("device_config")']


# -- VDI -----------------------------------------------------------------------------------------------


def test_vdi_create_makes_a_sparse_file_and_destroy_removes_it(shared_xapid: Any, shared_api: Any) -> None:
    api = shared_api
    sr = make_sr(api, shared=True)
    size = 20 * GIB
    vdi = api.VDI.create(vdi_args(sr, size, name_label="big disk"))
    rec = api.VDI.get_record(vdi)
    assert rec["virtual_size"] == str(size) and rec["SR"] == sr and rec["name_label"] == "big disk"
    assert api.SR.get_VDIs(sr) == [vdi]
    path = sr_dir(shared_xapid, api, sr) / f"{rec['uuid']}.img"
    st = path.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 < 1024 * 1024                   # sparse: nothing allocated
    assert int(api.SR.get_virtual_allocation(sr)) == size
    api.VDI.destroy(vdi)
    assert not path.exists()
    assert api.SR.get_VDIs(sr) == [] and int(api.SR.get_virtual_allocation(sr)) == 0
    with pytest.raises(XenAPI.Failure) as e:
        api.VDI.get_record(vdi)
    assert e.value.details == ["HANDLE_INVALID", "VDI", vdi]


def test_vdi_create_with_a_missing_mandatory_field_is_field_not_found(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.1: ``INTERNAL_ERROR ["Server_helpers.Dispatcher_FieldNotFound(\\"<field>\\")"]``."""
    s = shared_xapid.session()
    sr = s.xenapi.pool.get_default_SR(s.xenapi.pool.get_all()[0])
    before = sorted(s.xenapi.VDI.get_all())
    args = vdi_args(sr, GIB)
    del args["virtual_size"]
    assert failure(call_raw(s, "VDI.create", s.handle, args)) == [
        "INTERNAL_ERROR", 'Server_helpers.Dispatcher_FieldNotFound("virtual_size")']
    # Fields with a datamodel default may be omitted; unknown keys are ignored.
    minimal = {k: v for k, v in vdi_args(sr, GIB).items() if k not in ("name_label", "name_description")}
    vdi = s.xenapi.VDI.create({**minimal, "no_such_field": "x"})
    assert s.xenapi.VDI.get_name_label(vdi) == ""
    s.xenapi.VDI.destroy(vdi)
    assert sorted(s.xenapi.VDI.get_all()) == before


def test_vdi_on_a_bad_sr_is_handle_invalid_and_leaves_no_file(shared_xapid: Any, call_raw: Raw) -> None:
    s = shared_xapid.session()
    files = set((Path(shared_xapid.state_dir) / "sr").rglob("*.img"))
    assert failure(call_raw(s, "VDI.create", s.handle, vdi_args("OpaqueRef:nope", GIB))) == [
        "HANDLE_INVALID", "SR", "OpaqueRef:nope"]
    assert set((Path(shared_xapid.state_dir) / "sr").rglob("*.img")) == files


def test_vdi_destroy_also_destroys_its_vbds(shared_api: Any, vm_args: Callable[..., dict[str, Any]]) -> None:
    """xapi's VDI.destroy removes the VDI's VBDs at once ("rather than wait for the GC thread")."""
    api = shared_api
    sr = api.pool.get_default_SR(api.pool.get_all()[0])
    vm = api.VM.create(vm_args("vbd holder"))
    vdi = api.VDI.create(vdi_args(sr, GIB))
    vbd = api.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW",
                          "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                          "qos_algorithm_params": {}})
    assert api.VM.get_VBDs(vm) == [vbd] and api.VDI.get_VBDs(vdi) == [vbd]
    api.VDI.destroy(vdi)
    assert vbd not in api.VBD.get_all()
    assert api.VM.get_VBDs(vm) == []


def test_sr_destroy_removes_vdis_and_their_files(shared_xapid: Any, shared_api: Any) -> None:
    api = shared_api
    sr = make_sr(api, shared=False)
    vdis = [api.VDI.create(vdi_args(sr, GIB)) for _ in range(2)]
    folder = sr_dir(shared_xapid, api, sr)
    assert len(list(folder.glob("*.img"))) == 2
    unplug_all(api, sr)
    api.SR.destroy(sr)
    assert not set(vdis) & set(api.VDI.get_all())
    assert not folder.exists()
