"""Sender secrets at rest: scrypt-derived keys with ids, rotation, the format from before key
ids, and unreadable secrets as a clear error rather than a crash."""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from services.dispatcher.config import DispatcherSettings
from services.dispatcher.crypto import SecretBox, SecretUnreadable, UnknownKeyId, derive_key
from services.dispatcher.senders import Senders

FIRST, SECOND = "first master key", "second master key"


def legacy_seal(master: str, plaintext: str) -> bytes:
    """What rows written before key ids hold."""
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(master.encode()).digest())).encrypt(plaintext.encode())


def test_a_rotation_keeps_old_secrets_readable_and_seals_new_ones_under_the_new_id() -> None:
    old = SecretBox(FIRST, key_id="1").encrypt("token-one")
    assert old.startswith(b"1:") and b"token-one" not in old

    rotated = SecretBox(SECOND, key_id="2", previous={"1": FIRST})
    assert rotated.decrypt(old) == "token-one"
    new = rotated.encrypt("token-two")
    assert new.startswith(b"2:") and rotated.decrypt(new) == "token-two"
    assert rotated.is_current(new) and not rotated.is_current(old)

    dropped = SecretBox(SECOND, key_id="2")
    assert dropped.decrypt(new) == "token-two"
    with pytest.raises(UnknownKeyId, match="key id '1'.*PREGONERO_PREVIOUS_SECRET_KEYS"):
        dropped.decrypt(old)


def test_secrets_sealed_before_key_ids_still_open() -> None:
    legacy = legacy_seal(FIRST, "legacy-secret")
    assert SecretBox(FIRST).decrypt(legacy) == "legacy-secret"
    # After a rotation the old master key opens them from the previous keys.
    assert SecretBox(SECOND, key_id="2", previous={"1": FIRST}).decrypt(legacy) == "legacy-secret"
    with pytest.raises(SecretUnreadable, match="before key ids"):
        SecretBox(SECOND, key_id="2").decrypt(legacy)


def test_the_key_is_derived_with_scrypt_per_key_id() -> None:
    legacy_key = base64.urlsafe_b64encode(hashlib.sha256(FIRST.encode()).digest())
    assert derive_key(FIRST, "1") not in (legacy_key, derive_key(FIRST, "2"), derive_key(SECOND, "1"))
    # The same master key under another id is another key: an id cannot be renamed silently.
    with pytest.raises(SecretUnreadable, match="configured key of id '1'"):
        SecretBox(SECOND, key_id="1").decrypt(SecretBox(FIRST, key_id="1").encrypt("x"))


def test_unknown_ids_and_tampering_are_clear_errors() -> None:
    box = SecretBox(FIRST)
    for sealed in (b"9:" + box.encrypt("x")[2:], b"\xff\xfe:garbage"):
        with pytest.raises(UnknownKeyId):
            box.decrypt(sealed)
    for sealed in (b"1:not-a-token", b"", b"garbage"):
        with pytest.raises(SecretUnreadable):
            box.decrypt(sealed)


def test_key_ids_are_checked_when_the_box_is_made() -> None:
    for bad in ("", "a:b", "x" * 33, "día"):
        with pytest.raises(ValueError, match="key id"):
            SecretBox(FIRST, key_id=bad)
    with pytest.raises(ValueError, match="two different keys"):
        SecretBox(SECOND, key_id="1", previous={"1": FIRST})
    assert SecretBox(FIRST, key_id="1", previous={"1": FIRST}).key_id == "1"


def test_an_unreadable_secret_leaves_its_sender_out_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    def row(sender_id: int, sealed: bytes) -> dict[str, Any]:
        return {
            "id": sender_id,
            "account_id": "acme",
            "provider": "simulated",
            "rate_per_minute": 60,
            "jitter_ms": 0,
            "concurrency": 1,
            "token": "t",
            "secret_enc": sealed,
            "phone": "",
            "provider_config": "{}",
            "version": 1,
        }

    box = SecretBox(SECOND, key_id="2")
    senders = Senders(repo=None, box=box)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="pregonero.dispatcher"):
        configs = senders.configs([row(1, box.encrypt("ok")), row(2, SecretBox(FIRST).encrypt("lost"))])  # type: ignore[list-item]
    assert list(configs) == [1] and configs[1].secret == "ok"
    assert "sender 2" in caplog.text and "key id '1'" in caplog.text


def settings(**kw: Any) -> DispatcherSettings:
    # A real NATS login, as production requires: what fails is the setting under test.
    return DispatcherSettings(database_url="postgresql://x/y", nats_url="nats://dispatcher:s3cret@nats:4222", **kw)


def test_previous_keys_are_a_json_object_of_ids() -> None:
    configured = settings(pregonero_secret_key_id="2", pregonero_previous_secret_keys='{"1": "an older key"}')
    assert configured.pregonero_secret_key_id == "2"
    assert configured.previous_secret_keys() == {"1": "an older key"}
    assert settings().previous_secret_keys() == {} and settings().pregonero_secret_key_id == "1"
    for bad in ('["an older key"]', "an older key", '{"1": 5}', '{"a:b": "k"}'):
        with pytest.raises(ValidationError) as info:
            settings(pregonero_previous_secret_keys=bad)
        assert "PREGONERO_PREVIOUS_SECRET_KEYS" in str(info.value) and "older key" not in str(info.value)
    with pytest.raises(ValidationError):
        settings(pregonero_secret_key_id="a:b")
    with pytest.raises(ValidationError, match="PREVIOUS_SECRET_KEYS"):
        settings(environment="production", pregonero_secret_key="k" * 40, pregonero_previous_secret_keys='{"1": ""}')
