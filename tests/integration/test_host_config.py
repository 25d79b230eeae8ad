"""A host's own settings (xapi_host.ml set_hostname_live, set_power_on_mode, enable_ssh,
disable_ssh, set_ssh_enabled_timeout, set_console_idle_timeout, get_server_localtime,
get_sched_gran/set_sched_gran, list_timezones; xapi_pool.ml's pool-wide SSH settings) through
the SDK against a real daemon."""

from __future__ import annotations

import calendar
import time
from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid
from tests.integration.vmkit import wait_for


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def test_set_hostname_live_validates_like_xapi_and_renames_the_control_domain(shared_api: Any) -> None:
    api = shared_api
    host = api.host.get_all()[-1]
    before = api.host.get_hostname(host)
    assert failure(api.host.set_hostname_live, host, "") == ["HOST_NAME_INVALID", "hostname empty"]
    assert failure(api.host.set_hostname_live, host, "-edge") == ["HOST_NAME_INVALID",
                                                                  "hostname contains invalid characters"]
    assert failure(api.host.set_hostname_live, host, "under_score")[1] == "hostname contains invalid characters"
    assert failure(api.host.set_hostname_live, host, "a" * 256) == ["HOST_NAME_INVALID", "hostname is too long"]
    assert api.host.get_hostname(host) == before
    api.host.set_hostname_live(host, "rack-3.example")
    assert api.host.get_hostname(host) == "rack-3.example"
    dom0 = api.host.get_control_domain(host)
    assert api.VM.get_name_label(dom0) == "Control domain on host: rack-3.example"
    api.host.set_hostname_live(host, before)


def test_power_on_mode_time_and_scheduler(shared_api: Any) -> None:
    api = shared_api
    host = api.host.get_all()[0]
    api.host.set_power_on_mode(host, "wake-on-lan", {"key": "value"})
    assert api.host.get_power_on_mode(host) == "wake-on-lan"
    assert api.host.get_power_on_config(host) == {"key": "value"}
    local = str(api.host.get_server_localtime(host))
    assert abs(time.mktime(time.strptime(local, "%Y%m%dT%H:%M:%S")) - time.time()) < 120
    assert api.host.get_sched_gran(host) == "cpu"
    assert failure(api.host.set_sched_gran, host, "core") == ["OPERATION_NOT_ALLOWED", "Disabled by xapi.conf"]
    assert api.host.get_ntp_synchronized(host) is True
    zones = api.host.list_timezones(host)
    assert "UTC" in zones and "Europe/Paris" in zones
    assert "Xen version" in api.host.dmesg(host)
    api.host.syslog_reconfigure(host)


def test_ssh_switches_timeouts_and_pool_wide_settings(shared_api: Any) -> None:
    api = shared_api
    pool = api.pool.get_all()[0]
    host = api.host.get_all()[0]
    api.host.set_ssh_auto_mode(host, True)
    api.host.disable_ssh(host)
    assert api.host.get_ssh_enabled(host) is False
    api.host.enable_ssh(host)
    rec = api.host.get_record(host)
    assert rec["ssh_enabled"] is True and rec["ssh_auto_mode"] is False  # by hand: no auto mode
    assert str(rec["ssh_expiry"]) == "19700101T00:00:00Z"  # no timeout
    assert failure(api.host.set_ssh_enabled_timeout, host, 172801) == ["INVALID_VALUE", "ssh_enabled_timeout",
                                                                       "172801"]
    assert failure(api.host.set_ssh_enabled_timeout, host, -1)[0] == "INVALID_VALUE"
    api.host.set_ssh_enabled_timeout(host, 3600)
    expiry = calendar.timegm(time.strptime(str(api.host.get_ssh_expiry(host)), "%Y%m%dT%H:%M:%SZ"))
    assert 3500 < expiry - time.time() < 3700
    assert failure(api.host.set_console_idle_timeout, host, -5) == ["INVALID_VALUE", "console_timeout", "-5"]
    api.pool.set_console_idle_timeout(pool, 900)
    assert {api.host.get_console_idle_timeout(h) for h in api.host.get_all()} == {"900"}  # XML-RPC ints
    api.pool.disable_ssh(pool)
    assert {api.host.get_ssh_enabled(h) for h in api.host.get_all()} == {False}
    api.pool.set_ssh_enabled_timeout(pool, 0)
    api.pool.enable_ssh(pool)
    assert {api.host.get_ssh_enabled(h) for h in api.host.get_all()} == {True}


def test_an_ssh_timeout_disables_ssh_when_it_expires(xapid_factory: Any) -> None:
    d: Xapid = xapid_factory(**{"gc-interval": "0.2"})
    api = d.session().xenapi
    host = api.host.get_all()[1]
    api.host.set_ssh_enabled_timeout(host, 1)
    api.host.enable_ssh(host)
    assert api.host.get_ssh_enabled(host) is True
    wait_for(lambda: api.host.get_ssh_enabled(host) is False, 10, "the SSH timeout to disable SSH")
    assert all(api.host.get_ssh_enabled(h) for h in api.host.get_all() if h != host)
