"""Tests for JWT decoding, signature verification, trust and account claim checks."""

import base64
import json
import time

import nkeys
import pytest

from nasd import jwt
from nasd.jwt import JWTError, Operator, account_problems, decode, decode_account, decode_operator
from tests.tokens import (
    ACME,
    OPERATOR_KEY,
    OPERATOR_SIGNING_KEY,
    SHOP,
    SYS,
    account_claims,
    encode,
    fixture_claims,
    fixture_jwt,
    fixture_seed,
    new_seed,
    public_key,
)

NOW = 1796413055 + 60


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _operator() -> Operator:
    return Operator.from_token(decode_operator(fixture_jwt("demo")))


@pytest.mark.parametrize("name", ["SYS", "ACME", "SHOP"])
def test_fixture_accounts_decode_and_are_trusted(name):
    token = decode_account(fixture_jwt(name))
    assert token.version == 2
    assert token.claim_type == "account"
    assert _operator().trusts(token.issuer)
    assert account_problems(token, NOW) == []


def test_fixture_operator_fields():
    operator = _operator()
    assert operator.key == OPERATOR_KEY
    assert operator.name == "demo"
    assert operator.signing_keys == {OPERATOR_SIGNING_KEY}
    assert operator.system_account == SYS


def test_decode_strips_trailing_newline():
    token = decode(fixture_jwt("SHOP") + b"\n")
    assert token.raw == fixture_jwt("SHOP")


def test_decode_keeps_fields():
    token = decode(fixture_jwt("SHOP"))
    assert token.subject == SHOP
    assert token.issuer == OPERATOR_KEY
    assert token.jti == fixture_claims("SHOP")["jti"]
    assert token.issued_at == 1796413055
    assert token.expires == 0


def test_v1_token_verifies_over_payload_only():
    claims = {"iat": 1, "sub": SHOP, "name": "old", "type": "account", "nats": {}}
    token = decode_account(encode(claims, fixture_seed(OPERATOR_KEY), version=1))
    assert token.version == 1
    assert token.claim_type == "account"
    assert token.header["alg"] == "ed25519"


def test_v1_signature_over_header_rejected():
    claims = {"iat": 1, "sub": SHOP, "type": "account"}
    signer = nkeys.from_seed(bytearray(fixture_seed(OPERATOR_KEY)))
    claims["iss"] = OPERATOR_KEY
    header = _b64(b'{"typ":"jwt","alg":"ed25519"}')
    payload = _b64(json.dumps(claims).encode())
    wrong = header + b"." + payload + b"." + _b64(signer.sign(header + b"." + payload))
    with pytest.raises(JWTError, match="signature"):
        decode(wrong)


def test_tampered_payload_rejected():
    header, payload, signature = fixture_jwt("SHOP").split(b".")
    claims = json.loads(base64.urlsafe_b64decode(payload + b"=="))
    claims["nats"]["limits"]["conn"] = 1000
    tampered = header + b"." + _b64(json.dumps(claims).encode()) + b"." + signature
    with pytest.raises(JWTError, match="signature does not verify"):
        decode(tampered)


def test_tampered_signature_rejected():
    header, payload, signature = fixture_jwt("SHOP").split(b".")
    raw = bytearray(base64.urlsafe_b64decode(signature + b"=="))
    raw[0] ^= 1
    with pytest.raises(JWTError, match="signature does not verify"):
        decode(header + b"." + payload + b"." + _b64(bytes(raw)))


def test_issuer_with_bad_checksum_rejected():
    claims = fixture_claims("SHOP")
    claims["iss"] = OPERATOR_KEY[:-1] + ("A" if OPERATOR_KEY[-1] != "A" else "B")
    header, _, signature = fixture_jwt("SHOP").split(b".")
    token = header + b"." + _b64(json.dumps(claims).encode()) + b"." + signature
    with pytest.raises(JWTError, match="checksum"):
        decode(token)


def test_issuer_with_wrong_prefix_rejected():
    user_seed = new_seed(nkeys.PREFIX_BYTE_USER)
    token = encode(account_claims(SHOP, "SHOP", 10), user_seed)
    with pytest.raises(JWTError, match="operator or account key"):
        decode_account(token)


@pytest.mark.parametrize(
    "token, message",
    [
        (b"", "3 dot-separated segments"),
        (b"a.b", "3 dot-separated segments"),
        (b"a.b.c.d", "3 dot-separated segments"),
        (b"!!.eyJ9.sig", "base64url"),
        (_b64(b"[1]") + b"." + _b64(b"{}") + b".c2ln", "not a JSON object"),
        (_b64(b'{"typ":"JWT","alg":"HS256"}') + b"." + _b64(b'{"nats":{"version":2}}') + b".c2ln", "algorithm"),
        (_b64(b'{"typ":"XYZ","alg":"ed25519-nkey"}') + b"." + _b64(b'{"nats":{"version":2}}') + b".c2ln", "token type"),
        (_b64(b'{"typ":"JWT","alg":"ed25519-nkey"}') + b"." + _b64(b'{"nats":{"version":3}}') + b".c2ln", "newer"),
        (_b64(b'{"typ":"JWT","alg":"ed25519-nkey"}') + b"." + _b64(b'{"nats":{}}') + b".c2ln", "neither"),
        (_b64(b'{"typ":"JWT","alg":"ed25519-nkey"}') + b"." + _b64(b'{"nats":{"version":2}}') + b".c2ln", "no issuer"),
    ],
)
def test_malformed_tokens_rejected(token, message):
    with pytest.raises(JWTError, match=message):
        decode(token)


def test_padded_segments_rejected():
    header, payload, signature = fixture_jwt("SHOP").split(b".")
    with pytest.raises(JWTError, match="unpadded"):
        decode(header + b"." + payload + b"." + signature + b"==")


def test_oversized_token_rejected():
    with pytest.raises(JWTError, match="exceeds"):
        decode(b"a" * (jwt.MAX_TOKEN_SIZE + 1))


def test_user_jwt_is_not_an_account():
    user = encode(
        {"iat": 1, "sub": public_key(new_seed(nkeys.PREFIX_BYTE_USER)), "nats": {"type": "user", "version": 2}},
        fixture_seed(ACME),
    )
    with pytest.raises(JWTError, match="expected an account JWT"):
        decode_account(user)


def test_operator_strict_signing_keys():
    claims = fixture_claims("demo")
    claims["nats"]["strict_signing_key_usage"] = True
    claims.pop("jti")
    operator = Operator.from_token(decode_operator(encode(claims, fixture_seed(OPERATOR_KEY))))
    assert not operator.trusts(OPERATOR_KEY)
    assert operator.trusts(OPERATOR_SIGNING_KEY)


def test_operator_trust_rejects_strangers():
    assert not _operator().trusts(ACME)
    assert not _operator().trusts(public_key(new_seed(nkeys.PREFIX_BYTE_OPERATOR)))


def test_operator_with_bad_signing_key_rejected():
    claims = fixture_claims("demo")
    claims["nats"]["signing_keys"] = [ACME]
    claims.pop("jti")
    with pytest.raises(JWTError, match="not an operator key"):
        decode_operator(encode(claims, fixture_seed(OPERATOR_KEY)))


def test_read_decorated_creds_frame():
    text = "-----BEGIN NATS ACCOUNT JWT-----\n" + fixture_jwt("ACME").decode() + "\n------END NATS ACCOUNT JWT------\n"
    assert jwt.read_decorated(text) == fixture_jwt("ACME").decode()
    assert jwt.read_decorated(" plain \n") == "plain"


def _problems(**nats) -> list[str]:
    claims = account_claims(SHOP, "SHOP", NOW - 10, **nats)
    return account_problems(decode_account(encode(claims, fixture_seed(OPERATOR_KEY))), NOW)


def test_expired_and_not_yet_valid():
    claims = account_claims(SHOP, "SHOP", NOW - 10)
    claims["exp"] = NOW - 1
    claims["nbf"] = NOW + 100
    problems = account_problems(decode_account(encode(claims, fixture_seed(OPERATOR_KEY))), NOW)
    assert any("expired" in problem for problem in problems)
    assert any("not yet valid" in problem for problem in problems)


def test_expiry_second_is_still_valid():
    claims = account_claims(SHOP, "SHOP", NOW - 10)
    claims["exp"] = NOW
    assert account_problems(decode_account(encode(claims, fixture_seed(OPERATOR_KEY))), NOW) == []


def test_import_with_bad_account_key():
    problems = _problems(imports=[{"subject": "orders.>", "account": "AXYZ", "type": "stream"}])
    assert any("not a valid account key" in problem for problem in problems)


def test_export_with_bad_subject():
    problems = _problems(exports=[{"subject": "foo..bar", "type": "stream"}])
    assert any("invalid subject" in problem for problem in problems)


def test_export_token_position_must_be_wildcard():
    assert _problems(exports=[{"subject": "a.*.c", "type": "service", "account_token_position": 2}]) == []
    problems = _problems(exports=[{"subject": "a.b.c", "type": "service", "account_token_position": 2}])
    assert any("account_token_position" in problem for problem in problems)


def test_signing_keys_and_scopes():
    scope = {"kind": "user_scope", "key": ACME, "role": "x", "template": {}}
    assert _problems(signing_keys=[ACME, scope]) == []
    assert any("not an account key" in p for p in _problems(signing_keys=[OPERATOR_KEY]))


def test_revocations_need_user_keys():
    user = public_key(new_seed(nkeys.PREFIX_BYTE_USER))
    assert _problems(revocations={user: 10, "*": 5}) == []
    assert any("revocation" in p for p in _problems(revocations={"bob": 10}))


def test_full_wildcard_must_be_last():
    assert jwt.is_valid_subject("a.>")
    assert not jwt.is_valid_subject("a.>.b")
    assert not jwt.is_valid_subject("a b")
    assert not jwt.is_valid_subject("")


def test_render_decoded_annotates_dates():
    text = jwt.render_decoded(decode(fixture_jwt("SHOP")))
    assert '"alg": "ed25519-nkey"' in text
    assert '"subject": "orders.>"' in text
    assert "2026-12-04" in text
    assert '"iat": 1796413055,  // 2026-12-04' in text


def test_format_timestamp_out_of_range():
    assert "out of range" in jwt.format_timestamp(10**20)


def test_expired_fixture_time_check():
    assert not decode(fixture_jwt("SHOP")).is_expired(time.time())
