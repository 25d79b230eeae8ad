"""``xe host-data-source-*`` and ``xe vm-data-source-*`` (cli_operations.ml) against a running daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_xe_support import Xe
from tests.integration.vmkit import install, new_vif, wait_for


@pytest.fixture
def xe(shared_xapid: Any, tmp_path: Path) -> Xe:
    return Xe(tmp_path, shared_xapid)


def records(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.strip("\n").split("\n\n"):
        rec = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            rec[key.strip()] = value
        out.append(rec)
    return out


def test_host_data_sources(xe: Xe, shared_api: Any) -> None:
    master = shared_api.pool.get_master(shared_api.pool.get_all()[0])
    uuid = shared_api.host.get_uuid(master)
    listed = {r["name_label"]: r for r in records(xe.ok("host-data-source-list", f"uuid={uuid}"))}
    assert listed["cpu0"] == {"name_label": "cpu0", "name_description": "Physical cpu usage for cpu 0",
                              "enabled": "true", "standard": "true", "min": "0.", "max": "1.",
                              "units": "(fraction)"}
    assert listed["memory_total_kib"]["max"] == "inf"
    value = xe.ok("host-data-source-query", f"uuid={uuid}", "data-source=cpu_avg")
    assert value.endswith("\n") and 0 <= float(value) <= 1 and len(value.strip().split(".")[1]) == 6
    assert float(xe.ok("host-data-source-query", "host=host1", "data-source=memory_total_kib")) > 0
    assert "Required parameter not found: data-source" in xe.fail("host-data-source-query", f"uuid={uuid}")


def test_vm_data_sources_record_and_forget(xe: Xe, shared_api: Any) -> None:
    api = shared_api
    vm = install(api, "Debian Bookworm 12", "xe-stats")
    new_vif(api, vm, "0")
    api.VM.start(vm, False, False)
    uuid = api.VM.get_uuid(vm)
    try:
        listed = {r["name_label"]: r for r in records(xe.ok("vm-data-source-list", f"uuid={uuid}"))}
        assert {"cpu0", "memory", "vif_0_rx"} <= set(listed) and listed["vif_0_rx_errors"]["enabled"] == "false"
        assert xe.ok("vm-data-source-record", "vm=xe-stats", "data-source=vif_0_rx_errors") == ""
        listed = {r["name_label"]: r for r in records(xe.ok("vm-data-source-list", f"uuid={uuid}"))}
        assert listed["vif_0_rx_errors"]["enabled"] == "true"
        assert xe.ok("vm-data-source-forget", f"uuid={uuid}", "data-source=vif_0_rx_errors") == ""
        wait_for(lambda: float(xe.ok("vm-data-source-query", f"uuid={uuid}", "data-source=memory")) > 0,
                 what="the first sample")
    finally:
        api.VM.hard_shutdown(vm)
