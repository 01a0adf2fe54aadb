"""SQL of authentication: users, sessions and their refresh tokens, API keys, login attempts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

# Durations travel as whole seconds ($n::int * interval '1 second') so that every query
# prepares with plain parameter types.


class Q:
    ACCOUNT_EXISTS = "SELECT EXISTS (SELECT 1 FROM accounts WHERE account_id = $1)"

    # ON CONFLICT on the lower(email) index: replicas ensuring the same admin at start don't race.
    INSERT_USER = """
        INSERT INTO users (user_id, email, password_hash, role, account_id)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT ((lower(email))) DO NOTHING
        RETURNING *"""
    USER_BY_EMAIL = "SELECT * FROM users WHERE lower(email) = lower($1)"
    USER_BY_ID = "SELECT * FROM users WHERE user_id = $1"
    SET_PASSWORD_HASH = "UPDATE users SET password_hash = $2, updated_at = now() WHERE user_id = $1"
    # The user with the zone its dates are read in: its own, else its account's (an admin's:
    # the default account's, $2), else Chile's.
    USER_PROFILE = """
        SELECT u.*, COALESCE(NULLIF(u.timezone, ''), a.timezone, 'America/Santiago') AS effective_timezone
        FROM users u LEFT JOIN accounts a ON a.account_id = COALESCE(u.account_id, $2)
        WHERE u.user_id = $1"""
    SET_TIMEZONE = "UPDATE users SET timezone = $2, updated_at = now() WHERE user_id = $1 RETURNING user_id"
    ACCOUNT_TIMEZONE = "SELECT timezone FROM accounts WHERE account_id = $1"

    INSERT_SESSION = """
        INSERT INTO sessions (session_id, user_id, client_ip, expires_at)
        VALUES ($1, $2, $3, now() + $4::int * interval '1 second')"""
    # A session with what a new access token needs from its user.
    SESSION = """
        SELECT s.session_id, s.user_id, s.expires_at, s.revoked_at,
               u.email, u.role, u.account_id, u.is_active, u.created_at
        FROM sessions s JOIN users u USING (user_id)
        WHERE s.session_id = $1"""
    # Live while neither the session nor its user has been switched off.
    SESSION_ACTIVE = """
        SELECT EXISTS (
            SELECT 1 FROM sessions s JOIN users u USING (user_id)
            WHERE s.session_id = $1 AND s.revoked_at IS NULL AND s.expires_at > now() AND u.is_active)"""
    # As SESSION_ACTIVE, with the user's effective zone (see USER_PROFILE); no row when not live.
    SESSION_TIMEZONE = """
        SELECT COALESCE(NULLIF(u.timezone, ''), a.timezone, 'America/Santiago')
        FROM sessions s JOIN users u USING (user_id)
        LEFT JOIN accounts a ON a.account_id = COALESCE(u.account_id, $2)
        WHERE s.session_id = $1 AND s.revoked_at IS NULL AND s.expires_at > now() AND u.is_active"""
    EXTEND_SESSION = """
        UPDATE sessions SET expires_at = now() + $2::int * interval '1 second'
        WHERE session_id = $1 AND revoked_at IS NULL"""
    REVOKE_SESSION = """
        UPDATE sessions SET revoked_at = now(), revoke_reason = $2
        WHERE session_id = $1 AND revoked_at IS NULL
        RETURNING session_id"""

    INSERT_REFRESH_TOKEN = """
        INSERT INTO refresh_tokens (token_hash, session_id, expires_at)
        VALUES ($1, $2, now() + $3::int * interval '1 second')"""
    # Spends a token: of two concurrent uses only one gets the row back.
    USE_REFRESH_TOKEN = """
        UPDATE refresh_tokens SET used_at = now()
        WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
        RETURNING session_id"""
    REFRESH_TOKEN = "SELECT session_id, used_at, expires_at FROM refresh_tokens WHERE token_hash = $1"

    # Serialises the attempts of one address, so concurrent guesses cannot overrun the limit.
    LOCK_LOGIN_ADDRESS = "SELECT pg_advisory_xact_lock(hashtextextended('pregonero.login:' || $1, 0))"
    # The newest $3 failures of the address inside the window; the oldest of them decides
    # when the next attempt is allowed.
    RECENT_FAILURES = """
        SELECT count(*)::int AS failures,
               coalesce(ceil(extract(epoch FROM min(attempted_at) + $2::int * interval '1 second' - now())), 0)::int
                   AS retry_after
        FROM (SELECT attempted_at FROM login_attempts
              WHERE client_ip = $1 AND NOT succeeded AND attempted_at > now() - $2::int * interval '1 second'
              ORDER BY attempted_at DESC
              LIMIT $3) recent"""
    # Serialises the attempts on one e-mail (from any address), likewise; taken after the
    # address's lock, always in that order.
    LOCK_LOGIN_EMAIL = "SELECT pg_advisory_xact_lock(hashtextextended('pregonero.login.email:' || lower($1), 0))"
    # The newest $3 failures on one e-mail inside the window, however it is capitalised and
    # whether or not a user has it, since its last successful login: a success resets the
    # e-mail's count but not the addresses' (a user logging in must not hand a guesser's
    # address its attempts back).
    RECENT_EMAIL_FAILURES = """
        SELECT count(*)::int AS failures,
               coalesce(ceil(extract(epoch FROM min(attempted_at) + $2::int * interval '1 second' - now())), 0)::int
                   AS retry_after
        FROM (SELECT attempted_at FROM login_attempts
              WHERE lower(email) = lower($1) AND NOT succeeded
                AND attempted_at > now() - $2::int * interval '1 second'
                AND attempt_id > coalesce((SELECT max(attempt_id) FROM login_attempts
                                           WHERE lower(email) = lower($1) AND succeeded
                                             AND attempted_at > now() - $2::int * interval '1 second'), 0)
              ORDER BY attempted_at DESC
              LIMIT $3) recent"""
    INSERT_LOGIN_ATTEMPT = "INSERT INTO login_attempts (client_ip, email) VALUES ($1, $2) RETURNING attempt_id"
    LOGIN_SUCCEEDED = "UPDATE login_attempts SET succeeded = true WHERE attempt_id = $1"

    INSERT_API_KEY = """
        INSERT INTO api_keys (key_id, account_id, name, key_hash, prefix, last4, created_by)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        RETURNING *"""
    # An empty account id lists every account's keys (admins).
    LIST_API_KEYS = """
        SELECT * FROM api_keys
        WHERE ($1 = '' OR account_id = $1) AND ($2 OR revoked_at IS NULL)
        ORDER BY created_at DESC, key_id
        LIMIT $3"""
    API_KEY = "SELECT * FROM api_keys WHERE key_id = $1"
    REVOKE_API_KEY = "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 RETURNING *"
    # Looks a live key up and stamps its use in one statement (the gateway caches the answer
    # for seconds, so this runs a few times a minute per key at most).
    USE_API_KEY = """
        UPDATE api_keys SET last_used_at = now()
        WHERE key_hash = $1 AND revoked_at IS NULL
        RETURNING *"""

    PURGE_LOGIN_ATTEMPTS = "DELETE FROM login_attempts WHERE attempted_at < now() - $1::int * interval '1 second'"
    # Their refresh tokens go with them (ON DELETE CASCADE); access tokens expired long before.
    PURGE_SESSIONS = "DELETE FROM sessions WHERE expires_at < now() - interval '1 day'"


class AuthRepo:
    """Over the pool, or over one connection inside `transaction()`."""

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        self.db = db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AuthRepo]:
        if isinstance(self.db, asyncpg.Pool):
            async with self.db.acquire() as conn, conn.transaction():
                yield AuthRepo(conn)
        else:
            async with self.db.transaction():
                yield self

    async def account_exists(self, *, account_id: str) -> bool:
        return bool(await self.db.fetchval(Q.ACCOUNT_EXISTS, account_id))

    async def insert_user(
        self, *, user_id: str, email: str, password_hash: str, role: str, account_id: str | None
    ) -> asyncpg.Record | None:
        """The new row, or None when the e-mail is taken."""
        return await self.db.fetchrow(Q.INSERT_USER, user_id, email, password_hash, role, account_id)

    async def user_by_email(self, *, email: str) -> asyncpg.Record | None:
        return await self.db.fetchrow(Q.USER_BY_EMAIL, email)

    async def user_by_id(self, *, user_id: str) -> asyncpg.Record | None:
        return await self.db.fetchrow(Q.USER_BY_ID, user_id)

    async def user_profile(self, *, user_id: str, default_account: str) -> asyncpg.Record | None:
        return await self.db.fetchrow(Q.USER_PROFILE, user_id, default_account)

    async def set_timezone(self, *, user_id: str, timezone: str) -> bool:
        return await self.db.fetchval(Q.SET_TIMEZONE, user_id, timezone) is not None

    async def account_timezone(self, *, account_id: str) -> str | None:
        return await self.db.fetchval(Q.ACCOUNT_TIMEZONE, account_id)

    async def set_password_hash(self, *, user_id: str, password_hash: str) -> None:
        await self.db.execute(Q.SET_PASSWORD_HASH, user_id, password_hash)

    async def insert_session(self, *, session_id: str, user_id: str, client_ip: str, ttl_seconds: int) -> None:
        await self.db.execute(Q.INSERT_SESSION, session_id, user_id, client_ip, ttl_seconds)

    async def session(self, *, session_id: str) -> asyncpg.Record | None:
        return await self.db.fetchrow(Q.SESSION, session_id)

    async def session_active(self, *, session_id: str) -> bool:
        return bool(await self.db.fetchval(Q.SESSION_ACTIVE, session_id))

    async def session_timezone(self, *, session_id: str, default_account: str) -> str | None:
        """The effective zone of a live session's user; None when the session is not live."""
        return await self.db.fetchval(Q.SESSION_TIMEZONE, session_id, default_account)

    async def extend_session(self, *, session_id: str, ttl_seconds: int) -> None:
        await self.db.execute(Q.EXTEND_SESSION, session_id, ttl_seconds)

    async def revoke_session(self, *, session_id: str, reason: str) -> bool:
        """True when this call revoked it, False when it already was (or does not exist)."""
        return await self.db.fetchval(Q.REVOKE_SESSION, session_id, reason) is not None

    async def insert_refresh_token(self, *, token_hash: bytes, session_id: str, ttl_seconds: int) -> None:
        await self.db.execute(Q.INSERT_REFRESH_TOKEN, token_hash, session_id, ttl_seconds)

    async def use_refresh_token(self, *, token_hash: bytes) -> str | None:
        """The session of an unspent, unexpired token, which is now spent; else None."""
        return await self.db.fetchval(Q.USE_REFRESH_TOKEN, token_hash)

    async def refresh_token(self, *, token_hash: bytes) -> asyncpg.Record | None:
        return await self.db.fetchrow(Q.REFRESH_TOKEN, token_hash)

    async def lock_login_address(self, *, client_ip: str) -> None:
        """Held until the enclosing transaction ends."""
        await self.db.execute(Q.LOCK_LOGIN_ADDRESS, client_ip)

    async def recent_failures(self, *, client_ip: str, window_seconds: int, limit: int) -> tuple[int, int]:
        """(failures in the window, capped at limit; seconds until the oldest of them leaves it)."""
        row = await self.db.fetchrow(Q.RECENT_FAILURES, client_ip, window_seconds, limit)
        assert row is not None
        return row["failures"], row["retry_after"]

    async def lock_login_email(self, *, email: str) -> None:
        """Held until the enclosing transaction ends; take it after the address's."""
        await self.db.execute(Q.LOCK_LOGIN_EMAIL, email)

    async def recent_email_failures(self, *, email: str, window_seconds: int, limit: int) -> tuple[int, int]:
        """As `recent_failures`, for an e-mail and since its last successful login."""
        row = await self.db.fetchrow(Q.RECENT_EMAIL_FAILURES, email, window_seconds, limit)
        assert row is not None
        return row["failures"], row["retry_after"]

    async def insert_login_attempt(self, *, client_ip: str, email: str) -> int:
        return int(await self.db.fetchval(Q.INSERT_LOGIN_ATTEMPT, client_ip, email))

    async def login_succeeded(self, *, attempt_id: int) -> None:
        await self.db.execute(Q.LOGIN_SUCCEEDED, attempt_id)

    async def insert_api_key(
        self,
        *,
        key_id: str,
        account_id: str,
        name: str,
        key_hash: bytes,
        prefix: str,
        last4: str,
        created_by: str,
    ) -> asyncpg.Record:
        row = await self.db.fetchrow(Q.INSERT_API_KEY, key_id, account_id, name, key_hash, prefix, last4, created_by)
        assert row is not None
        return row

    async def list_api_keys(self, *, account_id: str, include_revoked: bool, limit: int) -> list[asyncpg.Record]:
        return await self.db.fetch(Q.LIST_API_KEYS, account_id, include_revoked, limit)

    async def api_key(self, *, key_id: str) -> asyncpg.Record | None:
        return await self.db.fetchrow(Q.API_KEY, key_id)

    async def revoke_api_key(self, *, key_id: str) -> asyncpg.Record | None:
        return await self.db.fetchrow(Q.REVOKE_API_KEY, key_id)

    async def use_api_key(self, *, key_hash: bytes) -> asyncpg.Record | None:
        return await self.db.fetchrow(Q.USE_API_KEY, key_hash)

    async def purge(self, *, login_window_seconds: int) -> None:
        await self.db.execute(Q.PURGE_LOGIN_ATTEMPTS, login_window_seconds)
        await self.db.execute(Q.PURGE_SESSIONS)
