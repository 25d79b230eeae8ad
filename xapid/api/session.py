"""session: login, logout and the session's own view of itself."""

from __future__ import annotations

from xapid.api import Call, handler
from xapid.errors import ApiError


@handler("session.login_with_password")
def login_with_password(call: Call, uname: str, pwd: str, version: str, originator: str) -> str:
    return call.daemon.sessions.login(uname, pwd, originator, local=call.local)


@handler("session.logout", "session.local_logout")
def logout(call: Call) -> None:
    assert call.session is not None
    call.daemon.sessions.logout(call.session)


@handler("session.change_password")
def change_password(call: Call, old_pwd: str, new_pwd: str) -> None:
    user = call.daemon.sessions.user(call.session)
    if call.daemon.users.check(user, old_pwd) is None:
        raise ApiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
    call.daemon.users.set_password(user, new_pwd)


@handler("session.get_all_subject_identifiers")
def get_all_subject_identifiers(call: Call) -> list[str]:
    return []
