"""xhad.conf: timing parameters, rendering, atomic write and parsing (ha.md 3.1)."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from xapid.errors import ApiError
from xapid.ha import conf

HOSTS = [
    ("aaaaaaaa-0000-4000-8000-000000000001", "10.0.0.11"),
    ("aaaaaaaa-0000-4000-8000-000000000002", "10.0.0.12"),
    ("aaaaaaaa-0000-4000-8000-000000000003", "10.0.0.13"),
]
XAPI = {
    "XapiHealthCheckInterval": 60,
    "XapiHealthCheckTimeout": 120,
    "XapiRestartAttempts": 1,
    "XapiRestartTimeout": 300,
}
GENERATION = "7d0c5c2e-4a51-4c3e-9d7e-0a1b2c3d4e5f"


def example(**overrides: object) -> str:
    """The document of ha.md 3.1.4 (T=90, host 2), with optional argument overrides."""
    args: dict[str, object] = {
        "generation": GENERATION,
        "hosts": HOSTS,
        "base_t": 90,
        "local_host_uuid": HOSTS[1][0],
        "heartbeat_interface": "xenbr0",
        "physical_interface": "eth0",
        "statefile": "/dev/sm/backend/sr-uuid/vdi-uuid",
        "xapi_params": XAPI,
    }
    args.update(overrides)
    return conf.render(**args)  # type: ignore[arg-type]


def test_timeouts_t60_match_the_table() -> None:
    assert list(conf.timeouts(60).items()) == [
        ("HeartbeatInterval", 3),
        ("StateFileInterval", 3),
        ("HeartbeatTimeout", 60),
        ("StateFileTimeout", 60),
        ("HeartbeatWatchdogTimeout", 60),
        ("StateFileWatchdogTimeout", 75),
        ("BootJoinTimeout", 120),
        ("EnableJoinTimeout", 120),
    ]


# ha.md 3.1.4's example (ha-config:timeout=90).
T90 = {
    "HeartbeatInterval": 3,
    "HeartbeatTimeout": 90,
    "StateFileInterval": 4,
    "StateFileTimeout": 90,
    "HeartbeatWatchdogTimeout": 90,
    "StateFileWatchdogTimeout": 105,
    "BootJoinTimeout": 150,
    "EnableJoinTimeout": 150,
}


def test_timeouts_t90_match_the_example() -> None:
    assert conf.timeouts(90) == T90


def test_timeouts_use_integer_division_at_the_minimum() -> None:
    result = conf.timeouts(10)
    assert (result["HeartbeatInterval"], result["StateFileInterval"]) == (2, 2)
    result = conf.timeouts(19)
    assert (result["HeartbeatInterval"], result["StateFileInterval"]) == (2, 2)


@pytest.mark.parametrize("base", ["60", 60.0, "+60"])
def test_timeouts_accept_integral_spellings(base: object) -> None:
    assert conf.timeouts(base) == conf.timeouts(60)


@pytest.mark.parametrize("base", [9, "9", "abc", "", " 60", "6e1", "60.5", 60.5, None, True, -60, [60]])
def test_timeouts_refuse_bad_base(base: object) -> None:
    with pytest.raises(ApiError) as caught:
        conf.timeouts(base)
    assert caught.value.code == "INTERNAL_ERROR"
    assert repr(base) in caught.value.params[0]


def test_render_starts_with_declaration_and_versioned_root() -> None:
    text = example()
    assert text.startswith('<?xml version="1.0" encoding="utf-8"?>\n<xhad-config version="1.0">\n')
    assert text.endswith("</xhad-config>\n")
    assert ET.fromstring(text.encode()).attrib == {"version": "1.0"}


def test_render_element_order() -> None:
    root = ET.fromstring(example().encode())
    assert [child.tag for child in root] == ["common-config", "local-config"]
    common = root.find("common-config")
    assert common is not None
    assert [child.tag for child in common] == [
        "GenerationUUID",
        "UDPport",
        "host",
        "host",
        "host",
        "parameters",
    ]
    assert [[leaf.tag for leaf in host] for host in common.findall("host")] == [["HostID", "IPaddress"]] * 3
    assert [host.findtext("HostID") for host in common.findall("host")] == [uuid for uuid, _ in HOSTS]
    parameters = common.find("parameters")
    assert parameters is not None
    assert [child.tag for child in parameters] == [
        "HeartbeatInterval",
        "HeartbeatTimeout",
        "StateFileInterval",
        "StateFileTimeout",
        "HeartbeatWatchdogTimeout",
        "StateFileWatchdogTimeout",
        "BootJoinTimeout",
        "EnableJoinTimeout",
        "XapiHealthCheckInterval",
        "XapiHealthCheckTimeout",
        "XapiRestartAttempts",
        "XapiRestartTimeout",
    ]
    local = root.find("local-config/localhost")
    assert local is not None
    assert [child.tag for child in local] == [
        "HostID",
        "HeartbeatInterface",
        "HeartbeatPhysicalInterface",
        "StateFile",
    ]


def test_render_parse_round_trip_reproduces_the_example() -> None:
    parsed = conf.parse(example())
    assert parsed == conf.XhadConf(
        generation=GENERATION,
        udp_port=694,
        hosts=HOSTS,
        parameters={**T90, **XAPI},
        local_host_uuid=HOSTS[1][0],
        heartbeat_interface="xenbr0",
        physical_interface="eth0",
        statefile="/dev/sm/backend/sr-uuid/vdi-uuid",
    )


def test_render_escapes_text() -> None:
    hosts = [("h&1", "a<b>c"), ("h2", "'\"")]
    text = example(hosts=hosts, local_host_uuid="h&1", statefile="/tmp/a&b<c>/sf")
    assert "h&amp;1" in text and "a&lt;b&gt;c" in text
    parsed = conf.parse(text)
    assert parsed.hosts == hosts
    assert parsed.statefile == "/tmp/a&b<c>/sf"


@pytest.mark.parametrize(
    "overrides",
    [
        {"statefile": "/tmp/\x01"},
        {"generation": 7},
        {"hosts": []},
        {"hosts": [(f"h{i}", "1.2.3.4") for i in range(65)], "local_host_uuid": "h0"},
        {"xapi_params": {k: v for k, v in XAPI.items() if k != "XapiRestartTimeout"}},
        {"xapi_params": {**XAPI, "Bogus": 1}},
        {"xapi_params": {**XAPI, "XapiRestartAttempts": "1"}},
        {"base_t": 5},
    ],
)
def test_render_refuses_bad_input(overrides: dict[str, object]) -> None:
    with pytest.raises(ApiError) as caught:
        example(**overrides)
    assert caught.value.code == "INTERNAL_ERROR"


def test_write_is_atomic_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "xhad.conf"
    conf.write(target, "first")
    conf.write(target, example())
    assert target.read_text() == example()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["xhad.conf"]


def test_write_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "xhad.conf"
    conf.write(target, "old")
    with pytest.raises(UnicodeEncodeError):
        conf.write(target, "bad \udc80")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["xhad.conf"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: "not xml",
        lambda t: t.replace("xhad-config", "other-config"),
        lambda t: t.replace("<GenerationUUID>", "<X>").replace("</GenerationUUID>", "</X>"),
        lambda t: t.replace("<UDPport>694", "<UDPport>six"),
        lambda t: t.replace("<XapiRestartAttempts>1", "<XapiRestartAttempts>one"),
        lambda t: t.replace(
            "<HostID>aaaaaaaa-0000-4000-8000-000000000002</HostID>\n", "<HostID>nobody</HostID>\n"
        ),
        lambda t: t.replace('encoding="utf-8"?>', 'encoding="utf-8"?><!DOCTYPE x [<!ENTITY e "x">]>'),
        lambda t: t.replace("<StateFile>/dev/sm/backend/sr-uuid/vdi-uuid</StateFile>", ""),
    ],
)
def test_parse_refuses_malformed(mutate: object) -> None:
    text = mutate(example())  # type: ignore[operator]
    assert text != example()
    with pytest.raises(ApiError) as caught:
        conf.parse(text)
    assert caught.value.code == "INTERNAL_ERROR"
