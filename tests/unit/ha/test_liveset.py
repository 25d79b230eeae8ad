"""The strict liveset parser (ha.md 3.2.1)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xapid.errors import ApiError
from xapid.ha import liveset
from xapid.ha.liveset import HostStatus, RawHost

H1 = "aaaaaaaa-0000-4000-8000-000000000001"
H2 = "aaaaaaaa-0000-4000-8000-000000000002"
H3 = "aaaaaaaa-0000-4000-8000-000000000003"


def _raw_host(host: str, lists: str) -> str:
    return f"""    <host_raw_data>
      <HostID>{host}</HostID>
      <time_since_last_update_on_statefile>1000</time_since_last_update_on_statefile>
      <time_since_last_heartbeat>500</time_since_last_heartbeat>
      <time_since_xapi_restart_first_attempted>-1</time_since_xapi_restart_first_attempted>
      <heartbeat_active_list_on_heartbeat>
        {lists}
      </heartbeat_active_list_on_heartbeat>
      <heartbeat_active_list_on_statefile>
        {lists}
      </heartbeat_active_list_on_statefile>
    </host_raw_data>
"""


# ha.md 3.2.2, completed with host_raw_data for every host.
EXAMPLE = f"""<?xml version="1.0" encoding="UTF-8"?>
<ha_liveset_info version="1.0">
  <status>Online</status>
  <localhost><HostID>{H1}</HostID></localhost>
  <host>
    <HostID>{H1}</HostID>
    <liveness>TRUE</liveness><master>TRUE</master>
    <statefile_access>TRUE</statefile_access><statefile_corrupted>FALSE</statefile_corrupted>
    <excluded>FALSE</excluded>
  </host>
  <host>
    <HostID>{H2}</HostID>
    <liveness>TRUE</liveness><master>FALSE</master>
    <statefile_access>TRUE</statefile_access><statefile_corrupted>FALSE</statefile_corrupted>
    <excluded>FALSE</excluded>
  </host>
  <host>
    <HostID>{H3}</HostID>
    <liveness>FALSE</liveness><master>FALSE</master>
    <statefile_access>FALSE</statefile_access><statefile_corrupted>FALSE</statefile_corrupted>
    <excluded>FALSE</excluded>
  </host>
  <raw_status_on_local_host>
    <statefile_latency>12</statefile_latency><statefile_latency_min>3</statefile_latency_min>
    <statefile_latency_max>40</statefile_latency_max>
    <heartbeat_latency>3004</heartbeat_latency><heartbeat_latency_min>3000</heartbeat_latency_min>
    <heartbeat_latency_max>3050</heartbeat_latency_max>
    <Xapi_healthcheck_latency>80</Xapi_healthcheck_latency>
    <Xapi_healthcheck_latency_min>20</Xapi_healthcheck_latency_min>
    <Xapi_healthcheck_latency_max>400</Xapi_healthcheck_latency_max>
{_raw_host(H1, f"{H1} {H2}")}{_raw_host(H2, f"{H1} {H2}")}{_raw_host(H3, "")}  </raw_status_on_local_host>
  <warning_on_local_host>
    <statefile_lost>FALSE</statefile_lost>
    <heartbeat_approaching_timeout>FALSE</heartbeat_approaching_timeout>
    <statefile_approaching_timeout>FALSE</statefile_approaching_timeout>
    <Xapi_healthcheck_approaching_timeout>FALSE</Xapi_healthcheck_approaching_timeout>
    <network_bonding_error>FALSE</network_bonding_error>
  </warning_on_local_host>
</ha_liveset_info>
"""

MINIMAL = (
    f"<ha_liveset_info><status>Starting</status><localhost><HostID>{H1}</HostID></localhost></ha_liveset_info>"
)


def refused(text: object) -> str:
    """Assert ``parse`` raises INTERNAL_ERROR; return its message."""
    with pytest.raises(ApiError) as caught:
        liveset.parse(text)  # type: ignore[arg-type]
    assert type(caught.value) is ApiError
    assert caught.value.code == "INTERNAL_ERROR"
    assert len(caught.value.params) == 1 and caught.value.params[0]
    return caught.value.params[0]


def drop_first(text: str, tag: str, after: str = "") -> str:
    """``text`` without the first ``<tag>...</tag>`` found after ``after``."""
    start = text.index(after) if after else 0
    match = re.compile(rf"<{tag}>.*?</{tag}>", re.S).search(text, start)
    assert match is not None
    return text[: match.start()] + text[match.end() :]


def test_example_parses() -> None:
    result = liveset.parse(EXAMPLE)
    assert result.status == "Online"
    assert result.local_host == H1
    assert result.hosts == {
        H1: HostStatus(True, True, True, False, False),
        H2: HostStatus(True, False, True, False, False),
        H3: HostStatus(False, False, False, False, False),
    }
    assert result.raw is not None
    assert result.raw[H1] == RawHost(1000, 500, [H1, H2], [H1, H2])
    assert result.raw[H3] == RawHost(1000, 500, [], [])
    assert result.warnings == dict.fromkeys(liveset.WARNINGS, False)


def test_minimal_starting_document_parses() -> None:
    result = liveset.parse(MINIMAL)
    assert (result.status, result.local_host, result.hosts, result.raw, result.warnings) == (
        "Starting",
        H1,
        {},
        None,
        None,
    )


@pytest.mark.parametrize(
    ("given", "canonical"), [("ONLINE", "Online"), ("starting", "Starting"), ("oFFline", "Offline")]
)
def test_status_is_case_insensitive(given: str, canonical: str) -> None:
    assert liveset.parse(EXAMPLE.replace("<status>Online", f"<status>{given}")).status == canonical


def test_host_fields_are_trimmed_and_any_case() -> None:
    text = EXAMPLE.replace("<liveness>FALSE</liveness>", "<liveness>\n  true </liveness>", 1)
    text = text.replace(f"<HostID>{H3}</HostID>\n    <liveness>", f"<HostID> {H3} </HostID>\n    <liveness>")
    result = liveset.parse(text)
    assert result.hosts[H3].liveness is True


def test_warnings_true_only_for_exact_upper_case() -> None:
    text = EXAMPLE.replace("<statefile_lost>FALSE", "<statefile_lost>TRUE")
    text = text.replace("<network_bonding_error>FALSE", "<network_bonding_error>true")
    text = text.replace("<heartbeat_approaching_timeout>FALSE", "<heartbeat_approaching_timeout> TRUE")
    text = text.replace("<statefile_approaching_timeout>FALSE", "<statefile_approaching_timeout>garbage")
    warnings = liveset.parse(text).warnings
    assert warnings == {
        "statefile_lost": True,
        "heartbeat_approaching_timeout": False,
        "statefile_approaching_timeout": False,
        "Xapi_healthcheck_approaching_timeout": False,
        "network_bonding_error": False,
    }


def test_unknown_elements_and_order_are_ignored() -> None:
    text = EXAMPLE.replace("<status>Online</status>", "<timeout><T1>1</T1></timeout><xapi_error_string/>")
    text = text.replace("</ha_liveset_info>", "<status>Online</status></ha_liveset_info>")
    assert liveset.parse(text).status == "Online"


STRICT_CASES = {
    "root": EXAMPLE.replace("ha_liveset_info", "liveset_info"),
    "status missing": drop_first(EXAMPLE, "status"),
    "status leading space": EXAMPLE.replace("<status>Online", "<status> Online"),
    "status trailing newline": EXAMPLE.replace("Online</status>", "Online\n</status>"),
    "status unknown": EXAMPLE.replace("<status>Online", "<status>Up"),
    "status empty": EXAMPLE.replace("<status>Online</status>", "<status/>"),
    "status child": EXAMPLE.replace("<status>Online</status>", "<status><b>Online</b></status>"),
    "status twice": EXAMPLE.replace(
        "<status>Online</status>", "<status>Online</status><status>Online</status>"
    ),
    "localhost missing": EXAMPLE.replace(f"<localhost><HostID>{H1}</HostID></localhost>", ""),
    "localhost first child": EXAMPLE.replace(
        "<localhost><HostID>", "<localhost><HostIndex>0</HostIndex><HostID>"
    ),
    "localhost hostid spaces": EXAMPLE.replace(f"<localhost><HostID>{H1}", f"<localhost><HostID> {H1}"),
    "localhost hostid empty": EXAMPLE.replace(f"<localhost><HostID>{H1}</HostID>", "<localhost><HostID/>"),
    "localhost text first": EXAMPLE.replace("<localhost><HostID>", "<localhost>x<HostID>"),
    "host boolean": EXAMPLE.replace("<liveness>TRUE", "<liveness>yes", 1),
    "host boolean empty": EXAMPLE.replace("<master>FALSE</master>", "<master/>", 1),
    "host duplicate": EXAMPLE.replace(
        f"<HostID>{H2}</HostID>\n    <liveness>", f"<HostID>{H1}</HostID>\n    <liveness>"
    ),
    "host field twice": EXAMPLE.replace(
        "<excluded>FALSE</excluded>", "<excluded>FALSE</excluded><excluded>TRUE</excluded>", 1
    ),
    "raw latency not int": EXAMPLE.replace("<statefile_latency>12", "<statefile_latency>12ms"),
    "raw host int": EXAMPLE.replace("<time_since_last_heartbeat>500", "<time_since_last_heartbeat>5.0", 1),
    "raw host empty id": EXAMPLE.replace(
        f"<HostID>{H3}</HostID>\n      <time", "<HostID></HostID>\n      <time"
    ),
    "not xml": "this is not XML <<<",
    "empty": "",
    "truncated": EXAMPLE[: len(EXAMPLE) // 2],
    "bytes": EXAMPLE.encode(),
}
for _field in liveset.HOST_FIELDS:
    STRICT_CASES[f"host without {_field}"] = drop_first(EXAMPLE, _field, after="<host>")
for _field in liveset.RAW_LATENCIES:
    STRICT_CASES[f"raw without {_field}"] = drop_first(EXAMPLE, _field)
for _field in (*liveset.RAW_HOST_INTS, *liveset.RAW_HOST_LISTS):
    STRICT_CASES[f"host_raw_data without {_field}"] = drop_first(EXAMPLE, _field)
STRICT_CASES["host_raw_data without HostID"] = drop_first(EXAMPLE, "HostID", after="<host_raw_data>")
for _field in liveset.WARNINGS:
    STRICT_CASES[f"warnings without {_field}"] = drop_first(EXAMPLE, _field)


@pytest.mark.parametrize("name", sorted(STRICT_CASES))
def test_each_rule_violation_is_refused(name: str) -> None:
    assert STRICT_CASES[name] != EXAMPLE
    refused(STRICT_CASES[name])


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<ha_liveset_info><status>&lol4;</status></ha_liveset_info>
"""


@pytest.mark.parametrize(
    "text",
    [
        BILLION_LAUGHS,
        '<!DOCTYPE ha_liveset_info SYSTEM "file:///etc/passwd">' + MINIMAL,
        '<!DOCTYPE x [<!ENTITY h SYSTEM "file:///etc/hostname">]>'
        "<ha_liveset_info><status>Online</status><localhost><HostID>&h;</HostID></localhost></ha_liveset_info>",
        "<!DOCTYPE ha_liveset_info>" + MINIMAL,
    ],
)
def test_dtds_and_entities_are_refused(text: str) -> None:
    refused(text)


def test_oversized_input_is_refused() -> None:
    padded = EXAMPLE.replace("</ha_liveset_info>", " " * (2 << 20) + "</ha_liveset_info>")
    assert "1 MiB" in refused(padded)
    multibyte = EXAMPLE.replace("</ha_liveset_info>", "<!--" + "é" * 600_000 + "--></ha_liveset_info>")
    assert len(multibyte) < 1 << 20
    assert "1 MiB" in refused(multibyte)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_only_internal_error_escapes_on_mangled_input(data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(EXAMPLE)))
    end = data.draw(st.integers(start, min(len(EXAMPLE), start + 80)))
    filler = data.draw(st.text(max_size=20))
    text = EXAMPLE[:start] + filler + EXAMPLE[end:]
    try:
        result = liveset.parse(text)
    except ApiError as exc:
        assert exc.code == "INTERNAL_ERROR"
    else:
        assert result.status in liveset.STATUSES


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_only_internal_error_escapes_on_random_text(text: str) -> None:
    try:
        liveset.parse(text)
    except ApiError as exc:
        assert exc.code == "INTERNAL_ERROR"


def _strict(text: str) -> liveset.Liveset:
    """The answer of the strict walk alone, as before the one-pass walk existed."""
    root = liveset.fast_fromstring(text)
    return liveset.Liveset(
        status=liveset._status(root),
        local_host=liveset._local_host(root),
        hosts=liveset._hosts(root),
        raw=liveset._raw(root),
        warnings=liveset._warnings(root),
    )


def _quick_agrees(text: str) -> bool:
    """The one-pass walk of ``text`` declines it or gives exactly the strict walk's answer."""
    try:
        root = liveset.fast_fromstring(text)
    except liveset.ParseError:
        return True
    try:
        quick = liveset._quick(root)
    except ApiError:
        quick = "refused"  # the parts the quick walk shares (status, localhost, warnings) refused it
    try:
        strict: object = _strict(text)
    except ApiError:
        strict = "refused"
    return quick is None or quick == strict


@pytest.mark.parametrize("name", sorted(k for k, v in STRICT_CASES.items() if isinstance(v, str)))
def test_one_pass_walk_never_accepts_what_the_strict_walk_refuses(name: str) -> None:
    assert _quick_agrees(STRICT_CASES[name])


def test_one_pass_walk_gives_the_strict_answer() -> None:
    root = liveset.fast_fromstring(EXAMPLE)
    quick = liveset._quick(root)
    assert quick is not None and quick == _strict(EXAMPLE)
    assert quick.raw is not None and quick.raw[H1].heartbeat_active_list_on_heartbeat == [H1, H2]
    # Repeated list elements, a list with children, and a host field with children are left
    # to the strict walk.
    for bad in (
        EXAMPLE.replace("</heartbeat_active_list_on_statefile>",
                        "</heartbeat_active_list_on_statefile><heartbeat_active_list_on_statefile/>", 1),
        EXAMPLE.replace("<heartbeat_active_list_on_heartbeat>", "<heartbeat_active_list_on_heartbeat><x/>", 1),
        EXAMPLE.replace("<liveness>TRUE", "<liveness><b/>TRUE", 1),
    ):
        assert liveset._quick(liveset.fast_fromstring(bad)) is None
        refused(bad)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_one_pass_walk_agrees_on_mangled_input(data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(EXAMPLE)))
    end = data.draw(st.integers(start, min(len(EXAMPLE), start + 80)))
    filler = data.draw(st.sampled_from(["", " ", "TRUE", "<x/>", "</host><host>", "-1", "a b"]))
    assert _quick_agrees(EXAMPLE[:start] + filler + EXAMPLE[end:])


# As xhad_engine.render_liveset lays a liveset out: HostIndex beside each HostID, lists on one line.
XHAD_LAYOUT = re.sub(r"\n\s+(%s[^\n]*)\n\s+</" % H1[:8], r"\1</", EXAMPLE)
for _index, _host in enumerate((H1, H2, H3)):
    XHAD_LAYOUT = XHAD_LAYOUT.replace(f"<HostID>{_host}</HostID>\n    <liveness>",
                                      f"<HostID>{_host}</HostID><HostIndex>{_index}</HostIndex>\n    <liveness>")
XHAD_LAYOUT = XHAD_LAYOUT.replace(f"<localhost><HostID>{H1}</HostID>",
                                  f"<localhost><HostID>{H1}</HostID><HostIndex>0</HostIndex>")

# What may break the plain reading's promise: entities, CDATA, comments, CR, characters beyond
# ASCII or forbidden in XML, markup inside text, other spellings of the words it reads.
TRICKY = ["", " ", "\t", "\n", "\r", "\r\n", "&amp;", "&lt;", "&#65;", "]]>", "]", "<!-- c -->", "<![CDATA[x]]>",
          "<x/>", "<b>TRUE</b>", "</host><host>", "TRUE", "true", "FALSE", "-1", "0123", "é", "\x00", "\x0b", "\u2028",
          "a b", H1, "<HostIndex>1</HostIndex>", '"', ">", "<?pi?>", "<!DOCTYPE x>"]


def _plain_agrees(text: str) -> bool:
    """The plain reading of ``text`` declines it or gives exactly the strict walk's answer."""
    plain = liveset._plain(text)
    if plain is None:
        return True
    try:
        return plain == _strict(text)
    except (ApiError, liveset.ParseError):
        return False  # the plain reading took a document the parser refuses


@pytest.mark.parametrize("text", [EXAMPLE, XHAD_LAYOUT], ids=["ha.md", "xhad"])
def test_plain_reading_gives_the_tree_answer(text: str) -> None:
    plain = liveset._plain(text)
    assert plain is not None and plain == _strict(text) == liveset.parse(text)
    assert plain.raw is not None and plain.raw[H2].heartbeat_active_list_on_statefile == [H1, H2]
    assert plain.raw[H3].heartbeat_active_list_on_heartbeat == []
    assert plain.hosts[H3] == HostStatus(False, False, False, False, False)


@pytest.mark.parametrize("name", sorted(k for k, v in STRICT_CASES.items() if isinstance(v, str)))
def test_plain_reading_never_accepts_what_the_strict_walk_refuses(name: str) -> None:
    assert liveset._plain(STRICT_CASES[name]) is None


@pytest.mark.parametrize("filler", TRICKY)
def test_plain_reading_agrees_with_every_tricky_insertion(filler: str) -> None:
    for text in (EXAMPLE, XHAD_LAYOUT):
        for at in range(0, len(text), 7):
            assert _plain_agrees(text[:at] + filler + text[at:]), (at, filler)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_plain_reading_agrees_on_mangled_input(data: st.DataObject) -> None:
    text = data.draw(st.sampled_from([EXAMPLE, XHAD_LAYOUT]))
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 60)))
    filler = data.draw(st.one_of(st.sampled_from(TRICKY), st.text(max_size=6)))
    assert _plain_agrees(text[:start] + filler + text[end:])
