"""xe commands for deploying and running VMs: install, clone, copy, snapshots, suspend/resume, migrate,
disks, CDs, VBDs, VIFs, memory limits and VLANs, with xe's parameters (cli_frontend.ml) and behaviour
(cli_operations.ml ``vm_install``, ``vm_clone_aux``, ``vm_disk_add``, ``vm_cd_insert``, ``vbd_create``...).
"""

from __future__ import annotations

import re

from xapid.schema import NULL_REF

from .xe_commands import (
    DANGEROUS,
    Args,
    Command,
    Context,
    Run,
    _print_uuid,
    failwith,
    host_named,
    parse_size,
    select_vms,
)
from .xe_errors import ApiFailure, XeError
from .xe_output import api_error_lines

NEW_VM_KEYS = ("new-name-label", "new-name-description", "sr-uuid", "sr-name-label", "ignore-vdi-uuids")


def _default_sr(ctx: Context) -> str | None:
    pool = ctx.rpc.call("pool.get_all")[0]
    sr = str(ctx.rpc.call("pool.get_default_SR", pool))
    return None if sr == NULL_REF else sr


def _template(ctx: Context, args: Args) -> str:
    """The template of ``vm-install``: ``template-uuid=``, ``template-name(-label)=`` or ``template=``."""
    uuid = args.get("template-uuid")
    if uuid is not None:
        try:
            return ctx.db.ref_of("VM", uuid)
        except ApiFailure:
            raise failwith("Cannot find template") from None
    name = args.get("template-name-label") or args.get("template-name")
    given = args.get("template")
    if name is None and given is None:
        raise failwith("Template must be specified by parameter 'template-uuid', 'template-name', "
                       "'template-name-label' or 'template'")
    if name is None:
        for ref, rec in ctx.db.records("VM").items():
            if rec["uuid"] == given:
                return ref
        name = given
    matches = [ref for ref, rec in ctx.db.records("VM").items()
               if rec["name_label"] == name and rec["is_a_template"] and not rec["is_control_domain"]]
    if not matches:
        raise failwith("No templates matched")
    if len(matches) > 1:
        raise failwith("More than one matching template found")
    return matches[0]


def vm_install(ctx: Context, args: Args) -> None:
    """Copy (with an SR) or clone the template, point its provision XML at the SR, provision; print the uuid."""
    template = _template(ctx, args)
    rec = ctx.db.record("VM", template) or {}
    if not rec.get("is_a_template"):
        raise failwith("Can only install from templates")
    sr = None
    if rec.get("is_a_snapshot"):
        if args.get("sr-uuid") is not None or args.get("sr-name-label") is not None:
            raise failwith("Do not use the sr-name-label or sr-uuid argument when installing from a snapshot. By "
                           "default, it will install each new disk on the same SR as the corresponding snapshot "
                           "disks.")
    else:
        if args.get("sr-uuid") is not None:
            sr = ctx.db.ref_of("SR", args.require("sr-uuid"))
        label = args.get("sr-name-label")
        if label is not None:
            named = [ref for ref, r in ctx.db.records("SR").items() if r["name_label"] == label]
            if not named:
                raise failwith("No SR with that name-label found")
            if sr is not None and sr not in named:
                raise failwith("SR specified via sr-uuid doesn't have the name specified via sr-name-label")
            if sr is None and len(named) > 1:
                raise failwith("Multiple SRs with that name-label found")
            sr = sr or named[0]
    target = sr or _default_sr(ctx)
    other = dict(rec.get("other_config", {}))
    if target is None and "disks" in other:
        raise failwith("Failed to find a valid default SR for the Pool. Please provide an sr-name-label or sr-uuid "
                       "parameter.")
    name = args.require("new-name-label")
    vm = ctx.rpc.call("VM.copy", template, name, sr) if sr else ctx.rpc.call("VM.clone", template, name)
    try:
        ctx.rpc.call("VM.set_name_description", vm, "Installed via xe CLI")
        ctx.rpc.call("VM.set_suspend_SR", vm, sr or rec.get("suspend_SR", NULL_REF))
        other = ctx.rpc.call("VM.get_other_config", vm)
        if "disks" in other and target is not None:
            sr_uuid = ctx.db.uuid_of("SR", target) or ""
            disks = re.sub(r'sr="[^"]*"', f'sr="{sr_uuid}"', other["disks"])
            ctx.rpc.call("VM.remove_from_other_config", vm, "disks")
            ctx.rpc.call("VM.add_to_other_config", vm, "disks", disks)
        ctx.rpc.call("VM.provision", vm)
    except (ApiFailure, XeError):
        try:
            ctx.rpc.call("VM.destroy", vm)
        except ApiFailure:
            pass
        raise
    _print_uuid(ctx, "VM", vm)


def _copy_op(method: str, templates: bool) -> Run:
    """vm-clone / vm-copy / vm-snapshot / vm-checkpoint: one new VM from the selected one, uuid printed."""

    def run(ctx: Context, args: Args) -> None:
        vms = select_vms(ctx, args, NEW_VM_KEYS, templates)
        if len(vms) != 1:
            raise failwith("Multiple matches VMs found. --multiple required to complete the operation")
        name = args.require("new-name-label")
        if method == "copy":
            sr_uuid = args.get("sr-uuid")
            sr = ctx.db.ref_of("SR", sr_uuid) if sr_uuid else NULL_REF
            new = ctx.rpc.call("VM.copy", vms[0], name, sr)
        elif method == "snapshot":
            ignore = [ctx.db.ref_of("VDI", u) for u in (args.get("ignore-vdi-uuids") or "").split(",") if u]
            new = ctx.rpc.call("VM.snapshot", vms[0], name, ignore)
        else:
            new = ctx.rpc.call(f"VM.{method}", vms[0], name)
        description = args.get("new-name-description")
        if description is not None:
            ctx.rpc.call("VM.set_name_description", new, description)
        _print_uuid(ctx, "VM", new)

    return run


def snapshot_revert(ctx: Context, args: Args) -> None:
    uuid = args.get("snapshot-uuid") or args.get("uuid")
    if uuid is None:
        raise failwith("Required parameter not found: snapshot-uuid or uuid.")
    snap = ctx.db.ref_of("VM", uuid)
    if not ctx.rpc.call("VM.get_is_a_snapshot", snap):
        raise failwith(f"This template is not a snapshot VM. (uuid: {uuid})")
    ctx.rpc.call("VM.revert", snap)


def _each_vm(ctx: Context, args: Args, skip: tuple[str, ...], call: Run) -> None:
    """Run ``call`` for every selected VM; with ``--multiple`` a failure is reported and the rest go on."""
    failures: list[str] = []
    for vm in select_vms(ctx, args, skip):
        try:
            call(ctx, Args([("vm-ref", vm)] + args.pairs))
        except ApiFailure as e:
            if not args.flag("multiple"):
                raise
            message = "; ".join(api_error_lines(e.code, e.params, ctx.db.describe))
            failures.append(f"operation failed on {ctx.db.uuid_of('VM', vm) or vm}: {message}")
    if failures:
        raise XeError(*failures)


def _vm(args: Args) -> str:
    return args.require("vm-ref")


def vm_suspend(ctx: Context, args: Args) -> None:
    _each_vm(ctx, args, (), lambda c, a: c.rpc.call("VM.suspend", _vm(a)))


def vm_resume(ctx: Context, args: Args) -> None:
    on = args.get("on")
    host = host_named(ctx, on) if on is not None else None

    def resume(c: Context, a: Args) -> None:
        if host is None:
            c.rpc.call("VM.resume", _vm(a), False, a.flag("force"))
        else:
            c.rpc.call("VM.resume_on", _vm(a), host, False, a.flag("force"))

    _each_vm(ctx, args, (), resume)


def vm_migrate(ctx: Context, args: Args) -> None:
    """Within the pool: ``host=`` (name or uuid) or ``host-uuid=``; VM.pool_migrate with ``live``."""
    if args.get("remote-master") is not None:
        raise failwith("xapid emulates one pool: cross-pool migration (remote-master=) is not available")
    text = args.get("host-uuid") or args.get("host")
    if text is None:
        raise failwith("Required parameter not found: host or host-uuid")
    host = host_named(ctx, text)
    options = {"live": "true" if args.flag("live") else "false"}
    _each_vm(ctx, args, ("host", "host-uuid", "live", "compress", "copy"),
             lambda c, a: c.rpc.call("VM.pool_migrate", _vm(a), host, options))


def vm_memory_limits_set(ctx: Context, args: Args) -> None:
    values = [str(parse_size(args.require(k))) for k in ("static-min", "static-max", "dynamic-min", "dynamic-max")]
    _each_vm(ctx, args, ("static-min", "static-max", "dynamic-min", "dynamic-max"),
             lambda c, a: c.rpc.call("VM.set_memory_limits", _vm(a), *values))


def _plug_if_running(ctx: Context, vm: str, vbd: str) -> None:
    if ctx.rpc.call("VM.get_power_state", vm) == "Running":
        ctx.rpc.call("VBD.plug", vbd)


def vm_disk_add(ctx: Context, args: Args) -> None:
    """A new "Created by xe" VDI and an owner VBD at ``device=``, plugged when the VM runs."""
    size = parse_size(args.require("disk-size"))
    device = args.require("device")
    sr_uuid = args.get("sr-uuid")
    sr = ctx.db.ref_of("SR", sr_uuid) if sr_uuid else _default_sr(ctx)
    if sr is None:
        raise failwith("No default Pool SR set; you must specify an SR on the commandline")

    def add(c: Context, a: Args) -> None:
        vm = _vm(a)
        vdi = c.rpc.call("VDI.create", {
            "name_label": "Created by xe", "name_description": "Created by xe", "SR": sr, "virtual_size": str(size),
            "type": "user", "sharable": False, "read_only": False, "other_config": {}, "xenstore_data": {},
            "sm_config": {"vmhint": c.rpc.call("VM.get_uuid", vm)}, "tags": []})
        try:
            vbd = c.rpc.call("VBD.create", {
                "VM": vm, "VDI": vdi, "userdevice": device, "bootable": False, "mode": "RW", "type": "Disk",
                "unpluggable": True, "empty": False, "other_config": {"owner": "true"}, "qos_algorithm_type": "",
                "qos_algorithm_params": {}, "device": "", "currently_attached": False})
            _plug_if_running(c, vm, vbd)
        except ApiFailure:
            c.rpc.call("VDI.destroy", vdi)
            raise

    _each_vm(ctx, args, ("disk-size", "device", "sr-uuid"), add)


def _cds(ctx: Context, vm: str) -> list[str]:
    return [v for v in ctx.rpc.call("VM.get_VBDs", vm) if ctx.rpc.call("VBD.get_type", v) == "CD"]


def vm_cd_insert(ctx: Context, args: Args) -> None:
    name = args.require("cd-name")
    vdis = [ref for ref, rec in ctx.db.records("VDI").items() if rec["name_label"] == name
            and (ctx.db.record("SR", rec["SR"]) or {}).get("content_type") == "iso"]
    if not vdis:
        raise failwith(f"CD {name} not found")
    if len(vdis) > 1:
        raise failwith(f"Multiple CDs named {name} found. Please use vbd-insert and specify uuids")

    def insert(c: Context, a: Args) -> None:
        empty = [v for v in _cds(c, _vm(a)) if c.rpc.call("VBD.get_empty", v)]
        if not empty:
            raise ApiFailure("VM_NO_EMPTY_CD_VBD", [_vm(a)])
        c.rpc.call("VBD.insert", empty[0], vdis[0])

    _each_vm(ctx, args, ("cd-name",), insert)


def vm_cd_eject(ctx: Context, args: Args) -> None:
    def eject(c: Context, a: Args) -> None:
        cds = _cds(c, _vm(a))
        if not cds:
            raise failwith("No CDs found")
        if len(cds) > 1:
            raise failwith("Two or more CDs found. Please use vbd-eject")
        c.rpc.call("VBD.eject", cds[0])

    _each_vm(ctx, args, (), eject)


def vbd_create(ctx: Context, args: Args) -> None:
    vm = ctx.db.ref_of("VM", args.require("vm-uuid"))
    vdi_uuid = args.get("vdi-uuid")
    vdi = ctx.db.ref_of("VDI", vdi_uuid) if vdi_uuid else NULL_REF
    mode = (args.get("mode") or "rw").lower()
    if mode not in ("ro", "rw"):
        raise failwith(f'Unknown mode: {mode} (should be "ro" or "rw"')
    vbd_type = (args.get("type") or "disk").lower()
    types = {"cd": "CD", "disk": "Disk", "floppy": "Floppy"}
    if vbd_type not in types:
        raise failwith(f'"Unknown type: {vbd_type} (should be "cd", "disk" or "floppy"')
    ref = ctx.rpc.call("VBD.create", {
        "VM": vm, "VDI": vdi, "userdevice": args.require("device"), "bootable": args.flag("bootable"),
        "mode": mode.upper(), "type": types[vbd_type], "unpluggable": True if args.get("unpluggable") is None
        else args.flag("unpluggable"), "empty": vdi_uuid is None, "other_config": {}, "qos_algorithm_type": "",
        "qos_algorithm_params": {}, "device": "", "currently_attached": False})
    _print_uuid(ctx, "VBD", ref)


def vbd_unplug(ctx: Context, args: Args) -> None:
    ref = ctx.db.ref_of("VBD", args.require("uuid"))
    ctx.rpc.call("VBD.unplug_force" if args.flag("force") else "VBD.unplug", ref)


def vtpm_create(ctx: Context, args: Args) -> None:
    """cli_operations.ml VTPM.create: ``is-unique`` (or ``is_unique``) defaults to false."""
    vm = ctx.db.ref_of("VM", args.require("vm-uuid"))
    unique = args.flag("is-unique") or args.flag("is_unique")
    _print_uuid(ctx, "VTPM", ctx.rpc.call("VTPM.create", vm, unique))


def vtpm_destroy(ctx: Context, args: Args) -> None:
    uuid = args.require("uuid")
    if not args.flag("force"):
        raise failwith(DANGEROUS)
    ctx.rpc.call("VTPM.destroy", ctx.db.ref_of("VTPM", uuid))


def vif_create(ctx: Context, args: Args) -> None:
    network = ctx.db.ref_of("network", args.require("network-uuid"))
    vm = ctx.db.ref_of("VM", args.require("vm-uuid"))
    mac = args.get("mac") or ""
    if mac == "random":
        import secrets

        octets = bytearray(secrets.token_bytes(6))
        octets[0] = (octets[0] | 2) & 0xFE
        mac = ":".join(f"{b:02x}" for b in octets)
    ref = ctx.rpc.call("VIF.create", {
        "device": args.require("device"), "network": network, "VM": vm, "MAC": mac,
        "MTU": str(ctx.rpc.call("network.get_MTU", network)), "other_config": {}, "currently_attached": False,
        "qos_algorithm_type": "", "qos_algorithm_params": {}, "locking_mode": "network_default",
        "ipv4_allowed": [], "ipv6_allowed": [], "trunks": []})
    _print_uuid(ctx, "VIF", ref)


def _on(cls: str, method: str) -> Run:
    def run(ctx: Context, args: Args) -> None:
        ctx.rpc.call(f"{cls}.{method}", ctx.db.ref_of(cls, args.require("uuid")))

    return run


def vlan_create(ctx: Context, args: Args) -> None:
    network = ctx.db.ref_of("network", args.require("network-uuid"))
    pif = ctx.db.ref_of("PIF", args.require("pif-uuid"))
    tag = args.require("vlan")
    if not tag.lstrip("-").isdigit():
        raise failwith(f"Failed to parse VLAN tag: {tag}")
    vlan = ctx.rpc.call("VLAN.create", pif, tag, network)
    _print_uuid(ctx, "PIF", ctx.rpc.call("VLAN.get_untagged_PIF", vlan))  # xe prints the PIF, as Rio did


SELECT = ("vm", "uuid", "multiple")


def vm_surface_commands() -> list[Command]:
    return [
        Command("vm-install", vm_install, ("new-name-label",),
                ("template", "template-uuid", "template-name-label", "sr-uuid", "sr-name-label"),
                "Install a new VM from a template; prints its uuid."),
        Command("vm-clone", _copy_op("clone", True), ("new-name-label",), (*SELECT, "new-name-description"),
                "Clone an existing VM, using storage-level fast disk clone where available."),
        Command("vm-copy", _copy_op("copy", True), ("new-name-label",), (*SELECT, "new-name-description", "sr-uuid"),
                "Copy an existing VM, but without using storage-level fast disk clone."),
        Command("vm-snapshot", _copy_op("snapshot", False), ("new-name-label",),
                (*SELECT, "new-name-description", "ignore-vdi-uuids"), "Snapshot an existing VM."),
        Command("vm-checkpoint", _copy_op("checkpoint", False), ("new-name-label",),
                (*SELECT, "new-name-description"), "Checkpoint an existing VM, using storage-level fast disk "
                "snapshot operation where available."),
        Command("snapshot-revert", snapshot_revert, (), ("uuid", "snapshot-uuid"),
                "Revert an existing VM to a previous checkpointed or snapshotted state."),
        Command("vm-suspend", vm_suspend, (), SELECT, "Suspend the selected VM(s)."),
        Command("vm-resume", vm_resume, (), (*SELECT, "force", "on"), "Resume the selected VM(s)."),
        Command("vm-migrate", vm_migrate, (), (*SELECT, "live", "host", "host-uuid", "force"),
                "Migrate the selected VM(s) to another host of the pool."),
        Command("vm-memory-limits-set", vm_memory_limits_set, ("static-min", "static-max", "dynamic-min",
                                                               "dynamic-max"), SELECT,
                "Configure the memory limits of a VM."),
        Command("vm-disk-add", vm_disk_add, ("disk-size", "device"), (*SELECT, "sr-uuid"),
                "Add a new disk to the selected VM(s)."),
        Command("vm-cd-insert", vm_cd_insert, ("cd-name",), SELECT, "Insert a CD into the VM's empty CD drive."),
        Command("vm-cd-eject", vm_cd_eject, (), SELECT, "Eject a CD from the VM's CD drive."),
        Command("vbd-create", vbd_create, ("vm-uuid", "device"), ("vdi-uuid", "bootable", "type", "mode",
                                                                   "unpluggable"),
                "Create a VBD; prints its uuid. Without vdi-uuid the VBD is empty (CD drives)."),
        Command("vbd-destroy", _on("VBD", "destroy"), ("uuid",), (), "Destroy a VBD."),
        Command("vbd-plug", _on("VBD", "plug"), ("uuid",), (),
                "Attempt to attach the VBD while the VM is in the running state."),
        Command("vbd-unplug", vbd_unplug, ("uuid",), ("timeout", "force"),
                "Attempt to detach the VBD while the VM is in the running state."),
        Command("vbd-eject", _on("VBD", "eject"), ("uuid",), (), "Remove the media from the drive."),
        Command("vif-create", vif_create, ("device", "network-uuid", "vm-uuid"), ("mac",),
                "Create a VIF; prints its uuid. An empty mac is generated from the VM's mac_seed."),
        Command("vif-destroy", _on("VIF", "destroy"), ("uuid",), (), "Destroy a VIF."),
        Command("vif-plug", _on("VIF", "plug"), ("uuid",), (),
                "Attempt to attach the VIF while the VM is in the running state."),
        Command("vif-unplug", _on("VIF", "unplug"), ("uuid",), ("force",),
                "Attempt to detach the VIF while the VM is in the running state."),
        Command("vtpm-create", vtpm_create, ("vm-uuid",), ("is-unique",), "Create a VTPM associated with a VM."),
        Command("vtpm-destroy", vtpm_destroy, ("uuid",), ("force",), "Destroy a VTPM"),
        Command("vlan-create", vlan_create, ("pif-uuid", "vlan", "network-uuid"), (),
                "Create a new VLAN on a host; prints the uuid of its PIF."),
        Command("vlan-destroy", _on("VLAN", "destroy"), ("uuid",), (), "Destroy a VLAN."),
    ]
