"""SQL of the dispatcher service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from services.runtime.db import planned_each_time

# What a sender is read as everywhere but where it is sent through (see SenderQ).
SENDER = """id, account_id, channel, provider, device_name, token, secret_hint, status, is_receiver, phone,
    rate_per_minute, jitter_ms, concurrency, provider_config, created_at, updated_at, connection,
    connection_reason, quota_left, connection_checked_at, daily_limit, session,
    sender_sent_today(id, provider_config) AS sent_today"""


class SenderQ:
    # Every query but LOAD_FOR_DISPATCH leaves secret_enc out: the ciphertext is read only
    # where it is decrypted to send.
    INSERT_SENDER = f"""
        INSERT INTO senders (account_id, channel, provider, device_name, token, secret_enc, secret_hint,
                             is_receiver, phone, rate_per_minute, jitter_ms, concurrency, provider_config, status,
                             daily_limit)
        VALUES ($1, $2, $3,
                -- Unnamed devices become "Device <n>"; counting deleted ones too keeps n from
                -- repeating a name still shown on past attempts.
                COALESCE(NULLIF($4, ''), 'Device ' || (SELECT count(*) + 1 FROM senders WHERE account_id = $1)),
                $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, $14, $15)
        RETURNING {SENDER}"""
    GET_SENDER = f"""
        SELECT {SENDER}
        FROM senders
        WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL"""
    # Row lock for read-merge-write updates: a concurrent patch of the provider cannot slip
    # between validating a provider_config and writing it.
    GET_SENDER_FOR_UPDATE = f"""
        SELECT {SENDER}
        FROM senders
        WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL
        FOR UPDATE"""
    # An empty channel means every channel.
    LIST_SENDERS = f"""
        SELECT {SENDER}
        FROM senders
        WHERE account_id = $1 AND ($2 = '' OR channel = $2) AND deleted_at IS NULL
        ORDER BY id"""
    LIST_ACTIVE = f"""
        SELECT {SENDER}
        FROM senders
        WHERE account_id = $1 AND ($2 = '' OR channel = $2) AND status = 'active' AND deleted_at IS NULL
        ORDER BY id"""
    # The live senders behind a business number ($3 '' = every account's): an inbound webhook
    # names the number, not the account. An account has a handful of senders, so the
    # provider's senders are read whole rather than indexed on their config.
    BY_NUMBER = f"""
        SELECT {SENDER}
        FROM senders
        WHERE provider = $1 AND provider_config->>'phone_number_id' = $2 AND ($3 = '' OR account_id = $3)
          AND deleted_at IS NULL
        ORDER BY id LIMIT 100"""
    # A NULL secret keeps the stored one (and its hint).
    UPDATE_SENDER = f"""
        UPDATE senders
        SET provider = $3, device_name = $4, token = $5,
            secret_enc = COALESCE($6, secret_enc), secret_hint = COALESCE($7, secret_hint),
            status = $8, is_receiver = $9, phone = $10, rate_per_minute = $11, jitter_ms = $12,
            concurrency = $13, provider_config = $14::jsonb, daily_limit = $15, updated_at = now(),
            version = version + 1
        WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL
        RETURNING {SENDER}"""
    # Marking a receiver serialises on its account for the rest of the transaction: two
    # concurrent marks then run one after the other, and the second unmarks the first instead
    # of failing on senders_one_receiver. Taken before any row lock, so it cannot deadlock.
    LOCK_RECEIVER = """
        SELECT pg_advisory_xact_lock(hashtextextended('pregonero.senders.receiver:' || $1, 0))"""
    # The receiver mark is not a sending setting, so the version stays: claims go on.
    UNMARK_RECEIVERS = """
        UPDATE senders SET is_receiver = false, updated_at = now()
        WHERE account_id = $1 AND channel = $2 AND is_receiver AND deleted_at IS NULL AND id <> $3"""
    SOFT_DELETE_SENDER = """
        UPDATE senders SET deleted_at = now(), updated_at = now(), version = version + 1
        WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL
        RETURNING id, account_id, channel, status, provider"""
    # What a provider says of a device (connections.record), with the connection it had:
    # news is only a change. A report without a quota (-1, a session webhook) keeps the last one.
    RECORD_STATE = """
        UPDATE senders AS s
        SET connection = $2, connection_reason = $3,
            quota_left = CASE WHEN $4::bigint >= 0 THEN $4::bigint ELSE s.quota_left END,
            connection_checked_at = now()
        FROM (SELECT id, connection FROM senders WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE) AS before
        WHERE s.id = before.id
        RETURNING s.id, s.account_id, s.channel, s.status, before.connection AS previous"""
    # The devices whose connection is due to be asked about, oldest check first, taken by one
    # replica at a time: marking them checked now is what keeps another replica from asking
    # too (a row a claim holds is skipped, and asked in a later round). Each is due somewhere
    # in the last fifth of its period, so devices first asked together drift apart.
    POLL_DUE = """
        UPDATE senders AS s SET connection_checked_at = now()
        FROM (SELECT id FROM senders
              WHERE provider = ANY($1::text[]) AND status = 'active' AND deleted_at IS NULL
                AND (connection_checked_at IS NULL
                     OR connection_checked_at < now() - make_interval(secs => $2 * (0.8 + 0.2 * random())))
              ORDER BY connection_checked_at NULLS FIRST, id
              LIMIT $3
              FOR NO KEY UPDATE SKIP LOCKED) AS due
        WHERE s.id = due.id
        RETURNING s.id, s.account_id, s.provider, s.token, s.secret_enc, s.phone, s.rate_per_minute, s.jitter_ms,
                  s.concurrency, s.provider_config, s.version"""
    # A provider's webhook names the device by its session at the provider (unique: migration 007).
    BY_SESSION = """
        SELECT id FROM senders WHERE provider = $1 AND session = $2 AND session <> '' AND deleted_at IS NULL"""
    SET_SESSION = """
        UPDATE senders SET session = $3, updated_at = now()
        WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL
        RETURNING id"""
    # The active devices that cannot take work now: not linked, or their local day's cap is used.
    UNAVAILABLE = """
        SELECT id, connection, connection_reason,
               daily_limit > 0 AND sender_sent_today(id, provider_config) >= daily_limit AS capped
        FROM senders
        WHERE status = 'active' AND deleted_at IS NULL AND channel = 'whatsapp'
          AND (connection IN ('disconnected', 'qr_needed')
               OR (daily_limit > 0 AND sender_sent_today(id, provider_config) >= daily_limit))"""
    # Internal, not account-scoped: the dispatch engine resolves senders named in its work.
    LOAD_FOR_DISPATCH = """
        SELECT id, account_id, provider, token, secret_enc, phone, rate_per_minute, jitter_ms, concurrency,
               provider_config, version
        FROM senders
        WHERE id = ANY($1::bigint[]) AND status = 'active' AND deleted_at IS NULL"""
    # reseal.py: every stored secret, deleted senders' too, in keyset pages.
    SEALED_SECRETS = """
        SELECT id, secret_enc FROM senders WHERE id > $1 AND secret_enc IS NOT NULL ORDER BY id LIMIT $2"""
    # Only while the ciphertext is the one read: a secret re-entered meanwhile stays as entered.
    # The version stays too: the secret itself is unchanged.
    RESEAL_SECRET = """
        UPDATE senders SET secret_enc = $3 WHERE id = $1 AND secret_enc = $2 RETURNING id"""


class SendersRepo:
    """Sender rows. Works on the pool, or on one connection inside `transaction()`."""

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        self.db = db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SendersRepo]:
        if isinstance(self.db, asyncpg.Pool):
            async with self.db.acquire() as conn, conn.transaction():
                yield SendersRepo(conn)
        else:
            async with self.db.transaction():
                yield self

    async def insert(
        self,
        *,
        account_id: str,
        channel: str,
        provider: str,
        device_name: str,
        token: str,
        secret_enc: bytes | None,
        secret_hint: str,
        is_receiver: bool,
        phone: str,
        rate_per_minute: int,
        jitter_ms: int,
        concurrency: int,
        provider_config_json: str,
        status: str,
        daily_limit: int = 0,
    ) -> asyncpg.Record:
        """An empty device_name gets the next "Device <n>" of the account."""
        row = await self.db.fetchrow(
            SenderQ.INSERT_SENDER,
            account_id,
            channel,
            provider,
            device_name,
            token,
            secret_enc,
            secret_hint,
            is_receiver,
            phone,
            rate_per_minute,
            jitter_ms,
            concurrency,
            provider_config_json,
            status,
            daily_limit,
        )
        assert row is not None
        return row

    async def get(self, *, sender_id: int, account_id: str, for_update: bool = False) -> asyncpg.Record | None:
        query = SenderQ.GET_SENDER_FOR_UPDATE if for_update else SenderQ.GET_SENDER
        return await self.db.fetchrow(query, sender_id, account_id)

    async def list_all(self, *, account_id: str, channel: str = "") -> list[asyncpg.Record]:
        return await self.db.fetch(SenderQ.LIST_SENDERS, account_id, channel)

    async def list_active(self, *, account_id: str, channel: str = "") -> list[asyncpg.Record]:
        return await self.db.fetch(SenderQ.LIST_ACTIVE, account_id, channel)

    async def by_number(self, *, provider: str, phone_number_id: str, scope: str) -> list[asyncpg.Record]:
        return await self.db.fetch(SenderQ.BY_NUMBER, provider, phone_number_id, scope)

    async def update(
        self,
        *,
        sender_id: int,
        account_id: str,
        provider: str,
        device_name: str,
        token: str,
        secret_enc: bytes | None,
        secret_hint: str | None,
        status: str,
        is_receiver: bool,
        phone: str,
        rate_per_minute: int,
        jitter_ms: int,
        concurrency: int,
        provider_config_json: str,
        daily_limit: int,
    ) -> asyncpg.Record | None:
        """Writes every mutable column; secret_enc/secret_hint None keep the stored secret."""
        return await self.db.fetchrow(
            SenderQ.UPDATE_SENDER,
            sender_id,
            account_id,
            provider,
            device_name,
            token,
            secret_enc,
            secret_hint,
            status,
            is_receiver,
            phone,
            rate_per_minute,
            jitter_ms,
            concurrency,
            provider_config_json,
            daily_limit,
        )

    async def lock_receiver(self, *, account_id: str) -> None:
        """Inside `transaction()`, before any row of the account is locked."""
        await self.db.execute(SenderQ.LOCK_RECEIVER, account_id)

    async def unmark_receivers(self, *, account_id: str, channel: str, keep_id: int = 0) -> None:
        """Inside `transaction()`, after lock_receiver: every other receiver of the account stops being one."""
        await self.db.execute(SenderQ.UNMARK_RECEIVERS, account_id, channel, keep_id)

    async def soft_delete(self, *, sender_id: int, account_id: str) -> asyncpg.Record | None:
        """The deleted sender's id, account, channel, status and provider; None when there was none."""
        return await self.db.fetchrow(SenderQ.SOFT_DELETE_SENDER, sender_id, account_id)

    async def load_for_dispatch(self, *, ids: Sequence[int]) -> list[asyncpg.Record]:
        return await self.db.fetch(SenderQ.LOAD_FOR_DISPATCH, list(ids))

    async def record_state(
        self, *, sender_id: int, connection: str, reason: str, quota_left: int
    ) -> asyncpg.Record | None:
        """The sender's id, account, channel, status and `previous` connection; None when deleted."""
        return await self.db.fetchrow(SenderQ.RECORD_STATE, sender_id, connection, reason, quota_left)

    async def poll_due(self, *, providers: Sequence[str], every_s: float, limit: int) -> list[asyncpg.Record]:
        """Rows with the LOAD_FOR_DISPATCH columns, now marked checked."""
        return await self.db.fetch(SenderQ.POLL_DUE, list(providers), every_s, limit)

    async def by_session(self, *, provider: str, session: str) -> int | None:
        return await self.db.fetchval(SenderQ.BY_SESSION, provider, session)

    async def set_session(self, *, sender_id: int, account_id: str, session: str) -> bool:
        return await self.db.fetchval(SenderQ.SET_SESSION, sender_id, account_id, session) is not None

    async def unavailable(self) -> list[asyncpg.Record]:
        return await self.db.fetch(SenderQ.UNAVAILABLE)

    async def sealed_secrets(self, *, after_id: int, limit: int) -> list[asyncpg.Record]:
        return await self.db.fetch(SenderQ.SEALED_SECRETS, after_id, limit)

    async def reseal_secret(self, *, sender_id: int, sealed: bytes, resealed: bytes) -> bool:
        return await self.db.fetchval(SenderQ.RESEAL_SECRET, sender_id, sealed, resealed) is not None


class AttemptQ:
    # Voice: a chunk's calls are all placed at once, so they are claimed together. DO NOTHING
    # on conflict: the ids returned are the attempts this delivery owns; the others were
    # recorded by an earlier delivery of the same chunk.
    CLAIM = """
        INSERT INTO attempts (attempt_id, batch_id, job_id, sender_id)
        SELECT a, $1::uuid, j, $4 FROM unnest($2::text[], $3::bigint[]) AS t(a, j)
        ON CONFLICT (attempt_id) DO NOTHING
        RETURNING attempt_id"""
    # Messages: each attempt is claimed just before its request goes out, through the sender
    # version it is sent with (the claims of one moment share this statement). FOR SHARE
    # makes an edit of the sender wait for claims in progress, and a claim that comes after
    # the edit see it: none is made through a sender that changed, was disabled or deleted.
    #
    # The claim commits asynchronously (set_config inside the statement sets it for its own
    # implicit transaction): a claim per send would otherwise wait for a WAL flush per send,
    # twice the database's cost at full speed. It is visible to every other session at once;
    # only a crash of the database itself can lose the last few hundred milliseconds of
    # claims, and the outcomes of those sends are still recorded by FINISH (an upsert).
    #
    # The daily cap (migration 007): a device takes only the claims that fit in what is left of
    # its local day's `daily_limit` (in the order asked), and the day's count moves by what was
    # claimed, one upsert per device and statement; the rest are refused like claims through
    # a changed sender. Counter rows are taken in sender order, so two statements cannot deadlock.
    CLAIM_SENDS = """
        WITH asked AS (
            SELECT t.a, t.b, t.j, t.s, t.v, row_number() OVER (PARTITION BY t.s ORDER BY t.n) AS place
            FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::bigint[], $5::bigint[])
                 WITH ORDINALITY AS t(a, b, j, s, v, n)
        ), claimed AS (
            INSERT INTO attempts (attempt_id, batch_id, job_id, sender_id)
            SELECT asked.a, asked.b, asked.j, asked.s
            FROM asked
            CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
            JOIN senders ON senders.id = asked.s AND senders.version = asked.v
                        AND senders.status = 'active' AND senders.deleted_at IS NULL
            LEFT JOIN sender_days AS today
                   ON today.sender_id = senders.id AND today.day = sender_day(senders.provider_config, now())
            WHERE senders.daily_limit = 0 OR coalesce(today.sent, 0) + asked.place <= senders.daily_limit
            FOR SHARE OF senders
            ON CONFLICT (attempt_id) DO NOTHING
            RETURNING attempt_id, sender_id
        ), counted AS (
            INSERT INTO sender_days AS d (sender_id, day, sent)
            SELECT claimed.sender_id, sender_day(senders.provider_config, now()), count(*)
            FROM claimed JOIN senders ON senders.id = claimed.sender_id
            GROUP BY claimed.sender_id, senders.provider_config
            ORDER BY claimed.sender_id
            ON CONFLICT (sender_id, day) DO UPDATE SET sent = d.sent + excluded.sent
        )
        SELECT attempt_id FROM claimed"""
    # A claim left by a send whose outcome is lost (its process died) that the provider says
    # it never got: given up, so the item is claimed afresh and sent. Only the same claim, and
    # only once it is older than any send can take (a send still under way keeps it).
    UNCLAIM = """
        DELETE FROM attempts
        WHERE attempt_id = $1 AND status = 'sending' AND created_at = $2
          AND created_at < now() - make_interval(secs => $3)"""
    # Claims taken ahead whose sends never started (the batch paused, the process stops, the
    # sender changed): given back at once, so the next copy of the work sends them without
    # waiting out the grace a claim of unknown fate gets.
    RELEASE = """
        DELETE FROM attempts WHERE attempt_id = ANY($1::text[]) AND status = 'sending'"""
    # Items that cannot be sent (no usable sender) end failed, on record; an id that another
    # copy of the work has claimed meanwhile is not returned, and its claim decides.
    RECORD_UNSENT = """
        INSERT INTO attempts (attempt_id, batch_id, job_id, sender_id, status, error, finished_at)
        SELECT a, $1::uuid, j, 0, 'failed', $4, now() FROM unnest($2::text[], $3::bigint[]) AS t(a, j)
        ON CONFLICT (attempt_id) DO NOTHING
        RETURNING attempt_id"""
    # age: seconds since the claim, by the database's clock (every replica reads the same one).
    EXISTING = """
        SELECT attempt_id, status, sender_id, provider_message_id, error, result, created_at,
               extract(epoch FROM now() - created_at)::float8 AS age
        FROM attempts
        WHERE attempt_id = ANY($1::text[])"""
    PLACED = """
        UPDATE attempts SET provider_message_id = $2 WHERE attempt_id = $1 AND status = 'sending'"""
    FINISH_CALL = """
        UPDATE attempts SET status = $2, provider_message_id = nullif($3, ''), error = nullif($4, ''),
               result = $5::jsonb, finished_at = now()
        WHERE attempt_id = $1"""
    # An upsert: a claim committed asynchronously (see CLAIM_SENDS) and lost in a database
    # crash still leaves its outcome on record here.
    FINISH = """
        INSERT INTO attempts AS a (attempt_id, batch_id, job_id, status, provider_message_id, error, sender_id,
                                   finished_at)
        SELECT r.attempt_id, $1::uuid, r.job_id, r.status, nullif(r.pmid, ''), nullif(r.error, ''), r.sender_id, now()
        FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[])
             AS r(attempt_id, job_id, status, pmid, error, sender_id)
        ON CONFLICT (attempt_id) DO UPDATE
        SET status = excluded.status, provider_message_id = excluded.provider_message_id,
            error = excluded.error, sender_id = excluded.sender_id, finished_at = excluded.finished_at"""


class AttemptsRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim(self, *, batch_id: str, items: Sequence[tuple[str, int]], sender_id: int) -> list[str]:
        rows = await self.pool.fetch(AttemptQ.CLAIM, batch_id, [a for a, _ in items], [j for _, j in items], sender_id)
        return [r["attempt_id"] for r in rows]

    async def claim_sends(self, *, rows: Sequence[tuple[str, str, int, int, int]]) -> set[str]:
        """rows: (attempt_id, batch_id, job_id, sender_id, sender_version); the ids claimed."""
        claimed = await self.pool.fetch(
            AttemptQ.CLAIM_SENDS,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [r[4] for r in rows],
        )
        return {r["attempt_id"] for r in claimed}

    async def unclaim(self, *, attempt_id: str, claimed_at: datetime, older_than_s: float) -> None:
        async with planned_each_time(self.pool) as conn:
            await conn.execute(AttemptQ.UNCLAIM, attempt_id, claimed_at, older_than_s)

    async def release(self, *, attempt_ids: Sequence[str]) -> None:
        async with planned_each_time(self.pool) as conn:
            await conn.execute(AttemptQ.RELEASE, list(attempt_ids))

    async def record_unsent(self, *, batch_id: str, items: Sequence[Any], error: str) -> set[str]:
        """items: work items (attempt_id, job_id); the ids recorded as failed."""
        rows = await self.pool.fetch(
            AttemptQ.RECORD_UNSENT, batch_id, [i.attempt_id for i in items], [i.job_id for i in items], error
        )
        return {r["attempt_id"] for r in rows}

    async def existing(self, *, attempt_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
        async with planned_each_time(self.pool) as conn:
            rows = await conn.fetch(AttemptQ.EXISTING, list(attempt_ids))
        return {r["attempt_id"]: r for r in rows}

    async def finish(self, *, batch_id: str, rows: Sequence[tuple[str, int, str, str, str, int]]) -> None:
        """rows: (attempt_id, job_id, status, provider_message_id, error, sender_id)."""
        columns: list[list[object]] = [[r[i] for r in rows] for i in range(6)]
        await self.pool.execute(AttemptQ.FINISH, batch_id, *columns)

    async def placed(self, attempt_id: str, call_id: str) -> None:
        """The provider accepted the call: its id, kept before the call ends."""
        await self.pool.execute(AttemptQ.PLACED, attempt_id, call_id)

    async def finish_call(self, *, attempt_id: str, status: str, call_id: str, error: str, result_json: str) -> None:
        await self.pool.execute(AttemptQ.FINISH_CALL, attempt_id, status, call_id, error, result_json)


class MessageQ:
    # ON CONFLICT: a send recorded twice (a retried write) keeps its first attempt.
    REMEMBER = """
        INSERT INTO provider_messages (provider, message_id, sender_id, attempt_id) VALUES ($1, $2, $3, $4)
        ON CONFLICT (provider, message_id) DO NOTHING"""
    # Scoped to the device the webhook named: another device's message id finds nothing.
    ATTEMPTS_OF = """
        SELECT message_id, attempt_id FROM provider_messages
        WHERE provider = $1 AND sender_id = $2 AND message_id = ANY($3::text[])"""


class ProviderMessagesRepo:
    """Provider message id → attempt, for providers whose delivery reports name only theirs."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def remember(self, *, provider: str, message_id: str, sender_id: int, attempt_id: str) -> None:
        await self.pool.execute(MessageQ.REMEMBER, provider, message_id, sender_id, attempt_id)

    async def attempts_of(self, *, provider: str, sender_id: int, message_ids: Sequence[str]) -> dict[str, str]:
        rows = await self.pool.fetch(MessageQ.ATTEMPTS_OF, provider, sender_id, list(message_ids))
        return {r["message_id"]: r["attempt_id"] for r in rows}
