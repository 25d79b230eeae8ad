"""xapi's HTTP handlers beside the RPC endpoint: statistics, disk and VM transfers.

One module per concern: :mod:`.access` (authentication, RBAC, tasks: shared by all), :mod:`.rrd`
(performance statistics), :mod:`.disks` (raw and VHD disk transfers), :mod:`.vms` (XVA VM export
and import; formats in :mod:`.vhd`, :mod:`.xva`, :mod:`.sparse`).  :func:`routes` is the one place
their routes are gathered for :meth:`xapid.server.Listener.routes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xapid.server import Route


def routes() -> list[Route]:
    """Every handler route (each module's ``routes()``), served on every listener."""
    from xapid.handlers import disks, rrd, vms

    return [
        *rrd.routes(),
        *disks.routes(),
        *vms.routes(),
    ]
