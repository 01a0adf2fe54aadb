"""`python -m services.dispatcher.reseal`: seals every stored sender secret again under the
current key (PREGONERO_SECRET_KEY_ID), so that an older key can leave the settings. Reads the
dispatcher's own settings. Safe beside running dispatchers and safe to run again: a row is
rewritten only while its ciphertext is still the one read, and only if it is not already
under the current key. Exits 1 when some secret opens with none of the configured keys (it
is named in the log; its key must stay, or the tenant re-enter the secret)."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, field

from services.runtime import db
from services.runtime.logs import log_fields, setup_logging

from .config import DispatcherSettings
from .crypto import SecretBox, SecretUnreadable
from .main import secret_box
from .repo import SenderQ, SendersRepo

log = logging.getLogger("pregonero.dispatcher.reseal")

PAGE = 200


@dataclass
class Resealed:
    resealed: int = 0
    unreadable: list[int] = field(default_factory=list)


async def reseal(repo: SendersRepo, box: SecretBox, *, page: int = PAGE) -> Resealed:
    done = Resealed()
    after_id = 0
    while rows := await repo.sealed_secrets(after_id=after_id, limit=page):
        for row in rows:
            sealed = bytes(row["secret_enc"])
            if box.is_current(sealed):
                continue
            try:
                plaintext = box.decrypt(sealed)
            except SecretUnreadable as exc:
                log.error("secret of sender %s does not decrypt: %s", row["id"], exc)
                done.unreadable.append(row["id"])
                continue
            if await repo.reseal_secret(sender_id=row["id"], sealed=sealed, resealed=box.encrypt(plaintext)):
                done.resealed += 1
        after_id = rows[-1]["id"]
    return done


async def reseal_stored(settings: DispatcherSettings) -> Resealed:
    """Every secret of the settings' database onto the settings' current key."""
    box = secret_box(settings)
    pool = await db.create_pool(settings.database_url, schema="dispatcher", max_size=1)
    try:
        await db.check_queries(pool, SenderQ)
        done = await reseal(SendersRepo(pool), box)
    finally:
        await pool.close()
    fields = log_fields(key_id=box.key_id, resealed=done.resealed, unreadable=len(done.unreadable))
    log.info("sender secrets resealed", extra=fields)
    return done


def main() -> int:
    settings = DispatcherSettings()
    setup_logging("dispatcher-reseal", settings.log_level)
    return 1 if asyncio.run(reseal_stored(settings)).unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
