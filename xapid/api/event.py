"""event: the change feed (behaviour in :mod:`xapid.events`)."""

from __future__ import annotations

from typing import Any

from xapid.api import Call, handler


@handler("event.from")
def event_from(call: Call, classes: list[str], token: str, timeout: float) -> dict[str, Any]:
    assert call.session is not None
    return call.daemon.events.event_from(call.session, classes, token, timeout)


@handler("event.inject")
def inject(call: Call, cls: str, ref: str) -> str:
    return call.daemon.events.inject(cls, ref)


@handler("event.register")
def register(call: Call, classes: list[str]) -> None:
    assert call.session is not None
    call.daemon.events.register(call.session, classes)


@handler("event.unregister")
def unregister(call: Call, classes: list[str]) -> None:
    assert call.session is not None
    call.daemon.events.unregister(call.session, classes)


@handler("event.next")
def next_events(call: Call) -> list[dict[str, Any]]:
    assert call.session is not None
    return call.daemon.events.next(call.session)


@handler("event.get_current_id")
def get_current_id(call: Call) -> int:
    return call.daemon.events.current_id()
