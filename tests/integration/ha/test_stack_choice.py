"""Choosing the cluster stack: ha.md 1.4 plus the design's explicit ``cluster_stack`` argument."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import XenAPI

from tests.integration.ha.conftest import add_recording_stack, calls, running_heartbeats


def details(exc: pytest.ExceptionInfo[XenAPI.Failure]) -> list[str]:
    return list(exc.value.details)


def shared_sr(api: object, sr_type: str, label: str = "constrained") -> str:
    x = api
    master = x.pool.get_master(x.pool.get_all()[0])  # type: ignore[attr-defined]
    return x.SR.create(master, {}, str(2 * 1024**4), label, "", sr_type, "user", True, {})  # type: ignore[attr-defined]


def test_new_pool_reports_xhad(api: object) -> None:
    """Design: pool.ha_cluster_stack is "xhad" for a pool that never enabled HA."""
    pool = api.pool.get_all()[0]  # type: ignore[attr-defined]
    assert api.pool.get_ha_cluster_stack(pool) == "xhad"  # type: ignore[attr-defined]
    assert api.pool.get_record(pool)["ha_cluster_stack"] == "xhad"  # type: ignore[attr-defined]


def test_unconstrained_pool_uses_default_stack(xapid_factory: object, stack_root: Path) -> None:
    foo = add_recording_stack(stack_root, "foo")
    d = xapid_factory(stack_root=stack_root)  # type: ignore[operator]
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    x.pool.enable_ha([], {"timeout": "10"})
    assert x.pool.get_ha_cluster_stack(pool) == "xhad"
    assert calls(foo) == []
    x.pool.disable_ha()


def test_sr_requiring_foo_makes_enable_use_foo(xapid_factory: object, stack_root: Path, sm_dir: Path) -> None:
    """Design: an attached SR whose driver needs stack foo makes pool.enable_ha use foo's scripts."""
    foo = add_recording_stack(stack_root, "foo")
    d = xapid_factory(stack_root=stack_root, **{"sm-dir": str(sm_dir)})  # type: ignore[operator]
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    master = x.pool.get_master(pool)
    master_uuid = x.host.get_uuid(master)
    shared_sr(x, "foosr")
    x.pool.enable_ha([], {"timeout": "10"})
    assert x.pool.get_ha_cluster_stack(pool) == "foo"
    assert x.pool.get_ha_enabled(pool) is True
    log = calls(foo)
    # ha.md 4.1: init on the master first, then every host joins, then the master proposes itself.
    assert log[0].startswith(f"ha_set_pool_state init host={master_uuid}")
    hosts = {x.host.get_uuid(h) for h in x.host.get_all()}
    started = {line.split("host=")[1].split()[0] for line in log if line.startswith("ha_start_daemon")}
    assert started == hosts
    assert any(line.startswith(f"ha_propose_master  host={master_uuid}") for line in log)
    # Every call saw its own host's xhad.conf.
    for line in log:
        uuid = line.split("host=")[1].split()[0]
        assert line.endswith(f"conf={d.state_dir / 'hosts' / uuid / 'xhad.conf'}")
    x.pool.disable_ha()
    assert running_heartbeats(d) == []
    # disable_ha keeps the stack (ha.md 4.4).
    assert x.pool.get_ha_cluster_stack(pool) == "foo"


def test_chosen_stack_survives_restart(xapid_factory: object, stack_root: Path, sm_dir: Path) -> None:
    add_recording_stack(stack_root, "foo")
    d = xapid_factory(stack_root=stack_root, **{"sm-dir": str(sm_dir)})  # type: ignore[operator]
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    shared_sr(x, "foosr")
    x.pool.enable_ha([], {"timeout": "10"})
    x.pool.disable_ha()
    d.restart()
    assert d.session().xenapi.pool.get_ha_cluster_stack(pool) == "foo"


def test_explicit_stack_good_name(xapid_factory: object, stack_root: Path) -> None:
    foo = add_recording_stack(stack_root, "foo")
    d = xapid_factory(stack_root=stack_root)  # type: ignore[operator]
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    x.pool.enable_ha([], {"timeout": "10"}, "foo")
    assert x.pool.get_ha_cluster_stack(pool) == "foo"
    assert calls(foo)
    x.pool.disable_ha()


def test_explicit_empty_name_lets_daemon_choose(api: object) -> None:
    pool = api.pool.get_all()[0]  # type: ignore[attr-defined]
    api.pool.enable_ha([], {"timeout": "10"}, "")  # type: ignore[attr-defined]
    assert api.pool.get_ha_cluster_stack(pool) == "xhad"  # type: ignore[attr-defined]
    api.pool.disable_ha()  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["nope", "../xhad", "xhad/../xhad", "/etc", ".hidden", "a/b", "x" * 65, ".", "..",
                                  "tab\tname"])
def test_explicit_unknown_or_malicious_name(xapid_factory: object, stack_root: Path, tmp_path: Path,
                                            name: str) -> None:
    """Design: a name that is not a folder under the root is UNKNOWN_CLUSTER_STACK [name]; nothing runs."""
    outside = add_recording_stack(tmp_path, "xhad")  # where "../xhad" from the root points
    d = xapid_factory(stack_root=stack_root)  # type: ignore[operator]
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    with pytest.raises(XenAPI.Failure) as e:
        x.pool.enable_ha([], {"timeout": "10"}, name)
    assert details(e) == ["UNKNOWN_CLUSTER_STACK", name]
    assert x.pool.get_ha_enabled(pool) is False
    assert x.pool.get_ha_cluster_stack(pool) == "xhad"
    assert calls(outside) == []
    assert running_heartbeats(d) == []


def test_explicit_stack_violating_sr_constraint(xapid_factory: object, stack_root: Path, sm_dir: Path) -> None:
    """Design: CLUSTER_STACK_CONSTRAINT [the SR that restricts, the stack it requires]."""
    add_recording_stack(stack_root, "foo")
    d = xapid_factory(stack_root=stack_root, **{"sm-dir": str(sm_dir)})  # type: ignore[operator]
    x = d.session().xenapi
    sr = shared_sr(x, "foosr")
    with pytest.raises(XenAPI.Failure) as e:
        x.pool.enable_ha([], {"timeout": "10"}, "xhad")
    assert details(e) == ["CLUSTER_STACK_CONSTRAINT", sr, "foo"]
    assert x.pool.get_ha_enabled(x.pool.get_all()[0]) is False


def test_chosen_stack_not_installed_is_unknown_cluster_stack(xapid_factory: object, stack_root: Path) -> None:
    """An attached OCFS2 SR needs corosync; without that stack folder the answer is UNKNOWN_CLUSTER_STACK."""
    shutil.rmtree(stack_root / "corosync")
    x = xapid_factory(stack_root=stack_root).session().xenapi  # type: ignore[operator]
    shared_sr(x, "ocfs2")
    with pytest.raises(XenAPI.Failure) as e:
        x.pool.enable_ha([], {"timeout": "10"})
    assert details(e) == ["UNKNOWN_CLUSTER_STACK", "corosync"]


def test_enable_ha_parameter_count(api: object) -> None:
    """Two or three parameters after the session; anything else is a count mismatch."""
    with pytest.raises(XenAPI.Failure) as e:
        api.pool.enable_ha([])  # type: ignore[attr-defined]
    assert details(e) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "pool.enable_ha", "2", "1"]
