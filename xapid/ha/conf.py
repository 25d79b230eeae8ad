"""The xhad.conf document: timing parameters, writer, atomic file write and parser (ha.md 3.1).

xapid writes one xhad.conf per host before ``ha_set_pool_state init`` (master) and
``ha_start_daemon`` (every host).  All hosts share the ``common-config`` section; only
``local-config`` differs.  :func:`parse` is the strict reader used by xapid and the tests;
the reference stack engine has its own stdlib-only reader.
"""

from __future__ import annotations

import random
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

from defusedxml.ElementTree import fromstring as defused_fromstring

from xapid import statefiles
from xapid.errors import internal

UDP_PORT = 694
MAX_HOSTS = 64

# ha.md 3.1.3 table order.
TIMING_PARAMETERS: tuple[str, ...] = (
    "HeartbeatInterval",
    "StateFileInterval",
    "HeartbeatTimeout",
    "StateFileTimeout",
    "HeartbeatWatchdogTimeout",
    "StateFileWatchdogTimeout",
    "BootJoinTimeout",
    "EnableJoinTimeout",
)

XAPI_PARAMETERS: tuple[str, ...] = (
    "XapiHealthCheckInterval",
    "XapiHealthCheckTimeout",
    "XapiRestartAttempts",
    "XapiRestartTimeout",
)

# ha.md 3.1.2: the order of the children of <parameters> in the document.
PARAMETER_ORDER: tuple[str, ...] = (
    "HeartbeatInterval",
    "HeartbeatTimeout",
    "StateFileInterval",
    "StateFileTimeout",
    "HeartbeatWatchdogTimeout",
    "StateFileWatchdogTimeout",
    "BootJoinTimeout",
    "EnableJoinTimeout",
    *XAPI_PARAMETERS,
)

MIN_BASE_T = 10
_MAX_CONF_BYTES = 1 << 20
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
# Characters XML 1.0 cannot carry at all, even escaped.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


@dataclass(frozen=True)
class XhadConf:
    """A parsed xhad.conf."""

    generation: str
    udp_port: int
    hosts: list[tuple[str, str]]
    parameters: dict[str, int]
    local_host_uuid: str
    heartbeat_interface: str
    physical_interface: str
    statefile: str


def parse_base_t(base: object) -> int:
    """Return the base timeout T as an int, or raise INTERNAL_ERROR naming the bad value.

    Accepted: an ``int`` (not ``bool``), an integral ``float`` (the ``ha_default_timeout_base``
    config key is a float), or a string of decimal digits with an optional sign and no
    surrounding whitespace.  The result must be at least 10.
    """
    value: int | None = None
    if isinstance(base, bool):
        value = None
    elif isinstance(base, int):
        value = base
    elif (isinstance(base, float) and base.is_integer()) or (
        isinstance(base, str) and _INT_TEXT.fullmatch(base)
    ):
        value = int(base)
    if value is None:
        raise internal(f"HA timeout base {base!r} is not an integer")
    if value < MIN_BASE_T:
        raise internal(f"HA timeout base {base!r} is below the minimum of {MIN_BASE_T} seconds")
    return value


def timeouts(base: object) -> dict[str, int]:
    """The eight timing parameters derived from base T (ha.md 3.1.3), in that table's order.

    Raises INTERNAL_ERROR naming the value when T is not an integer or is below 10.
    """
    t = parse_base_t(base)
    return {
        "HeartbeatInterval": min((t + 10) // 10, 3),
        "StateFileInterval": max(2, t // 20),
        "HeartbeatTimeout": t,
        "StateFileTimeout": t,
        "HeartbeatWatchdogTimeout": t,
        "StateFileWatchdogTimeout": t + 15,
        "BootJoinTimeout": t + 60,
        "EnableJoinTimeout": t + 60,
    }


def _text(value: object, what: str) -> str:
    """``value`` as escaped XML character data; INTERNAL_ERROR if XML cannot carry it."""
    if not isinstance(value, str):
        raise internal(f"xhad.conf {what} must be a string, got {type(value).__name__}")
    if _XML_ILLEGAL.search(value):
        raise internal(f"xhad.conf {what} {value!r} contains characters XML cannot represent")
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render(
    generation: str,
    hosts: list[tuple[str, str]],
    base_t: object,
    local_host_uuid: str,
    heartbeat_interface: str,
    physical_interface: str,
    statefile: str,
    xapi_params: dict[str, int],
    udp_port: int = UDP_PORT,
) -> str:
    """The complete xhad.conf document for one host (ha.md 3.1.2), ending in a newline.

    ``hosts`` are (uuid, address) pairs in pool database order; ``udp_port`` the heartbeat port
    (xapi: 694; xapid picks one free on every host address, as all hosts share one machine).  ``xapi_params`` must hold
    exactly the four Xapi* integers.  Raises INTERNAL_ERROR for a bad base T, missing or
    non-integer parameters, more than 64 hosts, or text XML cannot represent.
    """
    if not hosts:
        raise internal("xhad.conf needs at least one host")
    if len(hosts) > MAX_HOSTS:
        raise internal(f"xhad.conf supports at most {MAX_HOSTS} hosts, got {len(hosts)}")
    missing = [name for name in XAPI_PARAMETERS if name not in xapi_params]
    extra = sorted(set(xapi_params) - set(XAPI_PARAMETERS))
    if missing or extra:
        raise internal(f"xhad.conf xapi parameters: missing {missing}, unexpected {extra}")
    params: dict[str, int] = {**timeouts(base_t), **xapi_params}
    for name in PARAMETER_ORDER:
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise internal(f"xhad.conf parameter {name} must be an integer, got {value!r}")

    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<xhad-config version="1.0">',
        "  <common-config>",
        f"    <GenerationUUID>{_text(generation, 'GenerationUUID')}</GenerationUUID>",
        f"    <UDPport>{int(udp_port)}</UDPport>",
    ]
    for uuid, address in hosts:
        lines.append(
            f"    <host><HostID>{_text(uuid, 'HostID')}</HostID>"
            f"<IPaddress>{_text(address, 'IPaddress')}</IPaddress></host>"
        )
    lines.append("    <parameters>")
    lines.extend(f"      <{name}>{params[name]}</{name}>" for name in PARAMETER_ORDER)
    lines += [
        "    </parameters>",
        "  </common-config>",
        "  <local-config>",
        "    <localhost>",
        f"      <HostID>{_text(local_host_uuid, 'local HostID')}</HostID>",
        f"      <HeartbeatInterface>{_text(heartbeat_interface, 'HeartbeatInterface')}</HeartbeatInterface>",
        (
            "      <HeartbeatPhysicalInterface>"
            f"{_text(physical_interface, 'HeartbeatPhysicalInterface')}</HeartbeatPhysicalInterface>"
        ),
        f"      <StateFile>{_text(statefile, 'StateFile')}</StateFile>",
        "    </localhost>",
        "  </local-config>",
        "</xhad-config>",
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8, mode 0644), creating parent directories.

    Readers see either the old or the new complete file: the data goes to a temporary file in
    the same directory, is fsynced, renamed over ``path``, and the directory is fsynced; no
    symbolic link on the way is followed (:func:`xapid.statefiles.write_atomic`).
    """
    statefiles.write_atomic(Path(path), text.encode("utf-8"), mode=0o644)


def _only(parent: Element, tag: str, where: str) -> Element:
    """The single ``tag`` child of ``parent``; INTERNAL_ERROR if absent or repeated."""
    found = parent.findall(tag)
    if len(found) != 1:
        raise internal(f"xhad.conf: expected exactly one <{tag}> in {where}, found {len(found)}")
    return found[0]


def _leaf(parent: Element, tag: str, where: str) -> str:
    """The trimmed, non-empty text of the single leaf ``tag`` of ``parent``."""
    element = _only(parent, tag, where)
    if len(element):
        raise internal(f"xhad.conf: <{tag}> in {where} must not have child elements")
    text = (element.text or "").strip()
    if not text:
        raise internal(f"xhad.conf: <{tag}> in {where} is empty")
    return text


def _int(text: str, what: str) -> int:
    """``text`` as a decimal integer; INTERNAL_ERROR otherwise."""
    if not _INT_TEXT.fullmatch(text):
        raise internal(f"xhad.conf: {what} is not an integer: {text!r}")
    return int(text)


def parse(text: str) -> XhadConf:
    """Parse an xhad.conf document; raise INTERNAL_ERROR (only) for anything malformed.

    Requires the structure of ha.md 3.1.2: one GenerationUUID, UDPport, at least one host,
    integer parameters (unknown names kept), and a localhost naming one of the hosts.
    """
    if not isinstance(text, str):
        raise internal("xhad.conf must be text")
    if len(text) > _MAX_CONF_BYTES or len(text.encode("utf-8", "surrogatepass")) > _MAX_CONF_BYTES:
        raise internal("xhad.conf is larger than 1 MiB")
    try:
        root = defused_fromstring(text, forbid_dtd=True)
    except (ParseError, ValueError) as exc:  # DefusedXmlException is a ValueError
        raise internal(f"xhad.conf is not well-formed XML: {exc}") from None
    return _parse_tree(root)


def _parse_tree(root: Element) -> XhadConf:
    """Check the structure of a parsed document and extract its values."""
    if root.tag != "xhad-config":
        raise internal(f"xhad.conf: root element is <{root.tag}>, expected <xhad-config>")
    common = _only(root, "common-config", "xhad-config")
    generation = _leaf(common, "GenerationUUID", "common-config")
    udp_port = _int(_leaf(common, "UDPport", "common-config"), "UDPport")
    hosts: list[tuple[str, str]] = []
    for host in common.findall("host"):
        uuid = _leaf(host, "HostID", "host")
        if any(uuid == seen for seen, _ in hosts):
            raise internal(f"xhad.conf: host {uuid} is listed twice")
        hosts.append((uuid, _leaf(host, "IPaddress", "host")))
    if not hosts:
        raise internal("xhad.conf: no <host> elements")
    if len(hosts) > MAX_HOSTS:
        raise internal(f"xhad.conf: more than {MAX_HOSTS} hosts")
    parameters: dict[str, int] = {}
    for element in _only(common, "parameters", "common-config"):
        if element.tag in parameters:
            raise internal(f"xhad.conf: parameter {element.tag} given twice")
        if len(element):
            raise internal(f"xhad.conf: parameter {element.tag} must not have child elements")
        parameters[element.tag] = _int((element.text or "").strip(), f"parameter {element.tag}")
    local = _only(_only(root, "local-config", "xhad-config"), "localhost", "local-config")
    local_uuid = _leaf(local, "HostID", "localhost")
    if all(uuid != local_uuid for uuid, _ in hosts):
        raise internal(f"xhad.conf: local host {local_uuid} is not among the configured hosts")
    return XhadConf(
        generation=generation,
        udp_port=udp_port,
        hosts=hosts,
        parameters=parameters,
        local_host_uuid=local_uuid,
        heartbeat_interface=_leaf(local, "HeartbeatInterface", "localhost"),
        physical_interface=_leaf(local, "HeartbeatPhysicalInterface", "localhost"),
        statefile=_leaf(local, "StateFile", "localhost"),
    )


def free_udp_port(addresses: list[str], attempts: int = 64) -> int:
    """A UDP port that is free on every one of ``addresses`` now (the pool's heartbeat port).

    The emulated hosts of one pool share a machine, and several pools may run at once, so xapi's
    fixed port 694 would collide (and needs root).  INTERNAL_ERROR if none is found.
    """
    for _ in range(attempts):
        port = random.randint(20000, 59999)
        held: list[socket.socket] = []
        try:
            for address in addresses:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise internal(f"no UDP port is free on all heartbeat addresses {addresses}")
