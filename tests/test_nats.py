"""Unit tests for the NATS client protocol, the reconnecting factory and the claim
update publisher, driven through StringTransport and MemoryReactorClock."""

from __future__ import annotations

import base64
import binascii
import json
import random
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

import nasd
from nasd import logs
from nasd.creds import Credentials, load_credentials
from nasd.nats import (
    MAX_CONTROL_LINE,
    ClaimUpdatePublisher,
    ClientOptions,
    MaxPayloadExceededError,
    Message,
    NATSClientProtocol,
    NATSConnectionClosedError,
    NATSNotConnectedError,
    NATSServerError,
    ServerAddress,
    parse_server,
    parse_server_url,
)
from tests.tokens import CREDS

SYS_CREDS = str(CREDS / "SYS" / "sys.creds")
SHOP = "AARE3U7RTFWNNQPBUC6KITHHQ52HDNR5LINTV53ZWOA66OX5W3ANZINI"
ACME = "AD2BNNLQPZVSWXWLOI3ZC7ISPSL6UDGX36LGWCOCXEVLM2IOO56VZ6XX"
NONCE = "4yuJ5W3xMtoRv1k"
SERVER_URL = "nats://127.0.0.1:4222"
SHOP_SUBJECT = f"$SYS.ACCOUNT.{SHOP}.CLAIMS.UPDATE"


def info_line(**overrides: Any) -> bytes:
    """Return an INFO line like nats-server's, with the trailing space before CRLF."""
    fields: dict[str, Any] = {
        "server_id": "NTESTSERVERID",
        "server_name": "test-1",
        "version": "2.15.1",
        "proto": 1,
        "headers": True,
        "auth_required": True,
        "max_payload": 1048576,
        "nonce": NONCE,
    }
    fields.update(overrides)
    return b"INFO " + json.dumps(fields).encode() + b" \r\n"


def sent_lines(transport: StringTransport) -> list[bytes]:
    return transport.value().split(b"\r\n")


def connect_fields(transport: StringTransport) -> dict[str, Any]:
    line = next(line for line in sent_lines(transport) if line.startswith(b"CONNECT "))
    fields: dict[str, Any] = json.loads(line[len(b"CONNECT ") :])
    return fields


def verify_nonce_signature(public_key: str, nonce: str, signature: str) -> None:
    """Raise cryptography's InvalidSignature unless ``signature`` signs ``nonce``."""
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    assert binascii.crc_hqx(raw[:-2], 0) == int.from_bytes(raw[-2:], "little")
    key = Ed25519PublicKey.from_public_bytes(raw[1:-2])
    key.verify(
        base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
        nonce.encode(),
    )


class LogCapture:
    """Collect the log events published while a test runs."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        # nasd drops debug events unless debug logging is on, as it is with trace.
        logs.set_level(True)
        test.addCleanup(logs.set_level, False)

    def messages(self, level: LogLevel) -> list[str]:
        return [formatEvent(event) for event in self.events if event.get("log_level") == level]


class ProtocolTests(TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.credentials = load_credentials(SYS_CREDS)
        self.logs = LogCapture(self)
        self.ready: list[NATSClientProtocol] = []
        self.lost: list[Failure] = []
        self.messages: list[Message] = []

    def connect(
        self, credentials: Credentials | None = None, **options: Any
    ) -> tuple[NATSClientProtocol, StringTransport]:
        protocol = NATSClientProtocol(
            self.clock,
            ClientOptions(credentials=credentials, **options),
            server_url=SERVER_URL,
            on_ready=self.ready.append,
            on_lost=lambda protocol, reason: self.lost.append(reason),
            on_message=self.messages.append,
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def establish(
        self, credentials: Credentials | None = None, **info: Any
    ) -> tuple[NATSClientProtocol, StringTransport]:
        protocol, transport = self.connect(credentials)
        protocol.dataReceived(info_line(**info))
        protocol.dataReceived(b"PONG\r\n")
        transport.clear()
        return protocol, transport

    def test_info_sends_connect_and_ping(self) -> None:
        protocol, transport = self.connect(self.credentials, name="nasd-test")

        protocol.dataReceived(info_line())

        lines = sent_lines(transport)
        self.assertTrue(lines[0].startswith(b"CONNECT {"))
        self.assertEqual(lines[1:], [b"PING", b""])
        fields = connect_fields(transport)
        self.assertEqual(fields["verbose"], False)
        self.assertEqual(fields["pedantic"], False)
        self.assertEqual(fields["echo"], False)
        self.assertEqual(fields["headers"], False)
        self.assertEqual(fields["protocol"], 1)
        self.assertEqual(fields["lang"], "python-twisted")
        self.assertEqual(fields["version"], nasd.__version__)
        self.assertEqual(fields["name"], "nasd-test")
        self.assertEqual(fields["jwt"], self.credentials.jwt)
        verify_nonce_signature(self.credentials.public_key, NONCE, fields["sig"])

    def test_connect_without_credentials(self) -> None:
        protocol, transport = self.connect()

        protocol.dataReceived(info_line(auth_required=False))

        fields = connect_fields(transport)
        self.assertNotIn("jwt", fields)
        self.assertNotIn("sig", fields)
        self.assertEqual(fields["name"], "nasd")

    def test_connect_without_nonce_sends_no_sig(self) -> None:
        protocol, transport = self.connect(self.credentials)

        protocol.dataReceived(info_line(nonce=None))

        fields = connect_fields(transport)
        self.assertEqual(fields["jwt"], self.credentials.jwt)
        self.assertNotIn("sig", fields)

    def test_established_only_after_pong(self) -> None:
        protocol, _ = self.connect(self.credentials)

        protocol.dataReceived(info_line())
        self.assertFalse(protocol.established)
        self.assertEqual(self.ready, [])

        protocol.dataReceived(b"PONG\r\n")
        self.assertTrue(protocol.established)
        self.assertEqual(self.ready, [protocol])
        self.assertEqual(protocol.server_name, "test-1")
        self.assertEqual(protocol.server_version, "2.15.1")

    def test_server_ping_answered_with_pong(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(b"PING\r\n")

        self.assertEqual(transport.value(), b"PONG\r\n")

    def test_info_split_into_single_bytes(self) -> None:
        protocol, transport = self.connect(self.credentials)
        data = info_line()

        for index in range(len(data)):
            protocol.dataReceived(data[index : index + 1])

        self.assertEqual(sum(line.startswith(b"CONNECT ") for line in sent_lines(transport)), 1)
        self.assertEqual(protocol.server_info["nonce"], NONCE)
        verify_nonce_signature(self.credentials.public_key, NONCE, connect_fields(transport)["sig"])

    def test_several_frames_in_one_chunk(self) -> None:
        protocol, transport = self.connect(self.credentials)
        protocol.dataReceived(info_line())
        transport.clear()

        protocol.dataReceived(
            b"PONG\r\n"
            + info_line(connect_info=True, remote_account="AC2P")
            + b"+OK\r\nPING\r\nMSG greeting 7 5\r\nhello\r\nPING\r\n"
        )

        self.assertTrue(protocol.established)
        self.assertEqual(protocol.server_info["remote_account"], "AC2P")
        self.assertEqual(self.messages, [Message("greeting", "7", None, b"hello")])
        self.assertEqual(transport.value(), b"PONG\r\nPONG\r\n")

    def test_msg_payload_split_across_chunks(self) -> None:
        protocol, _ = self.establish()
        payload = b"first\r\nsecond\r\n" + b"x" * 1000
        data = b"MSG  inbox.reply\t9   _INBOX.abc \t %d\r\n" % len(payload) + payload + b"\r\n"

        for start in range(0, len(data), 7):
            protocol.dataReceived(data[start : start + 7])

        self.assertEqual(self.messages, [Message("inbox.reply", "9", "_INBOX.abc", payload)])

    def test_msg_header_and_payload_split_at_crlf(self) -> None:
        protocol, _ = self.establish()

        protocol.dataReceived(b"MSG subject 1 3\r")
        protocol.dataReceived(b"\nab")
        protocol.dataReceived(b"c\r")
        self.assertEqual(self.messages, [])
        protocol.dataReceived(b"\n")

        self.assertEqual(self.messages, [Message("subject", "1", None, b"abc")])

    def test_msg_without_crlf_after_payload_drops(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(b"MSG subject 1 3\r\nabcXY")

        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.messages, [])

    def test_msg_over_max_payload_drops(self) -> None:
        protocol, transport = self.establish(max_payload=10)

        protocol.dataReceived(b"MSG subject 1 11\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertIn("exceeds max_payload", self.logs.messages(LogLevel.error)[0])

    def test_authorization_violation_logged_and_dropped(self) -> None:
        protocol, transport = self.connect(self.credentials)
        protocol.dataReceived(info_line())

        protocol.dataReceived(b"-ERR 'Authorization Violation'\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertFalse(protocol.established)
        [message] = self.logs.messages(LogLevel.error)
        self.assertIn("'Authorization Violation'", message)
        self.assertIn(SYS_CREDS, message)
        self.assertIn(SERVER_URL, message)
        self.assertNotIn(self.credentials.seed.decode(), message)

    def test_authentication_timeout_dropped(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(info_line())

        protocol.dataReceived(b"-ERR 'Authentication Timeout'\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertIn("no creds file is configured", self.logs.messages(LogLevel.error)[0])

    def test_permission_violation_keeps_connection(self) -> None:
        protocol, transport = self.establish()
        protocol.publish("forbidden", b"x")
        flushed = protocol.flush()

        protocol.dataReceived(b"-ERR 'Permissions Violation for Publish to \"forbidden\"'\r\n")
        protocol.dataReceived(b"PONG\r\n")

        self.assertFalse(transport.disconnecting)
        self.assertTrue(protocol.established)
        self.assertIn("Permissions Violation", self.logs.messages(LogLevel.warn)[0])
        failure = self.failureResultOf(flushed, NATSServerError)
        self.assertIn('Publish to "forbidden"', failure.getErrorMessage())

    def test_stale_connection_error_drops(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(b"-ERR 'Stale Connection'\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertIn("'Stale Connection'", self.logs.messages(LogLevel.error)[0])

    def test_oversized_control_line_drops(self) -> None:
        protocol, transport = self.connect(self.credentials)

        protocol.dataReceived(b"INFO " + b"x" * MAX_CONTROL_LINE)

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertIn("control line longer", self.logs.messages(LogLevel.error)[0])

    def test_oversized_line_with_crlf_drops(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(b"PING" + b" " * MAX_CONTROL_LINE + b"\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_control_line_at_limit_accepted(self) -> None:
        protocol, transport = self.connect(self.credentials)
        line = info_line()[:-3]
        padded = line[:-1] + b', "padding": "' + b"p" * MAX_CONTROL_LINE + b'"}'
        padded = padded[: MAX_CONTROL_LINE - 2] + b'"}'
        self.assertEqual(len(padded), MAX_CONTROL_LINE)

        protocol.dataReceived(padded + b"\r\n")

        self.assertFalse(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"CONNECT "))

    def test_invalid_info_json_drops(self) -> None:
        protocol, transport = self.connect()

        protocol.dataReceived(b"INFO {not json\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertIn("INFO does not contain valid JSON", self.logs.messages(LogLevel.error)[0])

    def test_unknown_operation_drops(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(b"HELLO there\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertIn("unknown protocol operation 'HELLO'", self.logs.messages(LogLevel.error)[0])

    def test_input_after_drop_ignored(self) -> None:
        protocol, transport = self.establish()
        protocol.dataReceived(b"BOGUS\r\n")

        protocol.dataReceived(b"PING\r\n")

        self.assertEqual(transport.value(), b"")

    def test_random_input_never_raises(self) -> None:
        generator = random.Random(4222)
        pieces = [
            b"MSG ",
            b"INFO ",
            b"PING",
            b"PONG",
            b"-ERR ",
            b"+OK",
            b"\r\n",
            b" ",
            b"\t",
        ]
        for _ in range(200):
            protocol, _ = self.establish()
            data = b"".join(
                generator.choice(pieces) + generator.randbytes(generator.randrange(8))
                for _ in range(generator.randrange(1, 40))
            )

            for start in range(0, len(data), 5):
                protocol.dataReceived(data[start : start + 5])

    def test_non_utf8_msg_subject_accepted(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(b"MSG sub\xffject 1 2\r\nok\r\n")

        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.messages, [Message("sub\ufffdject", "1", None, b"ok")])

    def test_tls_required_drops(self) -> None:
        protocol, transport = self.connect(self.credentials)

        protocol.dataReceived(info_line(tls_required=True))

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertIn("requires TLS", self.logs.messages(LogLevel.error)[0])

    def test_publish_writes_pub(self) -> None:
        protocol, transport = self.establish()

        protocol.publish("orders.new", b"0123456789")
        protocol.publish("service.help", b"", reply="_INBOX.r1")

        self.assertEqual(
            transport.value(),
            b"PUB orders.new 10\r\n0123456789\r\nPUB service.help _INBOX.r1 0\r\n\r\n",
        )

    def test_publish_over_max_payload_rejected(self) -> None:
        protocol, transport = self.establish(max_payload=10)

        error = self.assertRaises(MaxPayloadExceededError, protocol.publish, "s", b"x" * 11)

        self.assertIsInstance(error, ValueError)
        self.assertIn("11 bytes", str(error))
        self.assertIn("max_payload of 10 bytes", str(error))
        self.assertEqual(transport.value(), b"")

    def test_publish_at_max_payload_sent(self) -> None:
        protocol, transport = self.establish(max_payload=10)

        protocol.publish("s", b"x" * 10)

        self.assertEqual(transport.value(), b"PUB s 10\r\nxxxxxxxxxx\r\n")

    def test_publish_invalid_subject_rejected(self) -> None:
        protocol, transport = self.establish()

        self.assertRaises(ValueError, protocol.publish, "two words", b"x")
        self.assertRaises(ValueError, protocol.publish, "", b"x")
        self.assertRaises(ValueError, protocol.publish, "ok", b"x", reply="bad\treply")
        self.assertEqual(transport.value(), b"")

    def test_publish_before_established_rejected(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(info_line())

        self.assertRaises(NATSNotConnectedError, protocol.publish, "s", b"x")
        self.failureResultOf(protocol.flush(), NATSNotConnectedError)

    def test_flush_answers_in_order(self) -> None:
        protocol, transport = self.establish()
        first = protocol.flush()
        second = protocol.flush()
        self.assertEqual(transport.value(), b"PING\r\nPING\r\n")

        protocol.dataReceived(b"PONG\r\n")
        self.successResultOf(first)
        self.assertNoResult(second)

        protocol.dataReceived(b"PONG\r\n")
        self.successResultOf(second)

    def test_flush_fails_on_connection_loss(self) -> None:
        protocol, _ = self.establish()
        flushed = protocol.flush()

        protocol.connectionLost(Failure(ConnectionLost("network down")))

        failure = self.failureResultOf(flushed, NATSConnectionClosedError)
        self.assertIn("network down", failure.getErrorMessage())
        self.assertEqual(len(self.lost), 1)

    def test_handshake_timeout_aborts(self) -> None:
        protocol, transport = self.connect(connect_timeout=3.0)
        protocol.dataReceived(info_line())

        self.clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)

        self.assertTrue(transport.disconnecting)
        self.assertIn("did not complete the handshake", self.logs.messages(LogLevel.error)[0])

    def test_keepalive_closes_stale_connection(self) -> None:
        protocol, transport = self.connect(ping_interval=10.0)
        protocol.dataReceived(info_line())
        protocol.dataReceived(b"PONG\r\n")
        transport.clear()

        self.clock.advance(10.0)
        self.assertEqual(transport.value(), b"PING\r\n")
        protocol.dataReceived(b"PONG\r\n")
        self.clock.advance(10.0)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(10.0)

        self.assertTrue(transport.disconnecting)
        self.assertIn("did not respond to a PING", self.logs.messages(LogLevel.error)[0])

    def test_trace_redacts_connect(self) -> None:
        protocol, transport = self.connect(self.credentials, trace=True)

        protocol.dataReceived(info_line())
        protocol.dataReceived(b"PONG\r\n")

        debug = "\n".join(self.logs.messages(LogLevel.debug))
        self.assertIn('"jwt":"<redacted>"', debug)
        self.assertIn('"sig":"<redacted>"', debug)
        self.assertNotIn(self.credentials.jwt, debug)
        self.assertNotIn(connect_fields(transport)["sig"], debug)
        self.assertIn("received from nats://127.0.0.1:4222: PONG", debug)
        self.assertIn("sent to nats://127.0.0.1:4222: PING", debug)


class ParseServerURLTests(TestCase):
    def test_valid_urls(self) -> None:
        cases = [
            ("nats://127.0.0.1:4222", ("127.0.0.1", 4222)),
            ("nats://127.0.0.1", ("127.0.0.1", 4222)),
            ("127.0.0.1:5222", ("127.0.0.1", 5222)),
            ("localhost", ("localhost", 4222)),
            ("NATS://Example.ORG:1/", ("example.org", 1)),
            ("nats://[::1]:4223", ("::1", 4223)),
            (" nats://127.0.0.1:4222 ", ("127.0.0.1", 4222)),
        ]
        for url, expected in cases:
            self.assertEqual(parse_server_url(url), expected, url)

    def test_tls_url_flagged(self) -> None:
        address = parse_server("tls://127.0.0.1:4443")

        self.assertEqual(address, ServerAddress("127.0.0.1", 4443, tls=True))
        self.assertEqual(address.url, "tls://127.0.0.1:4443")
        self.assertFalse(parse_server("127.0.0.1").tls)

    def test_invalid_urls_rejected(self) -> None:
        cases = [
            ("", "empty"),
            ("http://127.0.0.1:4222", "unsupported scheme http://"),
            ("nats://127.0.0.1:99999", "'nats://127.0.0.1:99999'"),
            ("nats://127.0.0.1:port", "'nats://127.0.0.1:port'"),
            ("nats://127.0.0.1:0", "port 0"),
            ("nats://127.0.0.1:4222/path", "path"),
            ("nats://:4222", "host is missing"),
        ]
        for url, expected in cases:
            error = self.assertRaises(ValueError, parse_server_url, url)
            self.assertIn(expected, str(error), url)

    def test_password_not_echoed(self) -> None:
        error = self.assertRaises(ValueError, parse_server_url, "nats://user:secret@127.0.0.1")

        self.assertNotIn("secret", str(error))
        self.assertIn("use a creds file", str(error))


class PublisherTests(TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.logs = LogCapture(self)

    def make_publisher(self, servers: list[str] | None = None, max_reconnects: int = -1) -> ClaimUpdatePublisher:
        publisher = ClaimUpdatePublisher(
            self.reactor,
            servers or [SERVER_URL],
            load_credentials(SYS_CREDS),
            connect_timeout=5.0,
            reconnect_wait=1.0,
            max_reconnects=max_reconnects,
        )
        publisher.factory.jitter = 0
        return publisher

    def accept(self, **info: Any) -> tuple[NATSClientProtocol, StringTransport]:
        """Complete the last connectTCP call and the NATS handshake on it."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(info_line(**info))
        protocol.dataReceived(b"PONG\r\n")
        return protocol, transport

    def lose(self, protocol: NATSClientProtocol) -> None:
        """Report a lost connection to the protocol and the factory, as TCP would."""
        reason = Failure(ConnectionLost("network down"))
        protocol.connectionLost(reason)
        protocol.factory.clientConnectionLost(self.reactor.connectors[-1], reason)

    def refuse(self, publisher: ClaimUpdatePublisher) -> None:
        publisher.factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))

    def pub_line(self, jwt: bytes, account: str = SHOP) -> bytes:
        subject = f"$SYS.ACCOUNT.{account}.CLAIMS.UPDATE"
        return b"PUB %s %d\r\n%s\r\nPING\r\n" % (subject.encode(), len(jwt), jwt)

    def test_start_connects_with_timeout(self) -> None:
        publisher = self.make_publisher(["nats://127.0.0.1:4333"])

        publisher.startService()

        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 4333, 5.0))
        self.assertIs(factory, publisher.factory)
        self.assertIn(
            "connecting to NATS server nats://127.0.0.1:4333",
            self.logs.messages(LogLevel.info),
        )
        self.assertFalse(publisher.connected)

    def test_pending_update_published_after_connect(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        publisher.publish_account_update(SHOP, b"jwt-1")
        self.assertEqual(publisher.pending_count, 1)

        protocol, transport = self.accept()

        self.assertTrue(publisher.connected)
        self.assertEqual(publisher.server_url, SERVER_URL)
        self.assertTrue(transport.value().endswith(self.pub_line(b"jwt-1")))
        self.assertEqual(publisher.pending_count, 1)
        self.assertIsNone(publisher.last_published)

        self.reactor.advance(3)
        protocol.dataReceived(b"PONG\r\n")

        self.assertEqual(publisher.pending_count, 0)
        self.assertEqual(publisher.last_published, 3)
        self.assertIn(
            f"published claim update for account {SHOP[:12]} to {SERVER_URL}",
            self.logs.messages(LogLevel.info),
        )

    def test_update_sent_at_once_when_connected(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        protocol, transport = self.accept()
        transport.clear()

        publisher.publish_account_update(SHOP, b"jwt-1")

        self.assertEqual(transport.value(), self.pub_line(b"jwt-1"))
        protocol.dataReceived(b"PONG\r\n")
        self.assertEqual(publisher.pending_count, 0)

    def test_update_kept_across_connection_loss(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        first, _ = self.accept()
        publisher.publish_account_update(SHOP, b"jwt-1")

        self.lose(first)

        self.assertFalse(publisher.connected)
        self.assertIsNone(publisher.server_url)
        self.assertEqual(publisher.pending_count, 1)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        second, transport = self.accept()
        self.assertTrue(transport.value().endswith(self.pub_line(b"jwt-1")))
        second.dataReceived(b"PONG\r\n")
        self.assertEqual(publisher.pending_count, 0)

    def test_newer_jwt_replaces_pending(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        publisher.publish_account_update(SHOP, b"jwt-old")
        publisher.publish_account_update(SHOP, b"jwt-new")
        publisher.publish_account_update(ACME, b"jwt-acme")
        self.assertEqual(publisher.pending_count, 2)

        _, transport = self.accept()

        sent = transport.value()
        self.assertNotIn(b"jwt-old", sent)
        self.assertIn(self.pub_line(b"jwt-new"), sent)
        self.assertIn(self.pub_line(b"jwt-acme", ACME), sent)

    def test_newer_jwt_in_flight_stays_pending(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        protocol, _ = self.accept()
        publisher.publish_account_update(SHOP, b"jwt-old")
        publisher.publish_account_update(SHOP, b"jwt-new")

        protocol.dataReceived(b"PONG\r\n")
        self.assertEqual(publisher.pending_count, 1)

        protocol.dataReceived(b"PONG\r\n")
        self.assertEqual(publisher.pending_count, 0)

    def test_oversized_jwt_dropped(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        _, transport = self.accept(max_payload=16)
        transport.clear()

        publisher.publish_account_update(SHOP, b"j" * 17)

        self.assertEqual(transport.value(), b"")
        self.assertEqual(publisher.pending_count, 0)
        [message] = self.logs.messages(LogLevel.error)
        self.assertIn(f"dropped the claim update for account {SHOP[:12]}", message)

    def test_permission_violation_keeps_update_pending(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        protocol, transport = self.accept()

        publisher.publish_account_update(SHOP, b"jwt-1")
        protocol.dataReceived(b"-ERR 'Permissions Violation for Publish to \"%s\"'\r\nPONG\r\n" % SHOP_SUBJECT.encode())

        self.assertFalse(transport.disconnecting)
        self.assertEqual(publisher.pending_count, 1)
        self.assertIn("rejected the claim update", self.logs.messages(LogLevel.error)[0])

    def test_invalid_account_rejected(self) -> None:
        publisher = self.make_publisher()

        self.assertRaises(ValueError, publisher.publish_account_update, "A.>", b"jwt")
        self.assertRaises(ValueError, publisher.publish_account_update, SHOP + " x", b"jwt")
        self.assertEqual(publisher.pending_count, 0)

    def test_reconnect_goes_to_next_server(self) -> None:
        servers = ["nats://127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003"]
        publisher = self.make_publisher(servers)
        publisher.startService()

        for expected_port, delay in [
            (4002, 1.0),
            (4003, 1.5),
            (4001, 2.25),
            (4002, 3.375),
        ]:
            self.refuse(publisher)
            attempts = len(self.reactor.tcpClients)
            self.reactor.advance(delay - 0.01)
            self.assertEqual(len(self.reactor.tcpClients), attempts)
            self.reactor.advance(0.01)
            self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.1", expected_port))

        warning = self.logs.messages(LogLevel.warn)[0]
        self.assertIn("failed to connect to NATS server nats://127.0.0.1:4001", warning)
        self.assertIn("trying nats://127.0.0.1:4002 in 1.0 s", warning)

    def test_loss_moves_to_next_server(self) -> None:
        publisher = self.make_publisher(["127.0.0.1:4001", "127.0.0.1:4002"])
        publisher.startService()
        protocol, _ = self.accept()
        self.assertEqual(publisher.server_url, "nats://127.0.0.1:4001")

        self.lose(protocol)
        self.reactor.advance(1.0)
        self.accept()

        self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.1", 4002))
        self.assertEqual(publisher.server_url, "nats://127.0.0.1:4002")
        self.assertIn(
            "lost the connection to NATS server nats://127.0.0.1:4001",
            self.logs.messages(LogLevel.warn)[0],
        )

    def test_delay_resets_after_established(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        for _ in range(3):
            self.refuse(publisher)
            self.reactor.advance(10)
        protocol, _ = self.accept()

        self.lose(protocol)
        self.reactor.advance(1.0)

        self.assertEqual(len(self.reactor.tcpClients), 5)
        self.assertEqual(publisher.factory.retries, 1)

    def test_max_reconnects_respected(self) -> None:
        publisher = self.make_publisher(max_reconnects=2)
        publisher.startService()

        for _ in range(3):
            self.refuse(publisher)
            self.reactor.advance(100)

        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.assertTrue(publisher.factory.gave_up)
        [message] = self.logs.messages(LogLevel.error)
        self.assertIn("giving up after 3 consecutive failures", message)
        self.assertIn("max_reconnects is 2", message)

    def test_negative_max_reconnects_retries_forever(self) -> None:
        publisher = self.make_publisher(max_reconnects=-1)
        publisher.startService()

        for _ in range(50):
            self.refuse(publisher)
            self.reactor.advance(100)

        self.assertEqual(len(self.reactor.tcpClients), 51)
        self.assertFalse(publisher.factory.gave_up)

    def test_tls_url_fails_without_connecting(self) -> None:
        publisher = self.make_publisher(["tls://127.0.0.1:4443"])

        publisher.startService()

        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIn(
            "TLS connections are not supported yet",
            self.logs.messages(LogLevel.warn)[0],
        )

    def test_stop_waits_for_in_flight_update(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        protocol, transport = self.accept()
        publisher.publish_account_update(SHOP, b"jwt-1")

        stopped = publisher.stopService()
        self.assertNoResult(stopped)
        self.assertFalse(transport.disconnecting)

        protocol.dataReceived(b"PONG\r\nPONG\r\n")
        self.assertEqual(publisher.pending_count, 0)
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(stopped)

        protocol.connectionLost(Failure(ConnectionDone()))
        protocol.factory.clientConnectionLost(self.reactor.connectors[-1], Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_stop_gives_up_after_timeout(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        _, transport = self.accept()
        publisher.publish_account_update(SHOP, b"jwt-1")

        stopped: Deferred[None] = publisher.stopService()
        self.reactor.advance(2.0)
        self.assertTrue(transport.disconnecting)
        self.reactor.advance(2.0)

        self.successResultOf(stopped)
        warnings = "\n".join(self.logs.messages(LogLevel.warn))
        self.assertIn("did not confirm the claim updates in flight", warnings)
        self.assertIn("1 claim updates were never confirmed", warnings)

    def test_stop_while_waiting_to_retry(self) -> None:
        publisher = self.make_publisher()
        publisher.startService()
        self.refuse(publisher)

        self.successResultOf(publisher.stopService())
        self.reactor.advance(100)

        self.assertEqual(len(self.reactor.tcpClients), 1)
