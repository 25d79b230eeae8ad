"""message: create, query and destroy alerts."""

from __future__ import annotations

from typing import Any

import pytest
import XenAPI


def test_message_lifecycle(api: Any) -> None:
    vm = api.VM.get_all()[0]
    vm_uuid = api.VM.get_uuid(vm)
    ref = api.message.create("VM_STARTED", "5", "VM", vm_uuid, "started")
    rec = api.message.get_record(ref)
    assert (rec["name"], rec["priority"], rec["cls"], rec["obj_uuid"], rec["body"]) == (
        "VM_STARTED", "5", "VM", vm_uuid, "started")
    assert rec["timestamp"].value.endswith("Z")
    assert ref in api.message.get_all()
    assert list(api.message.get("VM", vm_uuid, "19700101T00:00:00Z")) == [ref]
    assert api.message.get("VM", "other", "19700101T00:00:00Z") == {}
    assert ref in api.message.get_since("19700101T00:00:00Z")
    assert api.message.get_since("29990101T00:00:00Z") == {}
    other = api.message.create("HA_POOL_OVERCOMMITTED", "3", "Pool", api.pool.get_uuid(api.pool.get_all()[0]), "")
    api.message.destroy_all({"cls": "VM"})
    assert api.message.get_all() == [other]
    api.message.destroy_many([other])
    assert api.message.get_all() == []


def test_message_for_unknown_object(api: Any) -> None:
    with pytest.raises(XenAPI.Failure) as e:
        api.message.create("X", "1", "VM", "nope", "")
    assert e.value.details == ["UUID_INVALID", "VM", "nope"]
