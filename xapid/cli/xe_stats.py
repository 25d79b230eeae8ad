"""xe's data source commands (cli_operations.ml ``host_data_source_*``, ``vm_data_source_*``).

``*-data-source-list`` prints one record per data source (name_label, name_description, enabled,
standard, min, max, units; floats as OCaml's ``string_of_float``), ``*-data-source-query`` the
newest value as ``%f``; ``-record`` and ``-forget`` print nothing.
"""

from __future__ import annotations

import math
from typing import Any

from . import xe_output as output
from .xe_commands import Args, Command, Context, Run, select_hosts, select_vms
from .xe_errors import failwith


def ocaml_float(x: float) -> str:
    """OCaml's ``string_of_float``: ``%.12g`` with a trailing ``.`` when it reads as an integer."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = "%.12g" % x
    return text if any(c in text for c in ".e") else text + "."


def _records(ctx: Context, sources: list[dict[str, Any]]) -> None:
    for ds in sources:
        ctx.out.write(output.record_text([
            ("name_label", str(ds["name_label"])), ("name_description", str(ds["name_description"])),
            ("enabled", "true" if ds["enabled"] else "false"), ("standard", "true" if ds["standard"] else "false"),
            ("min", ocaml_float(float(ds["min"]))), ("max", ocaml_float(float(ds["max"]))),
            ("units", str(ds["units"]))]))


def _one_host(ctx: Context, args: Args) -> str:
    hosts = select_hosts(ctx, args, ("data-source",))
    if not hosts:
        raise failwith("No matching hosts found")
    if len(hosts) > 1:
        raise failwith("Multiple matching hosts found. Operation can only be performed on one host at a time")
    return hosts[0]


def _one_vm(ctx: Context, args: Args) -> str:
    vms = select_vms(ctx, args, ("data-source",))
    if len(vms) > 1:
        raise failwith("Multiple matches VMs found. Operation can only be performed on one VM at a time")
    return vms[0]


def _op(cls: str, verb: str) -> Run:
    pick = _one_host if cls == "host" else _one_vm

    def run(ctx: Context, args: Args) -> None:
        ref = pick(ctx, args)
        if verb == "list":
            _records(ctx, ctx.rpc.call(f"{cls}.get_data_sources", ref))
            return
        name = args.require("data-source")
        if verb == "query":
            ctx.out.write("%f\n" % float(ctx.rpc.call(f"{cls}.query_data_source", ref, name)))
        elif verb == "record":
            ctx.rpc.call(f"{cls}.record_data_source", ref, name)
        else:
            ctx.rpc.call(f"{cls}.forget_data_source_archives", ref, name)

    return run


def data_source_commands() -> list[Command]:
    """host-data-source-{list,query,record,forget} and the vm- ones."""
    out = []
    for prefix, cls, selectors in (("host", "host", ("host", "uuid", "<field>=<value>")),
                                   ("vm", "VM", ("vm", "uuid", "<field>=<value>"))):
        what = "host" if cls == "host" else "VM"
        out += [
            Command(f"{prefix}-data-source-list", _op(cls, "list"), (), selectors,
                    f"List the data sources that can be recorded for a {what}."),
            Command(f"{prefix}-data-source-query", _op(cls, "query"), ("data-source",), selectors,
                    f"Query the last value read from a {what} data source."),
            Command(f"{prefix}-data-source-record", _op(cls, "record"), ("data-source",), selectors,
                    f"Record the specified data source for a {what}."),
            Command(f"{prefix}-data-source-forget", _op(cls, "forget"), ("data-source",), selectors,
                    f"Stop recording the specified data source for a {what}, and forget all of the recorded"
                    " data."),
        ]
    return out
