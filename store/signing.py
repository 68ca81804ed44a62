"""Signing keys for checkpoint records: HMAC-SHA256 secrets by key id, loaded from a file.

Key file (JSON, readable only by the service user):

    {"sign_with": "k2", "keys": {"k1": "<hex secret>", "k2": "<hex secret>"}}

Records are signed with `sign_with`; records signed with any listed id are accepted, which is how
keys are rotated: add the new key, switch `sign_with`, drop the old key once no record uses it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from store.errors import SigningKeyError

log = structlog.get_logger(component="tcpcp.store.signing")

MIN_SECRET_BYTES = 16
MAX_KEY_ID_BYTES = 64
MAC_BYTES = 32


def _check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not key_id.isascii() or not key_id.isprintable():
        raise SigningKeyError(f"key id must be printable ASCII, got {key_id!r}")
    if not 0 < len(key_id) <= MAX_KEY_ID_BYTES or " " in key_id:
        raise SigningKeyError(
            f"key id must be 1..{MAX_KEY_ID_BYTES} characters without spaces, got {key_id!r}"
        )
    return key_id


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Secrets by key id, and the id new records are signed with."""

    sign_with: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        for key_id, secret in self.keys.items():
            _check_key_id(key_id)
            if len(secret) < MIN_SECRET_BYTES:
                raise SigningKeyError(
                    f"secret of key {key_id!r} must be at least {MIN_SECRET_BYTES} bytes, "
                    f"got {len(secret)}"
                )
        if self.sign_with not in self.keys:
            raise SigningKeyError(
                f"sign_with names key {self.sign_with!r}, but the keys are {sorted(self.keys)}"
            )

    def mac(self, key_id: str, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under key `key_id` (KeyError if the id is unknown)."""
        return hmac.new(self.keys[key_id], data, hashlib.sha256).digest()

    def accepts(self, key_id: str) -> bool:
        return key_id in self.keys


def parse_keyring(text: str) -> KeyRing:
    """Build a KeyRing from the key file's JSON text."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SigningKeyError(f"key file must be JSON, got a parse error: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
        raise SigningKeyError('key file must be an object with "sign_with" and "keys" members')
    sign_with = doc.get("sign_with")
    if not isinstance(sign_with, str):
        raise SigningKeyError(f'"sign_with" must be a key id string, got {sign_with!r}')
    secrets: dict[str, bytes] = {}
    for key_id, hex_secret in doc["keys"].items():
        _check_key_id(key_id)
        if not isinstance(hex_secret, str):
            raise SigningKeyError(f"secret of key {key_id!r} must be a hex string")
        try:
            secrets[key_id] = bytes.fromhex(hex_secret)
        except ValueError:
            raise SigningKeyError(f"secret of key {key_id!r} must be hex digits") from None
    return KeyRing(sign_with=sign_with, keys=secrets)


def load_keyring(path: str | os.PathLike[str]) -> KeyRing:
    """Read and parse the key file at `path`; warn when others than the owner may read it."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SigningKeyError(f"cannot read key file {p}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key_file_readable_by_others", path=str(p), mode=oct(mode & 0o777))
    return parse_keyring(text)


def new_secret_hex(nbytes: int = 32) -> str:
    """A fresh random secret, hex-encoded, for a key file."""
    return os.urandom(nbytes).hex()
