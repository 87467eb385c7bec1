"""Tests for public nkey decoding and signature verification."""

import base64
import binascii

import nkeys
import pytest

from nasd.keys import InvalidKeyError, KeyKind, decode_public_key, is_account_key, is_operator_key, verify_signature
from tests.tokens import ACME, OPERATOR_KEY, OPERATOR_SIGNING_KEY, fixture_seed, new_seed, public_key


def _with_prefix(prefix: int) -> str:
    body = bytes([prefix]) + b"\x07" * 32
    return base64.b32encode(body + binascii.crc_hqx(body, 0).to_bytes(2, "little")).decode()


def test_decode_fixture_operator_key():
    kind, raw = decode_public_key(OPERATOR_KEY)
    assert kind is KeyKind.OPERATOR
    assert len(raw) == 32


def test_decode_matches_nkeys_package():
    seed = fixture_seed(ACME)
    pair = nkeys.from_seed(bytearray(seed))
    _, raw = decode_public_key(ACME, KeyKind.ACCOUNT)
    assert pair.public_key.decode() == ACME
    assert raw == bytes(pair._keys.verify_key)


def test_account_key_predicates():
    assert is_account_key(ACME)
    assert not is_account_key(OPERATOR_KEY)
    assert is_operator_key(OPERATOR_SIGNING_KEY)
    assert not is_operator_key(ACME)
    assert not is_account_key(None)
    assert not is_account_key(ACME.lower())


def test_decode_rejects_bad_checksum():
    broken = ACME[:-1] + ("A" if ACME[-1] != "A" else "B")
    with pytest.raises(InvalidKeyError, match="checksum"):
        decode_public_key(broken)


def test_decode_rejects_wrong_length():
    with pytest.raises(InvalidKeyError, match="56 characters"):
        decode_public_key(ACME[:-1])


def test_decode_rejects_wrong_kind():
    with pytest.raises(InvalidKeyError, match="operator key"):
        decode_public_key(ACME, KeyKind.OPERATOR)


def test_decode_rejects_unknown_prefix():
    with pytest.raises(InvalidKeyError, match="prefix"):
        decode_public_key(_with_prefix(3 << 3))


def test_decode_rejects_seed():
    seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT).decode()
    with pytest.raises(InvalidKeyError):
        decode_public_key(seed)


def test_decode_rejects_path_characters():
    with pytest.raises(InvalidKeyError, match="not base32"):
        decode_public_key("../" + ACME[3:])


def test_verify_signature_good_and_tampered():
    seed = new_seed(nkeys.PREFIX_BYTE_USER)
    pair = nkeys.from_seed(bytearray(seed))
    signature = pair.sign(b"nonce")
    assert verify_signature(public_key(seed), b"nonce", signature)
    assert not verify_signature(public_key(seed), b"nonce!", signature)
    assert not verify_signature(public_key(seed), b"nonce", signature[:-1] + bytes([signature[-1] ^ 1]))


def test_verify_signature_wrong_key():
    signature = nkeys.from_seed(bytearray(new_seed(nkeys.PREFIX_BYTE_USER))).sign(b"data")
    other = public_key(new_seed(nkeys.PREFIX_BYTE_USER))
    assert not verify_signature(other, b"data", signature)
