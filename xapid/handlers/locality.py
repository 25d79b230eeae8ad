"""Which host serves a transfer: xapi's SR reachability check and its ``302`` redirect
(``importexport.ml`` check_sr_availability, find_host_for_sr, return_302_redirect; ``export.ml``).

A disk or VM transfer is served by the host whose address received it (the master for the
pool's address and the Unix socket) only if that host has a plugged PBD for every SR involved
and is live.  Otherwise the answer is ``302 Found`` to the same path and query at the address of
a live host that can see them all (xapi picks one at random; xapid picks the first by address),
or ``NO_HOSTS_AVAILABLE`` if there is none.  The redirect leaves the request's task pending: the
host the client goes to next completes it.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.server import Response

if TYPE_CHECKING:
    from xapid.handlers.access import Access
    from xapid.store import Store


class Redirect(Exception):
    """Raised by a handler body: answer ``response`` (a 302) and leave the task to the next host."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def can_see(store: Store, host: str, srs: set[str]) -> bool:
    """``which_specified_SRs_not_available_on_host`` is empty: a plugged PBD on ``host`` for each SR."""
    seen = {rec["SR"] for pbd in store.referrers("PBD", "host", host)
            if (rec := store.get("PBD", pbd)) is not None and rec["currently_attached"]}
    return srs <= seen


def _live(store: Store, host: str) -> bool:
    rec = store.get("host", host)
    metrics = store.get("host_metrics", rec["metrics"]) if rec is not None else None
    return bool(metrics and metrics["live"])


def serve_here_or_redirect(access: Access, srs: set[str]) -> None:
    """Return if the receiving host can serve a transfer touching ``srs``; else raise :class:`Redirect`
    (or ``NO_HOSTS_AVAILABLE``)."""
    srs = {sr for sr in srs if sr != NULL_REF}
    daemon = access.daemon
    store = daemon.store
    here = access.request.endpoint or daemon.master_ref()
    if can_see(store, here, srs) and _live(store, here):
        return
    hosts = sorted(store.items("host"), key=lambda item: _address_key(str(item[1]["address"])))
    target = next((ref for ref, rec in hosts
                   if ref != here and daemon.hw.is_running(str(rec["uuid"])) and _live(store, ref)
                   and can_see(store, ref, srs)), None)
    if target is None:
        raise ApiError("NO_HOSTS_AVAILABLE")
    address = str(store.get("host", target)["address"])  # type: ignore[index]
    request = access.request
    url = f"{daemon.api_scheme}://{address}:{daemon.api_port}{request.path}"
    if request.query:
        url += "?" + request.query
    headers = [("cache-control", "no-cache, no-store"), ("location", url)]
    raise Redirect(Response(302, b"", "text/plain", close=True, headers=headers))


def _address_key(address: str) -> tuple[int, str]:
    try:
        return int(ipaddress.ip_address(address)), ""
    except ValueError:
        return -1, address
