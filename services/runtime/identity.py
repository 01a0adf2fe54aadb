"""Who is calling. The gateway authenticates and sets these gRPC metadata keys; every service
reads them and scopes every query by account (admins may cross accounts)."""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

from .errors import NotFound, Unauthenticated

ACCOUNT_KEY = "x-account-id"
USER_KEY = "x-user-id"
ROLE_KEY = "x-role"
# The IANA zone the caller's local dates and times are read in (a date sent without an
# offset); empty when the gateway could not tell, and then the account's zone applies.
TIMEZONE_KEY = "x-timezone"

ADMIN = "admin"
MEMBER = "member"
# The shape of every account id (the accounts service creates no other). Anything else names
# no account, and must not travel on: as gRPC metadata it could not even be sent (ASCII only).
ACCOUNT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_account_id(text: str) -> bool:
    return ACCOUNT_ID_RE.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Caller:
    role: str
    account_id: str = ""
    user_id: str = ""
    timezone: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = ((ROLE_KEY, self.role), (ACCOUNT_KEY, self.account_id), (USER_KEY, self.user_id))
        return (*md, (TIMEZONE_KEY, self.timezone)) if self.timezone else md

    def account_scope(self, requested: str = "") -> str:
        """The account a query runs against: a member only ever gets its own; an admin gets
        the one it names. Another tenant's resource is 'not found', never 'forbidden', so
        ids cannot be probed."""
        if self.is_admin:
            if requested and not is_account_id(requested):
                raise NotFound(f"account {requested[:64]} not found")
            return requested or self.account_id
        if requested and requested != self.account_id:
            raise NotFound(f"account {requested} not found")
        return self.account_id


caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def caller_from_metadata(metadata: dict[str, str]) -> Caller | None:
    role = metadata.get(ROLE_KEY, "")
    if role not in (ADMIN, MEMBER):
        return None
    account = metadata.get(ACCOUNT_KEY, "")
    if role == MEMBER and not account:
        return None
    return Caller(
        role=role, account_id=account, user_id=metadata.get(USER_KEY, ""), timezone=metadata.get(TIMEZONE_KEY, "")
    )


def current_caller() -> Caller:
    """The caller of the RPC being served; a call without identity is rejected."""
    caller = caller_var.get()
    if caller is None:
        raise Unauthenticated("call carries no caller identity")
    return caller
