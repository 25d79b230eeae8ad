"""session: login, logout and the session's own view of itself."""

from __future__ import annotations

from xapid.api import Call, handler
from xapid.errors import ApiError


def host_is_slave(call: Call) -> ApiError:
    """What a slave answers a client that should talk to the master (names the master's address)."""
    return ApiError("HOST_IS_SLAVE", call.daemon.master_address(call.host))


@handler("session.login_with_password")
def login_with_password(call: Call, uname: str, pwd: str, version: str, originator: str) -> str:
    """A pool session, on the master only: a slave answers ``HOST_IS_SLAVE`` before checking the
    password (xapi_session.ml login_with_password); the Unix socket is the master's and pre-authenticated."""
    if not call.local and not call.on_master:
        raise host_is_slave(call)
    return call.daemon.sessions.login(uname, pwd, originator, local=call.local)


@handler("session.slave_local_login_with_password")
def slave_local_login_with_password(call: Call, uname: str, pwd: str) -> str:
    """A session of the receiving host's xapi alone, on any host (for the emergency calls):
    not in the pool database, good only on that host's own address (xapi_local_session.ml)."""
    return call.daemon.sessions.local_login(uname, pwd, call.host, local=call.local)


@handler("session.slave_local_login")
def slave_local_login(call: Call, psecret: str) -> str:
    """A local session of the receiving host's xapi for whoever holds the pool secret (the host's
    ``ptoken`` file; xapi_session.ml slave_local_login): how the host's own software (xhad's xapi
    health check) logs in at the host's address."""
    if not call.daemon.hw.toolstack.check_secret(psecret):
        raise ApiError("SESSION_AUTHENTICATION_FAILED", "", "Authentication failure")
    return call.daemon.sessions.local_login("root", "", call.host, local=True)


@handler("session.logout", "session.local_logout")
def logout(call: Call) -> None:
    assert call.session is not None
    call.daemon.sessions.logout(call.session)


@handler("session.get_this_host")
def get_this_host(call: Call, self: str) -> str:
    """The host whose address the session was made through (a local session: its own host)."""
    holder = call.daemon.sessions.local_host(self)
    if holder is not None:
        return holder
    rec = call.store.get("session", self)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "session", self)
    return str(rec["this_host"])


@handler("session.change_password")
def change_password(call: Call, old_pwd: str, new_pwd: str) -> None:
    user = call.daemon.sessions.user(call.session)
    if call.daemon.users.check(user, old_pwd) is None:
        raise ApiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
    call.daemon.users.set_password(user, new_pwd)


@handler("session.get_all_subject_identifiers")
def get_all_subject_identifiers(call: Call) -> list[str]:
    return []
