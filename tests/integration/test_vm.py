"""VM creation and the power-state machine, synchronous and as tasks (wire.md 4.1, 4.4, 5.3, 5.4)."""

from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Callable
from typing import Any

import pytest
import XenAPI

Raw = Callable[..., dict[str, Any]]
VmArgs = Callable[..., dict[str, Any]]
NULL = "OpaqueRef:NULL"


def failure(result: dict[str, Any]) -> list[str]:
    assert result["Status"] == "Failure", result
    return list(result["ErrorDescription"])


def state(api: Any, vm: str) -> tuple[str, str, int]:
    rec = api.VM.get_record(vm)
    return rec["power_state"], rec["resident_on"], int(rec["domid"])


def wait_task(api: Any, task: str, timeout: float = 10.0) -> dict[str, Any]:
    """Poll like ansible does (status leaves ``pending``), then return the record."""
    deadline = time.monotonic() + timeout
    while api.task.get_status(task) == "pending":
        assert time.monotonic() < deadline, "task did not finish"
        time.sleep(0.05)
    return dict(api.task.get_record(task))


# -- create ------------------------------------------------------------------------------------------------


def test_create_with_a_full_struct_gives_a_halted_vm_with_metrics(shared_api: Any, vm_args: VmArgs) -> None:
    vm = shared_api.VM.create(vm_args("created", other_config={"folder": "/a"}))
    rec = shared_api.VM.get_record(vm)
    assert rec["name_label"] == "created" and rec["other_config"]["folder"] == "/a"
    assert rec["memory_static_max"] == str(2 * 1024**3) and rec["VCPUs_max"] == "2"
    assert rec["actions_after_crash"] == "restart" and rec["HVM_boot_params"] == {"order": "cdn"}
    assert (rec["power_state"], rec["resident_on"], rec["domid"]) == ("Halted", NULL, "-1")
    assert rec["is_a_template"] is False and rec["is_control_domain"] is False
    metrics = shared_api.VM_metrics.get_record(rec["metrics"])
    assert isinstance(metrics["install_time"], xmlrpc.client.DateTime)
    assert shared_api.VM.get_by_uuid(rec["uuid"]) == vm and vm in shared_api.VM.get_by_name_label("created")


def test_create_ignores_dynamic_fields_in_the_struct(shared_api: Any, vm_args: VmArgs) -> None:
    """wire.md 4.1: only SRO and RW fields are constructor arguments; xapi creates every VM Halted."""
    host = shared_api.host.get_all()[0]
    args = vm_args("sneaky", power_state="Running", resident_on=host, domid="7", uuid="not-a-uuid",
                   is_control_domain=True)
    vm = shared_api.VM.create(args)
    assert state(shared_api, vm) == ("Halted", NULL, -1)
    rec = shared_api.VM.get_record(vm)
    assert rec["is_control_domain"] is False and rec["uuid"] != "not-a-uuid"


def test_create_round_trips_a_record_read_back_from_the_daemon(shared_api: Any, vm_args: VmArgs) -> None:
    """Clients copy a record (DateTime objects, ints as strings) into a new create call."""
    first = shared_api.VM.create(vm_args("original"))
    rec = shared_api.VM.get_record(first)
    rec["name_label"] = "copy"
    second = shared_api.VM.create(rec)
    assert shared_api.VM.get_name_label(second) == "copy"
    assert shared_api.VM.get_memory_static_max(second) == rec["memory_static_max"]


def test_create_with_a_missing_mandatory_field(shared_xapid: Any, call_raw: Raw, vm_args: VmArgs) -> None:
    s = shared_xapid.session()
    args = vm_args("incomplete")
    del args["memory_static_max"]
    assert failure(call_raw(s, "VM.create", s.handle, args)) == [
        "INTERNAL_ERROR", 'Server_helpers.Dispatcher_FieldNotFound("memory_static_max")']
    assert s.xenapi.VM.get_by_name_label("incomplete") == []


def test_create_with_a_bad_enum_or_ref_creates_nothing(shared_xapid: Any, call_raw: Raw, vm_args: VmArgs) -> None:
    s = shared_xapid.session()
    before = sorted(s.xenapi.VM.get_all())
    assert failure(call_raw(s, "VM.create", s.handle, vm_args("x", actions_after_crash="explode")))[0] == \
        "INTERNAL_ERROR"
    assert failure(call_raw(s, "VM.create", s.handle, vm_args("x", affinity="OpaqueRef:gone"))) == [
        "HANDLE_INVALID", "host", "OpaqueRef:gone"]
    assert sorted(s.xenapi.VM.get_all()) == before


# -- power states -----------------------------------------------------------------------------------------


def test_start_shutdown_cycle_keeps_power_state_resident_on_and_domid_right(shared_api: Any,
                                                                            vm_args: VmArgs) -> None:
    api = shared_api
    vm = api.VM.create(vm_args("cycle"))
    hosts = set(api.host.get_all())
    api.VM.start(vm, False, False)
    power, host, domid = state(api, vm)
    assert power == "Running" and host in hosts and domid > 0
    assert vm in api.host.get_resident_VMs(host)
    assert api.VM_metrics.get_state(api.VM.get_metrics(vm)) == ["running"]
    api.VM.clean_reboot(vm)
    power2, host2, domid2 = state(api, vm)
    assert (power2, host2) == ("Running", host) and domid2 > 0 and domid2 != domid
    api.VM.hard_reboot(vm)
    power3, host3, domid3 = state(api, vm)
    assert (power3, host3) == ("Running", host) and domid3 not in (domid, domid2)
    api.VM.clean_shutdown(vm)
    assert state(api, vm) == ("Halted", NULL, -1)
    assert vm not in api.host.get_resident_VMs(host)
    api.VM.start(vm, False, False)
    api.VM.hard_shutdown(vm)
    assert state(api, vm) == ("Halted", NULL, -1)


def test_start_on_a_chosen_host(shared_api: Any, vm_args: VmArgs) -> None:
    api = shared_api
    host3 = api.host.get_by_name_label("host3")[0]
    vm = api.VM.create(vm_args("placed"))
    api.VM.start_on(vm, host3, False, False)
    power, host, domid = state(api, vm)
    assert (power, host) == ("Running", host3) and domid > 0
    api.VM.hard_shutdown(vm)


def test_start_paused_then_unpause(shared_api: Any, vm_args: VmArgs) -> None:
    api = shared_api
    vm = api.VM.create(vm_args("paused"))
    api.VM.start(vm, True, False)
    assert state(api, vm)[0] == "Paused"
    api.VM.unpause(vm)
    assert state(api, vm)[0] == "Running"
    api.VM.hard_shutdown(vm)


def test_domids_of_running_vms_are_distinct(shared_api: Any, vm_args: VmArgs) -> None:
    api = shared_api
    vms = [api.VM.create(vm_args(f"many{i}")) for i in range(3)]
    for vm in vms:
        api.VM.start(vm, False, False)
    running = [r for r in api.VM.get_all_records().values() if r["power_state"] == "Running"
               and not r["is_control_domain"]]
    domids = [r["domid"] for r in running]
    assert len(domids) == len(set(domids))
    for vm in vms:
        api.VM.hard_shutdown(vm)


def test_bad_power_state_params_are_lowercase(shared_xapid: Any, call_raw: Raw, vm_args: VmArgs) -> None:
    """wire.md 4.4: VM_BAD_POWER_STATE [vm, expected, actual], states lowercase."""
    s = shared_xapid.session()
    api = s.xenapi
    vm = api.VM.create(vm_args("bad states"))
    assert failure(call_raw(s, "VM.clean_shutdown", s.handle, vm)) == ["VM_BAD_POWER_STATE", vm, "running",
                                                                      "halted"]
    assert failure(call_raw(s, "VM.clean_reboot", s.handle, vm)) == ["VM_BAD_POWER_STATE", vm, "running",
                                                                    "halted"]
    api.VM.start(vm, False, False)
    assert failure(call_raw(s, "VM.start", s.handle, vm, False, False)) == ["VM_BAD_POWER_STATE", vm, "halted",
                                                                           "running"]
    host = api.host.get_all()[0]
    assert failure(call_raw(s, "VM.start_on", s.handle, vm, host, False, False)) == [
        "VM_BAD_POWER_STATE", vm, "halted", "running"]
    # xapi_vm_lifecycle.ml allowed_power_states: destroy starts from Halted or Suspended, joined with ", ".
    assert failure(call_raw(s, "VM.destroy", s.handle, vm)) == ["VM_BAD_POWER_STATE", vm, "halted, suspended",
                                                               "running"]
    assert state(api, vm)[0] == "Running"                  # refusals change nothing
    api.VM.hard_shutdown(vm)
    err = failure(call_raw(s, "VM.hard_shutdown", s.handle, vm))
    assert err[:2] == ["VM_BAD_POWER_STATE", vm] and err[3] == "halted"
    assert err[2] == "paused, suspended, running"


def test_lifecycle_on_a_template_is_vm_is_template(shared_xapid: Any, call_raw: Raw, vm_args: VmArgs) -> None:
    """wire.md 4.4: VM_IS_TEMPLATE [vm, operation]."""
    s = shared_xapid.session()
    tpl = s.xenapi.VM.create(vm_args("a template", is_a_template=True))
    assert failure(call_raw(s, "VM.start", s.handle, tpl, False, False)) == ["VM_IS_TEMPLATE", tpl, "start"]
    host = s.xenapi.host.get_all()[0]
    assert failure(call_raw(s, "VM.start_on", s.handle, tpl, host, False, False))[:2] == ["VM_IS_TEMPLATE", tpl]
    assert state(s.xenapi, tpl)[0] == "Halted"


def test_lifecycle_on_a_bad_ref_is_handle_invalid(shared_xapid: Any, call_raw: Raw) -> None:
    s = shared_xapid.session()
    assert failure(call_raw(s, "VM.start", s.handle, "OpaqueRef:gone", False, False)) == [
        "HANDLE_INVALID", "VM", "OpaqueRef:gone"]
    vm = s.xenapi.VM.get_all()[0]
    assert failure(call_raw(s, "VM.start", s.handle, vm, "false", False))[0] == "INTERNAL_ERROR"


def test_destroy_a_halted_vm_removes_it_and_its_metrics(shared_api: Any, vm_args: VmArgs) -> None:
    vm = shared_api.VM.create(vm_args("doomed"))
    metrics = shared_api.VM.get_metrics(vm)
    shared_api.VM.destroy(vm)
    assert vm not in shared_api.VM.get_all()
    assert metrics not in shared_api.VM_metrics.get_all()


# -- async ---------------------------------------------------------------------------------------------


def test_async_start_returns_a_task_that_reaches_success(shared_api: Any, vm_args: VmArgs) -> None:
    """wire.md 5.3/5.4: a task ref now; status pending → success; result is an XML-RPC value fragment."""
    api = shared_api
    vm = api.VM.create(vm_args("async"))
    task = api.Async.VM.start(vm, False, False)
    assert task.startswith("OpaqueRef:") and task in api.task.get_all()
    rec = wait_task(api, task)
    assert rec["status"] == "success"
    assert rec["name_label"] == "Async.VM.start" and rec["name_description"] == ""
    assert rec["result"] == "<value></value>" and rec["error_info"] == []
    assert rec["progress"] == 1.0
    assert rec["finished"].value.endswith("Z") and rec["finished"].value != "19700101T00:00:00Z"
    assert rec["resident_on"] in api.host.get_all()
    assert (rec["type"], rec["backtrace"], rec["subtask_of"], rec["subtasks"]) == ("<none/>", "()", NULL, [])
    assert state(api, vm)[0] == "Running"
    api.task.destroy(task)
    assert task not in api.task.get_all()
    task = api.Async.VM.clean_shutdown(vm)
    assert wait_task(api, task)["status"] == "success" and state(api, vm)[0] == "Halted"


def test_async_create_result_is_the_new_ref_as_xml(shared_api: Any, vm_args: VmArgs) -> None:
    task = shared_api.Async.VM.create(vm_args("made by a task"))
    rec = wait_task(shared_api, task)
    assert rec["status"] == "success"
    (ref,), _ = xmlrpc.client.loads(
        f"<methodResponse><params><param>{rec['result']}</param></params></methodResponse>")
    assert shared_api.VM.get_name_label(ref) == "made by a task"


def test_failing_async_call_ends_in_failure_with_error_info(shared_api: Any, vm_args: VmArgs) -> None:
    """wire.md 5.3: errors from the implementation land in the task's error_info."""
    vm = shared_api.VM.create(vm_args("async fail"))
    task = shared_api.Async.VM.clean_shutdown(vm)          # it is Halted: refused inside the task
    rec = wait_task(shared_api, task)
    assert rec["status"] == "failure"
    assert rec["error_info"] == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    assert rec["result"] == ""
    bad = shared_api.Async.VM.start("OpaqueRef:gone", False, False)   # HANDLE_INVALID also lands in the task
    assert wait_task(shared_api, bad)["error_info"] == ["HANDLE_INVALID", "VM", "OpaqueRef:gone"]


def test_async_errors_before_the_task_exist_come_back_directly(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 5.3: bad session, count or types fail the call itself; no task is created."""
    s = shared_xapid.session()
    before = set(s.xenapi.task.get_all())
    vm = s.xenapi.VM.get_all()[0]
    assert failure(call_raw(s, "Async.VM.start", s.handle, vm)) == [
        "MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.start", "3", "1"]
    assert failure(call_raw(s, "Async.VM.start", s.handle, vm, "x", False))[0] == "INTERNAL_ERROR"
    assert failure(call_raw(s, "Async.VM.start", "OpaqueRef:bad", vm, False, False)) == [
        "SESSION_INVALID", "OpaqueRef:bad"]
    assert set(s.xenapi.task.get_all()) == before


def test_task_create_and_destroy(shared_api: Any) -> None:
    task = shared_api.task.create("my label", "my description")
    rec = shared_api.task.get_record(task)
    assert (rec["name_label"], rec["name_description"], rec["status"]) == ("my label", "my description",
                                                                             "pending")
    assert rec["finished"].value == "19700101T00:00:00Z"
    assert task in shared_api.task.get_by_name_label("my label")
    shared_api.task.destroy(task)
    with pytest.raises(XenAPI.Failure) as e:
        shared_api.task.get_status(task)
    assert e.value.details == ["HANDLE_INVALID", "task", task]


def test_tasks_are_listed_on_the_session_that_created_them(shared_xapid: Any, vm_args: VmArgs) -> None:
    """wire.md 5.1: ``session.tasks`` holds the tasks created using that session."""
    s, other = shared_xapid.session(), shared_xapid.session()
    api = s.xenapi
    mine = api.task.create("mine", "")
    vm = api.VM.create(vm_args("task owner"))
    started = api.Async.VM.start(vm, False, False)
    wait_task(api, started)
    assert {mine, started} <= set(api.session.get_tasks(s.handle))
    assert not {mine, started} & set(other.xenapi.session.get_tasks(other.handle))
    api.task.destroy(mine)
    assert mine not in api.session.get_tasks(s.handle) and started in api.session.get_tasks(s.handle)
