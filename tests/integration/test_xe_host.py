"""``xe`` end to end: host maintenance and power (cli_frontend.ml host-disable, host-enable, host-evacuate,
host-get-vms-which-prevent-evacuation, host-shutdown, host-reboot, host-power-on), host-ha-xapi-healthcheck
and pool-ha-prevent-restarts-for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_xe_support import Xe, make_vm, values

INTERNAL = ("The server failed to handle your request, due to an internal error. The given message may give"
            " details useful for debugging the problem.\n")


@pytest.fixture
def xe(xapid: Any, tmp_path: Path) -> Xe:
    return Xe(tmp_path, xapid)


def host_uuid(xe: Xe, name: str) -> str:
    return xe.ok("host-list", f"name-label={name}", "--minimal").strip()


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_host_disable_enable_and_selectors(xe: Xe) -> None:
    h2 = host_uuid(xe, "host2")
    assert xe.ok("host-disable", "host=host2") == ""
    assert xe.get("host", h2, "enabled") == "false"
    assert xe.ok("host-enable", f"uuid={h2}") == ""
    assert xe.get("host", h2, "enabled") == "true"
    assert xe.fail("host-disable") == INTERNAL + (
        "message: Failure: Multiple matching hosts found. --multiple required to complete the operation\n")
    assert xe.ok("host-disable", "--multiple") == ""
    assert xe.ok("host-list", "enabled=false", "--minimal").strip().count(",") == 2
    assert xe.ok("host-enable", "--multiple", "enabled=false") == ""
    assert xe.ok("host-list", "enabled=true", "--minimal").strip().count(",") == 2
    assert xe.fail("host-enable", "host=nosuch") == INTERNAL + "message: Failure: No matching hosts found\n"


def test_host_disable_auto_enable_false_survives_a_restart(xe: Xe) -> None:
    h3 = host_uuid(xe, "host3")
    xe.ok("host-disable", "host=host3", "auto-enable=false")
    xe.daemon.restart()
    xe = Xe(xe.home.parent, xe.daemon)
    assert xe.get("host", h3, "enabled") == "false"
    xe.ok("host-enable", "host=host3")
    assert xe.get("host", h3, "enabled") == "true"


def test_host_evacuate_and_what_prevents_it(xe: Xe, api: Any) -> None:
    h2 = host_uuid(xe, "host2")
    host2 = api.host.get_by_uuid(h2)
    vm = make_vm(api, "mover")
    api.VM.start_on(vm, host2, False, False)
    assert xe.ok("host-get-vms-which-prevent-evacuation", f"uuid={h2}") == ""
    for name in ("host1", "host3"):
        xe.ok("host-disable", f"host={name}")
    out = xe.ok("host-get-vms-which-prevent-evacuation", f"uuid={h2}")
    assert values(out) == [{"uuid": api.VM.get_uuid(vm), "name-label": "mover",
                            "reason": f"NO_HOSTS_AVAILABLE,{vm}"}]
    assert xe.fail("host-evacuate", "host=host2").startswith(
        "There were no servers available to complete the specified operation.\n")
    xe.ok("host-enable", "host=host3")
    assert xe.fail("host-evacuate") == INTERNAL + (
        "message: Failure: Multiple matching hosts found. Operation can only be performed on one host at a time\n")
    assert xe.ok("host-evacuate", "host=host2", "batch-size=2") == ""
    assert api.host.get_name_label(api.VM.get_resident_on(vm)) == "host3"


def test_host_shutdown_power_on_and_reboot(xe: Xe, api: Any) -> None:
    h2 = host_uuid(xe, "host2")
    assert xe.fail("host-shutdown", "host=host2") == (
        "This operation cannot be performed because the host is not disabled. Please disable the host and then"
        " try again.\n")
    xe.ok("host-disable", "host=host2")
    assert xe.ok("host-shutdown", "host=host2") == ""
    assert api.host_metrics.get_live(api.host.get_metrics(api.host.get_by_uuid(h2))) is False
    assert xe.ok("host-power-on", "host=host2") == ""
    wait_until(lambda: xe.get("host", h2, "enabled") == "true")
    assert xe.fail("host-power-on", "host=host2") == (
        "This operation cannot be completed because the server is still live.\n"
        f"host: {h2} (host2)\n")
    xe.ok("host-disable", "host=host2")
    assert xe.ok("host-reboot", "host=host2") == ""
    wait_until(lambda: xe.get("host", h2, "enabled") == "true")


def test_host_ha_xapi_healthcheck(xe: Xe) -> None:
    assert xe.ok("host-ha-xapi-healthcheck") == "xapi is healthy.\n"


def test_pool_ha_prevent_restarts_for(xe: Xe) -> None:
    """Works with HA off too (xapi_pool.ml); the monitor honours it (tests/integration/ha/test_failover.py)."""
    assert xe.ok("pool-ha-prevent-restarts-for", "seconds=60") == ""
    assert xe.ok("pool-ha-prevent-restarts-for", "seconds=0") == ""
    assert '"method": "pool.ha_prevent_restarts_for"' in xe.daemon.log()
    assert xe.fail("pool-ha-prevent-restarts-for").startswith("Required parameter not found: seconds")


def test_host_commands_are_in_help(xe: Xe) -> None:
    out = xe.ok("help", "host-evacuate")
    assert "network-uuid" in out and "batch-size" in out
    for command in ("host-disable", "host-enable", "host-shutdown", "host-reboot", "host-power-on",
                    "host-get-vms-which-prevent-evacuation", "host-ha-xapi-healthcheck",
                    "pool-ha-prevent-restarts-for", "host-emergency-ha-disable"):
        assert command in xe.ok("help")
