"""The keyring (pgsched.crypto) and its setting: round trips, refusals, and bad PGSCHED_ENCRYPTION_KEYS."""

from __future__ import annotations

import base64

import pytest

from pgsched import ConfigError, Settings, load_settings
from pgsched.crypto import Keyring, generate_key, is_envelope, kid_of
from pgsched.errors import DecryptionError, MissingKeyError

pytestmark = pytest.mark.unit

KEY1 = "k1:" + base64.b64encode(bytes(range(32))).decode()
KEY2 = "k2:" + base64.b64encode(bytes(range(32, 64))).decode()


def test_json_and_text_round_trip_and_name_their_key() -> None:
    ring = Keyring.parse(KEY1)
    value = {"day": "2026-11-22", "nested": [1, "two", None]}
    envelope = ring.encrypt_json(value, "args")
    assert set(envelope) == {"pgsched_encrypted", "kid", "nonce", "data"} and envelope["kid"] == "k1"
    assert "2026-11-22" not in str(envelope)
    assert is_envelope(envelope) and kid_of(envelope) == "k1"
    assert ring.decrypt_json(envelope, "args") == value
    text = ring.encrypt_text("Traceback: the secret", "error")
    assert text.startswith("pgsched:enc:1:k1:") and "secret" not in text
    assert ring.decrypt_text(text, "error") == "Traceback: the secret"
    assert ring.decrypt("plain text of pgsched's own", "error") == "plain text of pgsched's own"
    assert ring.encrypt_json(value, "args") != envelope  # a fresh nonce each time


def test_the_first_key_encrypts_and_every_key_decrypts() -> None:
    old = Keyring.parse(KEY1)
    both = Keyring.parse(f"{KEY2}, {KEY1}")
    assert both.current == "k2" and both.kids == ["k2", "k1"]
    sealed = old.encrypt_json({"a": 1}, "args")
    assert both.decrypt_json(sealed, "args") == {"a": 1}
    rotated = both.reencrypt(sealed, "args")
    assert kid_of(rotated) == "k2" and both.decrypt_json(rotated, "args") == {"a": 1}
    assert both.reencrypt(rotated, "args") is rotated  # already under the current key


def test_a_missing_key_is_named() -> None:
    sealed = Keyring.parse(KEY2).encrypt_text("x", "error")
    with pytest.raises(MissingKeyError, match="encryption key 'k2' is not configured") as info:
        Keyring.parse(KEY1).decrypt_text(sealed, "error")
    assert info.value.kid == "k2"


def test_a_wrong_key_tampered_data_and_a_moved_envelope_are_refused() -> None:
    ring = Keyring.parse(KEY1)
    impostor = Keyring.parse("k1:" + base64.b64encode(bytes(32)).decode())  # same id, another key
    envelope = ring.encrypt_json({"amount": 10}, "result")
    with pytest.raises(DecryptionError, match="result: the encrypted value cannot be decrypted with key 'k1'"):
        impostor.decrypt_json(envelope, "result")
    data = bytearray(base64.b64decode(envelope["data"]))
    data[0] ^= 1
    with pytest.raises(DecryptionError):
        ring.decrypt_json({**envelope, "data": base64.b64encode(bytes(data)).decode()}, "result")
    with pytest.raises(DecryptionError, match=r"^args:"):
        ring.decrypt_json(envelope, "args")  # a result pasted into args
    with pytest.raises(DecryptionError):
        ring.decrypt_text(ring.encrypt_text("line", "message"), "error")
    with pytest.raises(DecryptionError):
        ring.decrypt_json({"pgsched_encrypted": 1, "kid": "k1", "nonce": "%%%", "data": ""}, "args")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("just-a-key", "entry 1 is not kid:base64-key"),
        (f"{KEY1},bad kid:AAAA", "entry 2 is not kid:base64-key"),
        ("k1:not base64!", "the key of 'k1' is not valid base64"),
        ("k1:" + base64.b64encode(b"0123456789abcdef").decode(), "the key of 'k1' is 16 bytes; AES-256 needs 32"),
        (f"{KEY1},{KEY1}", "key id 'k1' is given twice"),
    ],
)
def test_bad_settings_name_the_variable_and_never_echo_key_material(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"PGSCHED_ENCRYPTION_KEYS": value})
    message = str(info.value)
    assert message.startswith("--encryption-keys / PGSCHED_ENCRYPTION_KEYS: ") and expected in message
    for part in value.replace(",", ":").split(":"):
        if len(part) > 8:  # key material (and whole entries) never appear
            assert part not in message


def test_settings_hide_the_keys_and_generate_makes_a_valid_entry() -> None:
    settings = load_settings(environ={"PGSCHED_ENCRYPTION_KEYS": KEY1})
    assert settings.encryption_keys == KEY1
    assert KEY1.split(":")[1] not in repr(settings) and "encryption_keys='<hidden>'" in repr(settings)
    entry = generate_key("k2027")
    assert Keyring.parse(entry).current == "k2027"
    with pytest.raises(ConfigError, match="key id 'bad id'"):
        generate_key("bad id")
    assert repr(Settings()).startswith("Settings(dsn=None")
