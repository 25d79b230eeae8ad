"""Hand-written behaviour per XenAPI class, registered by wire name.

A module here decorates a function with ``@handler("VM.start")``; the
dispatcher binds it to the message of that name declared in the schema (or
overrides the generic implementation of ``create``/``destroy``/setters).
Handlers receive a :class:`Call` then the unmarshalled arguments, with the
session already checked and stripped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xapid.daemon import Daemon
    from xapid.store import Store

Handler = Callable[..., Any]

HANDLERS: dict[str, Handler] = {}


def handler(*names: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the implementation of the given wire names."""

    def register(fn: Handler) -> Handler:
        for name in names:
            assert name not in HANDLERS, f"duplicate handler {name}"
            HANDLERS[name] = fn
        return fn

    return register


@dataclass
class Call:
    """What a handler knows about the call it serves."""

    daemon: Daemon
    method: str
    session: str | None = None
    task: str | None = None
    local: bool = False  # arrived on the Unix socket: pre-authenticated as root (wire.md 1.3)
    endpoint: str | None = None  # the host whose endpoint received the call; None: the master's

    @property
    def store(self) -> Store:
        return self.daemon.store

    @property
    def host(self) -> str:
        """The ref of the host this call was sent to (the master, for the pool's address and the Unix socket).

        Calls that real xapi never forwards (``host.emergency_ha_disable``, ``host.ha_xapi_healthcheck``,
        ``host.is_in_emergency_mode``) act on this host.
        """
        return self.endpoint or self.daemon.master_ref()

    @property
    def on_master(self) -> bool:
        """Whether the host this call was sent to is the pool's master now."""
        return self.endpoint is None or self.endpoint == self.daemon.master_ref()


def load_all() -> dict[str, Handler]:
    """Import every behaviour module so their handlers register; return the table."""
    from xapid.api import (  # noqa: F401
        cluster,
        event,
        host,
        host_config,
        host_forget,
        message,
        network,
        pbd,
        pool,
        role,
        session,
        sr,
        task,
        vbd,
        vdi,
        vdi_cbt,
        vdi_nbd,
        vif,
        vm,
        vm_appliance,
        vm_config,
        vm_copy,
        vm_migrate,
        vtpm,
    )

    return HANDLERS
