"""Decode NATS public nkeys and verify Ed25519 signatures made with them.

The installed ``nkeys`` package can only verify with a key pair built from a seed, so
public keys are decoded here: base32 without padding of one prefix byte, the 32-byte
Ed25519 public key and a little-endian CRC16 (XMODEM, as ``binascii.crc_hqx``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PUBLIC_KEY_LENGTH = 56
_DECODED_LENGTH = 35


class KeyKind(enum.Enum):
    """The role of a public nkey, identified by its prefix byte."""

    OPERATOR = 14 << 3
    ACCOUNT = 0
    USER = 20 << 3
    SERVER = 13 << 3
    CLUSTER = 2 << 3


class InvalidKeyError(ValueError):
    """A string that is not a well-formed public nkey of the expected kind."""


def decode_public_key(key: str, kind: KeyKind | None = None) -> tuple[KeyKind, bytes]:
    """Decode a public nkey into its kind and raw 32-byte Ed25519 key.

    Raises InvalidKeyError when the length, alphabet, checksum or prefix is wrong, or
    when *kind* is given and the key is of another kind.
    """
    if not isinstance(key, str) or len(key) != PUBLIC_KEY_LENGTH:
        raise InvalidKeyError(f"invalid public key {_shown(key)}: expected {PUBLIC_KEY_LENGTH} characters")
    try:
        raw = base64.b32decode(key, casefold=False)
    except (binascii.Error, ValueError):
        raise InvalidKeyError(f"invalid public key {_shown(key)}: not base32") from None
    if len(raw) != _DECODED_LENGTH:
        raise InvalidKeyError(f"invalid public key {_shown(key)}: wrong decoded length")

    body, checksum = raw[:-2], int.from_bytes(raw[-2:], "little")
    if binascii.crc_hqx(body, 0) != checksum:
        raise InvalidKeyError(f"invalid public key {_shown(key)}: checksum mismatch")

    try:
        found = KeyKind(body[0])
    except ValueError:
        raise InvalidKeyError(f"invalid public key {_shown(key)}: unknown prefix byte") from None
    if kind is not None and found is not kind:
        raise InvalidKeyError(f"invalid {kind.name.lower()} key {_shown(key)}: it is a {found.name.lower()} key")
    return found, body[1:]


def is_public_key(key: object, kind: KeyKind) -> bool:
    """Return whether *key* is a valid public nkey of *kind*."""
    if not isinstance(key, str):
        return False
    try:
        decode_public_key(key, kind)
    except InvalidKeyError:
        return False
    return True


def is_account_key(key: object) -> bool:
    return isinstance(key, str) and _is_account_key(key)


@functools.lru_cache(maxsize=65536)
def _is_account_key(key: str) -> bool:
    """Check an account key once; the HTTP fast path validates the same keys again and again."""
    return is_public_key(key, KeyKind.ACCOUNT)


def is_operator_key(key: object) -> bool:
    return is_public_key(key, KeyKind.OPERATOR)


def verify_signature(public_key: str, data: bytes, signature: bytes) -> bool:
    """Return whether *signature* is a valid Ed25519 signature of *data* by *public_key*.

    Raises InvalidKeyError when *public_key* itself is malformed.
    """
    _, raw = decode_public_key(public_key)
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def short_key(key: str) -> str:
    """Return the first 12 characters of a key, the form used in log lines."""
    return key[:12]


def _shown(key: object) -> str:
    """Render a rejected key for an error message without echoing unbounded input."""
    text = repr(key)
    return text if len(text) <= 70 else text[:67] + "..."
