"""Method resolution and the dispatch order of xapi (wire.md 4.3).

The method table is derived from the schema: generic messages for every
class (:mod:`xapid.generic`) plus the explicit messages the schema declares,
bound to the handlers of :mod:`xapid.api`.  :meth:`Dispatcher.dispatch` checks,
in xapi's order: name, parameter count, argument types, session, async
support, RBAC; then runs the implementation.  Every refusal is an
:class:`~xapid.errors.ApiError`.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xapid import generic
from xapid.api import Call, load_all
from xapid.errors import ApiError
from xapid.schema import ClassDef, Field, Param, Schema, Type
from xapid.wire import INT_TEXT, XDateTime, parse_double

if TYPE_CHECKING:
    from xapid.daemon import Daemon

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# What a host in emergency mode still answers (datamodel.ml emergency_calls; api_server.ml callback1).
EMERGENCY_CALLS = frozenset({
    "pool.emergency_reset_master", "pool.emergency_transition_to_master", "pool.ping_slave",
    "session.slave_local_login", "session.slave_local_login_with_password", "session.local_logout",
    "host.propose_new_master", "host.commit_new_master", "host.abort_new_master", "host.local_assert_healthy",
    "host.signal_networking_change", "host.local_management_reconfigure", "host.ha_xapi_healthcheck",
    "host.emergency_ha_disable", "host.management_disable", "host.get_system_status_capabilities",
    "host.is_in_emergency_mode", "host.shutdown_agent", "host.emergency_reset_server_certificate",
    "host.emergency_disable_tls_verification", "host.emergency_reenable_tls_verification",
    "host.emergency_clear_mandatory_guidance", "host.update_firewalld_service_status",
})
READ_ONLY_ROLES = ("pool-admin", "pool-operator", "vm-power-admin", "vm-admin", "vm-operator", "read-only")
WRITE_ROLES = ("pool-admin", "pool-operator")


@dataclass
class Method:
    """One served wire name."""

    name: str
    cls: str
    params: tuple[Param, ...]
    result: Type
    session: bool
    is_async: bool
    roles: tuple[str, ...]
    impl: Callable[..., Any] | None
    removed: bool = False

    @functools.cached_property
    def mandatory(self) -> int:
        """How many parameters have no default (counted once: ``params`` never changes)."""
        return sum(1 for p in self.params if not p.has_default)


@dataclass
class Reply:
    value: Any
    type: Type | None
    bare: bool = False  # system.listMethods: not wrapped in the envelope


class TypeMismatch(Exception):
    pass


def rpc_repr(v: Any) -> str:
    """The value as xapi's rpclib prints it in type errors (``I(42)``, ``S(x)``, ``[..]``)."""
    if isinstance(v, bool):
        return f"B({str(v).lower()})"
    if isinstance(v, int):
        return f"I({v})"
    if isinstance(v, float):
        return f"F({v})"
    if isinstance(v, str):
        return f"S({v})"
    if isinstance(v, XDateTime):
        return f"D({v.value})"
    if isinstance(v, list):
        return "[" + ", ".join(rpc_repr(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {rpc_repr(x)}" for k, x in v.items()) + "}"
    if v is None:
        return "N"
    return repr(v)


def valid_utf8(v: Any) -> bool:
    """False if any string in ``v`` cannot be encoded as UTF-8 (lone surrogates from JSON escapes)."""
    if isinstance(v, str):
        if v.isascii():  # the usual case, known without encoding
            return True
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, list):
        return all(valid_utf8(x) for x in v)
    if isinstance(v, dict):
        return all(valid_utf8(k) and valid_utf8(x) for k, x in v.items())
    return True


_DT = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})T(\d{2}):?(\d{2}):?(\d{2})(?:\.\d+)?(Z|[+-]\d{2}:?\d{2})?$")


def normalise_datetime(text: str) -> str:
    m = _DT.match(text.strip())
    if not m:
        raise TypeMismatch(f"Expected datetime, got '{rpc_repr(text)}'")
    y, mo, d, h, mi, s, zone = m.groups()
    zone = "Z" if zone in (None, "Z", "+00:00", "+0000", "-00:00") else zone
    return f"{y}{mo}{d}T{h}:{mi}:{s}{zone}"


class Coercer:
    """Unmarshal decoded wire values to declared types with xapi's leniencies (wire.md 2.3)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def __call__(self, value: Any, ty: Type) -> Any:
        try:
            return self._coerce(value, ty)
        except TypeMismatch as e:
            raise ApiError("INTERNAL_ERROR", f'(Failure "{e}")') from None

    def _coerce(self, v: Any, ty: Type) -> Any:
        k = ty.kind
        if k in ("string", "ref"):
            if isinstance(v, str):
                return v
            raise TypeMismatch(f"Expected string, got '{rpc_repr(v)}'")
        if k == "enum":
            if isinstance(v, str):
                canon = self.schema.enum_value(ty.name, v)
                if canon is not None:
                    return canon
                raise TypeMismatch(f"Unhandled pattern when unmarshalling variant type: found '{v}'")
            raise TypeMismatch(f"Expected string, got '{rpc_repr(v)}'")
        if k == "int":
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise TypeMismatch(f"Expected int, got '{rpc_repr(v)}'")
            if isinstance(v, str):
                if not INT_TEXT.match(v):  # ASCII digits only, as the XML-RPC <int> decoder
                    raise TypeMismatch(f"Expected int, got '{rpc_repr(v)}'")
                try:
                    v = int(v)
                except ValueError:  # more digits than Python converts: far outside int64 anyway
                    raise TypeMismatch(f"Expected int64, got '{rpc_repr(v)}'") from None
            if not INT64_MIN <= v <= INT64_MAX:
                raise TypeMismatch(f"Expected int64, got '{rpc_repr(v)}'")
            return v
        if k == "float":
            if isinstance(v, bool):
                raise TypeMismatch(f"Expected float, got '{rpc_repr(v)}'")
            try:
                if isinstance(v, str):
                    return parse_double(v)
                if isinstance(v, (int, float)):
                    return float(v)
            except (ValueError, OverflowError):  # OverflowError: an int beyond the double range
                pass
            raise TypeMismatch(f"Expected float, got '{rpc_repr(v)}'")
        if k == "bool":
            if isinstance(v, bool):
                return v
            raise TypeMismatch(f"Expected bool, got '{rpc_repr(v)}'")
        if k == "datetime":
            if isinstance(v, XDateTime):
                return normalise_datetime(v.value)
            if isinstance(v, str):
                return normalise_datetime(v)
            raise TypeMismatch(f"Expected datetime, got '{rpc_repr(v)}'")
        if k == "set":
            if not isinstance(v, list):
                raise TypeMismatch(f"Expected array, got '{rpc_repr(v)}'")
            assert ty.elem is not None
            return [self._coerce(x, ty.elem) for x in v]
        if k == "map":
            if not isinstance(v, dict):
                raise TypeMismatch(f"Expected struct, got '{rpc_repr(v)}'")
            assert ty.key is not None and ty.value is not None
            return {self._coerce(kk, ty.key): self._coerce(vv, ty.value) for kk, vv in v.items()}
        if k == "record":
            if not isinstance(v, dict):
                raise TypeMismatch(f"Expected struct, got '{rpc_repr(v)}'")
            return v
        return v


class Dispatcher:
    """The method table and the checks that run before a handler."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.schema = daemon.schema
        self.coerce = Coercer(self.schema)
        self.table: dict[str, Method] = {}
        self._build(load_all())
        self._alt = {name.replace(".", "_", 1): name for name in self.table}

    # -- building the table --------------------------------------------------------------------

    def _add(self, m: Method) -> None:
        self.table[m.name] = m

    def _build(self, handlers: dict[str, Callable[..., Any]]) -> None:
        for cdef in self.schema.classes.values():
            if cdef.in_db:
                self._generic(cdef)
            for msg in cdef.messages.values():
                name = f"{cdef.name}.{msg.name}"
                existing = self.table.get(name)
                # A generic implementation serves an explicit message of the same name only if it takes the
                # same parameters (host.set_power_on_mode has two, the generic setter one).
                same = existing is not None and len(existing.params) == len(msg.params)
                impl = existing.impl if existing is not None and same else None
                self._add(Method(
                    name=name, cls=cdef.name, params=msg.params, result=msg.result, session=msg.session,
                    is_async=msg.is_async, roles=msg.roles, impl=impl, removed=msg.lifecycle == "removed",
                ))
        for name, fn in handlers.items():
            if name not in self.table:
                raise RuntimeError(f"handler {name} has no message in the schema")
            self.table[name].impl = fn

    def _generic(self, c: ClassDef) -> None:
        ref_t = Type("ref", name=c.name)
        self_p = Param("self", ref_t)
        n = c.name

        def add(msg: str, params: tuple[Param, ...], result: Type, impl: Callable[..., Any],
                roles: tuple[str, ...] = READ_ONLY_ROLES, is_async: bool = False, removed: bool = False) -> None:
            roles = c.generic_roles.get(msg, roles)
            self._add(Method(f"{n}.{msg}", n, params, result, True, is_async, roles, impl, removed))

        rec_t = Type("record", name=n)
        add("get_record", (self_p,), rec_t, generic.get_record(c))
        add("get_by_uuid", (Param("uuid", Type("string")),), ref_t, generic.get_by_uuid(c))
        if c.has_name_label:
            add("get_by_name_label", (Param("label", Type("string")),), Type("set", elem=ref_t),
                generic.get_by_name_label(c))
        if c.get_all:
            all_t = Type("map", key=ref_t, value=rec_t)
            expr_p = (Param("expr", Type("string")),)
            add("get_all", (), Type("set", elem=ref_t), generic.get_all(c))
            add("get_all_records", (), all_t, generic.get_all_records(c))
            add("get_all_records_where", expr_p, all_t, generic.get_all_records_where(c))
            add("get_all_where", expr_p, Type("set", elem=ref_t), generic.get_all_where(c))
        for f in c.fields.values():
            add(f"get_{f.name}", (self_p,), f.type, generic.getter(c, f), removed=f.removed)
            for kind, msg in c.write_messages(f).items():
                params, impl = self._write_method(c, f, kind, self_p)
                add(msg, params, Type("void"), impl, roles=WRITE_ROLES)
        if c.constructor:
            add("create", (Param("args", rec_t),), ref_t, generic.create(c, self.coerce), roles=WRITE_ROLES,
                is_async=True)
            add("destroy", (self_p,), Type("void"), generic.destroy(c), roles=WRITE_ROLES, is_async=True)

    @staticmethod
    def _write_method(c: ClassDef, f: Field, kind: str, self_p: Param) -> tuple[tuple[Param, ...], Callable[..., Any]]:
        """Parameters and generic implementation of one write message of ``f``."""
        ty = f.type
        if kind == "setter":
            return (self_p, Param("value", ty)), generic.setter(c, f)
        if kind in ("map_add", "map_remove"):
            assert ty.key is not None and ty.value is not None
            if kind == "map_add":
                return (self_p, Param("key", ty.key), Param("value", ty.value)), generic.map_add(c, f)
            return (self_p, Param("key", ty.key)), generic.map_remove(c, f)
        assert ty.elem is not None
        if kind == "set_add":
            return (self_p, Param("value", ty.elem)), generic.set_add(c, f)
        return (self_p, Param("value", ty.elem)), generic.set_remove(c, f)

    # -- introspection -----------------------------------------------------------------------------

    def list_methods(self) -> list[str]:
        """Every wire name that has an implementation."""
        return sorted(n for n, m in self.table.items() if m.impl is not None or m.removed)

    def resolve(self, name: str) -> Method | None:
        m = self.table.get(name)
        if m is None and name in self._alt:
            m = self.table.get(self._alt[name])
        return m

    # -- dispatch ------------------------------------------------------------------------------------

    def dispatch(self, name: str, params: list[Any], local: bool = False, endpoint: str | None = None) -> Reply:
        """Run one call through xapi's check order; raise :class:`ApiError` on refusal.

        ``endpoint`` is the host whose own address received the call (None: the pool's address or
        the Unix socket, both the master's).  A host in emergency mode answers only the emergency
        calls there, with its emergency error to anything else.
        """
        if endpoint is not None and name not in EMERGENCY_CALLS:
            error = self.daemon.ha.emergency_error(endpoint)
            if error is not None:
                raise error
        for p in params:
            if not valid_utf8(p):
                raise ApiError("INVALID_VALUE", "Invalid UTF-8 string in parameter",
                               p if isinstance(p, str) else rpc_repr(p))
        if name == "system.listMethods":
            return Reply(self.list_methods(), Type("set", elem=Type("string")), bare=True)
        if name.startswith("system.isAlive:"):
            if not params:
                raise ApiError("INTERNAL_ERROR", '(Failure "hd")')
            return Reply(params[0], None)
        is_async = False
        base = name
        for prefix in ("Async.", "InternalAsync."):
            if name.startswith(prefix):
                is_async, base = True, name[len(prefix):]
        method = self.resolve(base)
        if method is None:
            if params:
                self.daemon.sessions.check(params[0], endpoint)
            raise ApiError("MESSAGE_METHOD_UNKNOWN", base)
        args = params[1:] if method.session else list(params)
        received = len(params) - (1 if method.session else 0)
        mandatory = method.mandatory
        has_defaults = mandatory < len(method.params)
        if (received != mandatory and not has_defaults) or received < mandatory:
            # xapi reports the mandatory count and the name as called (alias kept, Async. stripped).
            raise ApiError("MESSAGE_PARAMETER_COUNT_MISMATCH", base, mandatory, received)
        session = None
        if method.session:
            session = params[0]
            if not isinstance(session, str):
                raise ApiError("INTERNAL_ERROR", f'(Failure "Expected string, got \'{rpc_repr(session)}\'")')
        values = []
        for i, p in enumerate(() if method.removed else method.params):  # removed: only the session is read
            if i < len(args):
                values.append(self.coerce(args[i], p.type))
            else:
                values.append(copy.deepcopy(p.default))  # a handler may keep or change it
        if method.session:
            assert session is not None
            self.daemon.sessions.check(session, endpoint)
        if method.removed:
            raise ApiError("MESSAGE_REMOVED")
        if is_async and not method.is_async:
            raise ApiError("Fault", f"No async mode for this operation (rpc: {method.name})")
        call = Call(self.daemon, base, session, local=local, endpoint=endpoint)
        if is_async:
            task = self.daemon.tasks.start(call, method, values, name)
            return Reply(task, Type("ref", name="task"))
        return Reply(self.run(call, method, values), method.result)

    def run(self, call: Call, method: Method, values: list[Any]) -> Any:
        """RBAC then the implementation (the part an async call runs inside its task)."""
        if call.session is not None:
            self.daemon.sessions.authorise(call.session, method)
        if method.impl is None:
            raise ApiError("NOT_IMPLEMENTED", method.name)
        return method.impl(call, *values)
