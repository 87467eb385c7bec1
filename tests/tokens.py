"""Make signed NATS JWTs and key pairs for tests, and locate the nsc fixture tree."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import nkeys

FIXTURES = Path(
    os.environ.get("NASD_FIXTURES") or Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "nsc-demo"
)
STORE = FIXTURES / "stores" / "demo"
KEYS = FIXTURES / "keys" / "keys"
CREDS = FIXTURES / "keys" / "creds" / "demo"

OPERATOR_KEY = "OBCQRCGGEA3D24DZ5XYPTPQXTLF477NUMV2U27OOGLWCOLJJO5X57L6I"
OPERATOR_SIGNING_KEY = "ODLLPN6VOWUSBBSLHMCKKNMOCOA4YS2MBRTD6EJ6LXXIFNFGH5QK2IPF"
SYS = "AC2PZDSITLEQ7QIFCTF4EVZ7EIQK67U4CRDJQ4UCQJWNAJFOGCTT7FTS"
ACME = "AD2BNNLQPZVSWXWLOI3ZC7ISPSL6UDGX36LGWCOCXEVLM2IOO56VZ6XX"
SHOP = "AARE3U7RTFWNNQPBUC6KITHHQ52HDNR5LINTV53ZWOA66OX5W3ANZINI"
BOB = "UBFKPZPDKIH52ZJRP57UJO37BA6HBS6IEIVYTNFC5YPFPECXAFTHST2B"


def fixture_jwt(name: str) -> bytes:
    """Return the nsc-made JWT of the operator ("demo") or of an account ("SYS", "ACME", "SHOP")."""
    if name == "demo":
        return (STORE / "demo.jwt").read_bytes()
    return (STORE / "accounts" / name / f"{name}.jwt").read_bytes()


def fixture_seed(public_key: str) -> bytes:
    """Return the seed nsc stored for *public_key*."""
    kind = public_key[0]
    return (KEYS / kind / public_key[1:3] / f"{public_key}.nk").read_bytes().strip()


def fixture_claims(name: str) -> dict[str, Any]:
    """Return the decoded (unverified) claims of a fixture JWT."""
    payload = fixture_jwt(name).split(b".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))


def new_seed(prefix: int) -> bytes:
    """Make a random seed of the given nkeys prefix (nkeys.PREFIX_BYTE_ACCOUNT, ...)."""
    return nkeys.encode_seed(os.urandom(32), prefix)


def public_key(seed: bytes) -> str:
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _jti(claims: dict[str, Any]) -> str:
    standard = {k: claims[k] for k in ("aud", "exp", "iat", "iss", "name", "nbf", "sub") if claims.get(k)}
    digest = hashlib.sha512(json.dumps(standard, separators=(",", ":")).encode(), usedforsecurity=False)
    return base64.b32encode(digest.digest()[:32]).decode().rstrip("=")


def encode(claims: dict[str, Any], seed: bytes, version: int = 2) -> bytes:
    """Sign *claims* with *seed*, setting iss (and jti when absent), as nsc would."""
    signer = nkeys.from_seed(bytearray(seed))
    claims = dict(claims)
    claims["iss"] = signer.public_key.decode()
    claims.setdefault("jti", _jti(claims))
    if version == 2:
        header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signed = header + b"." + payload
    else:
        header = _b64(json.dumps({"typ": "jwt", "alg": "ed25519"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signed = payload
    return header + b"." + payload + b"." + _b64(signer.sign(signed))


def account_claims(subject: str, name: str, iat: int, **nats: Any) -> dict[str, Any]:
    """Build v2 account claims with unlimited limits, overridden by *nats* entries."""
    section: dict[str, Any] = {
        "limits": {
            "subs": -1,
            "data": -1,
            "payload": -1,
            "imports": -1,
            "exports": -1,
            "wildcards": True,
            "conn": -1,
            "leaf": -1,
        },
        "default_permissions": {"pub": {}, "sub": {}},
        "type": "account",
        "version": 2,
    }
    section.update(nats)
    return {"iat": iat, "name": name, "sub": subject, "nats": section}
