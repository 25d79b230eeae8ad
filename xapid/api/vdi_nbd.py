"""VDI: where a disk can be read over NBD (xapi_vdi.ml get_nbd_info); the service is :mod:`xapid.nbd_exports`."""

from __future__ import annotations

from typing import Any

from xapid.api import Call, handler
from xapid.nbd_exports import nbd_info


@handler("VDI.get_nbd_info")
def get_nbd_info(call: Call, self: str) -> list[dict[str, Any]]:
    """One entry per address and host that serves the VDI: export name, address, port, cert, subject."""
    return nbd_info(call.daemon, self, str(call.session))
