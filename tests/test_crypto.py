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
S = ("charge_card", "payments")  # the (task, queue) of the job a payload belongs to


def test_json_and_text_round_trip_and_name_their_key() -> None:
    ring = Keyring.parse(KEY1)
    value = {"day": "2026-11-22", "nested": [1, "two", None]}
    envelope = ring.encrypt_json(value, "args", S)
    assert set(envelope) == {"pgsched_encrypted", "v", "kid", "nonce", "data"} and envelope["kid"] == "k1"
    assert envelope["v"] == 2
    assert "2026-11-22" not in str(envelope)
    assert is_envelope(envelope) and kid_of(envelope) == "k1"
    assert ring.decrypt_json(envelope, "args", S) == value
    text = ring.encrypt_text("Traceback: the secret", "error", S)
    assert text.startswith("pgsched:enc:2:k1:") and "secret" not in text
    assert ring.decrypt_text(text, "error", S) == "Traceback: the secret"
    assert ring.decrypt("plain text of pgsched's own", "error", S) == "plain text of pgsched's own"
    assert ring.encrypt_json(value, "args", S) != envelope  # a fresh nonce each time


def test_the_first_key_encrypts_and_every_key_decrypts() -> None:
    old = Keyring.parse(KEY1)
    both = Keyring.parse(f"{KEY2}, {KEY1}")
    assert both.current == "k2" and both.kids == ["k2", "k1"]
    sealed = old.encrypt_json({"a": 1}, "args", S)
    assert both.decrypt_json(sealed, "args", S) == {"a": 1}
    rotated = both.reencrypt(sealed, "args", S)
    assert kid_of(rotated) == "k2" and both.decrypt_json(rotated, "args", S) == {"a": 1}
    assert both.reencrypt(rotated, "args", S) is rotated  # already under the current key


def test_a_missing_key_is_named() -> None:
    sealed = Keyring.parse(KEY2).encrypt_text("x", "error", S)
    with pytest.raises(MissingKeyError, match="encryption key 'k2' is not configured") as info:
        Keyring.parse(KEY1).decrypt_text(sealed, "error", S)
    assert info.value.kid == "k2"


def test_a_wrong_key_tampered_data_and_a_moved_envelope_are_refused() -> None:
    ring = Keyring.parse(KEY1)
    impostor = Keyring.parse("k1:" + base64.b64encode(bytes(32)).decode())  # same id, another key
    envelope = ring.encrypt_json({"amount": 10}, "result", S)
    with pytest.raises(DecryptionError, match="result: the encrypted value cannot be decrypted with key 'k1'"):
        impostor.decrypt_json(envelope, "result", S)
    data = bytearray(base64.b64decode(envelope["data"]))
    data[0] ^= 1
    with pytest.raises(DecryptionError):
        ring.decrypt_json({**envelope, "data": base64.b64encode(bytes(data)).decode()}, "result", S)
    with pytest.raises(DecryptionError, match=r"^args:"):
        ring.decrypt_json(envelope, "args", S)  # a result pasted into args
    with pytest.raises(DecryptionError):
        ring.decrypt_text(ring.encrypt_text("line", "message", S), "error", S)
    with pytest.raises(DecryptionError):
        ring.decrypt_json({"pgsched_encrypted": 1, "kid": "k1", "nonce": "%%%", "data": ""}, "args", S)


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


def test_an_envelope_moved_to_a_job_of_another_task_or_queue_is_refused() -> None:
    ring = Keyring.parse(KEY1)
    envelope = ring.encrypt_json({"card": "4111"}, "args", ("charge_card", "payments"))
    text = ring.encrypt_text("card 4111", "message", ("charge_card", "payments"))
    for elsewhere in [("log_it", "payments"), ("charge_card", "default"), ("charge_card:payments", "")]:
        with pytest.raises(DecryptionError):
            ring.decrypt_json(envelope, "args", elsewhere)
        with pytest.raises(DecryptionError):
            ring.decrypt_text(text, "message", elsewhere)
    assert ring.decrypt_json(envelope, "args", ("charge_card", "payments")) == {"card": "4111"}


def version_1(ring: Keyring, kid: str, key: bytes) -> tuple[dict[str, object], str]:
    """A JSON and a text envelope as pgsched wrote them before task and queue were bound (field only)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = bytes(12)
    data = AESGCM(key).encrypt(nonce, b'{"a": 1}', b"pgsched:1:args")
    envelope = {
        "pgsched_encrypted": 1,
        "kid": kid,
        "nonce": base64.b64encode(nonce).decode(),
        "data": base64.b64encode(data).decode(),
    }
    line = AESGCM(key).encrypt(nonce, b"old line", b"pgsched:1:message")
    return envelope, f"pgsched:enc:1:{kid}:{base64.b64encode(nonce + line).decode()}"


def test_version_1_envelopes_stay_readable_and_rotation_rewrites_them_as_version_2() -> None:
    ring = Keyring.parse(KEY1)
    old_json, old_text = version_1(ring, "k1", bytes(range(32)))
    assert is_envelope(old_json) and is_envelope(old_text) and kid_of(old_text) == "k1"
    assert ring.decrypt(old_json, "args", S) == {"a": 1}
    assert ring.decrypt(old_text, "message", S) == "old line"
    with pytest.raises(DecryptionError):
        ring.decrypt(old_json, "result", S)  # the field is still bound
    upgraded = ring.reencrypt(old_json, "args", S)  # same key, but version 1
    assert upgraded["v"] == 2 and ring.decrypt(upgraded, "args", S) == {"a": 1}
    with pytest.raises(DecryptionError):
        ring.decrypt(upgraded, "args", ("another_task", "payments"))
    assert ring.reencrypt(old_text, "message", S).startswith("pgsched:enc:2:k1:")


def test_the_keyring_counts_its_encryptions_per_key() -> None:
    ring = Keyring.parse(f"{KEY2},{KEY1}")
    for _ in range(3):
        ring.encrypt_json({}, "args", S)
    ring.encrypt_text("x", "error", S)
    assert ring.encryptions == {"k2": 4}
