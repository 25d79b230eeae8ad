"""VTPMs (xapi_vtpm.ml, message_forwarding.ml VTPM, xapi_vm_lifecycle.ml create_vtpm,
xapi_vm_clone.ml copy, export.ml make_vtpm / import.ml VTPM) and the licensed feature map
(xapi-types/features.ml), through the SDK, xe and plain HTTP against a real daemon."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path
from typing import Any

import requests

from tests.conftest import Xapid
from tests.integration.test_xe_support import Xe
from tests.integration.vmkit import failure

STATE = base64.b64encode(b"tpm state \x00\x01\x02").decode()


def new_vm(api: Any, vm_args: Any, name: str) -> str:
    return str(api.VM.create(vm_args(name)))


def test_the_pool_and_hosts_carry_the_licensed_feature_map(shared_api: Any) -> None:
    pool = shared_api.pool.get_all()[0]
    restrictions = shared_api.pool.get_restrictions(pool)
    assert restrictions["enable_xha"] == "true" and restrictions["restrict_vtpm"] == "false"
    assert "restrict_ha" not in restrictions  # no such key in features.ml
    assert all(v == "false" for k, v in restrictions.items() if k != "enable_xha"), restrictions
    assert len(restrictions) == 54
    for host in shared_api.host.get_all():
        params = shared_api.host.get_license_params(host)
        assert {k: params[k] for k in restrictions} == restrictions


def test_create_needs_a_halted_vm_without_one_and_destroy_frees_the_slot(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    vm = new_vm(api, vm_args, "tpm-guest")
    assert "create_vtpm" in api.VM.get_allowed_operations(vm)
    vtpm = api.VTPM.create(vm, False)
    rec = api.VTPM.get_record(vtpm)
    assert rec["VM"] == vm and rec["is_unique"] is False and rec["persistence_backend"] == "xapi"
    assert rec["allowed_operations"] == ["destroy"] and "contents" not in rec
    assert api.VM.get_VTPMs(vm) == [vtpm]
    assert "create_vtpm" not in api.VM.get_allowed_operations(vm)
    assert failure(api.VTPM.create, vm, True) == ["VTPM_MAX_AMOUNT_REACHED", "1"]
    assert api.VTPM.get_contents(vtpm) == ""

    api.VM.start(vm, False, False)
    assert api.VTPM.get_allowed_operations(vtpm) == []
    assert failure(api.VTPM.destroy, vtpm) == ["VM_BAD_POWER_STATE", vm, "halted;suspended", "running"]
    other = new_vm(api, vm_args, "tpm-running")
    api.VM.start(other, False, False)
    assert failure(api.VTPM.create, other, False)[:2] == ["VM_BAD_POWER_STATE", other]
    assert api.VM.get_VTPMs(other) == []
    api.VM.hard_shutdown(other)
    api.VM.hard_shutdown(vm)

    secrets_before = len(api.secret.get_all())
    api.VTPM.destroy(vtpm)
    assert api.VM.get_VTPMs(vm) == [] and vtpm not in api.VTPM.get_all()
    assert len(api.secret.get_all()) == secrets_before - 1
    assert "create_vtpm" in api.VM.get_allowed_operations(vm)
    assert failure(api.VTPM.get_record, vtpm)[:1] == ["HANDLE_INVALID"]


def test_contents_are_base64_and_replacing_them_leaves_one_secret(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    vtpm = api.VTPM.create(new_vm(api, vm_args, "tpm-contents"), False)
    secrets = len(api.secret.get_all())
    api.VTPM.set_contents(vtpm, STATE)
    assert api.VTPM.get_contents(vtpm) == STATE
    assert len(api.secret.get_all()) == secrets  # the old secret went with the swap
    error = failure(api.VTPM.set_contents, vtpm, "not base64!")
    assert error[0] == "INTERNAL_ERROR"
    assert api.VTPM.get_contents(vtpm) == STATE and len(api.secret.get_all()) == secrets


def test_copies_take_the_vtpm_a_unique_one_empty_and_destroy_takes_it_away(shared_api: Any, vm_args: Any) -> None:
    api = shared_api
    vm = new_vm(api, vm_args, "tpm-source")
    plain = api.VTPM.create(vm, False)
    api.VTPM.set_contents(plain, STATE)
    clone = api.VM.clone(vm, "tpm-clone")
    (copied,) = api.VM.get_VTPMs(clone)
    assert copied != plain and api.VTPM.get_contents(copied) == STATE
    assert api.VTPM.get_is_unique(copied) is False

    unique_vm = new_vm(api, vm_args, "tpm-unique")
    unique = api.VTPM.create(unique_vm, True)
    api.VTPM.set_contents(unique, STATE)
    snap = api.VM.snapshot(unique_vm, "tpm-snap")
    (snapped,) = api.VM.get_VTPMs(snap)
    assert api.VTPM.get_is_unique(snapped) is True and api.VTPM.get_contents(snapped) == ""

    secrets = len(api.secret.get_all())
    api.VM.destroy(clone)
    assert copied not in api.VTPM.get_all() and len(api.secret.get_all()) == secrets - 1
    assert plain in api.VTPM.get_all()


def test_xe_vtpm_create_list_and_destroy_needs_force(xapid: Xapid, tmp_path: Path) -> None:
    xe = Xe(tmp_path, xapid)
    vm = xe.ok("vm-install", "template=Other install media", "new-name-label=xe-tpm").strip()
    uuid = xe.ok("vtpm-create", f"vm-uuid={vm}", "is-unique=true").strip()
    assert xe.ok("vtpm-list", "params=vm-uuid", "--minimal", f"uuid={uuid}").strip() == vm
    assert xe.ok("vtpm-param-get", f"uuid={uuid}", "param-name=is_unique").strip() == "true"  # records.ml
    assert "must be forced" in xe.fail("vtpm-destroy", f"uuid={uuid}")
    xe.ok("vtpm-destroy", f"uuid={uuid}", "--force")
    assert xe.ok("vtpm-list", "--minimal").strip() == ""


def test_an_exported_vm_takes_its_vtpm_with_its_contents(xapid: Xapid, vm_args: Any) -> None:
    s = xapid.session()
    api, session = s.xenapi, s._session  # type: ignore[attr-defined]
    vm = new_vm(api, vm_args, "tpm-export")
    vtpm = api.VTPM.create(vm, True)
    api.VTPM.set_contents(vtpm, STATE)
    uuid = api.VTPM.get_uuid(vtpm)
    data = requests.get(f"{xapid.url}export", params={"session_id": session, "ref": vm}, timeout=30).content
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ova = tar.extractfile("ova.xml").read().decode()  # type: ignore[union-attr]
    assert "<value>VTPM</value>" in ova and "vTPM'_content" in ova and STATE in ova

    def import_(restore: bool) -> list[str]:
        t = api.task.create("import", "")
        params = {"session_id": session, "task_id": t, **({"restore": "true"} if restore else {})}
        r = requests.put(f"{xapid.url}import", params=params, data=data, timeout=30)
        assert r.status_code == 200
        rec = api.task.get_record(t)
        assert rec["status"] == "success", rec
        return [v for v in api.VM.get_all() if api.VM.get_name_label(v) == "tpm-export" and v != vm]

    (copy,) = import_(False)
    (imported,) = api.VM.get_VTPMs(copy)
    assert api.VTPM.get_uuid(imported) != uuid  # a plain import makes new uuids
    assert api.VTPM.get_contents(imported) == STATE and api.VTPM.get_is_unique(imported) is True
    api.VM.destroy(copy)
    api.VM.destroy(vm)
    (restored_vm,) = import_(True)
    (restored,) = api.VM.get_VTPMs(restored_vm)
    assert api.VTPM.get_uuid(restored) == uuid and api.VTPM.get_contents(restored) == STATE
