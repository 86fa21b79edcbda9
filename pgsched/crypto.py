"""Payload encryption at rest: AES-256-GCM envelopes that name their key.

Keys come from ``PGSCHED_ENCRYPTION_KEYS`` (``kid:base64-of-32-bytes``, comma-separated);
the first key encrypts, every key decrypts, and no key ever enters the database. Two
envelope shapes, one per column kind:

- jsonb columns (``args``, ``result``, ``progress``): a JSON object, so ``args`` still
  passes the table's "is an object" check::

      {"pgsched_encrypted": 1, "v": 2, "kid": "k1", "nonce": "<base64>", "data": "<base64>"}

- text columns (``error``, ``run_logs.message``): ``pgsched:enc:2:<kid>:<base64 nonce+data>``.

The associated data binds the field name, the job's task and its queue (a ``Scope``), so
an envelope copied into another field (a result pasted into ``args``), or into a job of
another task or queue, fails authentication instead of decrypting. The job id is not
bound, because a single enqueue learns it only from the insert itself: an envelope can
still be copied between jobs of the same task and queue.

Version 1 envelopes (no ``"v"``, text prefix ``pgsched:enc:1:``), written before the
task and queue were bound, bind the field name only; they stay readable, and
``pgsched keys rotate`` rewrites live ones as version 2.

Nonces are random (96 bits): NIST SP 800-38D allows at most 2**32 encryptions under
one key for the chance of a repeated nonce to stay below 2**-32. ``Keyring.encryptions``
counts this process's encryptions per key; rotate a key well before the fleet's total
nears that (docs/architecture.md, "Encrypted payloads").
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, DecryptionError, MissingKeyError

ENVELOPE_MARKER = "pgsched_encrypted"
TEXT_PREFIX = "pgsched:enc:2:"
TEXT_PREFIX_V1 = "pgsched:enc:1:"  # same length as TEXT_PREFIX
KEY_BYTES = 32
NONCE_BYTES = 12
KID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SETTING = "--encryption-keys / PGSCHED_ENCRYPTION_KEYS"
# NIST SP 800-38D, 8.3: random 96-bit nonces, at most 2**32 encryptions per key.
NONCE_BUDGET = 2**32

# (task, queue) of the job a payload belongs to: bound into the envelope.
Scope = tuple[str, str]

_encoder = msgspec.json.Encoder()


def _aad(field: str, scope: Scope | None) -> bytes:
    if scope is None:  # a version 1 envelope: the field only
        return f"pgsched:1:{field}".encode()
    task, queue = scope
    return _encoder.encode(["pgsched", 2, field, task, queue])  # JSON: no separator to confuse


def is_envelope(value: Any) -> bool:
    """True for a value pgsched encrypted: a JSON envelope (a dict) or an encrypted text."""
    if isinstance(value, str):
        return value.startswith((TEXT_PREFIX, TEXT_PREFIX_V1))
    return isinstance(value, Mapping) and value.get(ENVELOPE_MARKER) == 1


def kid_of(value: Any) -> str | None:
    """The key id an envelope names (None for a value that is not an envelope)."""
    if not is_envelope(value):
        return None
    if isinstance(value, str):
        return value[len(TEXT_PREFIX) :].split(":", 1)[0]
    return str(value.get("kid"))


def envelope_version(value: Any) -> int:
    """1 for an envelope that binds only its field name, 2 for one that binds its job's task and queue too."""
    if isinstance(value, str):
        return 2 if value.startswith(TEXT_PREFIX) else 1
    return int(value.get("v", 1))


def generate_key(kid: str) -> str:
    """A fresh ``kid:base64`` entry for PGSCHED_ENCRYPTION_KEYS."""
    if not KID_PATTERN.match(kid):
        raise ConfigError(f"key id {kid!r}: use 1-64 letters, digits and _ . -")
    return f"{kid}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"


@functools.lru_cache(maxsize=8)
def load_keyring(setting: str) -> Keyring:
    """The Keyring of a PGSCHED_ENCRYPTION_KEYS value, parsed once per value."""
    return Keyring.parse(setting)


class Keyring:
    """The keys of this process, by key id; the first one encrypts."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError(f"{SETTING}: no key given")
        self.current = keys[0][0]
        self._ciphers = {kid: AESGCM(key) for kid, key in keys}
        # Encryptions made by this process, per key id (each used one random nonce).
        self.encryptions: Counter[str] = Counter()
        self._lock = threading.Lock()  # sync tasks encrypt their log lines from their threads

    @classmethod
    def parse(cls, value: str) -> Keyring:
        """Parse the setting; a ConfigError names the variable and the entry, never the key material."""
        keys: list[tuple[str, bytes]] = []
        for number, entry in enumerate(value.split(","), start=1):
            kid, sep, encoded = entry.strip().partition(":")
            if not sep or not KID_PATTERN.match(kid):
                raise ConfigError(
                    f"{SETTING}: entry {number} is not kid:base64-key (the key id: 1-64 letters, digits and _ . -)"
                )
            if any(kid == known for known, _ in keys):
                raise ConfigError(f"{SETTING}: key id {kid!r} is given twice")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"{SETTING}: the key of {kid!r} is not valid base64") from None
            if len(key) != KEY_BYTES:
                raise ConfigError(f"{SETTING}: the key of {kid!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}")
            keys.append((kid, key))
        return cls(keys)

    @property
    def kids(self) -> list[str]:
        """Every key id, the encrypting one first."""
        return list(self._ciphers)

    def _cipher(self, kid: str) -> AESGCM:
        try:
            return self._ciphers[kid]
        except KeyError:
            raise MissingKeyError(kid) from None

    def _seal(self, plaintext: bytes, field: str, scope: Scope) -> tuple[bytes, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        with self._lock:
            self.encryptions[self.current] += 1
        return nonce, self._cipher(self.current).encrypt(nonce, plaintext, _aad(field, scope))

    def _open(self, kid: str, nonce: bytes, data: bytes, field: str, scope: Scope | None) -> bytes:
        try:
            return self._cipher(kid).decrypt(nonce, data, _aad(field, scope))
        except InvalidTag:
            raise DecryptionError(field, kid) from None

    # -- JSON (jsonb columns) ------------------------------------------------------------------

    def encrypt_encoded(self, encoded: str | bytes, field: str, scope: Scope) -> str:
        """The JSON text of the envelope of an already-encoded JSON value (no second encoding)."""
        plaintext = encoded.encode() if isinstance(encoded, str) else encoded
        nonce, data = self._seal(plaintext, field, scope)
        envelope = {
            ENVELOPE_MARKER: 1,
            "v": 2,
            "kid": self.current,
            "nonce": base64.b64encode(nonce).decode(),
            "data": base64.b64encode(data).decode(),
        }
        return _encoder.encode(envelope).decode()

    def encrypt_json(self, value: Any, field: str, scope: Scope) -> dict[str, Any]:
        """The envelope of a JSON value, as a dict."""
        envelope: dict[str, Any] = msgspec.json.decode(self.encrypt_encoded(_encoder.encode(value), field, scope))
        return envelope

    def decrypt_json(self, envelope: Mapping[str, Any], field: str, scope: Scope) -> Any:
        """The value inside an envelope; MissingKeyError or DecryptionError (tampered, moved)."""
        try:
            nonce = base64.b64decode(envelope["nonce"], validate=True)
            data = base64.b64decode(envelope["data"], validate=True)
            kid = str(envelope["kid"])
            version = envelope.get("v", 1)
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise DecryptionError(field, None) from None
        if version not in (1, 2):
            raise DecryptionError(field, kid)
        return msgspec.json.decode(self._open(kid, nonce, data, field, scope if version == 2 else None))

    # -- text (text columns) -------------------------------------------------------------------

    def encrypt_text(self, text: str, field: str, scope: Scope) -> str:
        """The text envelope of ``text``."""
        nonce, data = self._seal(text.encode(), field, scope)
        return f"{TEXT_PREFIX}{self.current}:{base64.b64encode(nonce + data).decode()}"

    def decrypt_text(self, text: str, field: str, scope: Scope) -> str:
        """The text inside a text envelope; MissingKeyError or DecryptionError (tampered, moved)."""
        version_2 = text.startswith(TEXT_PREFIX)
        kid, _, encoded = text[len(TEXT_PREFIX) :].partition(":")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise DecryptionError(field, kid) from None
        return self._open(kid, raw[:NONCE_BYTES], raw[NONCE_BYTES:], field, scope if version_2 else None).decode()

    # -- either ------------------------------------------------------------------------------

    def decrypt(self, value: Any, field: str, scope: Scope) -> Any:
        """``value`` decrypted if it is an envelope, else unchanged (pgsched's own plain texts,
        rows written before encryption was turned on)."""
        if isinstance(value, str):
            return self.decrypt_text(value, field, scope) if is_envelope(value) else value
        return self.decrypt_json(value, field, scope) if is_envelope(value) else value

    def reencrypt(self, value: Any, field: str, scope: Scope) -> Any:
        """An envelope of an older key, or of version 1, encrypted again with the current key as
        version 2 (others unchanged)."""
        if not is_envelope(value) or (kid_of(value) == self.current and envelope_version(value) == 2):
            return value
        if isinstance(value, str):
            return self.encrypt_text(self.decrypt_text(value, field, scope), field, scope)
        return self.encrypt_json(self.decrypt_json(value, field, scope), field, scope)
