"""Sender secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256) under a key from settings, and
the masked form that is all an API ever shows of a secret."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

MASK = "••••"
HINT_LENGTH = 4
# Below this length the last four characters would give away too much of the secret.
MIN_LENGTH_FOR_HINT = 8


class SecretBox:
    def __init__(self, key: str) -> None:
        # SHA-256 → 32 bytes → urlsafe base64 is exactly Fernet's key format, so operators
        # may set any string (a passphrase or a generated key) as PREGONERO_SECRET_KEY.
        self._fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        """Raises cryptography.fernet.InvalidToken when the key is not the one it was sealed with."""
        return self._fernet.decrypt(bytes(token)).decode()


def hint_of(secret: str) -> str:
    """The few trailing characters kept in clear beside the ciphertext, for masking."""
    return secret[-HINT_LENGTH:] if len(secret) >= MIN_LENGTH_FOR_HINT else ""


def masked(hint: str) -> str:
    return f"••••••{hint}" if hint else MASK


__all__ = ["InvalidToken", "SecretBox", "hint_of", "masked"]
