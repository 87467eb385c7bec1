"""Tests for self-signed account uploads and the signing service, through the HTTP API
(StubTreq) with a stand-in NATS connection and a Clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nkeys
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IResponse

from nasd.config import Config, NATSConfig
from nasd.http import HELP_TEXT, AccountServerAPI
from nasd.jwt import Operator, decode_account
from nasd.nats import (
    MaxPayloadExceededError,
    Message,
    NoRespondersError,
    NotConnectedError,
    RequestTimeoutError,
)
from nasd.service import StartupError, build_signer
from nasd.signing import MAX_REPLY_TEXT, SigningService, check_self_signed
from nasd.store import MemoryStore
from tests.test_http import (
    BASE_URL,
    FIXTURE_IAT,
    NOW,
    TEXT_PLAIN,
    RecordingPublisher,
    fixture_operator,
    signing_seed,
)
from tests.tokens import ACME, OPERATOR_SIGNING_KEY, account_claims, encode, new_seed, public_key

SUBJECT = "nasd.sign"
TIMEOUT = 1.5


def claims_of(jwt: bytes) -> dict[str, Any]:
    """Return the claims of *jwt* without iss and jti, ready to be signed again."""
    claims = dict(decode_account(jwt).claims)
    claims.pop("iss")
    claims.pop("jti")
    return claims


def operator_signs(payload: bytes) -> bytes:
    """Act as a signing service: sign the received account claims with the operator signing key."""
    return encode(claims_of(payload), signing_seed())


class FakeConnection:
    """A NATS connection stand-in whose signing service replies with ``answer(payload)``.

    With *error*, each request fails with it; with *raises*, request raises it at once,
    as NATSConnection does for an oversized payload. With neither an answer nor an
    error, no reply arrives and the request times out on the clock.
    """

    def __init__(
        self,
        clock: Clock,
        answer: Callable[[bytes], bytes] | None = None,
        error: Exception | None = None,
        raises: Exception | None = None,
    ) -> None:
        self.clock = clock
        self.answer = answer
        self.error = error
        self.raises = raises
        self.requests: list[tuple[str, bytes, float]] = []
        self.pending: list[Deferred[Message]] = []

    def request(self, subject: str, payload: bytes, timeout: float) -> Deferred[Message]:
        if self.raises is not None:
            raise self.raises
        self.requests.append((subject, payload, timeout))
        if self.error is not None:
            return fail(self.error)
        if self.answer is not None:
            return succeed(Message(subject="_INBOX.test.1", sid="1", reply=None, payload=self.answer(payload)))
        waiting: Deferred[Message] = Deferred()
        timeout_error = RequestTimeoutError(f"no reply to the request on {subject} within {timeout} s")
        self.clock.callLater(timeout, waiting.errback, timeout_error)
        self.pending.append(waiting)
        return waiting


class SigningTestCase(TestCase):
    """A fresh API per test, trusting the fixture operator, with a fresh account key."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.publisher = RecordingPublisher(self.store)
        self.account_seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        self.account = public_key(self.account_seed)
        self.self_signed = encode(account_claims(self.account, "TEAM", FIXTURE_IAT + 10), self.account_seed)
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def serve(
        self, connection: FakeConnection | None, operator: Operator | None = None, signer: bool = True
    ) -> FakeConnection | None:
        """Build the API with a signing service on *connection* (none when *signer* is false)."""
        service = SigningService(lambda: connection, SUBJECT, TIMEOUT) if signer else None
        trusted = operator if operator is not None else fixture_operator()
        api = AccountServerAPI(self.clock, self.store, trusted, self.publisher, signer=service)
        self.stub = StubTreq(api.resource())
        return connection

    def post(self, jwt: bytes, key: str | None = None, path: str = "/jwt/v1/accounts/") -> tuple[IResponse, bytes]:
        requested = self.stub.request("POST", f"{BASE_URL}{path}{key or self.account}", data=jwt)
        response = self.successResultOf(requested)
        body = self.successResultOf(response.content())
        return response, body

    def content_type(self, response: IResponse) -> list[bytes] | None:
        return response.headers.getRawHeaders(b"Content-Type")

    def logged(self, level: LogLevel) -> list[str]:
        return [formatEvent(event) for event in self.events if event.get("log_level") == level]


class SignedReplyTests(SigningTestCase):
    """The signing service replies with the operator-signed JWT: 200, stored and published."""

    def test_signed_reply_stored(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        assert connection is not None
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body, b"")
        self.assertEqual(connection.requests, [(SUBJECT, self.self_signed, TIMEOUT)])
        stored = self.store.get(self.account)
        assert stored is not None
        self.assertEqual(decode_account(stored.raw).issuer, OPERATOR_SIGNING_KEY)
        self.assertEqual(claims_of(stored.raw), claims_of(self.self_signed))

    def test_signed_reply_published(self) -> None:
        self.serve(FakeConnection(self.clock, answer=operator_signs))
        self.post(self.self_signed)
        stored = self.store.get(self.account)
        assert stored is not None
        self.assertEqual(self.publisher.published, [(self.account, stored.raw)])

    def test_signed_reply_logged(self) -> None:
        self.serve(FakeConnection(self.clock, answer=operator_signs))
        self.post(self.self_signed)
        jti = decode_account(self.self_signed).jti
        expected = f"{self.account[:12]} signing service signed the JWT ({jti}) with {OPERATOR_SIGNING_KEY[:12]}"
        self.assertIn(expected, self.logged(LogLevel.info))

    def test_reply_with_trailing_newline(self) -> None:
        self.serve(FakeConnection(self.clock, answer=lambda payload: operator_signs(payload) + b"\n"))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 200, body)
        self.assertIsNotNone(self.store.get(self.account))

    def test_signed_reply_older_than_stored_409(self) -> None:
        newer = encode(account_claims(self.account, "TEAM", FIXTURE_IAT + 500), signing_seed())
        self.successResultOf(self.store.save(decode_account(newer)))
        self.serve(FakeConnection(self.clock, answer=operator_signs))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 409, body)
        stored = self.store.get(self.account)
        assert stored is not None
        self.assertEqual(stored.raw, newer)
        self.assertEqual(self.publisher.published, [])

    def test_repeated_self_signed_updates(self) -> None:
        self.serve(FakeConnection(self.clock, answer=operator_signs))
        for offset in (10, 20, 30):
            update = encode(account_claims(self.account, "TEAM", FIXTURE_IAT + offset), self.account_seed)
            response, body = self.post(update)
            self.assertEqual(response.code, 200, f"iat +{offset}: {body!r}")
            stored = self.store.get(self.account)
            assert stored is not None
            self.assertEqual(decode_account(stored.raw).issued_at, FIXTURE_IAT + offset)
        self.assertEqual(len(self.publisher.published), 3)

    def test_post_with_query_goes_through_klein(self) -> None:
        # A query string makes the fast path hand the request to the Klein app.
        self.serve(FakeConnection(self.clock, answer=operator_signs))
        requested = self.stub.request("POST", f"{BASE_URL}/jwt/v1/accounts/{self.account}?x=1", data=self.self_signed)
        response = self.successResultOf(requested)
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(self.store.get(self.account))

    def test_post_via_double_slash(self) -> None:
        self.serve(FakeConnection(self.clock, answer=operator_signs))
        response, body = self.post(self.self_signed, path="/jwt/v1//accounts/")
        self.assertEqual(response.code, 200, body)
        self.assertIsNotNone(self.store.get(self.account))


class AcceptedReplyTests(SigningTestCase):
    """The signing service replies with anything but a usable signed JWT: 202, nothing stored."""

    def test_text_reply_202(self) -> None:
        message = "your request will be reviewed; check back later"
        self.serve(FakeConnection(self.clock, answer=lambda _: message.encode()))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 202)
        self.assertEqual(self.content_type(response), [TEXT_PLAIN])
        self.assertEqual(body, message.encode() + b"\n")
        self.assertIsNone(self.store.get(self.account))
        self.assertEqual(self.publisher.published, [])

    def test_text_reply_logged(self) -> None:
        self.serve(FakeConnection(self.clock, answer=lambda _: b"later"))
        self.post(self.self_signed)
        jti = decode_account(self.self_signed).jti
        expected = f"{self.account[:12]} signing service accepted the JWT for processing ({jti})"
        self.assertIn(expected, self.logged(LogLevel.info))
        self.assertEqual(self.logged(LogLevel.warn), [])

    def test_empty_reply_202(self) -> None:
        self.serve(FakeConnection(self.clock, answer=lambda _: b""))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 202)
        self.assertEqual(body, b"\n")
        self.assertIsNone(self.store.get(self.account))

    def test_untrusted_jwt_reply_202(self) -> None:
        stranger = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
        untrusted = encode(account_claims(self.account, "TEAM", FIXTURE_IAT + 10), stranger)
        self.serve(FakeConnection(self.clock, answer=lambda _: untrusted))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 202)
        self.assertEqual(self.content_type(response), [TEXT_PLAIN])
        self.assertEqual(body, untrusted + b"\n")
        self.assertIsNone(self.store.get(self.account))
        self.assertEqual(self.publisher.published, [])
        warnings = self.logged(LogLevel.warn)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("replied with a JWT that cannot be stored", warnings[0])
        self.assertIn(f"untrusted issuer {public_key(stranger)}", warnings[0])

    def test_echoed_self_signed_reply_202(self) -> None:
        self.serve(FakeConnection(self.clock, answer=lambda payload: payload))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 202)
        self.assertEqual(body, self.self_signed + b"\n")
        self.assertIsNone(self.store.get(self.account))
        self.assertIn("self-signed", self.logged(LogLevel.warn)[0])

    def test_reply_for_other_account_202(self) -> None:
        other = encode(account_claims(ACME, "ACME", FIXTURE_IAT + 10), signing_seed())
        self.serve(FakeConnection(self.clock, answer=lambda _: other))
        response, _ = self.post(self.self_signed)
        self.assertEqual(response.code, 202)
        self.assertIsNone(self.store.get(self.account))
        self.assertIsNone(self.store.get(ACME))
        self.assertIn(f"the JWT is for account {ACME}", self.logged(LogLevel.warn)[0])

    def test_expired_signed_reply_202(self) -> None:
        def expired(payload: bytes) -> bytes:
            return encode(dict(claims_of(payload), exp=NOW - 60), signing_seed())

        self.serve(FakeConnection(self.clock, answer=expired))
        response, _ = self.post(self.self_signed)
        self.assertEqual(response.code, 202)
        self.assertIsNone(self.store.get(self.account))
        self.assertIn("claim is expired", self.logged(LogLevel.warn)[0])

    def test_long_reply_cut_at_limit(self) -> None:
        self.serve(FakeConnection(self.clock, answer=lambda _: b"x" * (MAX_REPLY_TEXT + 1000)))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 202)
        self.assertEqual(body, b"x" * MAX_REPLY_TEXT + b"\n")

    def test_invalid_utf8_reply_replaced(self) -> None:
        self.serve(FakeConnection(self.clock, answer=lambda _: b"queued \xff\xfe for review"))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 202)
        self.assertEqual(body.decode("utf-8"), "queued \ufffd\ufffd for review\n")


class FailedRequestTests(SigningTestCase):
    """The signing request fails: 500 with one message per cause, nothing stored."""

    def assertFailed(self, response: IResponse, body: bytes, message: str) -> None:
        self.assertEqual(response.code, 500, body)
        self.assertEqual(self.content_type(response), [TEXT_PLAIN])
        self.assertEqual(body, message.encode() + b"\n")
        self.assertIsNone(self.store.get(self.account))
        self.assertEqual(self.publisher.published, [])
        errors = self.logged(LogLevel.error)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(message, errors[0])
        self.assertIn(self.account[:12], errors[0])

    def test_not_connected_500(self) -> None:
        self.serve(FakeConnection(self.clock, error=NotConnectedError("not connected to any NATS server")))
        response, body = self.post(self.self_signed)
        self.assertFailed(response, body, "the signing service cannot be reached: nasd is not connected to NATS")

    def test_no_connection_object_500(self) -> None:
        self.serve(None)
        response, body = self.post(self.self_signed)
        self.assertFailed(response, body, "the signing service cannot be reached: nasd is not connected to NATS")

    def test_timeout_500(self) -> None:
        connection = self.serve(FakeConnection(self.clock))
        assert connection is not None
        requested = self.stub.request("POST", f"{BASE_URL}/jwt/v1/accounts/{self.account}", data=self.self_signed)
        self.clock.advance(TIMEOUT - 0.1)
        self.assertNoResult(requested)
        self.clock.advance(0.1)
        self.stub.flush()
        response = self.successResultOf(requested)
        body = self.successResultOf(response.content())
        self.assertFailed(response, body, "the signing service did not answer within 1.5 s")
        self.assertEqual(connection.requests, [(SUBJECT, self.self_signed, TIMEOUT)])

    def test_no_responders_500(self) -> None:
        self.serve(FakeConnection(self.clock, error=NoRespondersError(f"no subscriber received {SUBJECT}")))
        response, body = self.post(self.self_signed)
        self.assertFailed(response, body, f"no signing service is subscribed to {SUBJECT}")

    def test_cancelled_500(self) -> None:
        self.serve(FakeConnection(self.clock, error=CancelledError()))
        response, body = self.post(self.self_signed)
        self.assertFailed(response, body, "the signing request was cancelled because nasd is stopping")

    def test_oversized_payload_413(self) -> None:
        error = MaxPayloadExceededError("the payload is 2000 bytes, more than the max_payload of 1000 bytes")
        self.serve(FakeConnection(self.clock, raises=error))
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 413, body)
        self.assertIn(b"too large to send to the signing service", body)
        self.assertIsNone(self.store.get(self.account))

    def test_failure_messages_distinct(self) -> None:
        bodies = set()
        for error in (NotConnectedError("down"), NoRespondersError("nobody"), RequestTimeoutError("late")):
            self.serve(FakeConnection(self.clock, error=error))
            response, body = self.post(self.self_signed)
            self.assertEqual(response.code, 500, body)
            bodies.add(body)
        self.assertEqual(len(bodies), 3, bodies)


class NotForwardedTests(SigningTestCase):
    """Uploads that are rejected with 400 before any signing request."""

    def assertNotForwarded(self, connection: FakeConnection | None) -> None:
        assert connection is not None
        self.assertEqual(connection.requests, [])
        self.assertIsNone(self.store.get(self.account))

    def test_self_signed_without_signer_400(self) -> None:
        self.serve(None, signer=False)
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 400, body)
        self.assertIn(b"self-signed", body)
        self.assertIn(b"operator must sign it", body)
        self.assertIn(b"no signing service", body)
        self.assertIsNone(self.store.get(self.account))

    def test_expired_self_signed_400(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        claims = account_claims(self.account, "TEAM", FIXTURE_IAT + 10)
        expired = encode(dict(claims, exp=NOW - 60), self.account_seed)
        response, body = self.post(expired)
        self.assertEqual(response.code, 400, body)
        self.assertIn(b"claim is expired", body)
        self.assertNotForwarded(connection)

    def test_not_yet_valid_self_signed_400(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        claims = account_claims(self.account, "TEAM", FIXTURE_IAT + 10)
        early = encode(dict(claims, nbf=NOW + 3600), self.account_seed)
        response, body = self.post(early)
        self.assertEqual(response.code, 400, body)
        self.assertIn(b"not yet valid", body)
        self.assertNotForwarded(connection)

    def test_malformed_self_signed_claims_400(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        claims = account_claims(self.account, "TEAM", FIXTURE_IAT + 10, exports=[{"subject": "a..b"}])
        response, body = self.post(encode(claims, self.account_seed))
        self.assertEqual(response.code, 400, body)
        self.assertIn(b"invalid subject 'a..b'", body)
        self.assertNotForwarded(connection)

    def test_tampered_self_signed_400(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        header, payload, signature = self.self_signed.split(b".")
        other = encode(account_claims(self.account, "EVIL", FIXTURE_IAT + 10), self.account_seed)
        tampered = header + b"." + other.split(b".")[1] + b"." + signature
        response, body = self.post(tampered)
        self.assertEqual(response.code, 400, body)
        self.assertIn(b"signature does not verify", body)
        self.assertNotForwarded(connection)

    def test_unknown_operator_400(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        stranger = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
        token = encode(account_claims(self.account, "TEAM", FIXTURE_IAT + 10), stranger)
        response, body = self.post(token)
        self.assertEqual(response.code, 400, body)
        self.assertIn(f"untrusted issuer {public_key(stranger)}".encode(), body)
        self.assertNotForwarded(connection)

    def test_account_signing_key_400(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        account_signing_seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        claims = account_claims(
            self.account,
            "TEAM",
            FIXTURE_IAT + 10,
            signing_keys=[public_key(account_signing_seed)],
        )
        response, body = self.post(encode(claims, account_signing_seed))
        self.assertEqual(response.code, 400, body)
        self.assertIn(f"untrusted issuer {public_key(account_signing_seed)}".encode(), body)
        self.assertNotForwarded(connection)

    def test_other_account_in_url_400(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        response, body = self.post(self.self_signed, key=ACME)
        self.assertEqual(response.code, 400, body)
        self.assertIn(f"the JWT is for account {self.account}, not for {ACME}".encode(), body)
        self.assertNotForwarded(connection)
        self.assertIsNone(self.store.get(ACME))

    def test_without_operator_400(self) -> None:
        connection = FakeConnection(self.clock, answer=operator_signs)
        service = SigningService(lambda: connection, SUBJECT, TIMEOUT)
        api = AccountServerAPI(self.clock, self.store, None, self.publisher, signer=service)
        self.stub = StubTreq(api.resource())
        response, body = self.post(self.self_signed)
        self.assertEqual(response.code, 400, body)
        self.assertIn(b"no operator is configured", body)
        self.assertNotForwarded(connection)

    def test_operator_signed_not_forwarded(self) -> None:
        connection = self.serve(FakeConnection(self.clock, answer=operator_signs))
        signed = encode(account_claims(self.account, "TEAM", FIXTURE_IAT + 10), signing_seed())
        response, body = self.post(signed)
        self.assertEqual(response.code, 200, body)
        assert connection is not None
        self.assertEqual(connection.requests, [])
        stored = self.store.get(self.account)
        assert stored is not None
        self.assertEqual(stored.raw, signed)


class CheckSelfSignedTests(TestCase):
    """check_self_signed on its own."""

    def setUp(self) -> None:
        self.seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        self.key = public_key(self.seed)

    def test_self_signed_returned(self) -> None:
        token = encode(account_claims(self.key, "TEAM", FIXTURE_IAT), self.seed)
        checked = check_self_signed(self.key, token, NOW)
        assert checked is not None
        self.assertEqual(checked.issuer, self.key)

    def test_operator_signed_none(self) -> None:
        token = encode(account_claims(self.key, "TEAM", FIXTURE_IAT), signing_seed())
        self.assertIsNone(check_self_signed(self.key, token, NOW))

    def test_garbage_none(self) -> None:
        self.assertIsNone(check_self_signed(self.key, b"not a JWT", NOW))

    def test_other_key_none(self) -> None:
        token = encode(account_claims(self.key, "TEAM", FIXTURE_IAT), self.seed)
        self.assertIsNone(check_self_signed(ACME, token, NOW))


class HelpTextTests(TestCase):
    def test_help_lists_202(self) -> None:
        self.assertIn("202  the signing service replied with a message", HELP_TEXT)
        self.assertIn("signrequestsubject", HELP_TEXT)


class BuildSignerTests(TestCase):
    """build_signer: the wiring of the signing service at startup."""

    def test_no_subject_no_signer(self) -> None:
        self.assertIsNone(build_signer(Config(), None, MemoryStore()))

    def test_subject_without_nats_fails(self) -> None:
        config = Config(sign_request_subject=SUBJECT)
        with self.assertRaises(StartupError) as raised:
            build_signer(config, None, MemoryStore())
        self.assertIn("set nats.servers", str(raised.exception))
        self.assertIn(SUBJECT, str(raised.exception))

    def test_signer_uses_publisher_connection(self) -> None:
        connection = object()

        class Publisher:
            pass

        publisher: Any = Publisher()
        publisher.connection = connection
        config = Config(
            sign_request_subject=SUBJECT,
            sign_request_timeout=2.5,
            nats=NATSConfig(servers=("nats://127.0.0.1:4222",)),
        )
        signer = build_signer(config, publisher, MemoryStore())
        assert signer is not None
        self.assertEqual(signer.subject, SUBJECT)
        self.assertEqual(signer.timeout, 2.5)
        self.assertIs(signer.connection(), connection)
