"""Tests for activation tokens: the hash id, the upload checks, the stores and the routes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Generator
from typing import Any

import nkeys
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IResponse

from nasd.activations import (
    DirectoryActivationStore,
    MemoryActivationStore,
    StoredActivation,
    clean_subject,
    hash_id,
    parse_hash_id,
)
from nasd.config import Config, with_overrides
from nasd.jwt import decode
from nasd.service import build_service
from nasd.store import DirectoryStore, MemoryStore
from tests.test_http import (
    BASE_URL,
    NOW,
    TEXT_PLAIN,
    APITestCase,
    RecordingPublisher,
    build_harness,
    resign,
)
from tests.tokens import (
    ACME,
    BOB,
    OPERATOR_KEY,
    SHOP,
    STORE,
    SYS,
    encode,
    fixture_claims,
    fixture_jwt,
    fixture_seed,
    new_seed,
)

ACME_SIGNING_KEY = "AAXI74PGJL6QMXTCSFXFMIF5GHPFPA5WLJIKRDG4JPPDDFQUKWAWLA2M"
SYS_SIGNING_KEY = "ABMXPZEJZBOY5UXDZQUMRXTP3M6F6UYGWM2WFV5UBLPDJMRYLF2YI5WE"

# Worked out with openssl and coreutils, not with nasd:
#   printf '%s' "$ACME.$SHOP.orders" | openssl dgst -sha256 -binary | base32
ORDERS_HASH = "ZZUHUFCDI7FXAWXU4AIDR5SSDHWC26PW3CVNWB6VOYEQNYYBSJTQ===="


def expected_hash(issuer: str, subject: str, cleaned: str) -> str:
    """Compute a hash id from the rule itself: padded base32 of SHA-256("iss.sub.cleaned")."""
    digest = hashlib.sha256(f"{issuer}.{subject}.{cleaned}".encode()).digest()
    return base64.b32encode(digest).decode()


def activation_claims(
    subject: str = "orders.*",
    kind: str = "stream",
    importer: str = SHOP,
    iat: int = NOW - 60,
    issuer_account: str | None = None,
    **claims: Any,
) -> dict[str, Any]:
    """Build v2 activation claims that let *importer* import *subject*."""
    nats: dict[str, Any] = {"subject": subject, "kind": kind, "type": "activation", "version": 2}
    if issuer_account is not None:
        nats["issuer_account"] = issuer_account
    return {"iat": iat, "name": subject, "sub": importer, "nats": nats, **claims}


def acme_activation(seed_of: str = ACME, **changes: Any) -> bytes:
    """Sign an activation from ACME (or with another key's seed) for SHOP."""
    return encode(activation_claims(**changes), fixture_seed(seed_of))


def hash_of(token: bytes) -> str:
    return StoredActivation.from_token(decode(token)).hash_id


class ActivationPublisher(RecordingPublisher):
    """A publisher that also records activation updates."""

    def __init__(self) -> None:
        super().__init__()
        self.activations: list[tuple[str, str, bytes]] = []

    def publish_activation_update(self, account: str, hash_id: str, jwt: bytes) -> None:
        self.activations.append((account, hash_id, jwt))


class HashIdTests(TestCase):
    """The hash id nsc prints for an activation, and the parsing of hash ids in URLs."""

    def test_clean_subject_cases(self) -> None:
        cases = {
            "foo.*": "foo",
            "foo.*.bar": "foo",
            ">": "_",
            "*.bar": "_",
            "foo.bar": "foo.bar",
            "a.b.>": "a.b",
        }
        for subject, cleaned in cases.items():
            self.assertEqual(clean_subject(subject), cleaned, subject)

    def test_hash_follows_rule(self) -> None:
        cases = {"foo.*": "foo", "foo.*.bar": "foo", ">": "_", "*.bar": "_", "foo.bar": "foo.bar"}
        for subject, cleaned in cases.items():
            self.assertEqual(hash_id(ACME, SHOP, subject), expected_hash(ACME, SHOP, cleaned), subject)

    def test_hash_known_vector(self) -> None:
        self.assertEqual(hash_id(ACME, SHOP, "orders.*"), ORDERS_HASH)
        self.assertEqual(hash_id(ACME, SHOP, "orders.>"), ORDERS_HASH)

    def test_hash_keeps_padding(self) -> None:
        value = hash_id(ACME, SHOP, "foo.bar")
        self.assertEqual(len(value), 56)
        self.assertTrue(value.endswith("===="))

    def test_hash_depends_on_each_part(self) -> None:
        hashes = {hash_id(ACME, SHOP, "a"), hash_id(SHOP, ACME, "a"), hash_id(ACME, SHOP, "b")}
        self.assertEqual(len(hashes), 3)

    def test_parse_padded_and_unpadded(self) -> None:
        self.assertEqual(parse_hash_id(ORDERS_HASH), ORDERS_HASH)
        self.assertEqual(parse_hash_id(ORDERS_HASH.rstrip("=")), ORDERS_HASH)

    def test_parse_rejects_malformed(self) -> None:
        last = ORDERS_HASH[51]
        other_last = "B" if last != "B" else "C"
        for text in (
            ORDERS_HASH.lower(),
            ORDERS_HASH[:-1],
            ORDERS_HASH + "=",
            ORDERS_HASH[:51] + other_last + "====",
            "../" + ORDERS_HASH[3:],
            "1" * 52,
            "",
        ):
            self.assertIsNone(parse_hash_id(text), text)


class ActivationAPITestCase(APITestCase):
    """The API with ACME (exporter, it has a signing key) and SHOP (importer) stored."""

    def setUp(self) -> None:
        super().setUp()
        self.publisher = ActivationPublisher()
        self.use(build_harness(publisher=self.publisher))
        self.store_directly(fixture_jwt("ACME"))
        self.store_directly(fixture_jwt("SHOP"))

    def upload(self, token: bytes, **kwargs: Any) -> tuple[IResponse, bytes]:
        return self.post("/jwt/v1/activations", token, **kwargs)

    def fetch(self, text: str, query: str = "", **kwargs: Any) -> tuple[IResponse, bytes]:
        return self.get(f"/jwt/v1/activations/{text}{query}", **kwargs)


class UploadTests(ActivationAPITestCase):
    """POST /jwt/v1/activations: accepted tokens, stored and announced."""

    def test_post_then_get_round_trip(self) -> None:
        token = acme_activation()
        response, body = self.upload(token, headers={"Content-Type": "application/jwt"})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body, b"")

        response, body = self.fetch(ORDERS_HASH)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, token)
        self.assertEqual(self.header(response, "Content-Type"), [b"application/jwt"])

    def test_post_any_content_type(self) -> None:
        for content_type in ("text/plain", "application/octet-stream", "application/x-www-form-urlencoded"):
            token = acme_activation(subject=f"ct.{content_type.split('/')[1]}")
            response, body = self.upload(token, headers={"Content-Type": content_type})
            self.assertEqual(response.code, 200, body)
            self.assertEqual(self.harness.api.activations.get(hash_of(token)).raw, token)

    def test_post_trailing_newline_stripped(self) -> None:
        token = acme_activation()
        self.assertEqual(self.upload(token + b"\n")[0].code, 200)
        self.assertEqual(self.fetch(ORDERS_HASH)[1], token)

    def test_post_publishes_activation(self) -> None:
        token = acme_activation()
        self.upload(token)
        self.assertEqual(self.publisher.activations, [(ACME, ORDERS_HASH, token)])
        self.assertEqual(self.publisher.published, [])

    def test_post_without_activation_publisher(self) -> None:
        publisher = RecordingPublisher()
        self.use(build_harness(store=self.harness.store, publisher=publisher))
        response, body = self.upload(acme_activation())
        self.assertEqual(response.code, 200, body)
        self.assertEqual(publisher.published, [])

    def test_post_publish_error_logged(self) -> None:
        def reject(account: str, hash_id: str, jwt: bytes) -> None:
            raise ValueError(f"invalid activation hash ID {hash_id!r}")

        self.publisher.publish_activation_update = reject  # type: ignore[method-assign]
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        response, body = self.upload(acme_activation())
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.fetch(ORDERS_HASH)[0].code, 200)
        lines = [formatEvent(event) for event in events]
        self.assertTrue(any(line.startswith(f"publishing activation JWT {ORDERS_HASH} failed") for line in lines))

    def test_post_without_publisher(self) -> None:
        self.use(build_harness(store=self.harness.store))
        response, body = self.upload(acme_activation())
        self.assertEqual(response.code, 200, body)

    def test_post_logs_issuer_and_hash(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.upload(acme_activation())
        lines = [formatEvent(event) for event in events]
        self.assertIn(f"updated activation JWT - {ACME[:12]} - {ORDERS_HASH}", lines)

    def test_signing_key_with_issuer_account(self) -> None:
        token = acme_activation(seed_of=ACME_SIGNING_KEY, issuer_account=ACME)
        response, body = self.upload(token)
        self.assertEqual(response.code, 200, body)
        expected = expected_hash(ACME_SIGNING_KEY, SHOP, "orders")
        self.assertEqual(self.fetch(expected)[1], token)
        self.assertEqual(self.publisher.activations, [(ACME, expected, token)])

    def test_scoped_signing_key_accepted(self) -> None:
        claims = fixture_claims("ACME")
        claims["nats"]["signing_keys"] = [{"kind": "user_scope", "key": ACME_SIGNING_KEY, "role": "x", "template": {}}]
        self.store_directly(resign("ACME", fixture_seed(OPERATOR_KEY), iat=NOW - 600, nats=claims["nats"]))
        token = acme_activation(seed_of=ACME_SIGNING_KEY, issuer_account=ACME)
        response, body = self.upload(token)
        self.assertEqual(response.code, 200, body)

    def test_service_activation_accepted(self) -> None:
        token = acme_activation(subject="help.me", kind="service")
        response, body = self.upload(token)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.fetch(expected_hash(ACME, SHOP, "help.me"))[1], token)

    def test_v1_activation_accepted(self) -> None:
        claims = {"iat": NOW - 60, "sub": SHOP, "type": "activation", "nats": {"subject": "orders.*", "type": "stream"}}
        token = encode(claims, fixture_seed(ACME), version=1)
        response, body = self.upload(token)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.fetch(ORDERS_HASH)[1], token)

    def test_system_account_file_counts_as_known(self) -> None:
        sys_token = decode(fixture_jwt("SYS"))
        self.use(build_harness(store=self.harness.store, system_account=sys_token))
        token = encode(activation_claims(subject="$SYS.X"), fixture_seed(SYS))
        response, body = self.upload(token)
        self.assertEqual(response.code, 200, body)

    def test_same_jwt_twice(self) -> None:
        token = acme_activation()
        self.assertEqual(self.upload(token)[0].code, 200)
        self.assertEqual(self.upload(token)[0].code, 200)
        self.assertEqual(self.fetch(ORDERS_HASH)[1], token)
        self.assertEqual(len(self.publisher.activations), 2)

    def test_newer_iat_replaces(self) -> None:
        older, newer = acme_activation(iat=NOW - 100), acme_activation(iat=NOW - 50)
        self.upload(older)
        self.assertEqual(self.upload(newer)[0].code, 200)
        self.assertEqual(self.fetch(ORDERS_HASH)[1], newer)

    def test_older_iat_409(self) -> None:
        older, newer = acme_activation(iat=NOW - 100), acme_activation(iat=NOW - 50)
        self.upload(newer)
        response, body = self.upload(older)
        self.assertEqual(response.code, 409)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn(b"newer", body)
        self.assertEqual(self.fetch(ORDERS_HASH)[1], newer)
        self.assertEqual(len(self.publisher.activations), 1)

    def test_oversized_body_413(self) -> None:
        response, _ = self.upload(b"x" * (1024 * 1024 + 1))
        self.assertEqual(response.code, 413)

    def test_readonly_store_405(self) -> None:
        store = MemoryStore(readonly=True)
        self.use(build_harness(store=store))
        response, body = self.upload(acme_activation())
        self.assertEqual(response.code, 405)
        self.assertIn(b"read-only", body)

    def test_get_on_upload_path_405(self) -> None:
        response, _ = self.get("/jwt/v1/activations")
        self.assertEqual(response.code, 405)


class RejectionTests(ActivationAPITestCase):
    """POST /jwt/v1/activations: tokens that nats-server would not honour get 400 and a reason."""

    def assertNotStored(self, token: bytes) -> None:
        self.assertIsNone(self.harness.api.activations.get(hash_of(token)))
        self.assertEqual(self.publisher.activations, [])

    def test_unknown_account(self) -> None:
        seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        token = encode(activation_claims(), seed)
        self.assertRejected(*self.upload(token), "is not an account stored on this server")
        self.assertNotStored(token)

    def test_known_key_account_not_stored(self) -> None:
        # SYS is a real account of the operator, but it is not stored in this harness.
        token = encode(activation_claims(), fixture_seed(SYS))
        self.assertRejected(*self.upload(token), f"the issuer {SYS} is not an account stored")
        self.assertNotStored(token)

    def test_issuer_account_not_stored(self) -> None:
        token = encode(activation_claims(issuer_account=SYS), fixture_seed(SYS_SIGNING_KEY))
        self.assertRejected(*self.upload(token), f"account {SYS} is not stored on this server")

    def test_signing_key_without_issuer_account(self) -> None:
        token = acme_activation(seed_of=ACME_SIGNING_KEY)
        self.assertRejected(*self.upload(token), "set issuer_account")
        self.assertNotStored(token)

    def test_signing_key_of_other_account(self) -> None:
        token = acme_activation(seed_of=ACME_SIGNING_KEY, issuer_account=SHOP)
        self.assertRejected(*self.upload(token), f"is not a signing key of account {SHOP}")

    def test_account_not_trusted_by_operator(self) -> None:
        stranger_operator = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
        store = MemoryStore()
        self.successResultOf(store.save(decode(resign("ACME", stranger_operator))))
        self.use(build_harness(store=store))
        self.assertRejected(*self.upload(acme_activation()), "is not signed by operator demo")

    def test_no_operator(self) -> None:
        self.use(build_harness(store=self.harness.store, operator=None))
        self.assertRejected(*self.upload(acme_activation()), "no operator is configured")

    def test_operator_issued(self) -> None:
        token = encode(activation_claims(), fixture_seed(OPERATOR_KEY))
        self.assertRejected(*self.upload(token), "is not an account key")

    def test_expired(self) -> None:
        token = acme_activation(exp=NOW - 1)
        self.assertRejected(*self.upload(token), "the activation JWT expired at")
        self.assertNotStored(token)

    def test_not_yet_valid(self) -> None:
        token = acme_activation(nbf=NOW + 3600)
        self.assertRejected(*self.upload(token), "is not valid before")

    def test_future_expiry_accepted(self) -> None:
        self.assertEqual(self.upload(acme_activation(exp=NOW + 3600))[0].code, 200)

    def test_account_jwt_rejected(self) -> None:
        self.assertRejected(*self.upload(fixture_jwt("SHOP")), "expected an activation JWT, got claim type 'account'")

    def test_subject_not_account(self) -> None:
        token = acme_activation(importer=BOB)
        self.assertRejected(*self.upload(token), "is not an account public key")

    def test_invalid_import_subject(self) -> None:
        self.assertRejected(*self.upload(acme_activation(subject="a..b")), "is not a valid subject")

    def test_missing_import_subject(self) -> None:
        claims = activation_claims()
        del claims["nats"]["subject"]
        self.assertRejected(*self.upload(encode(claims, fixture_seed(ACME))), "is not a valid subject")

    def test_invalid_kind(self) -> None:
        self.assertRejected(*self.upload(acme_activation(kind="both")), "neither 'stream' nor 'service'")

    def test_service_with_wildcard(self) -> None:
        token = acme_activation(subject="help.*", kind="service")
        self.assertRejected(*self.upload(token), "cannot have a wildcard subject")

    def test_issuer_account_not_key(self) -> None:
        token = acme_activation(seed_of=ACME_SIGNING_KEY, issuer_account="ACME")
        self.assertRejected(*self.upload(token), "issuer_account 'ACME' is not an account public key")

    def test_empty_body(self) -> None:
        self.assertRejected(*self.upload(b""), "the request body is empty")

    def test_garbage_body(self) -> None:
        self.assertRejected(*self.upload(b"not a jwt"), "invalid JWT")

    def test_tampered_signature(self) -> None:
        token = acme_activation()
        header, payload, signature = token.split(b".")
        changed = decode(token).claims | {"sub": ACME}
        forged_payload = base64.urlsafe_b64encode(json.dumps(changed).encode()).rstrip(b"=")
        self.assertRejected(*self.upload(header + b"." + forged_payload + b"." + signature), "invalid JWT")


class GetActivationTests(ActivationAPITestCase):
    """GET and HEAD /jwt/v1/activations/<hash id>."""

    def setUp(self) -> None:
        super().setUp()
        self.token = acme_activation()
        self.jti = decode(self.token).jti
        response, body = self.upload(self.token)
        self.assertEqual(response.code, 200, body)
        self.publisher.activations.clear()

    def test_percent_encoded_hash(self) -> None:
        encoded = ORDERS_HASH.replace("=", "%3D")
        response, body = self.fetch(encoded)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.token)

    def test_lowercase_percent_encoding(self) -> None:
        response, body = self.fetch(ORDERS_HASH.replace("=", "%3d"))
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.token)

    def test_unpadded_hash(self) -> None:
        response, body = self.fetch(ORDERS_HASH.rstrip("="))
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.token)

    def test_etag_and_cache_control(self) -> None:
        response, _ = self.fetch(ORDERS_HASH)
        self.assertEqual(self.header(response, "ETag"), [f'"{self.jti}"'.encode()])
        self.assertEqual(self.header(response, "Cache-Control"), [b"no-cache"])

    def test_if_none_match_304(self) -> None:
        response, body = self.fetch(ORDERS_HASH, headers={"If-None-Match": f'"{self.jti}"'})
        self.assertEqual(response.code, 304)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, "ETag"), [f'"{self.jti}"'.encode()])

    def test_if_none_match_other_200(self) -> None:
        response, body = self.fetch(ORDERS_HASH, headers={"If-None-Match": '"OTHER"'})
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.token)

    def test_head_sends_headers_only(self) -> None:
        response, body = self.call("HEAD", f"/jwt/v1/activations/{ORDERS_HASH}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, "Content-Length"), [str(len(self.token)).encode()])
        self.assertEqual(self.header(response, "ETag"), [f'"{self.jti}"'.encode()])

    def test_text_flag(self) -> None:
        response, body = self.fetch(ORDERS_HASH, "?text=true")
        self.assertEqual(body, self.token)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])

    def test_decode_flag(self) -> None:
        response, body = self.fetch(ORDERS_HASH, "?decode=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        text = body.decode()
        self.assertIn('"alg": "ed25519-nkey"', text)
        self.assertIn('"subject": "orders.*"', text)
        self.assertIn('"type": "activation"', text)

    def test_notify_flag_publishes(self) -> None:
        response, _ = self.fetch(ORDERS_HASH, "?notify=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.publisher.activations, [(ACME, ORDERS_HASH, self.token)])

    def test_without_notify_publishes_nothing(self) -> None:
        self.fetch(ORDERS_HASH)
        self.assertEqual(self.publisher.activations, [])

    def test_check_flag_expired_404(self) -> None:
        token = acme_activation(subject="soon.*", exp=NOW + 10)
        self.assertEqual(self.upload(token)[0].code, 200)
        self.harness.clock.advance(20)
        self.assertEqual(self.fetch(hash_of(token))[0].code, 200)
        self.assertEqual(self.fetch(hash_of(token), "?check=true")[0].code, 404)

    def test_unknown_hash_404(self) -> None:
        other = hash_id(ACME, SHOP, "nothing")
        response, body = self.fetch(other)
        self.assertEqual(response.code, 404)
        self.assertEqual(self.header(response, "Content-Type"), [TEXT_PLAIN])
        self.assertIn(other.encode(), body)

    def test_malformed_hash_404(self) -> None:
        for text in ("abc", ORDERS_HASH.lower(), "%2E%2E", ORDERS_HASH[:-5] + "%00===="):
            response, body = self.fetch(text)
            self.assertEqual(response.code, 404, text)


class DirectoryActivationTests(TestCase):
    """Activations beside a DirectoryStore: files written in the real reactor's thread pool."""

    def setUp(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="nasd-activations-")
        self.addCleanup(shutil.rmtree, self.folder, ignore_errors=True)
        for name, key in (("ACME", ACME), ("SHOP", SHOP)):
            with open(os.path.join(self.folder, f"{key}.jwt"), "wb") as file:
                file.write(fixture_jwt(name))
        self.store = DirectoryStore(reactor, self.folder)
        self.store.open()
        self.activations_folder = os.path.join(self.folder, "activations")
        self.harness = build_harness(
            store=self.store, activations=DirectoryActivationStore(reactor, self.activations_folder)
        )

    @inlineCallbacks
    def request(self, method: str, path: str, **kwargs: Any) -> Generator[Deferred[Any], Any, tuple[IResponse, bytes]]:
        """Send a request, then pump the in-memory connection until the response arrives (at most 10 s)."""
        stub = self.harness.stub
        answered: list[Any] = []
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

    def file_path(self, hash_value: str) -> str:
        return os.path.join(self.activations_folder, hash_value.rstrip("=") + ".jwt")

    @inlineCallbacks
    def test_post_writes_private_file(self) -> Generator[Deferred[Any], Any, None]:
        token = acme_activation()
        response, body = yield self.request("POST", "/jwt/v1/activations", data=token)
        self.assertEqual(response.code, 200, body)
        path = self.file_path(ORDERS_HASH)
        with open(path, "rb") as file:
            self.assertEqual(file.read(), token)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.activations_folder).st_mode), 0o700)
        self.assertEqual(os.listdir(self.activations_folder), [ORDERS_HASH.rstrip("=") + ".jwt"])

    @inlineCallbacks
    def test_file_served_after_restart(self) -> Generator[Deferred[Any], Any, None]:
        token = acme_activation()
        yield self.request("POST", "/jwt/v1/activations", data=token)
        restarted = DirectoryActivationStore(reactor, self.activations_folder)
        self.assertEqual(restarted.get(ORDERS_HASH).raw, token)

    @inlineCallbacks
    def test_older_iat_keeps_file(self) -> Generator[Deferred[Any], Any, None]:
        newer, older = acme_activation(iat=NOW - 10), acme_activation(iat=NOW - 20)
        yield self.request("POST", "/jwt/v1/activations", data=newer)
        response, _ = yield self.request("POST", "/jwt/v1/activations", data=older)
        self.assertEqual(response.code, 409)
        with open(self.file_path(ORDERS_HASH), "rb") as file:
            self.assertEqual(file.read(), newer)

    @inlineCallbacks
    def test_activations_not_listed_as_accounts(self) -> Generator[Deferred[Any], Any, None]:
        yield self.request("POST", "/jwt/v1/activations", data=acme_activation())
        reopened = DirectoryStore(reactor, self.folder)
        reopened.open()
        self.assertEqual(sorted(reopened.keys()), sorted([ACME, SHOP]))

    def test_file_under_wrong_name_ignored(self) -> None:
        os.makedirs(self.activations_folder, mode=0o700)
        other = hash_id(ACME, SHOP, "elsewhere")
        with open(self.file_path(other), "wb") as file:
            file.write(acme_activation())
        store = DirectoryActivationStore(reactor, self.activations_folder)
        self.assertIsNone(store.get(other))
        self.assertIsNone(store.get(ORDERS_HASH))

    def test_file_with_bad_signature_ignored(self) -> None:
        os.makedirs(self.activations_folder, mode=0o700)
        token = acme_activation()
        with open(self.file_path(ORDERS_HASH), "wb") as file:
            file.write(token[:-4] + b"AAAA")
        self.assertIsNone(DirectoryActivationStore(reactor, self.activations_folder).get(ORDERS_HASH))

    def test_file_changed_by_hand_read_again(self) -> None:
        store = DirectoryActivationStore(reactor, self.activations_folder)
        os.makedirs(self.activations_folder, mode=0o700)
        first, second = acme_activation(iat=NOW - 20), acme_activation(iat=NOW - 10, name="changed")
        with open(self.file_path(ORDERS_HASH), "wb") as file:
            file.write(first)
        self.assertEqual(store.get(ORDERS_HASH).raw, first)
        with open(self.file_path(ORDERS_HASH), "wb") as file:
            file.write(second + b"\n")
        self.assertEqual(store.get(ORDERS_HASH).raw, second)
        os.unlink(self.file_path(ORDERS_HASH))
        self.assertIsNone(store.get(ORDERS_HASH))

    def test_invalid_hash_never_becomes_path(self) -> None:
        store = DirectoryActivationStore(reactor, self.activations_folder)
        self.assertIsNone(store.get("../" + ORDERS_HASH[3:]))
        self.assertIsNone(store.get(ORDERS_HASH.lower()))


class ServiceWiringTests(TestCase):
    """build_service puts activations beside a store folder, or in memory without one."""

    def setUp(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="nasd-activations-service-")
        self.addCleanup(shutil.rmtree, self.folder, ignore_errors=True)

    def config(self, store_dir: str | None) -> Config:
        return with_overrides(Config(operator=str(STORE / "demo.jwt")), http={"port": 0}, store={"dir": store_dir})

    def test_directory_store_gets_folder(self) -> None:
        service = build_service(MemoryReactorClock(), self.config(os.path.join(self.folder, "jwt")))
        activations = service.api.activations
        self.assertIsInstance(activations, DirectoryActivationStore)
        self.assertEqual(activations.location, os.path.join(self.folder, "jwt", "activations"))

    def test_memory_store_keeps_memory(self) -> None:
        service = build_service(MemoryReactorClock(), self.config(None))
        self.assertIsInstance(service.api.activations, MemoryActivationStore)
        self.assertNotIsInstance(service.api.activations, DirectoryActivationStore)


class HelpTests(APITestCase):
    def test_help_lists_activation_routes(self) -> None:
        _, body = self.get("/jwt/v1/help")
        text = body.decode()
        self.assertIn("POST /jwt/v1/activations\n", text)
        self.assertIn("GET /jwt/v1/activations/<hash id>\n", text)
