"""Helpers shared by the core-daemon integration tests (the daemon fixtures live in ../conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Xapid, kill_heartbeats, root_api, write_conf
from tests.integration.corosync_kit import tracker  # noqa: F401 - a fixture for the real-corosync tests
from xapid import schema as schema_mod
from xapid.generic import constructor_fields
from xapid.schema import Schema

# Realistic values for the VM constructor fields that have no datamodel default.
VM_MANDATORY: dict[str, Any] = {
    "user_version": "1",
    "is_a_template": False,
    "affinity": "OpaqueRef:NULL",
    "memory_static_max": str(2 * 1024**3),     # Python can only send ints beyond 2^31 as strings
    "memory_dynamic_max": str(2 * 1024**3),
    "memory_dynamic_min": str(1024**3),
    "memory_static_min": str(512 * 1024**2),
    "VCPUs_params": {},
    "VCPUs_max": "2",
    "VCPUs_at_startup": "2",
    "actions_after_shutdown": "destroy",
    "actions_after_reboot": "restart",
    "actions_after_crash": "restart",
    "PV_bootloader": "",
    "PV_kernel": "",
    "PV_ramdisk": "",
    "PV_args": "",
    "PV_bootloader_args": "",
    "PV_legacy_args": "",
    "HVM_boot_policy": "BIOS order",
    "HVM_boot_params": {"order": "cdn"},
    "platform": {"cores-per-socket": "2"},
    "PCI_bus": "",
    "other_config": {},
    "recommendations": "",
}


@pytest.fixture(scope="module")
def shared_xapid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One daemon (default settings, 3 hosts) for all tests of a module that only read or add objects.

    Tests that restart, kill or reconfigure the daemon use ``xapid_factory`` instead.
    """
    tmp = tmp_path_factory.mktemp("shared")
    d = Xapid(tmp / "state", write_conf(tmp / "state.conf"), ["--hosts", "3"])
    d.start()
    yield d
    d.stop()
    kill_heartbeats(d.state_dir)


@pytest.fixture
def shared_api(shared_xapid: Any) -> Iterator[Any]:
    """``session.xenapi`` of a fresh root session on :func:`shared_xapid`."""
    yield from root_api(shared_xapid)


@pytest.fixture(scope="session")
def schema() -> Schema:
    return schema_mod.load()


def _wire(value: Any) -> Any:
    """A value as a Python XenAPI client sends it: ints as strings (they may exceed 2^31)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    return value


@pytest.fixture(scope="session")
def vm_args(schema: Schema) -> Callable[..., dict[str, Any]]:
    """``vm_args(name_label, **overrides)``: a full ``VM.create`` struct, as xe or ansible build it.

    Every constructor field (wire.md 4.1: all SRO and RW fields) is present: the
    mandatory ones from :data:`VM_MANDATORY`, the others with their datamodel default.
    """
    fields = constructor_fields(schema.classes["VM"])

    def build(name_label: str, **overrides: Any) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for f in fields:
            args[f.name] = _wire(f.default) if f.has_default else VM_MANDATORY[f.name]
        args["name_label"] = name_label
        args.update(overrides)
        return args

    return build


def raw(session: Any, method: str, *params: Any) -> dict[str, Any]:
    """Call ``method`` through the SDK's ServerProxy with exactly ``params``; return the raw envelope.

    Unlike ``session.xenapi``, nothing is prepended and ``SESSION_INVALID`` is not
    turned into a silent re-login, so the daemon's own answer is visible.
    """
    result = getattr(session, method)(*params)
    assert isinstance(result, dict), result
    return result


@pytest.fixture(scope="session")
def call_raw() -> Callable[..., dict[str, Any]]:
    return raw
