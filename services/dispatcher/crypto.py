"""Sender secrets at rest, and the masked form that is all an API ever shows of a secret.

A secret is sealed with Fernet (AES-128-CBC + HMAC-SHA256) under a key derived with scrypt
from one of the operator's master keys, salted with that key's id, and stored as
`<key id>:<Fernet token>`. New secrets are sealed under the current key; a stored one opens
with the key its id names, so the master key can rotate while the secrets sealed before stay
readable for as long as the settings hold their key (DispatcherSettings; reseal.py moves
them onto the current one).

Values stored before key ids are a bare Fernet token (which never holds a ':') under the
SHA-256 of the master key; they open with each configured master key in turn."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MASK = "••••"
HINT_LENGTH = 4
# Below this length the last four characters would give away too much of the secret.
MIN_LENGTH_FOR_HINT = 8

KEY_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,32}$"
_KEY_ID = re.compile(KEY_ID_PATTERN)
_SEPARATOR = b":"
# The master key may be a passphrase, hence a memory-hard KDF: scrypt at its interactive
# cost (16 MiB, tens of milliseconds), paid once per configured key when the box is made.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SALT = b"pregonero/dispatcher/sender-secret/"


class SecretUnreadable(InvalidToken):
    """A stored secret that the configured keys do not open; the message says why."""


class UnknownKeyId(SecretUnreadable):
    """Sealed under a key id the settings no longer (or not yet) hold."""


def derive_key(master: str, key_id: str) -> bytes:
    """The Fernet key of one master key: scrypt, salted with the key's id."""
    kdf = Scrypt(salt=_SALT + key_id.encode(), length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return base64.urlsafe_b64encode(kdf.derive(master.encode()))


def _legacy_key(master: str) -> bytes:
    # How keys were derived before key ids; kept only to open what was sealed then.
    return base64.urlsafe_b64encode(hashlib.sha256(master.encode()).digest())


class SecretBox:
    """Seals under `key` (id `key_id`); opens under it and under `previous` ({id: master key})."""

    def __init__(self, key: str, *, key_id: str = "1", previous: Mapping[str, str] | None = None) -> None:
        previous = dict(previous or {})
        for kid in (key_id, *previous):
            if not _KEY_ID.match(kid):
                raise ValueError(f"secret key id {kid[:40]!r} must be 1 to 32 of A-Z a-z 0-9 _ . -")
        if previous.get(key_id, key) != key:
            raise ValueError(f"secret key id {key_id!r} names two different keys")
        masters = {**previous, key_id: key}
        self.key_id = key_id
        self._prefix = key_id.encode() + _SEPARATOR
        self._fernets = {kid: Fernet(derive_key(master, kid)) for kid, master in masters.items()}
        # The current key first: it is the one most old values were sealed under.
        self._legacy = [Fernet(_legacy_key(m)) for m in dict.fromkeys((key, *masters.values()))]

    def encrypt(self, plaintext: str) -> bytes:
        return self._prefix + self._fernets[self.key_id].encrypt(plaintext.encode())

    def decrypt(self, sealed: bytes) -> str:
        """Raises UnknownKeyId, or SecretUnreadable, when the configured keys do not open it."""
        data = bytes(sealed)
        kid_bytes, separator, token = data.partition(_SEPARATOR)
        if not separator:
            for legacy in self._legacy:
                try:
                    return legacy.decrypt(data).decode()
                except InvalidToken:
                    continue
            raise SecretUnreadable("sealed before key ids, under none of the configured secret keys")
        kid = kid_bytes.decode(errors="replace")
        fernet = self._fernets.get(kid)
        if fernet is None:
            raise UnknownKeyId(
                f"sealed under secret key id {kid[:40]!r}, which neither PREGONERO_SECRET_KEY_ID"
                " nor PREGONERO_PREVIOUS_SECRET_KEYS holds"
            )
        try:
            return fernet.decrypt(token).decode()
        except InvalidToken as exc:
            raise SecretUnreadable(f"does not open with the configured key of id {kid!r}") from exc

    def is_current(self, sealed: bytes) -> bool:
        """Sealed under the current key (reseal.py leaves it alone)."""
        return bytes(sealed).startswith(self._prefix)


def hint_of(secret: str) -> str:
    """The few trailing characters kept in clear beside the ciphertext, for masking."""
    return secret[-HINT_LENGTH:] if len(secret) >= MIN_LENGTH_FOR_HINT else ""


def masked(hint: str) -> str:
    return f"••••••{hint}" if hint else MASK


__all__ = ["InvalidToken", "SecretBox", "SecretUnreadable", "UnknownKeyId", "derive_key", "hint_of", "masked"]
