"""host: HA emergency disable and the read-only helpers clients call."""

from __future__ import annotations

from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.timeutil import now_iso


@handler("host.emergency_ha_disable")
def emergency_ha_disable(call: Call, soft: bool) -> None:
    # The call acts on the host it is sent to; every call reaches the master here.
    call.daemon.ha.emergency_disable(call.daemon.master_ref(), soft)


@handler("host.get_servertime")
def get_servertime(call: Call, host: str) -> str:
    if call.store.get("host", host) is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    return now_iso()


@handler("host.get_management_interface")
def get_management_interface(call: Call, host: str) -> str:
    if call.store.get("host", host) is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    for pif in call.store.referrers("PIF", "host", host):
        rec = call.store.get("PIF", pif)
        if rec and rec["management"]:
            return pif
    raise ApiError("INTERNAL_ERROR", "host has no management interface")
