"""pool.ha_compute_hypothetical_max_host_failures_to_tolerate through the SDK (ha.md 4.10, 8)."""

from __future__ import annotations

from typing import Any

import pytest
import XenAPI

from tests.integration.test_xe_support import make

GIB = 1024**3


def big_vm(api: Any, name: str, gib: int) -> str:
    """A halted VM of ``gib`` GiB static max memory; returns its ref."""
    size = str(gib * GIB)
    return make(api, "VM", name_label=name, is_a_template=False, memory_static_max=size, memory_dynamic_max=size,
                memory_dynamic_min=size, memory_static_min=size, VCPUs_max="1", VCPUs_at_startup="1")


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def test_hypothetical_plans(api: Any) -> None:
    """Three 64 GiB hosts (60 GiB usable each): two 50 GiB protected VMs survive one failure, one survives two."""
    compute = api.pool.ha_compute_hypothetical_max_host_failures_to_tolerate
    a, b = big_vm(api, "a", 50), big_vm(api, "b", 50)
    assert compute({}) == "3"
    assert compute({a: "restart"}) == "2"
    assert compute({a: "restart", b: "restart"}) == "1"
    assert compute({a: "restart", b: "best-effort"}) == "2"
    assert compute({a: "", b: "best-effort"}) == "3"
    # Only hypothetical: the VMs' own priorities are untouched and the real computation ignores them.
    assert api.VM.get_ha_restart_priority(a) == ""
    assert api.pool.ha_compute_max_host_failures_to_tolerate() == "3"


def test_hypothetical_errors(api: Any) -> None:
    compute = api.pool.ha_compute_hypothetical_max_host_failures_to_tolerate
    vm = big_vm(api, "x", 1)
    assert failure(compute, {vm: "always"}) == ["INVALID_VALUE", "ha_restart_priority", "always"]
    assert failure(compute, {"OpaqueRef:nope": "restart"})[:2] == ["HANDLE_INVALID", "VM"]
