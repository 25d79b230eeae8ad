"""Performance statistics over HTTP: ``/rrd_updates``, ``/host_rrd``, ``/vm_rrd`` (xcp-rrdd's formats)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xapid.server import Route


def routes() -> list[Route]:
    """The statistics routes."""
    return []
