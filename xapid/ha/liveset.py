"""Strict parser for the liveset XML printed by ``ha_query_liveset`` (ha.md 3.2.1).

The parser follows xapi's rules to the letter, so a stack that xapi would reject is rejected
here too.  Every problem, including malformed or hostile XML (DTDs, entities) and oversized
input, raises ``ApiError("INTERNAL_ERROR", <what is wrong>)`` and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element, ParseError
from xml.etree.ElementTree import fromstring as fast_fromstring

from defusedxml.ElementTree import fromstring as defused_fromstring

from xapid.errors import internal

MAX_BYTES = 1 << 20

STATUSES: tuple[str, ...] = ("Online", "Starting", "Offline")
HOST_FIELDS: tuple[str, ...] = (
    "HostID",
    "liveness",
    "master",
    "statefile_access",
    "statefile_corrupted",
    "excluded",
)
RAW_LATENCIES: tuple[str, ...] = (
    "statefile_latency",
    "statefile_latency_min",
    "statefile_latency_max",
    "heartbeat_latency",
    "heartbeat_latency_min",
    "heartbeat_latency_max",
    "Xapi_healthcheck_latency",
    "Xapi_healthcheck_latency_min",
    "Xapi_healthcheck_latency_max",
)
RAW_HOST_INTS: tuple[str, ...] = (
    "time_since_last_update_on_statefile",
    "time_since_last_heartbeat",
    "time_since_xapi_restart_first_attempted",
)
RAW_HOST_LISTS: tuple[str, ...] = (
    "heartbeat_active_list_on_heartbeat",
    "heartbeat_active_list_on_statefile",
)
WARNINGS: tuple[str, ...] = (
    "statefile_lost",
    "heartbeat_approaching_timeout",
    "statefile_approaching_timeout",
    "Xapi_healthcheck_approaching_timeout",
    "network_bonding_error",
)

_INT = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class HostStatus:
    """One ``host`` entry of the liveset."""

    liveness: bool
    master: bool
    statefile_access: bool
    statefile_corrupted: bool
    excluded: bool


class RawHost:
    """The parts of one ``host_raw_data`` entry that xapi uses (``host.ha_network_peers``).

    Each list may be given as its element's text: it is split when read.  A 64-host liveset
    carries 8,192 UUIDs in these lists, and xapi reads the local host's only."""

    __slots__ = ("time_since_last_update_on_statefile", "time_since_last_heartbeat", "_lists")

    def __init__(
        self,
        time_since_last_update_on_statefile: int,
        time_since_last_heartbeat: int,
        heartbeat_active_list_on_heartbeat: Sequence[str] | str,
        heartbeat_active_list_on_statefile: Sequence[str] | str,
    ) -> None:
        self.time_since_last_update_on_statefile = time_since_last_update_on_statefile
        self.time_since_last_heartbeat = time_since_last_heartbeat
        self._lists = (heartbeat_active_list_on_heartbeat, heartbeat_active_list_on_statefile)

    def _list(self, which: int) -> list[str]:
        value = self._lists[which]
        return value.split() if isinstance(value, str) else list(value)

    @property
    def heartbeat_active_list_on_heartbeat(self) -> list[str]:
        """The hosts this one hears by heartbeat, as it reported them."""
        return self._list(0)

    @property
    def heartbeat_active_list_on_statefile(self) -> list[str]:
        """The hosts this one sees on the statefile, as it reported them."""
        return self._list(1)

    def _key(self) -> tuple[int, int, list[str], list[str]]:
        return (self.time_since_last_update_on_statefile, self.time_since_last_heartbeat,
                self.heartbeat_active_list_on_heartbeat, self.heartbeat_active_list_on_statefile)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawHost) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # equal by value, like the dataclass it replaces

    def __repr__(self) -> str:
        return "RawHost(%r, %r, %r, %r)" % self._key()


@dataclass(frozen=True)
class Liveset:
    """A parsed liveset; ``raw`` and ``warnings`` are None when their block is absent."""

    status: str
    local_host: str
    hosts: dict[str, HostStatus]
    raw: dict[str, RawHost] | None
    warnings: dict[str, bool] | None


def _children(parent: Element, tag: str) -> list[Element]:
    """Every direct child of ``parent`` named ``tag``, in document order."""
    return [child for child in parent if child.tag == tag]


def _groups(parent: Element) -> dict[str, list[Element]]:
    """The direct children of ``parent`` by tag, each list in document order (one pass: a
    64-host liveset has some 2,000 elements and is parsed once per query)."""
    groups: dict[str, list[Element]] = {}
    for child in parent:
        found = groups.get(child.tag)
        if found is None:
            groups[child.tag] = [child]
        else:
            found.append(child)
    return groups


def _one(groups: dict[str, list[Element]], tag: str, where: str) -> Element:
    """The only ``tag`` child in ``groups``; INTERNAL_ERROR if absent or repeated."""
    found = groups.get(tag)
    if not found:
        raise internal(f"liveset: <{where}> has no <{tag}>")
    if len(found) > 1:
        raise internal(f"liveset: <{where}> has {len(found)} <{tag}> elements")
    return found[0]


def _single(parent: Element, tag: str, where: str) -> Element:
    """The only ``tag`` child of ``parent``; INTERNAL_ERROR if absent or repeated."""
    return _one({tag: _children(parent, tag)}, tag, where)


def _leaf_text(element: Element, where: str) -> str:
    """The raw text of a leaf element; a leaf has no element children."""
    if len(element):
        raise internal(f"liveset: <{element.tag}> in <{where}> must be a leaf element")
    return element.text or ""


def _field(groups: dict[str, list[Element]], tag: str, where: str) -> str:
    """The trimmed text of the single leaf ``tag`` among ``groups``."""
    return _leaf_text(_one(groups, tag, where), where).strip()


def _bool(text: str, what: str) -> bool:
    """``TRUE``/``FALSE`` in any case; INTERNAL_ERROR otherwise."""
    upper = text.upper()
    if upper == "TRUE":
        return True
    if upper == "FALSE":
        return False
    raise internal(f"liveset: {what} is not TRUE or FALSE: {text!r}")


def _int(text: str, what: str) -> int:
    """A decimal integer, optionally negative; INTERNAL_ERROR otherwise."""
    if not _INT.fullmatch(text):
        raise internal(f"liveset: {what} is not an integer: {text!r}")
    return int(text)


def _status(root: Element) -> str:
    """The canonical status word."""
    element = _single(root, "status", "ha_liveset_info")
    text = _leaf_text(element, "ha_liveset_info")
    for status in STATUSES:
        # Case-insensitive but deliberately not trimmed, as in xapi.
        if text.lower() == status.lower():
            return status
    raise internal(f"liveset: <status> is not Online, Starting or Offline: {text!r}")


def _local_host(root: Element) -> str:
    """The local host UUID from ``localhost``'s first child."""
    localhost = _single(root, "localhost", "ha_liveset_info")
    if (localhost.text or "").strip():
        raise internal("liveset: <localhost> has text before its first child")
    if not len(localhost) or localhost[0].tag != "HostID":
        raise internal("liveset: the first child of <localhost> must be <HostID>")
    uuid = _leaf_text(localhost[0], "localhost")
    if not uuid or uuid != uuid.strip():
        raise internal(f"liveset: localhost <HostID> is empty or has surrounding whitespace: {uuid!r}")
    return uuid


def _hosts(root: Element) -> dict[str, HostStatus]:
    """Every ``host`` entry by UUID, in document order."""
    hosts: dict[str, HostStatus] = {}
    for host in _children(root, "host"):
        fields = _groups(host)
        uuid = _field(fields, "HostID", "host")
        if not uuid:
            raise internal("liveset: a <host> has an empty <HostID>")
        if uuid in hosts:
            raise internal(f"liveset: host {uuid} is listed twice")
        flags = {name: _bool(_field(fields, name, "host"), f"host {uuid} {name}") for name in HOST_FIELDS[1:]}
        hosts[uuid] = HostStatus(**flags)
    return hosts


def _raw(root: Element) -> dict[str, RawHost] | None:
    """The ``raw_status_on_local_host`` block by host UUID, or None if absent."""
    found = _children(root, "raw_status_on_local_host")
    if not found:
        return None
    if len(found) > 1:
        raise internal("liveset: more than one <raw_status_on_local_host>")
    block = _groups(found[0])
    where = "raw_status_on_local_host"
    for name in RAW_LATENCIES:
        _int(_field(block, name, where), name)
    raw: dict[str, RawHost] = {}
    for entry in block.get("host_raw_data", []):
        fields = _groups(entry)
        uuid = _field(fields, "HostID", "host_raw_data")
        if not uuid:
            raise internal("liveset: a <host_raw_data> has an empty <HostID>")
        if uuid in raw:
            raise internal(f"liveset: host_raw_data for {uuid} is listed twice")
        ints = {name: _int(_field(fields, name, "host_raw_data"), f"{uuid} {name}") for name in RAW_HOST_INTS}
        lists = {name: _field(fields, name, "host_raw_data") for name in RAW_HOST_LISTS}
        raw[uuid] = RawHost(
            time_since_last_update_on_statefile=ints["time_since_last_update_on_statefile"],
            time_since_last_heartbeat=ints["time_since_last_heartbeat"],
            heartbeat_active_list_on_heartbeat=lists["heartbeat_active_list_on_heartbeat"],
            heartbeat_active_list_on_statefile=lists["heartbeat_active_list_on_statefile"],
        )
    return raw


def _warnings(root: Element) -> dict[str, bool] | None:
    """The five warning flags, or None if the block is absent."""
    found = _children(root, "warning_on_local_host")
    if not found:
        return None
    if len(found) > 1:
        raise internal("liveset: more than one <warning_on_local_host>")
    where = "warning_on_local_host"
    flags = _groups(found[0])
    # Only the exact upper-case word counts as true, as in xapi; the text is not trimmed.
    return {name: _leaf_text(_one(flags, name, where), where) == "TRUE" for name in WARNINGS}


_BOOLS = {"TRUE": True, "FALSE": False}
def _only_leaf(groups: dict[str, list[Element]], tag: str) -> Element | None:
    """The single leaf ``tag`` among ``groups`` (see :func:`_groups`), or None if it is absent,
    repeated or not a leaf."""
    found = groups.get(tag)
    if found is None or len(found) != 1 or len(found[0]):
        return None
    return found[0]


def _leaf(groups: dict[str, list[Element]], tag: str) -> str | None:
    """The trimmed text of the single leaf ``tag``, or None if it is absent, repeated or not a leaf."""
    element = _only_leaf(groups, tag)
    return None if element is None else (element.text or "").strip()


def _quick_hosts(elements: list[Element]) -> dict[str, HostStatus] | None:
    """:func:`_hosts` for entries that break no rule, in one pass each; None at the first problem
    (the strict walk then names it)."""
    hosts: dict[str, HostStatus] = {}
    for host in elements:
        children = _groups(host)
        uuid = _leaf(children, "HostID")
        if not uuid or uuid in hosts:
            return None
        flags = []
        for name in HOST_FIELDS[1:]:
            text = _leaf(children, name)
            value = _BOOLS.get(text.upper()) if text is not None else None
            if value is None:
                return None
            flags.append(value)
        hosts[uuid] = HostStatus(*flags)
    return hosts


def _quick_raw(block: Element) -> dict[str, RawHost] | None:
    """:func:`_raw` of a ``raw_status_on_local_host`` that breaks no rule; None at the first problem."""
    children = _groups(block)
    for name in RAW_LATENCIES:
        text = _leaf(children, name)
        if text is None or not _INT.fullmatch(text):
            return None
    raw: dict[str, RawHost] = {}
    for entry in block:
        if entry.tag != "host_raw_data":
            continue
        fields = _groups(entry)
        uuid = _leaf(fields, "HostID")
        if not uuid or uuid in raw:
            return None
        ints = []
        for name in RAW_HOST_INTS:
            text = _leaf(fields, name)
            if text is None or not _INT.fullmatch(text):
                return None
            ints.append(int(text))
        on_heartbeat, on_statefile = (_only_leaf(fields, name) for name in RAW_HOST_LISTS)
        if on_heartbeat is None or on_statefile is None:
            return None
        # The text as it stands: split() on reading ignores the whitespace strip() would remove.
        raw[uuid] = RawHost(ints[0], ints[1], on_heartbeat.text or "", on_statefile.text or "")
    return raw


def _quick(root: Element) -> Liveset | None:
    """The liveset of a document that breaks no rule, or None if any rule might be broken.

    A 64-host liveset is some 350 kB and 1,000 elements, parsed once per query and host: this
    walk visits each element once.  Whatever it does not accept goes to the strict walk, which
    gives the answer or the precise error, so the two never disagree."""
    hosts = [child for child in root if child.tag == "host"]
    blocks = [child for child in root if child.tag == "raw_status_on_local_host"]
    if len(blocks) > 1:
        return None
    found = _quick_hosts(hosts)
    raw = _quick_raw(blocks[0]) if blocks else None
    if found is None or (blocks and raw is None):
        return None
    return Liveset(
        status=_status(root),
        local_host=_local_host(root),
        hosts=found,
        raw=raw,
        warnings=_warnings(root),
    )


# The plain reading (_plain): a liveset laid out as xhad prints it, read with regular expressions
# and str.find instead of a tree.  Each pattern below names its elements in the one order xhad
# writes them, with only blanks between elements and only names, digits and TRUE/FALSE inside
# them, so that a document they match is well-formed XML with the answer the tree walk gives.
_BLANKS = r"[ \t\n]*"
_NAME = r"[0-9A-Za-z_.:-]+"
_HOST_INDEX = r"(?:<HostIndex>[0-9]+</HostIndex>)?"
# Printable ASCII without "&" (no entity), "[" and "]" (no "]]>"), plus tab and newline (no CR
# for XML to normalise): character data made of these reads as it stands.
_PLAIN_CHARS = bytes(c for c in range(0x20, 0x7F) if c not in b"&[]") + b"\t\n"
_PLAIN_HEAD = re.compile(
    r'(?:<\?xml version="1\.0" encoding="UTF-8"\?>)?' + _BLANKS + r'<ha_liveset_info version="1\.0">' + _BLANKS
    + r"<status>(Online|Starting|Offline)</status>" + _BLANKS
    + rf"<localhost><HostID>({_NAME})</HostID>{_HOST_INDEX}</localhost>" + _BLANKS
)
_PLAIN_HOST = re.compile(
    rf"<host>{_BLANKS}<HostID>({_NAME})</HostID>{_BLANKS}{_HOST_INDEX}{_BLANKS}"
    + _BLANKS.join(f"<{name}>(TRUE|FALSE)</{name}>" for name in HOST_FIELDS[1:])
    + rf"{_BLANKS}</host>{_BLANKS}"
)
_PLAIN_RAW_HEAD = re.compile(
    "<raw_status_on_local_host>" + _BLANKS
    + _BLANKS.join(f"<{name}>-?[0-9]+</{name}>" for name in RAW_LATENCIES) + _BLANKS
)
_PLAIN_RAW_HOST = re.compile(
    rf"<host_raw_data>{_BLANKS}<HostID>({_NAME})</HostID>{_BLANKS}"
    + _BLANKS.join(f"<{name}>(-?[0-9]+)</{name}>" for name in RAW_HOST_INTS)
    + f"{_BLANKS}<{RAW_HOST_LISTS[0]}>"
)
_PLAIN_LIST_ENDS = tuple(f"</{name}>" for name in RAW_HOST_LISTS)
_PLAIN_BETWEEN_LISTS = re.compile(f"{_PLAIN_LIST_ENDS[0]}{_BLANKS}<{RAW_HOST_LISTS[1]}>")
_PLAIN_RAW_END = re.compile(f"{_PLAIN_LIST_ENDS[1]}{_BLANKS}</host_raw_data>{_BLANKS}")
_PLAIN_TAIL = re.compile(
    "</raw_status_on_local_host>" + _BLANKS + "<warning_on_local_host>" + _BLANKS
    + _BLANKS.join(f"<{name}>(TRUE|FALSE)</{name}>" for name in WARNINGS)
    + _BLANKS + "</warning_on_local_host>" + _BLANKS + "</ha_liveset_info>" + _BLANKS
)


def _plain_list(text: str, start: int, close: str) -> int:
    """Where the list text from ``start`` ends (at ``close``), or -1 if it holds markup."""
    end = text.find(close, start)
    return -1 if end < 0 or text.find("<", start, end) >= 0 else end


def _plain(text: str) -> Liveset | None:
    """The liveset of an Online document laid out as xhad prints it, or None for any other
    document (the tree walk then reads it, or names what is wrong).

    A 64-host liveset is some 350 kB, 300 kB of it peer lists: read this way it takes about a
    third of the time of expat's pass alone (parse() runs once per query and host)."""
    if not text.isascii() or text.encode("ascii").translate(None, _PLAIN_CHARS):
        return None
    head = _PLAIN_HEAD.match(text)
    if head is None:
        return None
    at = head.end()
    hosts: dict[str, HostStatus] = {}
    while (host := _PLAIN_HOST.match(text, at)) is not None:
        if host[1] in hosts:
            return None
        hosts[host[1]] = HostStatus(*(flag == "TRUE" for flag in host.groups()[1:]))
        at = host.end()
    block = _PLAIN_RAW_HEAD.match(text, at)
    if block is None:
        return None
    at = block.end()
    raw: dict[str, RawHost] = {}
    close_first, close_second = _PLAIN_LIST_ENDS
    while (entry := _PLAIN_RAW_HOST.match(text, at)) is not None:
        first = entry.end()
        first_end = _plain_list(text, first, close_first)
        between = _PLAIN_BETWEEN_LISTS.match(text, first_end) if first_end >= 0 else None
        second = between.end() if between is not None else -1
        second_end = _plain_list(text, second, close_second) if second >= 0 else -1
        end = _PLAIN_RAW_END.match(text, second_end) if second_end >= 0 else None
        if end is None or entry[1] in raw:
            return None
        raw[entry[1]] = RawHost(int(entry[2]), int(entry[3]), text[first:first_end], text[second:second_end])
        at = end.end()
    tail = _PLAIN_TAIL.fullmatch(text, at)
    if tail is None:
        return None
    return Liveset(
        status=head[1],
        local_host=head[2],
        hosts=hosts,
        raw=raw,
        warnings={name: flag == "TRUE" for name, flag in zip(WARNINGS, tail.groups(), strict=True)},
    )


def parse(text: str) -> Liveset:
    """Parse a liveset document, applying every rule of ha.md 3.2.1.

    Raises INTERNAL_ERROR (and no other exception) for input over 1 MiB, malformed XML, any
    DTD or entity declaration, a wrong root, a bad or missing status, a bad localhost, a host
    entry with a missing or non-boolean field, an incomplete raw block or warning block.
    """
    if not isinstance(text, str):
        raise internal(f"liveset must be text, got {type(text).__name__}")
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise internal("liveset is larger than 1 MiB")
    plain = _plain(text)
    if plain is not None:
        return plain
    try:
        if "<!DOCTYPE" in text:
            # No DTD, so no entity but the five predefined ones (expat refuses any other reference):
            # the C parser is then as safe as defusedxml's Python-level one, and three times faster.
            root = defused_fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
        else:
            root = fast_fromstring(text)
    except (ParseError, ValueError) as exc:  # DefusedXmlException is a ValueError
        raise internal(f"liveset is not acceptable XML: {exc}") from None
    if root.tag != "ha_liveset_info":
        raise internal(f"liveset: root element is <{root.tag}>, expected <ha_liveset_info>")
    quick = _quick(root)
    if quick is not None:
        return quick
    return Liveset(
        status=_status(root),
        local_host=_local_host(root),
        hosts=_hosts(root),
        raw=_raw(root),
        warnings=_warnings(root),
    )
