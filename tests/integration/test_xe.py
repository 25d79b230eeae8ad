"""``xe`` end to end: connection and arguments, help, output layout, the generated per-class commands.

Every test runs the installed ``xe`` as a subprocess against a real daemon
(wire.md 8); ``api`` is the SDK view of the same daemon, used to set up and
to cross-check.
"""

from __future__ import annotations

import socket
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_xe_support import SCHEMA, Xe, check_layout, make, make_vm, values
from xapid.cli.xe_fields import build

HINT = "For usage run: 'xe help'\n"


@pytest.fixture
def xe(xapid: Any, tmp_path: Path) -> Xe:
    """xe on a daemon of its own, for tests that change existing objects."""
    return Xe(tmp_path, xapid)


@pytest.fixture
def sxe(shared_xapid: Any, tmp_path: Path) -> Xe:
    """xe on the module's shared daemon, for tests that only read or add objects."""
    return Xe(tmp_path, shared_xapid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pool_uuid(api: Any) -> str:
    return str(api.pool.get_uuid(api.pool.get_all()[0]))


def nfs_sr(api: Any) -> str:
    return next(r for r, rec in api.SR.get_all_records().items() if rec["type"] == "nfs")


# -- connection, arguments, help ---------------------------------------------------------------------


def test_help_lists_commands_and_parameters(tmp_path: Path) -> None:
    xe = Xe(tmp_path)
    r = xe.raw("help")
    assert r.rc == 0 and r.err == ""
    assert r.out.startswith("Usage: xe <cmd>")
    listed = {c.strip() for c in r.out.split("------------\n", 1)[1].replace("\n", " ").split(",")}
    for cls in ("pool", "host", "sr", "sm", "pbd", "vdi", "vbd", "vm", "network", "pif", "vif", "task", "message"):
        for suffix in ("list", "param-list", "param-get", "param-set", "param-add", "param-remove", "param-clear"):
            assert f"{cls}-{suffix}" in listed
    for name in ("sr-create", "sr-forget", "sr-destroy", "pbd-create", "pbd-plug", "pbd-unplug", "pbd-destroy",
                 "vdi-create", "vdi-destroy", "vm-start", "vm-shutdown", "vm-reboot", "pool-ha-enable",
                 "pool-ha-disable", "host-emergency-ha-disable", "pool-ha-compute-max-host-failures-to-tolerate"):
        assert name in listed
    r = xe.raw("help", "sr-create")
    assert r.rc == 0
    lines = r.out.splitlines()
    assert lines[0] == "command name            : sr-create"
    assert lines[1] == "        reqd params     : name-label, type"
    assert "physical-size" in lines[2] and "device-config:" in lines[2]
    r = xe.raw("help", "pool-ha-enable")
    assert "heartbeat-sr-uuids, ha-config:, cluster-stack" in r.out
    assert xe.raw("--help").rc == 0
    assert xe.raw().rc == 0
    r = xe.raw("help", "no-such-command")
    assert (r.rc, r.err) == (1, "Unknown command: no-such-command\n" + HINT)


def test_cannot_connect(tmp_path: Path) -> None:
    xe = Xe(tmp_path)
    r = xe.raw("-s", "127.0.0.1", "-p", str(free_port()), "-pw", "x", "--nossl", "vm-list")
    assert (r.rc, r.out) == (1, "")
    assert r.err == "Unable to contact server. Please check server and port settings.\n"


def test_usage_errors(sxe: Xe) -> None:
    assert sxe.fail("vm-frobnicate") == "Unknown command: vm-frobnicate\n" + HINT
    assert sxe.fail("vm-param-get", "uuid=x") == "Required parameter not found: param-name\n" + HINT
    assert sxe.fail("pool-param-list") == "Required parameter not found: uuid\n" + HINT
    assert sxe.fail("name-label=x") == "Syntax error: command name is missing\n" + HINT


def test_authentication_failed_and_password_file(sxe: Xe, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("root\nnot-the-password\n")
    r = sxe.raw("-s", "127.0.0.1", "-p", sxe.port, "-pwf", str(bad), "--nossl", "pool-list")
    assert (r.rc, r.out, r.err) == (1, "", "Authentication failed\n" + HINT)
    r = sxe.raw("-p", sxe.port, "-u", "root", "-pw", "wrong", "--nossl", "pool-list")
    assert (r.rc, r.err) == (1, "Authentication failed\n" + HINT)
    # -pwf: the password comes from the file (user on line 1), never from the command line.
    argv = ["-s", "127.0.0.1", "-p", sxe.port, "-pwf", str(sxe.pwf), "--nossl", "pool-list", "--minimal"]
    assert sxe.daemon.password not in " ".join(argv)
    r = sxe.raw(*argv)
    assert r.rc == 0 and len(r.out.strip()) == 36
    # -pw and the key=value forms of every connection setting.
    r = sxe.raw("-h", "127.0.0.1", "-p", sxe.port, "-pw", sxe.daemon.password, "--nossl", "pool-list", "--minimal")
    assert r.rc == 0 and len(r.out.strip()) == 36
    r = sxe.raw("server=127.0.0.1", f"port={sxe.port}", "username=root", f"password={sxe.daemon.password}",
               "nossl=true", "pool-list", "--minimal")
    assert r.rc == 0 and len(r.out.strip()) == 36
    r = sxe.raw(f"port={sxe.port}", f"passwordfile={sxe.pwf}", "nossl=true", "pool-list", "--minimal")
    assert r.rc == 0 and len(r.out.strip()) == 36


def test_defaults_from_rc_file_and_extra_args(sxe: Xe) -> None:
    (sxe.home / ".xe").write_text(f"server=127.0.0.1\nport={sxe.port}\nusername=root\n"
                                 f"password={sxe.daemon.password}\nnossl=true\n")
    r = sxe.raw("pool-list", "--minimal")
    assert (r.rc, r.err) == (0, "") and len(r.out.strip()) == 36
    (sxe.home / ".xe").write_text(f"port={free_port()}\nnossl=true\n")
    r = sxe.raw("pool-list", env=sxe.env())
    assert r.rc == 1 and "Unable to contact server" in r.err
    # XE_EXTRA_ARGS beats ~/.xe; the command line beats both; "\," is a literal comma.
    extra = f"port={sxe.port},passwordfile={sxe.pwf},params=name-label\\,master"
    r = sxe.raw("pool-list", env=sxe.env(XE_EXTRA_ARGS=extra))
    assert r.rc == 0, r.err
    assert list(values(r.out)[0]) == ["name-label", "master"]
    r = sxe.raw("-p", sxe.port, "pool-list", "--minimal", env=sxe.env(XE_EXTRA_ARGS=f"port=1,passwordfile={sxe.pwf}"))
    assert r.rc == 0 and len(r.out.strip()) == 36


# -- output ----------------------------------------------------------------------------------------------


def test_golden_records(sxe: Xe, shared_api: Any) -> None:
    sm = next(r for r, rec in shared_api.SM.get_all_records().items() if rec["type"] == "nfs")
    assert sxe.ok("sm-list", "type=nfs") == (
        f"uuid ( RO)                : {shared_api.SM.get_uuid(sm)}\n"
        "          name-label ( RO): NFS VHD\n"
        "    name-description ( RO): SR plugin which stores disks as VHD files on a remote NFS filesystem\n"
        "                type ( RO): nfs\n"
        "              vendor ( RO): xapid\n"
        "           copyright ( RO): (C) 2026 xapid authors\n"
        "       configuration (MRO): server: hostname or IP address; serverpath: path on remote server;"
        " nfsversion: NFS version to use (3 or 4)\n"
        "\n"
    )
    host1 = shared_api.host.get_by_name_label("host1")[0]
    dom0 = shared_api.host.get_control_domain(host1)
    assert sxe.ok("vm-list", "name-label=Control domain on host: host1") == (
        f"uuid ( RO)           : {shared_api.VM.get_uuid(dom0)}\n"
        "     name-label ( RW): Control domain on host: host1\n"
        "    power-state ( RO): running\n"
        "\n"
    )
    local = shared_api.SR.get_by_name_label("Local storage on host1")[0]
    pbd = shared_api.SR.get_PBDs(local)[0]
    assert sxe.ok("pbd-list", f"uuid={shared_api.PBD.get_uuid(pbd)}") == (
        f"uuid ( RO)                  : {shared_api.PBD.get_uuid(pbd)}\n"
        f"             host-uuid ( RO): {shared_api.host.get_uuid(host1)}\n"
        f"               sr-uuid ( RO): {shared_api.SR.get_uuid(local)}\n"
        "         device-config (MRW): device: /dev/sda3\n"
        "    currently-attached ( RO): true\n"
        "\n"
    )


def test_layout_of_every_listing(sxe: Xe, shared_api: Any) -> None:
    shared_api.task.create("label", "description")  # the demo pool has no task
    commands = [[f"{cls}-list", *extra] for cls in ("pool", "host", "sr", "sm", "pbd", "vdi", "vm", "network", "pif",
                                                    "task")
                for extra in ([], ["params=all"])]
    with ThreadPoolExecutor(8) as workers:
        outs = list(workers.map(lambda argv: sxe.ok(*argv), commands))
    for argv, out in zip(commands, outs, strict=True):
        if argv[0] != "vdi-list":  # the demo pool has no VDI
            assert out, argv
            check_layout(out)
    rec = check_layout(sxe.ok("pool-param-list", f"uuid={pool_uuid(shared_api)}"))[0]
    assert list(rec) == [f.name.replace("_", "-") for f in SCHEMA.classes["pool"].fields.values() if not f.removed]
    dom0 = shared_api.VM.get_uuid(shared_api.host.get_control_domain(shared_api.host.get_all()[0]))
    out = sxe.ok("vm-param-list", f"uuid={dom0}")
    check_layout(out)
    # A deprecated field carries its marker inside the padded label.
    assert any(line.lstrip().startswith("memory-target ( RO) [DEPRECATED]: ") for line in out.splitlines())


def test_tags_follow_setters(sxe: Xe, shared_api: Any) -> None:
    rec = check_layout(sxe.ok("pool-param-list", f"uuid={pool_uuid(shared_api)}"))[0]
    assert rec["uuid"][0] == " RO"
    assert rec["name-label"][0] == " RW"
    assert rec["master"][0] == " RO"
    assert rec["default-SR"][0] == " RW"
    assert rec["other-config"][0] == "MRW"
    assert rec["ha-configuration"][0] == "MRO"
    assert rec["tags"][0] == "SRW"
    assert rec["ha-statefiles"][0] == "SRO"
    assert rec["ha-host-failures-to-tolerate"][0] == " RW"  # DRO, but pool.set_ha_host_failures_to_tolerate exists
    assert rec["ha-cluster-stack"][0] == " RO"
    assert rec["ha-enabled"] == (" RO", "false")
    sr = check_layout(sxe.ok("sr-param-list", f"uuid={shared_api.SR.get_uuid(nfs_sr(shared_api))}"))[0]
    assert sr["name-label"][0] == " RW"  # SRO with an explicit SR.set_name_label
    assert sr["type"][0] == " RO"
    assert sr["PBDs"][0] == "SRO"


def test_write_methods_match_the_daemon(shared_xapid: Any) -> None:
    """The RW/MRW/SRW tags and the methods param-set & co. call are exactly those the daemon serves."""
    served = set(xmlrpc.client.ServerProxy(shared_xapid.url).system.listMethods())
    prefixes = {"map": (("set_", "setter"), ("add_to_", "map_add"), ("remove_from_", "map_remove")),
                "set": (("set_", "setter"), ("add_", "set_add"), ("remove_", "set_remove"))}
    checked = 0
    for view in build(SCHEMA).values():
        declared = SCHEMA.classes[view.api].messages
        for f in view.fields:
            if f.api is None:
                continue
            for prefix, attr in prefixes.get(f.kind, (("set_", "setter"),)):
                wire = f"{view.api}.{prefix}{f.api}"
                method = getattr(f, attr)
                if method is None:
                    assert wire not in served, wire
                else:
                    assert method == wire and (wire in served or f"{prefix}{f.api}" in declared), wire
                checked += 1
    assert checked > 500


def test_value_rendering(sxe: Xe, shared_api: Any) -> None:
    pool = shared_api.pool.get_all()[0]
    rec = values(sxe.ok("pool-list", "params=all"))[0]
    assert rec["master"] == shared_api.host.get_uuid(shared_api.pool.get_master(pool))
    assert rec["default-SR"] == shared_api.SR.get_uuid(nfs_sr(shared_api))
    assert rec["other-config"] == "memory-ratio-hvm: 0.25; memory-ratio-pv: 0.25"
    assert rec["ha-enabled"] == "false"
    assert rec["redo-log-vdi"] == "<not in database>"
    assert rec["telemetry-frequency"] == "weekly"
    assert rec["ha-cluster-stack"] == "xhad"
    assert rec["last-update-sync"] == "19700101T00:00:00Z"
    host = values(sxe.ok("host-list", "name-label=host1", "params=capabilities,API-version-major,enabled"))[0]
    assert host == {"API-version-major": "2", "enabled": "true",
                    "capabilities": "xen-3.0-x86_64; hvm-3.0-x86_32; hvm-3.0-x86_64"}
    vm = shared_api.VM.get_by_name_label("Control domain on host: host1")[0]
    vm_rec = values(sxe.ok("vm-param-list", f"uuid={shared_api.VM.get_uuid(vm)}"))[0]
    assert vm_rec["power-state"] == "running"  # enum "Running" printed lowercase
    assert vm_rec["affinity"] == "<not in database>"
    assert vm_rec["resident-on"] == shared_api.host.get_uuid(shared_api.host.get_by_name_label("host1")[0])
    assert vm_rec["HVM-shadow-multiplier"] == "1.000"
    task = shared_api.task.create("a task", "")
    task_rec = values(sxe.ok("task-list", f"uuid={shared_api.task.get_uuid(task)}", "params=all"))[0]
    assert task_rec["progress"] == "0.000"
    assert task_rec["status"] == "pending"
    assert len(task_rec["created"]) == len("20250319T04:16:24Z") and task_rec["created"].endswith("Z")
    sm = values(sxe.ok("sm-list", "type=melio", "params=required-cluster-stack"))[0]
    assert sm == {"required-cluster-stack": "melio"}


def test_derived_fields(xe: Xe, api: Any) -> None:
    vm = make_vm(api, "vm-a")
    sr = nfs_sr(api)
    vdi = api.VDI.create({"SR": sr, "virtual_size": str(2**20), "type": "user", "sharable": False,
                          "read_only": False, "other_config": {}, "name_label": "disk-a"})
    vbd = make(api, "VBD", VM=vm, VDI=vdi, userdevice="0", mode="RW", type="Disk")
    network = api.network.get_all()[0]
    vif = make(api, "VIF", VM=vm, network=network, device="0", MAC="02:00:00:00:00:01")
    uuid = {"vm": api.VM.get_uuid(vm), "vdi": api.VDI.get_uuid(vdi), "sr": api.SR.get_uuid(sr),
            "network": api.network.get_uuid(network)}
    assert values(xe.ok("vbd-list", f"uuid={api.VBD.get_uuid(vbd)}")) == [{
        "uuid": api.VBD.get_uuid(vbd), "vm-uuid": uuid["vm"], "vm-name-label": "vm-a", "vdi-uuid": uuid["vdi"],
        "device": "", "empty": "false"}]
    assert values(xe.ok("vif-list", f"vm-uuid={uuid['vm']}")) == [{
        "uuid": api.VIF.get_uuid(vif), "device": "0", "network-uuid": uuid["network"], "vm-uuid": uuid["vm"]}]
    vdi_rec = values(xe.ok("vdi-list", f"uuid={uuid['vdi']}"))[0]
    assert vdi_rec["sr-uuid"] == uuid["sr"] and vdi_rec["virtual-size"] == str(2**20)
    host1 = api.host.get_by_name_label("host1")[0]
    pifs = values(xe.ok("pif-list", f"host-uuid={api.host.get_uuid(host1)}"))
    assert len(pifs) == 1 and pifs[0]["network-uuid"] == uuid["network"] and pifs[0]["VLAN"] == "-1"
    srs = {r["name-label"]: r["host"] for r in values(xe.ok("sr-list"))}
    assert srs["Local storage on host2"] == "host2" and srs["Shared NFS storage"] == "<shared>"


# -- list: columns, filters, --minimal --------------------------------------------------------------------


def test_list_params_filters_and_minimal(xe: Xe, api: Any) -> None:
    dom0s = {api.VM.get_uuid(api.host.get_control_domain(h)) for h in api.host.get_all()}
    assert set(xe.ok("vm-list", "--minimal").strip().split(",")) == dom0s
    assert set(xe.ok("vm-list", "minimal=true").strip().split(",")) == dom0s
    assert set(xe.ok("--minimal", "vm-list").strip().split(",")) == dom0s
    # Columns print in record order whatever order params= names them.
    assert list(values(xe.ok("host-list", "params=name-label,uuid"))[0]) == ["uuid", "name-label"]
    everything = values(xe.ok("host-list", "params=all", "name-label=host1"))[0]
    assert {"uuid", "software-version", "ha-statefiles", "ha-network-peers", "control-domain"} <= set(everything)
    # --minimal prints the first selected column, escaping commas.
    vm = make_vm(api, "a,b\\c")
    assert xe.ok("vm-list", f"uuid={api.VM.get_uuid(vm)}", "params=name-label", "--minimal") == "a\\,b\\\\c\n"
    assert xe.ok("vm-list", "name-label=nothing-has-this-name", "--minimal") == "\n"
    assert xe.ok("vm-list", "name-label=nothing-has-this-name") == ""
    # Field, enum (any case), map and set filters.
    nfs = api.SR.get_uuid(nfs_sr(api))
    assert len(values(xe.ok("pbd-list", f"sr-uuid={nfs}"))) == 3
    assert len(values(xe.ok("pbd-list", "device-config:server=127.0.0.1"))) == 3
    assert len(values(xe.ok("pbd-list", "device-config:device=/dev/sda3"))) == 3
    assert xe.ok("pbd-list", "device-config:device=/dev/nope") == ""
    assert len(values(xe.ok("vm-list", "power-state=Running"))) == 3
    assert len(values(xe.ok("vm-list", "power-state=halted"))) == 1
    assert len(values(xe.ok("host-list", "capabilities:contains=hvm-3.0-x86_32"))) == 3
    assert xe.ok("host-list", "capabilities:contains=nope") == ""
    assert xe.fail("vm-list", "no-such-field=1") == "Unknown field 'no-such-field'\n"
    assert xe.fail("vm-list", "params=uuid,bogus") == "Unknown field 'bogus'\n"


def test_vm_list_hides_templates(xe: Xe, api: Any) -> None:
    vm = make_vm(api, "soon-a-template")
    uuid = api.VM.get_uuid(vm)
    assert uuid in xe.ok("vm-list", "--minimal")
    xe.ok("vm-param-set", f"uuid={uuid}", "is-a-template=true")
    assert api.VM.get_is_a_template(vm) is True
    assert uuid not in xe.ok("vm-list", "--minimal")
    # The seeded templates are listed too.
    assert uuid in xe.ok("template-list", "--minimal").strip().split(",")
    assert uuid in xe.ok("vm-list", "is-a-template=true", "--minimal").strip().split(",")


# -- param-get / set / add / remove / clear ----------------------------------------------------------------


def test_param_get_and_set(xe: Xe, api: Any) -> None:
    pool_ref = api.pool.get_all()[0]
    pool = pool_uuid(api)
    assert xe.get("pool", pool, "name-label") == "xapid pool"
    assert xe.get("pool", pool, "other-config", "memory-ratio-pv") == "0.25"
    assert xe.fail("pool-param-get", f"uuid={pool}", "param-name=other-config", "param-key=nope") == \
        "Key nope not found in map\n"
    assert xe.fail("pool-param-get", f"uuid={pool}", "param-name=no-such") == \
        "Error code: Missing parameter\nError parameters: no-such\n"
    xe.ok("pool-param-set", f"uuid={pool}", "name-label=renamed pool", "other-config:memory-ratio-pv=0.5",
          "other-config:new=x=y", "ha-allow-overcommit=true")
    assert api.pool.get_name_label(pool_ref) == "renamed pool"
    assert api.pool.get_other_config(pool_ref) == {"memory-ratio-hvm": "0.25", "memory-ratio-pv": "0.5",
                                                   "new": "x=y"}
    assert api.pool.get_ha_allow_overcommit(pool_ref) is True
    # A ref field is set by uuid; an explicit set_ message makes a DRO field settable.
    local = api.SR.get_by_name_label("Local storage on host2")[0]
    xe.ok("pool-param-set", f"uuid={pool}", f"default-SR={api.SR.get_uuid(local)}")
    assert api.pool.get_default_SR(pool_ref) == local
    xe.ok("pool-param-set", f"uuid={pool}", "ha-host-failures-to-tolerate=1")
    assert xe.get("pool", pool, "ha-host-failures-to-tolerate") == "1"
    # Read-only fields are refused before anything is changed.
    assert xe.fail("pool-param-set", f"uuid={pool}", "name-label=x", "master=y") == "Field 'master' is read-only.\n"
    assert api.pool.get_name_label(pool_ref) == "renamed pool"
    sr = api.SR.get_uuid(nfs_sr(api))
    assert xe.fail("sr-param-set", f"uuid={sr}", "type=ext") == "Field 'type' is read-only.\n"
    assert xe.fail("sr-param-set", f"uuid={sr}", "tags=a") == "Field 'tags' is read-only.\n"
    assert xe.fail("pool-param-set", f"uuid={pool}", "restrictions:x=y") == "Field 'restrictions' is read-only.\n"
    assert xe.fail("pool-param-set", f"uuid={pool}", "frobs=1") == "Unknown field 'frobs'\n"
    xe.ok("sr-param-set", f"uuid={sr}", "name-label=NFS renamed")
    assert api.SR.get_name_label(nfs_sr(api)) == "NFS renamed"
    vm = make_vm(api, "prio")
    xe.ok("vm-param-set", f"uuid={api.VM.get_uuid(vm)}", "ha-restart-priority=best-effort")
    assert api.VM.get_ha_restart_priority(vm) == "best-effort"


def test_param_add_remove_clear(xe: Xe, api: Any) -> None:
    pool_ref = api.pool.get_all()[0]
    pool = pool_uuid(api)
    # Sets: param-key names the member.
    xe.ok("pool-param-add", f"uuid={pool}", "param-name=tags", "param-key=red")
    xe.ok("pool-param-add", f"uuid={pool}", "param-name=tags", "param-key=blue")
    assert api.pool.get_tags(pool_ref) == ["red", "blue"]
    assert xe.get("pool", pool, "tags") == "red; blue"
    xe.ok("pool-param-remove", f"uuid={pool}", "param-name=tags", "param-key=red")
    assert api.pool.get_tags(pool_ref) == ["blue"]
    xe.ok("pool-param-clear", f"uuid={pool}", "param-name=tags")
    assert api.pool.get_tags(pool_ref) == []
    # Maps: k=v pairs.
    net = api.network.get_all()[0]
    net_uuid = api.network.get_uuid(net)
    xe.ok("network-param-add", f"uuid={net_uuid}", "param-name=other-config", "k1=v1", "k2=v2")
    assert api.network.get_other_config(net) == {"automatic": "true", "k1": "v1", "k2": "v2"}
    assert xe.get("network", net_uuid, "other-config") == "automatic: true; k1: v1; k2: v2"
    xe.ok("network-param-remove", f"uuid={net_uuid}", "param-name=other-config", "param-key=k1")
    assert api.network.get_other_config(net) == {"automatic": "true", "k2": "v2"}
    xe.ok("network-param-clear", f"uuid={net_uuid}", "param-name=other-config")
    assert api.network.get_other_config(net) == {}
    # A map with only an explicit setter (PBD.set_device_config).
    pbd = api.PBD.get_all()[0]
    pbd_uuid = api.PBD.get_uuid(pbd)
    before = api.PBD.get_device_config(pbd)
    xe.ok("pbd-param-add", f"uuid={pbd_uuid}", "param-name=device-config", "extra=1")
    assert api.PBD.get_device_config(pbd) == {**before, "extra": "1"}
    xe.ok("pbd-param-remove", f"uuid={pbd_uuid}", "param-name=device-config", "param-key=extra")
    assert api.PBD.get_device_config(pbd) == before
    # Refusals.
    assert xe.fail("pool-param-add", f"uuid={pool}", "param-name=ha-configuration", "k=v") == \
        "Field 'ha-configuration' is read-only.\n"
    assert xe.fail("pool-param-clear", f"uuid={pool}", "param-name=master") == "Field 'master' is read-only.\n"
    assert xe.fail("pool-param-remove", f"uuid={pool}", "param-name=tags") == \
        "Required parameter not found: param-key\n" + HINT
    assert xe.fail("pool-param-clear", f"uuid={pool}", "param-name=ha-allow-overcommit") == \
        "Field 'ha-allow-overcommit' is not a map or set.\n"
    xe.ok("pool-param-set", f"uuid={pool}", "name-description=something")
    xe.ok("pool-param-clear", f"uuid={pool}", "param-name=name-description")
    assert api.pool.get_name_description(pool_ref) == ""


def test_api_error_output(sxe: Xe, shared_api: Any) -> None:
    assert sxe.fail("vm-param-list", "uuid=1234") == "The uuid you supplied was invalid.\ntype: VM\nuuid: 1234\n"
    assert sxe.fail("sr-param-get", "uuid=nope", "param-name=type") == \
        "The uuid you supplied was invalid.\ntype: SR\nuuid: nope\n"
    # A code without a description: code and parameters.
    pbd = shared_api.PBD.get_uuid(shared_api.PBD.get_all()[0])
    assert sxe.fail("pbd-destroy", f"uuid={pbd}") == \
        "Error code: OPERATION_NOT_ALLOWED\nError parameters: PBD is currently attached\n"
