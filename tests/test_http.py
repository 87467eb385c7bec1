"""Tests for the HTTP API, driven end to end through treq's in-memory StubTreq client."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import nkeys
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IResponse
from twisted.web.server import Site

from nasd.activations import ActivationStore
from nasd.http import AccountServerAPI, BoundedRequest
from nasd.jwt import Operator, Token, decode_account, decode_operator
from nasd.store import DirectoryStore, MemoryStore, StoredJWT
from tests.tokens import (
    ACME,
    BOB,
    CREDS,
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

BASE_URL = "http://nasd.test"

# Every fixture JWT was issued at this time (2026-12-04 19:37:35 UTC). The test clock
# runs one day later, so the fixtures are valid and tests can sign JWTs with later iats.
FIXTURE_IAT = 1796413055
NOW = FIXTURE_IAT + 86400

ONE_MIB = 1024 * 1024
TEXT_PLAIN = b"text/plain; charset=utf-8"


def fixture_operator() -> Operator:
    return Operator.from_token(decode_operator(fixture_jwt("demo")))


def resign(name: str, seed: bytes, **changes: Any) -> bytes:
    """Sign the claims of fixture account *name* with *seed*, after applying *changes*.

    The fixture's jti and iss are dropped so that ``encode`` sets them for the new signer.
    """
    claims = fixture_claims(name)
    claims.pop("jti")
    claims.pop("iss")
    claims.update(changes)
    return encode(claims, seed)


def operator_seed() -> bytes:
    return fixture_seed(OPERATOR_KEY)


def signing_seed() -> bytes:
    return fixture_seed(OPERATOR_SIGNING_KEY)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def sign_with_header(header: dict[str, Any], claims: dict[str, Any], seed: bytes) -> bytes:
    """Sign *claims* with *seed* under any *header*, using the v2 rule (header.payload)."""
    signer = nkeys.from_seed(bytearray(seed))
    claims = dict(claims, iss=signer.public_key.decode(), jti="CUSTOMHEADERTOKEN")
    signed = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(claims).encode())
    return signed + b"." + _b64(signer.sign(signed))


def user_jwt() -> bytes:
    """Return the user JWT of bob (SHOP) from its nsc creds file."""
    lines = (CREDS / "SHOP" / "bob.creds").read_text().splitlines()
    return lines[1].strip().encode()


def bad_checksum(key: str) -> str:
    """Change one character of *key*, so that it is still base32 but its CRC16 fails."""
    replacement = "B" if key[10] == "A" else "A"
    return key[:10] + replacement + key[11:]


class RecordingPublisher:
    """A stand-in for the NATS publisher that records each update and the store entry at that moment."""

    def __init__(self, store: MemoryStore | None = None, connected: bool = True, pending_count: int = 0) -> None:
        self.store = store
        self.connected = connected
        self.server_url: str | None = "nats://127.0.0.1:4222"
        self.pending_count = pending_count
        self.last_published: float | None = None
        self.last_acknowledged: float | None = None
        self.published: list[tuple[str, bytes]] = []
        self.stored_when_published: list[StoredJWT | None] = []

    def publish_account_update(self, account: str, jwt: bytes) -> None:
        self.published.append((account, jwt))
        self.stored_when_published.append(self.store.get(account) if self.store is not None else None)


@dataclass
class Harness:
    """One API instance with its clock and store, and a StubTreq client bound to it."""

    api: AccountServerAPI
    clock: Clock
    store: MemoryStore
    stub: StubTreq
    publisher: RecordingPublisher | None = None


_FIXTURE_OPERATOR = "fixture operator"


def build_harness(
    store: MemoryStore | None = None,
    operator: Operator | None | str = _FIXTURE_OPERATOR,
    publisher: RecordingPublisher | None = None,
    system_account: Token | None = None,
    now: float = NOW,
    activations: ActivationStore | None = None,
) -> Harness:
    """Build the API trusting the fixture operator ``demo`` (unless *operator* is given), at time *now*."""
    clock = Clock()
    clock.advance(now)
    if store is None:
        store = MemoryStore()
    trusted = fixture_operator() if operator == _FIXTURE_OPERATOR else operator
    assert trusted is None or isinstance(trusted, Operator)
    api = AccountServerAPI(
        clock, store, trusted, publisher=publisher, system_account=system_account, activations=activations
    )
    return Harness(api=api, clock=clock, store=store, stub=StubTreq(api.resource()), publisher=publisher)


class APITestCase(TestCase):
    """Base class: a fresh harness per test and helpers that return (response, body)."""

    def setUp(self) -> None:
        self.use(build_harness())

    def use(self, harness: Harness) -> Harness:
        self.harness = harness
        return harness

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[IResponse, bytes]:
        """Send one request and return the response and its body.

        A MemoryStore saves synchronously, so both Deferreds have fired on return.
        """
        response = self.successResultOf(self.harness.stub.request(method, BASE_URL + path, **kwargs))
        body = self.successResultOf(response.content())
        return response, body

    def get(self, path: str, **kwargs: Any) -> tuple[IResponse, bytes]:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, data: bytes, **kwargs: Any) -> tuple[IResponse, bytes]:
        return self.call("POST", path, data=data, **kwargs)

    def header(self, response: IResponse, name: str) -> list[bytes] | None:
        return response.headers.getRawHeaders(name.encode("ascii"))

    def store_directly(self, token: bytes) -> Token:
        """Put a JWT into the store without the API's checks (the store checks only iat)."""
        decoded = decode_account(token)
        self.successResultOf(self.harness.store.save(decoded))
        return decoded

    def assertRejected(self, response: IResponse, body: bytes, fragment: str) -> None:
        """Check that a response is a 400 with one line of plain text containing *fragment*."""
        self.assertEqual(response.code, 400, body)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertTrue(body.endswith(b"\n"), body)
        self.assertEqual(body.count(b"\n"), 1, body)
        self.assertIn(fragment, body.decode())


class ResolverCheckTests(APITestCase):
    """GET /jwt/v1/accounts: the check nats-server makes before it starts."""

    def assertResolverCheck(self, path: str) -> None:
        response, body = self.get(path)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, "Cache-Control"), [b"no-cache, no-store, must-revalidate"])
        self.assertEqual(self.header(response, "Pragma"), [b"no-cache"])
        self.assertEqual(self.header(response, "Expires"), [b"0"])

    def test_check_without_slash(self) -> None:
        self.assertResolverCheck("/jwt/v1/accounts")

    def test_check_with_slash(self) -> None:
        self.assertResolverCheck("/jwt/v1/accounts/")

    def test_check_with_double_slash(self) -> None:
        self.assertResolverCheck("/jwt/v1//accounts/")

    def test_check_double_slash_no_trailing(self) -> None:
        self.assertResolverCheck("/jwt/v1//accounts")


class GetAccountTests(APITestCase):
    """GET /jwt/v1/accounts/<key>."""

    def setUp(self) -> None:
        super().setUp()
        self.acme = self.store_directly(fixture_jwt("ACME"))

    def test_get_returns_stored_bytes(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{ACME}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("ACME"))
        self.assertEqual(self.header(response, "Content-Type"), [b"application/jwt"])

    def test_get_sets_etag_and_cache_control(self) -> None:
        response, _ = self.get(f"/jwt/v1/accounts/{ACME}")
        self.assertEqual(self.header(response, "ETag"), [f'"{self.acme.jti}"'.encode()])
        self.assertEqual(self.header(response, "Cache-Control"), [b"no-cache"])

    def test_get_never_sends_max_age(self) -> None:
        response, _ = self.get(f"/jwt/v1/accounts/{ACME}")
        cache_control = b",".join(self.header(response, "Cache-Control") or [])
        self.assertNotIn(b"max-age", cache_control)

    def test_get_via_double_slash(self) -> None:
        response, body = self.get(f"/jwt/v1//accounts/{ACME}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("ACME"))
        self.assertEqual(self.header(response, "Content-Type"), [b"application/jwt"])

    def test_get_unknown_key_404(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{SHOP}")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn(SHOP.encode(), body)

    def test_get_random_account_key_404(self) -> None:
        key = public_key(new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
        response, _ = self.get(f"/jwt/v1/accounts/{key}")
        self.assertEqual(response.code, 404)

    def test_get_malformed_key_404(self) -> None:
        response, body = self.get("/jwt/v1/accounts/nope")
        self.assertEqual(response.code, 404)
        self.assertIn(b"not a valid account public key", body)

    def test_get_user_key_404(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{BOB}")
        self.assertEqual(response.code, 404)
        self.assertIn(b"not a valid account public key", body)

    def test_get_bad_checksum_key_404(self) -> None:
        # Store the JWT under the mangled key too, so that only the key check can return 404.
        key = bad_checksum(ACME)
        self.harness.store._index[key] = StoredJWT(key, fixture_jwt("ACME"), self.acme.jti, FIXTURE_IAT, 0)
        response, body = self.get(f"/jwt/v1/accounts/{key}")
        self.assertEqual(response.code, 404)
        self.assertIn(b"not a valid account public key", body)

    def test_head_sends_headers_only(self) -> None:
        response, body = self.call("HEAD", f"/jwt/v1/accounts/{ACME}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, "Content-Type"), [b"application/jwt"])
        self.assertEqual(self.header(response, "ETag"), [f'"{self.acme.jti}"'.encode()])

    def assertNotModified(self, if_none_match: str) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{ACME}", headers={"If-None-Match": if_none_match})
        self.assertEqual(response.code, 304, if_none_match)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, "ETag"), [f'"{self.acme.jti}"'.encode()])

    def test_if_none_match_exact_304(self) -> None:
        self.assertNotModified(f'"{self.acme.jti}"')

    def test_if_none_match_weak_304(self) -> None:
        self.assertNotModified(f'W/"{self.acme.jti}"')

    def test_if_none_match_list_304(self) -> None:
        self.assertNotModified(f'"OTHER", "{self.acme.jti}", "MORE"')

    def test_if_none_match_star_304(self) -> None:
        self.assertNotModified("*")

    def test_if_none_match_other_200(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{ACME}", headers={"If-None-Match": '"SOMETHINGELSE"'})
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("ACME"))

    def test_if_none_match_unquoted_200(self) -> None:
        # An entity tag is a quoted string, so the bare jti does not match it.
        response, _ = self.get(f"/jwt/v1/accounts/{ACME}", headers={"If-None-Match": self.acme.jti})
        self.assertEqual(response.code, 200)

    def test_text_flag_plain_jwt(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{ACME}?text=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertEqual(body, fixture_jwt("ACME"))

    def test_decode_flag_shows_header(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{ACME}?decode=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn('"alg": "ed25519-nkey"', body.decode())

    def test_decode_flag_literal_subjects(self) -> None:
        _, body = self.get(f"/jwt/v1/accounts/{ACME}?decode=true")
        text = body.decode()
        self.assertIn('"subject": "orders.>"', text)
        self.assertNotIn("\\u003e", text)

    def test_decode_flag_dates_iat(self) -> None:
        _, body = self.get(f"/jwt/v1/accounts/{ACME}?decode=true")
        self.assertIn(f'"iat": {FIXTURE_IAT},  // 2026-12-04 19:37:35 UTC', body.decode())

    def test_check_flag_expired_404(self) -> None:
        self.store_directly(resign("SHOP", operator_seed(), iat=FIXTURE_IAT + 10, exp=NOW - 60))
        response, body = self.get(f"/jwt/v1/accounts/{SHOP}?check=true")
        self.assertEqual(response.code, 404)
        self.assertIn(b"expired", body)

    def test_expired_without_check_200(self) -> None:
        expired = resign("SHOP", operator_seed(), iat=FIXTURE_IAT + 10, exp=NOW - 60)
        self.store_directly(expired)
        response, body = self.get(f"/jwt/v1/accounts/{SHOP}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, expired)

    def test_check_flag_valid_200(self) -> None:
        expiring_later = resign("SHOP", operator_seed(), iat=FIXTURE_IAT + 10, exp=NOW + 3600)
        self.store_directly(expiring_later)
        response, body = self.get(f"/jwt/v1/accounts/{SHOP}?check=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, expiring_later)

    def test_check_flag_no_exp_200(self) -> None:
        response, body = self.get(f"/jwt/v1/accounts/{ACME}?check=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("ACME"))


class NotifyTests(APITestCase):
    """GET with notify=true, and the system account served from configuration."""

    def test_notify_publishes_once(self) -> None:
        harness = self.use(build_harness(publisher=RecordingPublisher()))
        self.store_directly(fixture_jwt("ACME"))
        response, body = self.get(f"/jwt/v1/accounts/{ACME}?notify=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("ACME"))
        assert harness.publisher is not None
        self.assertEqual(harness.publisher.published, [(ACME, fixture_jwt("ACME"))])

    def test_get_without_notify_publishes_nothing(self) -> None:
        harness = self.use(build_harness(publisher=RecordingPublisher()))
        self.store_directly(fixture_jwt("ACME"))
        response, _ = self.get(f"/jwt/v1/accounts/{ACME}")
        self.assertEqual(response.code, 200)
        assert harness.publisher is not None
        self.assertEqual(harness.publisher.published, [])

    def test_notify_without_publisher_200(self) -> None:
        self.store_directly(fixture_jwt("ACME"))
        response, body = self.get(f"/jwt/v1/accounts/{ACME}?notify=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("ACME"))

    def test_system_account_fallback_served(self) -> None:
        system = decode_account(fixture_jwt("SYS"))
        self.use(build_harness(system_account=system))
        response, body = self.get(f"/jwt/v1/accounts/{SYS}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("SYS"))
        self.assertEqual(self.header(response, "ETag"), [f'"{system.jti}"'.encode()])

    def test_system_account_fallback_other_404(self) -> None:
        self.use(build_harness(system_account=decode_account(fixture_jwt("SYS"))))
        response, _ = self.get(f"/jwt/v1/accounts/{ACME}")
        self.assertEqual(response.code, 404)

    def test_stored_system_account_preferred(self) -> None:
        self.use(build_harness(system_account=decode_account(fixture_jwt("SYS"))))
        newer = resign("SYS", signing_seed(), iat=FIXTURE_IAT + 10)
        self.store_directly(newer)
        _, body = self.get(f"/jwt/v1/accounts/{SYS}")
        self.assertEqual(body, newer)


class PostAccountTests(APITestCase):
    """POST /jwt/v1/accounts/<key> with JWTs the server accepts."""

    def test_post_each_fixture_account(self) -> None:
        for name, key in (("SYS", SYS), ("ACME", ACME), ("SHOP", SHOP)):
            response, body = self.post(f"/jwt/v1/accounts/{key}", fixture_jwt(name))
            self.assertEqual(response.code, 200, f"{name}: {body!r}")
            self.assertEqual(body, b"", name)

    def test_post_then_get_returns_it(self) -> None:
        self.post(f"/jwt/v1/accounts/{SHOP}", fixture_jwt("SHOP"))
        response, body = self.get(f"/jwt/v1/accounts/{SHOP}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("SHOP"))

    def test_post_any_content_type(self) -> None:
        content_types = [
            "application/jwt",
            "application/json",
            "text/plain",
            "application/octet-stream",
            "application/x-www-form-urlencoded",
        ]
        for content_type in content_types:
            self.use(build_harness())
            response, body = self.post(
                f"/jwt/v1/accounts/{ACME}", fixture_jwt("ACME"), headers={"Content-Type": content_type}
            )
            self.assertEqual(response.code, 200, f"{content_type}: {body!r}")
            self.assertIsNotNone(self.harness.store.get(ACME), content_type)

    def test_post_trailing_newline_stripped(self) -> None:
        response, _ = self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("ACME") + b"\n")
        self.assertEqual(response.code, 200)
        _, body = self.get(f"/jwt/v1/accounts/{ACME}")
        self.assertEqual(body, fixture_jwt("ACME"))

    def test_post_via_double_slash(self) -> None:
        response, _ = self.post(f"/jwt/v1//accounts/{ACME}", fixture_jwt("ACME"))
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(self.harness.store.get(ACME))

    def test_post_publishes_after_save(self) -> None:
        store = MemoryStore()
        publisher = RecordingPublisher(store)
        self.use(build_harness(store=store, publisher=publisher))
        response, _ = self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("ACME"))
        self.assertEqual(response.code, 200)
        self.assertEqual(publisher.published, [(ACME, fixture_jwt("ACME"))])
        stored = publisher.stored_when_published[0]
        assert stored is not None
        self.assertEqual(stored.raw, fixture_jwt("ACME"))

    def test_post_same_jwt_twice(self) -> None:
        first, _ = self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("ACME"))
        second, body = self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("ACME"))
        self.assertEqual(first.code, 200)
        self.assertEqual(second.code, 200, body)
        stored = self.harness.store.get(ACME)
        assert stored is not None
        self.assertEqual(stored.raw, fixture_jwt("ACME"))

    def test_post_newer_iat_replaces(self) -> None:
        self.post(f"/jwt/v1/accounts/{SHOP}", fixture_jwt("SHOP"))
        newer = resign("SHOP", signing_seed(), iat=FIXTURE_IAT + 100)
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", newer)
        self.assertEqual(response.code, 200, body)
        _, served = self.get(f"/jwt/v1/accounts/{SHOP}")
        self.assertEqual(served, newer)

    def test_post_older_iat_409(self) -> None:
        newer = resign("SHOP", signing_seed(), iat=FIXTURE_IAT + 100)
        self.post(f"/jwt/v1/accounts/{SHOP}", newer)
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", fixture_jwt("SHOP"))
        self.assertEqual(response.code, 409)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn(b"is newer", body)
        self.assertIn(str(FIXTURE_IAT + 100).encode(), body)
        _, served = self.get(f"/jwt/v1/accounts/{SHOP}")
        self.assertEqual(served, newer)

    def test_older_iat_not_published(self) -> None:
        publisher = RecordingPublisher()
        self.use(build_harness(publisher=publisher))
        newer = resign("SHOP", signing_seed(), iat=FIXTURE_IAT + 100)
        self.post(f"/jwt/v1/accounts/{SHOP}", newer)
        self.post(f"/jwt/v1/accounts/{SHOP}", fixture_jwt("SHOP"))
        self.assertEqual(publisher.published, [(SHOP, newer)])

    def test_post_equal_iat_replaces(self) -> None:
        self.post(f"/jwt/v1/accounts/{SHOP}", fixture_jwt("SHOP"))
        claims = fixture_claims("SHOP")
        claims["nats"]["limits"]["conn"] = 20
        same_iat = resign("SHOP", signing_seed(), nats=claims["nats"])
        self.assertEqual(decode_account(same_iat).issued_at, FIXTURE_IAT)
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", same_iat)
        self.assertEqual(response.code, 200, body)
        _, served = self.get(f"/jwt/v1/accounts/{SHOP}")
        self.assertEqual(served, same_iat)

    def test_post_v1_account_jwt(self) -> None:
        claims = {
            "iat": FIXTURE_IAT + 100,
            "name": "LEGACY",
            "sub": ACME,
            "type": "account",
            "nats": {"limits": {"subs": -1, "conn": -1}},
        }
        legacy = encode(claims, operator_seed(), version=1)
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", legacy)
        self.assertEqual(response.code, 200, body)
        _, served = self.get(f"/jwt/v1/accounts/{ACME}")
        self.assertEqual(served, legacy)

    def test_post_built_account_claims(self) -> None:
        fresh = encode(account_claims(ACME, "ACME", FIXTURE_IAT + 5), signing_seed())
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", fresh)
        self.assertEqual(response.code, 200, body)

    def test_post_strict_operator_signing_key(self) -> None:
        self.use(build_harness(operator=strict_operator()))
        response, body = self.post(f"/jwt/v1/accounts/{SYS}", fixture_jwt("SYS"))
        self.assertEqual(response.code, 200, body)


def strict_operator() -> Operator:
    """Return the fixture operator re-signed with ``strict_signing_key_usage: true``."""
    claims = fixture_claims("demo")
    claims.pop("jti")
    claims.pop("iss")
    claims["nats"]["strict_signing_key_usage"] = True
    return Operator.from_token(decode_operator(encode(claims, operator_seed())))


class PostRejectionTests(APITestCase):
    """POST /jwt/v1/accounts/<key> with JWTs or requests the server rejects."""

    def test_reject_garbage_body(self) -> None:
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", b"this is not a JWT")
        self.assertRejected(response, body, "invalid JWT")

    def test_reject_empty_body(self) -> None:
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", b"")
        self.assertRejected(response, body, "body is empty")

    def test_reject_tampered_payload(self) -> None:
        header, _, signature = fixture_jwt("ACME").split(b".")
        claims = fixture_claims("ACME")
        claims["name"] = "EVIL"
        tampered = header + b"." + _b64(json.dumps(claims).encode()) + b"." + signature
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", tampered)
        self.assertRejected(response, body, "signature does not verify")
        self.assertIsNone(self.harness.store.get(ACME))

    def test_reject_wrong_header_alg(self) -> None:
        claims = account_claims(ACME, "ACME", FIXTURE_IAT + 5)
        token = sign_with_header({"typ": "JWT", "alg": "HS256"}, claims, operator_seed())
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", token)
        self.assertRejected(response, body, "unsupported algorithm 'HS256'")

    def test_reject_key_mismatch(self) -> None:
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("SHOP"))
        self.assertRejected(response, body, f"the JWT is for account {SHOP}, not for {ACME}")
        self.assertIsNone(self.harness.store.get(ACME))
        self.assertIsNone(self.harness.store.get(SHOP))

    def test_reject_invalid_url_key(self) -> None:
        response, body = self.post("/jwt/v1/accounts/nope", fixture_jwt("ACME"))
        self.assertRejected(response, body, "'nope' in the URL is not a valid account public key")

    def test_reject_user_key_in_url(self) -> None:
        response, body = self.post(f"/jwt/v1/accounts/{BOB}", user_jwt())
        self.assertRejected(response, body, "not a valid account public key")

    def test_reject_user_jwt(self) -> None:
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", user_jwt())
        self.assertRejected(response, body, "claim type 'user'")

    def test_reject_self_signed(self) -> None:
        token = encode(account_claims(SHOP, "SHOP", FIXTURE_IAT + 5), fixture_seed(SHOP))
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", token)
        self.assertRejected(response, body, "self-signed")

    def test_reject_unknown_operator(self) -> None:
        stranger = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
        token = encode(account_claims(SHOP, "SHOP", FIXTURE_IAT + 5), stranger)
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", token)
        self.assertRejected(response, body, f"untrusted issuer {public_key(stranger)}")

    def test_reject_identity_key_strict(self) -> None:
        self.use(build_harness(operator=strict_operator()))
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("ACME"))
        self.assertRejected(response, body, "strict signing key usage")

    def test_reject_expired_jwt(self) -> None:
        token = resign("ACME", signing_seed(), exp=NOW - 60)
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", token)
        self.assertRejected(response, body, "expired")
        self.assertIsNone(self.harness.store.get(ACME))

    def test_reject_not_yet_valid(self) -> None:
        token = resign("ACME", signing_seed(), nbf=NOW + 3600)
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", token)
        self.assertRejected(response, body, "not yet valid")

    def test_reject_import_bad_account(self) -> None:
        claims = fixture_claims("SHOP")
        claims["nats"]["imports"][0]["account"] = "ANOTAKEY"
        token = resign("SHOP", signing_seed(), nats=claims["nats"])
        response, body = self.post(f"/jwt/v1/accounts/{SHOP}", token)
        self.assertRejected(response, body, "account 'ANOTAKEY' is not a valid account key")

    def test_reject_export_bad_subject(self) -> None:
        claims = fixture_claims("ACME")
        claims["nats"]["exports"][1]["subject"] = "foo..bar"
        token = resign("ACME", signing_seed(), nats=claims["nats"])
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", token)
        self.assertRejected(response, body, "invalid subject 'foo..bar'")

    def test_reject_without_operator(self) -> None:
        self.use(build_harness(operator=None))
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("ACME"))
        self.assertRejected(response, body, "no operator is configured")

    def test_rejection_publishes_nothing(self) -> None:
        publisher = RecordingPublisher()
        self.use(build_harness(publisher=publisher))
        self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("SHOP"))
        self.assertEqual(publisher.published, [])

    def test_oversized_body_413(self) -> None:
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", b"x" * (ONE_MIB + 1))
        self.assertEqual(response.code, 413)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn(str(ONE_MIB).encode(), body)

    def test_body_of_one_mib_not_413(self) -> None:
        # Exactly 1 MiB is allowed, so the JWT padded with whitespace gets past the size check.
        jwt = fixture_jwt("ACME")
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", jwt + b"\n" * (ONE_MIB - len(jwt)))
        self.assertNotEqual(response.code, 413, body)

    def test_readonly_store_405(self) -> None:
        self.use(build_harness(store=MemoryStore(readonly=True)))
        response, body = self.post(f"/jwt/v1/accounts/{ACME}", fixture_jwt("ACME"))
        self.assertEqual(response.code, 405)
        self.assertEqual(self.header(response, "Allow"), [b"GET, HEAD"])
        self.assertIn(b"read-only", body)
        self.assertIsNone(self.harness.store.get(ACME))


class OperatorRouteTests(APITestCase):
    """GET /jwt/v1/operator."""

    def test_operator_jwt_served(self) -> None:
        response, body = self.get("/jwt/v1/operator")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), [b"application/jwt"])
        self.assertEqual(body, fixture_jwt("demo"))

    def test_operator_text_flag(self) -> None:
        response, body = self.get("/jwt/v1/operator?text=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertEqual(body, fixture_jwt("demo"))

    def test_operator_decode_flag(self) -> None:
        response, body = self.get("/jwt/v1/operator?decode=true")
        text = body.decode()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn('"alg": "ed25519-nkey"', text)
        self.assertIn(f'"sub": "{OPERATOR_KEY}"', text)
        self.assertIn(f'"iat": {FIXTURE_IAT},  // 2026-12-04 19:37:35 UTC', text)

    def test_operator_missing_404(self) -> None:
        self.use(build_harness(operator=None))
        response, body = self.get("/jwt/v1/operator")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn(b"no operator", body)


class HelpAndHealthTests(APITestCase):
    """GET /jwt/v1/help and GET /healthz."""

    def test_help_lists_every_route(self) -> None:
        response, body = self.get("/jwt/v1/help")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        text = body.decode()
        routes = [
            "GET /jwt/v1/accounts/\n",
            "GET /jwt/v1/accounts/<account public key>",
            "POST /jwt/v1/accounts/<account public key>",
            "GET /jwt/v1/operator",
            "GET /jwt/v1/help",
            "GET /healthz",
        ]
        for route in routes:
            self.assertIn(route, text)

    def health(self) -> tuple[IResponse, dict[str, Any]]:
        response, body = self.get("/healthz")
        return response, json.loads(body)

    def test_health_without_publisher(self) -> None:
        response, report = self.health()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), [b"application/json"])
        self.assertEqual(self.header(response, "Cache-Control"), [b"no-store"])
        self.assertEqual(report["status"], "ok")
        self.assertIs(report["nats"]["configured"], False)
        self.assertIs(report["nats"]["connected"], False)

    def test_health_counts_accounts(self) -> None:
        self.store_directly(fixture_jwt("ACME"))
        self.store_directly(fixture_jwt("SHOP"))
        _, report = self.health()
        self.assertEqual(report["store"], {"kind": "memory", "accounts": 2, "readonly": False})

    def test_health_connected_publisher(self) -> None:
        self.use(build_harness(publisher=RecordingPublisher(connected=True, pending_count=3)))
        _, report = self.health()
        self.assertIs(report["nats"]["configured"], True)
        self.assertIs(report["nats"]["connected"], True)
        self.assertEqual(report["nats"]["pending_updates"], 3)
        self.assertEqual(report["nats"]["server"], "nats://127.0.0.1:4222")

    def test_health_disconnected_publisher(self) -> None:
        self.use(build_harness(publisher=RecordingPublisher(connected=False, pending_count=7)))
        _, report = self.health()
        self.assertIs(report["nats"]["configured"], True)
        self.assertIs(report["nats"]["connected"], False)
        self.assertEqual(report["nats"]["pending_updates"], 7)


class RoutingErrorTests(APITestCase):
    """Unknown paths and methods."""

    def test_unknown_path_404(self) -> None:
        response, body = self.get("/no/such/path")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn(b"/jwt/v1/help", body)

    def test_put_account_405(self) -> None:
        response, body = self.call("PUT", f"/jwt/v1/accounts/{ACME}", data=fixture_jwt("ACME"))
        self.assertEqual(response.code, 405)
        allow = b",".join(self.header(response, "Allow") or []).decode()
        allowed = [method.strip() for method in allow.split(",")]
        self.assertIn("GET", allowed)
        self.assertIn("POST", allowed)
        self.assertNotIn("PUT", allowed)
        self.assertIn(b"PUT", body)
        self.assertIsNone(self.harness.store.get(ACME))


class DirectoryStoreTests(TestCase):
    """The API on a DirectoryStore, which writes in the real reactor's thread pool."""

    def setUp(self) -> None:
        # tempfile rather than self.mktemp(), which under pytest writes below the current folder.
        self.folder = tempfile.mkdtemp(prefix="nasd-http-")
        self.addCleanup(shutil.rmtree, self.folder, ignore_errors=True)
        self.store = DirectoryStore(reactor, self.folder)
        self.store.open()
        self.harness = build_harness(store=self.store)

    @inlineCallbacks
    def request(self, method: str, path: str, **kwargs: Any) -> Generator[Deferred[Any], Any, tuple[IResponse, bytes]]:
        """Send a request, then pump the in-memory connection until the response arrives (at most 10 s)."""
        stub = self.harness.stub
        answered: list[Any] = []
        # Deferred.called is already true while treq's chain waits on an inner Deferred,
        # so the loop waits for a callback added at the end of the chain instead.
        stub.request(method, BASE_URL + path, **kwargs).addBoth(answered.append)
        for _ in range(1000):
            stub.flush()
            if answered:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(answered, f"no answer to {method} {path} within 10 s")
        response = answered[0]
        if isinstance(response, Failure):
            response.raiseException()
        reading = response.content()
        stub.flush()
        body = yield reading
        return response, body

    @inlineCallbacks
    def test_post_writes_file(self) -> Generator[Deferred[Any], Any, None]:
        response, body = yield self.request("POST", f"/jwt/v1/accounts/{ACME}", data=fixture_jwt("ACME") + b"\n")
        self.assertEqual(response.code, 200, body)
        with open(os.path.join(self.folder, f"{ACME}.jwt"), "rb") as file:
            self.assertEqual(file.read(), fixture_jwt("ACME"))

    @inlineCallbacks
    def test_post_then_get(self) -> Generator[Deferred[Any], Any, None]:
        yield self.request("POST", f"/jwt/v1/accounts/{SHOP}", data=fixture_jwt("SHOP"))
        response, body = yield self.request("GET", f"/jwt/v1/accounts/{SHOP}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, fixture_jwt("SHOP"))

    @inlineCallbacks
    def test_older_iat_keeps_file(self) -> Generator[Deferred[Any], Any, None]:
        newer = resign("SHOP", signing_seed(), iat=FIXTURE_IAT + 100)
        first, _ = yield self.request("POST", f"/jwt/v1/accounts/{SHOP}", data=newer)
        second, body = yield self.request("POST", f"/jwt/v1/accounts/{SHOP}", data=fixture_jwt("SHOP"))
        self.assertEqual(first.code, 200)
        self.assertEqual(second.code, 409, body)
        with open(os.path.join(self.folder, f"{SHOP}.jwt"), "rb") as file:
            self.assertEqual(file.read(), newer)

    @inlineCallbacks
    def test_save_tracked_until_done(self) -> Generator[Deferred[Any], Any, None]:
        response, _ = yield self.request("POST", f"/jwt/v1/accounts/{ACME}", data=fixture_jwt("ACME"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.harness.api.in_flight, set())


class BoundedRequestTests(TestCase):
    """BoundedRequest on a real twisted.web Site, fed raw HTTP over a StringTransport."""

    def setUp(self) -> None:
        self.harness = build_harness()
        self.requests: list[BoundedRequest] = []
        created_requests = self.requests

        class RecordingRequest(BoundedRequest):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                created_requests.append(self)

        # timeout=None: no idle timer, so no delayed call is left in the global reactor.
        self.site = Site(self.harness.api.resource(), timeout=None)
        self.site.requestFactory = RecordingRequest

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def post_head(self, length_header: bytes) -> bytes:
        return (
            b"POST /jwt/v1/accounts/"
            + ACME.encode()
            + b" HTTP/1.1\r\nHost: nasd.test\r\n"
            + length_header
            + b"\r\n\r\n"
        )

    def assert413(self, transport: StringTransport) -> None:
        written = transport.value()
        self.assertTrue(written.startswith(b"HTTP/1.1 413 "), written[:200])
        self.assertIn(b"Connection: close\r\n", written)
        self.assertTrue(written.endswith(f"larger than {ONE_MIB} bytes\n".encode()), written[-200:])
        self.assertTrue(transport.disconnecting)

    def test_bounded_site_serves_get(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /jwt/v1/help HTTP/1.1\r\nHost: nasd.test\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:200])

    def test_bounded_site_accepts_post(self) -> None:
        protocol, transport = self.connect()
        jwt = fixture_jwt("ACME")
        protocol.dataReceived(self.post_head(b"Content-Length: " + str(len(jwt)).encode()) + jwt)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:200])
        self.assertIsNotNone(self.harness.store.get(ACME))

    def test_announced_oversize_413(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(self.post_head(b"Content-Length: 2000000"))
        self.assert413(transport)
        self.assertEqual(len(self.requests), 1)
        self.assertIsNone(self.requests[0].content)

    def test_announced_oversize_ignores_body(self) -> None:
        # twisted.protocols.tls (Twisted 26.10) passes decrypted bytes on in pieces of up
        # to 32 KiB and keeps doing so after loseConnection. Such late body bytes must be dropped.
        protocol, transport = self.connect()
        protocol.dataReceived(self.post_head(b"Content-Length: 2000000"))
        protocol.dataReceived(b"x" * 65536)
        self.assert413(transport)
        self.assertIsNone(self.requests[0].content)
        self.assertIsNone(self.harness.store.get(ACME))

    def test_announced_one_mib_accepted(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(self.post_head(b"Content-Length: " + str(ONE_MIB).encode()))
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_chunked_oversize_413(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(self.post_head(b"Transfer-Encoding: chunked"))
        piece = 64 * 1024
        for _ in range(ONE_MIB // piece):
            protocol.dataReceived(b"%x\r\n" % piece + b"\n" * piece + b"\r\n")
        self.assertEqual(transport.value(), b"", "1 MiB of chunks is within the limit")
        protocol.dataReceived(b"1\r\n\n\r\n")
        self.assert413(transport)

    def test_chunked_oversize_stores_nothing(self) -> None:
        # The first chunk is a valid JWT, and the terminating chunk arrives in the same read
        # as the chunk over the limit. The server must send only the 413 and store nothing.
        protocol, transport = self.connect()
        protocol.dataReceived(self.post_head(b"Transfer-Encoding: chunked"))
        jwt = fixture_jwt("ACME")
        padding = b"\n" * ONE_MIB
        protocol.dataReceived(
            b"%x\r\n" % len(jwt) + jwt + b"\r\n" + b"%x\r\n" % len(padding) + padding + b"\r\n0\r\n\r\n"
        )
        self.assert413(transport)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertIsNone(self.harness.store.get(ACME))
