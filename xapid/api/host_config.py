"""host and pool: a host's own settings (xapi_host.ml set_hostname_live, set_power_on_mode,
enable_ssh / disable_ssh / set_ssh_enabled_timeout / set_ssh_auto_mode, set_console_idle_timeout,
get_server_localtime, syslog_reconfigure, dmesg, get_sched_gran / set_sched_gran,
get_ntp_synchronized, list_timezones; xapi_pool.ml's pool-wide SSH and console settings).

The emulated hosts run no sshd or chrony: each call validates and records what xapi does, and
the expiry of an SSH timeout is enforced by the garbage-collection pass (:func:`expire_ssh`,
every ``gc-interval`` seconds, where xapi schedules a one-shot job).
"""

from __future__ import annotations

import calendar
import re
import time
import zoneinfo
from typing import Any

from xapid.api import Call, handler
from xapid.api.host import _host
from xapid.errors import ApiError
from xapid.store import Store

EPOCH = "19700101T00:00:00Z"
MAX_SSH_TIMEOUT = 172800  # two days (xapi_host.ml set_ssh_enabled_timeout)
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]*")


def _iso(seconds: float) -> str:
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime(seconds))


def _seconds(iso: str) -> float:
    return float(calendar.timegm(time.strptime(iso, "%Y%m%dT%H:%M:%SZ")))


@handler("host.set_hostname_live")
def set_hostname_live(call: Call, host: str, hostname: str) -> None:
    """Letters, digits, ``-`` and ``.`` (no ``-`` at either end), at most 255 characters, else
    ``HOST_NAME_INVALID [reason]``; the control domain is renamed after it."""
    if not hostname:
        raise ApiError("HOST_NAME_INVALID", "hostname empty")
    if len(hostname) > 255:
        raise ApiError("HOST_NAME_INVALID", "hostname is too long")
    if not _HOSTNAME.fullmatch(hostname) or hostname[0] == "-" or hostname[-1] == "-":
        raise ApiError("HOST_NAME_INVALID", "hostname contains invalid characters")
    with call.store.transaction() as tx:
        rec = tx.get("host", host)
        rec["hostname"] = hostname
        dom0 = tx.find("VM", rec["control_domain"])
        if dom0 is not None:  # Helpers.update_domain_zero_name
            dom0["name_label"] = f"Control domain on host: {hostname}"


@handler("host.set_power_on_mode")
def set_power_on_mode(call: Call, self: str, power_on_mode: str, power_on_config: dict[str, str]) -> None:
    with call.store.transaction() as tx:
        tx.get("host", self).update(power_on_mode=power_on_mode, power_on_config=dict(power_on_config))


@handler("host.get_server_localtime")
def get_server_localtime(call: Call, host: str) -> str:
    """The host's local time (Date.localtime: no zone designator)."""
    _host(call, host)
    return time.strftime("%Y%m%dT%H:%M:%S", time.localtime())


@handler("host.syslog_reconfigure")
def syslog_reconfigure(call: Call, host: str) -> None:
    """Re-read ``logging:syslog_destination`` (nothing to restart on an emulated host)."""
    _host(call, host)


@handler("host.dmesg")
def dmesg(call: Call, host: str) -> str:
    """The host's console ring (xenopsd's get_console_data): what the emulated machine printed."""
    rec = _host(call, host)
    return (f"(XEN) Xen version {rec['software_version'].get('xen', '')} (xapid)\n"
            f"(XEN) Command line: dom0_mem=4096M,max:4096M watchdog ucode=scan\n"
            f"(XEN) Brought up {rec['cpu_info'].get('cpu_count', '1')} CPUs\n"
            f"(XEN) Dom0 has maximum 4 VCPUs\n"
            f"(XEN) *** Serial input to DOM0 (type 'CTRL-a' three times to switch input)\n")


@handler("host.get_sched_gran")
def get_sched_gran(call: Call, self: str) -> str:
    _host(call, self)
    return "cpu"  # no sched-gran on the Xen command line: the default


@handler("host.set_sched_gran")
def set_sched_gran(call: Call, self: str, value: str) -> None:
    _host(call, self)
    raise ApiError("OPERATION_NOT_ALLOWED", "Disabled by xapi.conf")  # allow_host_sched_gran_modification


@handler("host.get_ntp_synchronized")
def get_ntp_synchronized(call: Call, self: str) -> bool:
    _host(call, self)
    return True  # the emulated hosts keep the daemon's clock


@handler("host.list_timezones")
def list_timezones(call: Call, self: str) -> list[str]:
    _host(call, self)
    return sorted(zoneinfo.available_timezones() | {"UTC"})


# -- SSH and the console ---------------------------------------------------------------------------


def _enable_ssh(rec: dict[str, Any]) -> None:
    rec["ssh_auto_mode"] = False  # enabling by hand turns the auto mode off
    timeout = int(rec["ssh_enabled_timeout"])
    rec["ssh_expiry"] = EPOCH if timeout == 0 else _iso(time.time() + timeout)
    rec["ssh_enabled"] = True


def _disable_ssh(rec: dict[str, Any]) -> None:
    rec.update(ssh_enabled=False, ssh_expiry=_iso(time.time()))


def _set_ssh_timeout(rec: dict[str, Any], value: int) -> None:
    if value < 0 or value > MAX_SSH_TIMEOUT:
        raise ApiError("INVALID_VALUE", "ssh_enabled_timeout", value)
    rec["ssh_enabled_timeout"] = value
    if rec["ssh_enabled"]:
        rec["ssh_expiry"] = EPOCH if value == 0 else _iso(time.time() + value)


def _set_console_timeout(rec: dict[str, Any], value: int) -> None:
    if value < 0:
        raise ApiError("INVALID_VALUE", "console_timeout", value)
    rec["console_idle_timeout"] = value


def _on_host(call: Call, host: str, change: Any, *args: Any) -> None:
    with call.store.transaction() as tx:
        change(tx.get("host", host), *args)


def _on_pool(call: Call, pool: str, change: Any, *args: Any) -> None:
    """xapi_pool.ml: the host call on every host of the pool, all or none."""
    with call.store.transaction() as tx:
        tx.get("pool", pool)
        for host in tx.refs("host"):
            change(tx.get("host", host), *args)


@handler("host.enable_ssh")
def enable_ssh(call: Call, self: str) -> None:
    _on_host(call, self, _enable_ssh)


@handler("host.disable_ssh")
def disable_ssh(call: Call, self: str) -> None:
    _on_host(call, self, _disable_ssh)


@handler("host.set_ssh_enabled_timeout")
def set_ssh_enabled_timeout(call: Call, self: str, value: int) -> None:
    _on_host(call, self, _set_ssh_timeout, value)


@handler("host.set_console_idle_timeout")
def set_console_idle_timeout(call: Call, self: str, value: int) -> None:
    _on_host(call, self, _set_console_timeout, value)


@handler("host.set_ssh_auto_mode")
def set_ssh_auto_mode(call: Call, self: str, value: bool) -> None:
    _on_host(call, self, lambda rec: rec.update(ssh_auto_mode=value))


@handler("pool.enable_ssh")
def pool_enable_ssh(call: Call, self: str) -> None:
    _on_pool(call, self, _enable_ssh)


@handler("pool.disable_ssh")
def pool_disable_ssh(call: Call, self: str) -> None:
    _on_pool(call, self, _disable_ssh)


@handler("pool.set_ssh_enabled_timeout")
def pool_set_ssh_enabled_timeout(call: Call, self: str, value: int) -> None:
    _on_pool(call, self, _set_ssh_timeout, value)


@handler("pool.set_console_idle_timeout")
def pool_set_console_idle_timeout(call: Call, self: str, value: int) -> None:
    _on_pool(call, self, _set_console_timeout, value)


@handler("pool.set_ssh_auto_mode")
def pool_set_ssh_auto_mode(call: Call, self: str, value: bool) -> None:
    _on_pool(call, self, lambda rec: rec.update(ssh_auto_mode=value))


def expire_ssh(store: Store, now: float | None = None) -> int:
    """Disable SSH on every host whose ``ssh_expiry`` has passed (xapi's ``job_for_disable_ssh``);
    return how many."""
    now = time.time() if now is None else now
    due = [ref for ref, rec in store.items("host")
           if rec["ssh_enabled"] and rec["ssh_expiry"] != EPOCH and _seconds(rec["ssh_expiry"]) <= now]
    if due:
        with store.transaction() as tx:
            for ref in due:
                rec = tx.get("host", ref)
                if rec["ssh_enabled"]:
                    rec["ssh_enabled"] = False
    return len(due)
