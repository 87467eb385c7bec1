"""Unit tests for the NATS client protocol, the reconnecting factory and the claim
update publisher, driven through StringTransport and MemoryReactorClock."""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import os
import random
import shutil
import tempfile
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from OpenSSL import SSL
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

import nasd
from nasd import logs
from nasd.creds import Credentials, load_credentials
from nasd.http import AccountServerAPI
from nasd.journal import JOURNAL_NAME, PendingJournal
from nasd.nats import (
    MAX_CONTROL_LINE,
    MAX_INFO_LINE,
    ClaimUpdateAcknowledgements,
    ClaimUpdatePublisher,
    ClientOptions,
    MaxPayloadExceededError,
    Message,
    NATSClientProtocol,
    NATSConnection,
    NATSConnectionClosedError,
    NATSServerError,
    NoRespondersError,
    NotConnectedError,
    RequestTimeoutError,
    ServerAddress,
    parse_headers,
    parse_server,
    parse_server_url,
)
from nasd.store import MemoryStore
from tests.tokens import CREDS

SYS_CREDS = str(CREDS / "SYS" / "sys.creds")
SHOP = "AARE3U7RTFWNNQPBUC6KITHHQ52HDNR5LINTV53ZWOA66OX5W3ANZINI"
ACME = "AD2BNNLQPZVSWXWLOI3ZC7ISPSL6UDGX36LGWCOCXEVLM2IOO56VZ6XX"
NONCE = "4yuJ5W3xMtoRv1k"
SERVER_URL = "nats://127.0.0.1:4222"
SHOP_SUBJECT = f"$SYS.ACCOUNT.{SHOP}.CLAIMS.UPDATE"
# An activation hash ID in nsc's form: base32 of a SHA-256 digest, with padding.
HASH_ID = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZA===="


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


def client_commands(data: bytes) -> list[tuple[bytes, ...]]:
    """Split what a client wrote into commands, such as (b"SUB", subject, sid),
    (b"PING",) or (b"PUB", subject, reply or b"", payload)."""
    commands: list[tuple[bytes, ...]] = []
    while data:
        line, _, data = data.partition(b"\r\n")
        fields = line.split(b" ")
        if fields[0] == b"PUB":
            size = int(fields[-1])
            payload, data = data[:size], data[size + 2 :]
            reply = fields[2] if len(fields) == 4 else b""
            commands.append((b"PUB", fields[1], reply, payload))
        elif fields[0] == b"CONNECT":
            commands.append((b"CONNECT",))
        else:
            commands.append(tuple(fields))
    return commands


def msg(subject: str, payload: bytes, sid: str = "1") -> bytes:
    """Return a MSG as nats-server sends it."""
    return b"MSG %s %s %d\r\n%s\r\n" % (subject.encode(), sid.encode(), len(payload), payload)


def hmsg(subject: str, headers: bytes, payload: bytes, sid: str = "1") -> bytes:
    """Return an HMSG as nats-server sends it, with the header block *headers*."""
    total = len(headers) + len(payload)
    return b"HMSG %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), sid.encode(), len(headers), total, headers, payload)


NO_RESPONDERS = b"NATS/1.0 503\r\n\r\n"


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
        self.assertEqual(fields["headers"], True)
        self.assertEqual(fields["no_responders"], True)
        self.assertEqual(fields["tls_required"], False)
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

    def test_msg_split_at_every_position(self) -> None:
        data = b"MSG inbox.reply 9 _INBOX.abc 12\r\nhello\r\nworld\r\nPING\r\n"
        expected = Message("inbox.reply", "9", "_INBOX.abc", b"hello\r\nworld")

        for position in range(len(data) + 1):
            self.messages.clear()
            protocol, transport = self.establish()

            protocol.dataReceived(data[:position])
            protocol.dataReceived(data[position:])

            self.assertEqual(self.messages, [expected], position)
            self.assertEqual(transport.value(), b"PONG\r\n", position)

    def test_hmsg_headers_split_across_chunks(self) -> None:
        protocol, _ = self.establish()
        headers = b"NATS/1.0\r\nNats-Subject: orders.new\r\nTrace: a:b\r\n\r\n"
        data = hmsg("orders.new", headers, b"payload\r\n", sid="4")

        for start in range(0, len(data), 3):
            protocol.dataReceived(data[start : start + 3])

        [message] = self.messages
        self.assertEqual(message.subject, "orders.new")
        self.assertEqual(message.sid, "4")
        self.assertIsNone(message.reply)
        self.assertEqual(message.payload, b"payload\r\n")
        self.assertEqual(message.headers, (("Nats-Subject", "orders.new"), ("Trace", "a:b")))
        self.assertEqual(message.header("Trace"), "a:b")
        self.assertIsNone(message.header("trace"))
        self.assertIsNone(message.status)

    def test_hmsg_split_at_every_position(self) -> None:
        data = b"HMSG _INBOX.x.1 1 reply.to 24 26\r\nNATS/1.0 408 Timeout\r\n\r\nok\r\n"

        for position in range(len(data) + 1):
            self.messages.clear()
            protocol, transport = self.establish()

            protocol.dataReceived(data[:position])
            protocol.dataReceived(data[position:])

            self.assertFalse(transport.disconnecting, position)
            [message] = self.messages
            self.assertEqual(message.reply, "reply.to", position)
            self.assertEqual(message.status, 408, position)
            self.assertEqual(message.description, "Timeout", position)
            self.assertEqual(message.payload, b"ok", position)

    def test_hmsg_no_responders_status(self) -> None:
        protocol, _ = self.establish()

        protocol.dataReceived(hmsg("_INBOX.x.1", NO_RESPONDERS, b""))

        [message] = self.messages
        self.assertEqual(message.status, 503)
        self.assertEqual(message.payload, b"")
        self.assertEqual(message.headers, ())

    def test_hmsg_header_size_over_total_drops(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(b"HMSG subject 1 20 10\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertIn("header size 20 exceeds its total size 10", self.logs.messages(LogLevel.error)[0])

    def test_hmsg_malformed_arguments_drop(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(b"HMSG subject 1 12\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertIn("malformed HMSG arguments", self.logs.messages(LogLevel.error)[0])

    def test_hmsg_invalid_headers_skipped(self) -> None:
        protocol, transport = self.establish()

        protocol.dataReceived(hmsg("subject", b"HTTP/1.1 200\r\n\r\n", b"x") + msg("subject", b"next"))

        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.messages, [Message("subject", "1", None, b"next")])
        self.assertIn("invalid headers", self.logs.messages(LogLevel.warn)[0])

    def test_parse_headers_cases(self) -> None:
        cases = [
            (b"NATS/1.0\r\n\r\n", (None, "", ())),
            (b"NATS/1.0 503\r\n\r\n", (503, "", ())),
            (b"NATS/1.0 408 Request Timeout\r\nA: 1\r\n\r\n", (408, "Request Timeout", (("A", "1"),))),
            (b"NATS/1.0\r\nA: 1\r\nA: 2\r\nB:\r\n\r\n", (None, "", (("A", "1"), ("A", "2"), ("B", "")))),
        ]
        for block, expected in cases:
            self.assertEqual(parse_headers(block), expected, block)

        for block in [b"NATS/2.0\r\n\r\n", b"NATS/1.0 50\r\n\r\n", b"NATS/1.0\r\nno colon\r\n\r\n", b""]:
            self.assertRaises(ValueError, parse_headers, block)

    def test_subscribe_and_unsubscribe_lines(self) -> None:
        protocol, transport = self.establish()

        protocol.subscribe("orders.>", "1")
        protocol.subscribe("work", "2", queue="workers")
        protocol.unsubscribe("1")

        self.assertEqual(transport.value(), b"SUB orders.> 1\r\nSUB work workers 2\r\nUNSUB 1\r\n")
        self.assertRaises(ValueError, protocol.subscribe, "two words", "3")
        self.assertRaises(ValueError, protocol.subscribe, "ok", "3", queue="")

    def test_subscribe_before_established_rejected(self) -> None:
        protocol, _ = self.connect()

        self.assertRaises(NotConnectedError, protocol.subscribe, "orders", "1")

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

        protocol.dataReceived(b"-ERR " + b"x" * MAX_CONTROL_LINE)

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertIn("control line longer", self.logs.messages(LogLevel.error)[0])

    def test_oversized_info_line_drops(self) -> None:
        protocol, transport = self.connect(self.credentials)

        protocol.dataReceived(b"INFO " + b"x" * MAX_INFO_LINE)

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertIn(f"maximum of {MAX_INFO_LINE} bytes", self.logs.messages(LogLevel.error)[0])

    def test_long_info_of_large_cluster_accepted(self) -> None:
        protocol, transport = self.connect(self.credentials)
        urls = [f"10.0.{i // 250}.{i % 250}:4222" for i in range(500)]
        info = info_line(connect_urls=urls)
        self.assertGreater(len(info), MAX_CONTROL_LINE)

        protocol.dataReceived(info)

        self.assertFalse(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"CONNECT "))

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
            b"HMSG ",
            b"NATS/1.0",
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

    def test_connect_without_headers_support(self) -> None:
        protocol, transport = self.connect()

        protocol.dataReceived(info_line(headers=False))

        fields = connect_fields(transport)
        self.assertEqual(fields["headers"], False)
        self.assertEqual(fields["no_responders"], False)

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

        self.assertRaises(NotConnectedError, protocol.publish, "s", b"x")
        self.failureResultOf(protocol.flush(), NotConnectedError)

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

    def test_keepalive_pings_every_interval(self) -> None:
        protocol, transport = self.connect(ping_interval=10.0)
        protocol.dataReceived(info_line())
        protocol.dataReceived(b"PONG\r\n")
        transport.clear()

        for _ in range(5):
            self.clock.advance(9.9)
            self.assertEqual(transport.value(), b"")
            self.clock.advance(0.1)
            self.assertEqual(transport.value(), b"PING\r\n")
            protocol.dataReceived(b"PONG\r\n")
            transport.clear()

        self.assertFalse(transport.disconnecting)
        self.assertTrue(protocol.established)

    def test_keepalive_stops_after_loss(self) -> None:
        protocol, transport = self.connect(ping_interval=10.0)
        protocol.dataReceived(info_line())
        protocol.dataReceived(b"PONG\r\n")
        transport.clear()

        protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(100.0)

        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])

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

    def pub_line(self, publisher: ClaimUpdatePublisher, jwt: bytes, account: str = SHOP, token: int = 1) -> bytes:
        """Return the PUB of a claim update with its reply subject, and the PING that confirms it."""
        subject = f"$SYS.ACCOUNT.{account}.CLAIMS.UPDATE"
        reply = f"{publisher.connection.inbox_prefix}.{token}"
        return b"PUB %s %s %d\r\n%s\r\nPING\r\n" % (subject.encode(), reply.encode(), len(jwt), jwt)

    def sub_line(self, publisher: ClaimUpdatePublisher) -> bytes:
        """Return the SUB of the connection's reply inbox."""
        return f"SUB {publisher.connection.inbox_prefix}.* 1\r\n".encode()

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
        self.assertTrue(transport.value().endswith(self.sub_line(publisher) + self.pub_line(publisher, b"jwt-1")))
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

        self.assertEqual(transport.value(), self.sub_line(publisher) + self.pub_line(publisher, b"jwt-1"))
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
        self.assertTrue(transport.value().endswith(self.pub_line(publisher, b"jwt-1", token=2)))
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
        self.assertIn(self.pub_line(publisher, b"jwt-new", token=1), sent)
        self.assertIn(self.pub_line(publisher, b"jwt-acme", ACME, token=2), sent)

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

    def test_tls_url_connects_over_tcp(self) -> None:
        publisher = self.make_publisher(["tls://127.0.0.1:4443"])

        publisher.startService()

        [(host, port, _, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 4443))
        self.assertIn("connecting to NATS server tls://127.0.0.1:4443", self.logs.messages(LogLevel.info))

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


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records the options of startTLS instead of starting TLS."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_options: list[Any] = []

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_options.append(contextFactory)


class RecordingTLS:
    """A stand-in for ClientTLS that records the host names it makes options for."""

    def __init__(self) -> None:
        self.hostnames: list[str] = []

    def options_for(self, hostname: str) -> tuple[str, str]:
        self.hostnames.append(hostname)
        return ("options for", hostname)


class TLSDecisionTests(TestCase):
    """When the protocol upgrades to TLS, and when it closes a connection to a server without TLS."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.logs = LogCapture(self)
        self.credentials = load_credentials(SYS_CREDS)

    def connect(
        self, server_url: str = SERVER_URL, tls: Any = None, transport: StringTransport | None = None
    ) -> tuple[NATSClientProtocol, Any]:
        protocol = NATSClientProtocol(
            self.clock,
            ClientOptions(credentials=self.credentials, tls=tls),
            server_url=server_url,
        )
        transport = transport if transport is not None else TLSStringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_tls_required_starts_tls(self) -> None:
        protocol, transport = self.connect()

        protocol.dataReceived(info_line(tls_required=True))

        [options] = transport.tls_options
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(options))
        self.assertTrue(protocol.tls_started)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_connect_waits_for_tls_handshake(self) -> None:
        protocol, transport = self.connect(tls=RecordingTLS())
        protocol.dataReceived(info_line(tls_required=True))
        self.assertEqual(transport.value(), b"")

        protocol.handshakeCompleted()

        fields = connect_fields(transport)
        self.assertEqual(fields["jwt"], self.credentials.jwt)
        self.assertIs(fields["tls_required"], True)
        verify_nonce_signature(self.credentials.public_key, NONCE, fields["sig"])
        protocol.dataReceived(b"PONG\r\n")
        self.assertTrue(protocol.established)

    def test_configured_tls_server_without_tls_drops(self) -> None:
        tls = RecordingTLS()
        protocol, transport = self.connect(tls=tls)

        protocol.dataReceived(info_line())

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.tls_options, [])
        [message] = self.logs.messages(LogLevel.error)
        self.assertIn(f"NATS server {SERVER_URL} does not offer TLS", message)
        self.assertIn("nats.tls is configured", message)
        self.assertIn("without sending credentials", message)

    def test_tls_url_server_without_tls_drops(self) -> None:
        protocol, transport = self.connect("tls://127.0.0.1:4443")

        protocol.dataReceived(info_line())

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertIn("a tls:// URL", self.logs.messages(LogLevel.error)[0])

    def test_configured_tls_uses_optional_tls(self) -> None:
        tls = RecordingTLS()
        protocol, transport = self.connect(tls=tls)

        protocol.dataReceived(info_line(tls_available=True))

        self.assertEqual(transport.tls_options, [("options for", "127.0.0.1")])
        self.assertEqual(transport.value(), b"")

    def test_optional_tls_unused_without_configuration(self) -> None:
        protocol, transport = self.connect()

        protocol.dataReceived(info_line(tls_available=True))

        self.assertEqual(transport.tls_options, [])
        self.assertFalse(protocol.tls_started)
        self.assertIs(connect_fields(transport)["tls_required"], False)

    def test_tls_verifies_host_of_url(self) -> None:
        for url, host in [
            ("tls://localhost:4443", "localhost"),
            ("nats://127.0.0.1:4222", "127.0.0.1"),
            ("tls://[::1]:4443", "::1"),
        ]:
            tls = RecordingTLS()
            protocol, _ = self.connect(url, tls=tls)

            protocol.dataReceived(info_line(tls_required=True))

            self.assertEqual(tls.hostnames, [host], url)

    def test_data_after_info_before_tls_drops(self) -> None:
        protocol, transport = self.connect(tls=RecordingTLS())

        protocol.dataReceived(info_line(tls_required=True) + b"PING\r\n")

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.tls_options, [])
        self.assertIn("sent data after INFO", self.logs.messages(LogLevel.error)[0])

    def test_transport_without_tls_drops(self) -> None:
        protocol, transport = self.connect(transport=StringTransport())

        protocol.dataReceived(info_line(tls_required=True))

        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertIn("cannot start TLS", self.logs.messages(LogLevel.error)[0])

    def test_failed_certificate_check_logged(self) -> None:
        protocol, _ = self.connect(tls=RecordingTLS())
        protocol.dataReceived(info_line(tls_required=True))

        protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))

        [message] = self.logs.messages(LogLevel.error)
        self.assertIn(f"TLS connection to NATS server {SERVER_URL} failed", message)
        self.assertIn("certificate verify failed", message)
        self.assertIn("nats.tls.root", message)
        self.assertIn("names 127.0.0.1", message)

    def test_rejected_client_certificate_logged(self) -> None:
        protocol, _ = self.connect(tls=RecordingTLS())
        protocol.dataReceived(info_line(tls_required=True))
        protocol.handshakeCompleted()

        protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")])))

        [message] = self.logs.messages(LogLevel.error)
        self.assertIn("tlsv13 alert certificate required", message)
        self.assertIn("nats.tls.cert and nats.tls.key", message)


class FakeServerMixin:
    """Helpers that play the TCP connection and the nats-server side for a factory
    connected through ``self.reactor`` (a MemoryReactorClock)."""

    reactor: MemoryReactorClock

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


class ConnectionTests(FakeServerMixin, TestCase):
    """NATSConnection: subscriptions across reconnections, publishing and requests."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.logs = LogCapture(self)
        self.connection = NATSConnection(
            self.reactor,
            [SERVER_URL],
            ClientOptions(credentials=load_credentials(SYS_CREDS)),
            reconnect_wait=1.0,
        )
        self.connection.factory.jitter = 0
        self.connection.startService()

    def inbox_commands(self, transport: StringTransport) -> list[tuple[bytes, ...]]:
        inbox = f"{self.connection.inbox_prefix}.*".encode()
        return [command for command in client_commands(transport.value()) if command[:2] == (b"SUB", inbox)]

    def test_subscription_sent_after_connect(self) -> None:
        received: list[Message] = []
        subscription = self.connection.subscribe("orders.>", received.append)

        protocol, transport = self.accept()

        self.assertIn((b"SUB", b"orders.>", subscription.sid.encode()), client_commands(transport.value()))
        protocol.dataReceived(msg("orders.new", b"hello", sid=subscription.sid))
        self.assertEqual([message.payload for message in received], [b"hello"])

    def test_subscribe_when_connected_sends_sub(self) -> None:
        _, transport = self.accept()
        transport.clear()

        first = self.connection.subscribe("orders.>", lambda message: None)
        second = self.connection.subscribe("work", lambda message: None, queue="workers")

        self.assertEqual(
            client_commands(transport.value()),
            [(b"SUB", b"orders.>", first.sid.encode()), (b"SUB", b"work", b"workers", second.sid.encode())],
        )
        self.assertNotEqual(first.sid, second.sid)

    def test_subscribe_invalid_subject_rejected(self) -> None:
        self.assertRaises(ValueError, self.connection.subscribe, "two words", lambda message: None)
        self.assertRaises(ValueError, self.connection.subscribe, "ok", lambda message: None, queue="a b")

    def test_messages_dispatched_by_sid(self) -> None:
        first: list[Message] = []
        second: list[Message] = []
        self.connection.subscribe("a", first.append)
        subscription = self.connection.subscribe("b", second.append)
        protocol, _ = self.accept()

        protocol.dataReceived(msg("b", b"for b", sid=subscription.sid))

        self.assertEqual(first, [])
        self.assertEqual([message.payload for message in second], [b"for b"])

    def test_unsubscribe_sends_unsub_and_drops_messages(self) -> None:
        received: list[Message] = []
        subscription = self.connection.subscribe("orders", received.append)
        protocol, transport = self.accept()
        transport.clear()

        self.connection.unsubscribe(subscription)
        self.connection.unsubscribe(subscription)
        protocol.dataReceived(msg("orders", b"late", sid=subscription.sid))

        self.assertEqual(client_commands(transport.value()), [(b"UNSUB", subscription.sid.encode())])
        self.assertFalse(subscription.active)
        self.assertEqual(received, [])

    def test_resubscribe_after_reconnect(self) -> None:
        kept = self.connection.subscribe("kept", lambda message: None)
        dropped = self.connection.subscribe("dropped", lambda message: None)
        queued = self.connection.subscribe("queued", lambda message: None, queue="group")
        self.connection.add_ready_callback(lambda: self.connection.publish("hello", b"again"))
        first, _ = self.accept()
        self.connection.unsubscribe(dropped)

        self.lose(first)
        self.reactor.advance(1.0)
        _, transport = self.accept()

        commands = client_commands(transport.value())
        subscribed = [command for command in commands if command[0] == b"SUB"]
        self.assertEqual(
            subscribed,
            [(b"SUB", b"kept", kept.sid.encode()), (b"SUB", b"queued", b"group", queued.sid.encode())],
        )
        self.assertLess(commands.index(subscribed[-1]), commands.index((b"PUB", b"hello", b"", b"again")))

    def test_publish_when_connected(self) -> None:
        _, transport = self.accept()
        transport.clear()

        self.connection.publish("orders.new", b"payload", reply="reply.here")

        self.assertEqual(transport.value(), b"PUB orders.new reply.here 7\r\npayload\r\n")

    def test_publish_not_connected_raises(self) -> None:
        error = self.assertRaises(NotConnectedError, self.connection.publish, "orders", b"x")

        self.assertIn(SERVER_URL, str(error))
        self.failureResultOf(self.connection.flush(), NotConnectedError)

    def test_publish_over_max_payload_raises(self) -> None:
        _, transport = self.accept(max_payload=4)
        transport.clear()

        error = self.assertRaises(MaxPayloadExceededError, self.connection.publish, "orders", b"12345")

        self.assertIn("max_payload of 4 bytes", str(error))
        self.assertEqual(self.connection.max_payload, 4)
        self.assertEqual(transport.value(), b"")

    def test_ready_and_lost_callbacks(self) -> None:
        events: list[str] = []
        self.connection.add_ready_callback(lambda: events.append(f"ready {self.connection.server_url}"))
        self.connection.add_lost_callback(lambda reason: events.append(f"lost {reason.type.__name__}"))

        protocol, _ = self.accept()
        self.assertTrue(self.connection.connected)
        self.assertEqual(self.connection.server_name, "test-1")
        self.lose(protocol)

        self.assertFalse(self.connection.connected)
        self.assertIsNone(self.connection.server_url)
        self.assertEqual(events, [f"ready {SERVER_URL}", "lost ConnectionLost"])

    def test_lost_callback_skipped_for_failed_handshake(self) -> None:
        lost: list[Failure] = []
        self.connection.add_lost_callback(lost.append)
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(info_line())

        protocol.dataReceived(b"-ERR 'Authorization Violation'\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))

        self.assertEqual(lost, [])

    def test_failing_callbacks_logged(self) -> None:
        def fail_on_message(message: Message) -> None:
            raise RuntimeError("callback bug")

        received: list[Message] = []
        broken = self.connection.subscribe("broken", fail_on_message)
        working = self.connection.subscribe("working", received.append)
        self.connection.add_ready_callback(lambda: 1 / 0)
        protocol, transport = self.accept()

        protocol.dataReceived(msg("broken", b"1", sid=broken.sid) + msg("working", b"2", sid=working.sid))

        self.assertFalse(transport.disconnecting)
        self.assertEqual([message.payload for message in received], [b"2"])
        critical = "\n".join(self.logs.messages(LogLevel.critical))
        self.assertIn("the callback of the subscription to broken failed", critical)
        self.assertIn("a callback for the new connection", critical)
        self.flushLoggedErrors(RuntimeError, ZeroDivisionError)

    def test_request_answered(self) -> None:
        protocol, transport = self.accept()
        transport.clear()

        answer = self.connection.request("service.time", b"now?", timeout=2.0)

        commands = client_commands(transport.value())
        inbox = self.connection.inbox_prefix
        self.assertEqual(commands[0], (b"SUB", f"{inbox}.*".encode(), b"1"))
        self.assertEqual(commands[1], (b"PUB", b"service.time", f"{inbox}.1".encode(), b"now?"))
        self.assertNoResult(answer)
        protocol.dataReceived(msg(f"{inbox}.1", b"noon"))
        self.assertEqual(self.successResultOf(answer).payload, b"noon")
        self.assertEqual(self.reactor.getDelayedCalls()[1:], [])

    def test_request_no_responders(self) -> None:
        protocol, _ = self.accept()

        answer = self.connection.request("nobody.home", b"", timeout=2.0)
        protocol.dataReceived(hmsg(f"{self.connection.inbox_prefix}.1", NO_RESPONDERS, b""))

        failure = self.failureResultOf(answer, NoRespondersError)
        self.assertIn("nobody.home", failure.getErrorMessage())

    def test_request_timeout(self) -> None:
        self.accept()

        answer = self.connection.request("slow.service", b"", timeout=2.0)
        self.reactor.advance(1.9)
        self.assertNoResult(answer)
        self.reactor.advance(0.1)

        failure = self.failureResultOf(answer, RequestTimeoutError)
        self.assertIn("no reply to the request on slow.service within 2.0 s", failure.getErrorMessage())

    def test_request_not_connected(self) -> None:
        answer = self.connection.request("service", b"", timeout=2.0)

        self.failureResultOf(answer, NotConnectedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_request_invalid_timeout_rejected(self) -> None:
        self.accept()

        self.assertRaises(ValueError, self.connection.request, "service", b"", 0)
        self.assertRaises(ValueError, self.connection.request_many, "service", b"", -1.0)

    def test_request_over_max_payload_sends_nothing(self) -> None:
        _, transport = self.accept(max_payload=4)
        transport.clear()

        self.assertRaises(MaxPayloadExceededError, self.connection.request, "service", b"12345", 1.0)

        self.assertEqual(transport.value(), b"")

    def test_requests_share_one_inbox_subscription(self) -> None:
        protocol, transport = self.accept()

        first = self.connection.request("service", b"1", timeout=2.0)
        second = self.connection.request("service", b"2", timeout=2.0)
        protocol.dataReceived(msg(f"{self.connection.inbox_prefix}.2", b"two"))
        protocol.dataReceived(msg(f"{self.connection.inbox_prefix}.1", b"one"))

        self.assertEqual(len(self.inbox_commands(transport)), 1)
        self.assertEqual(self.successResultOf(first).payload, b"one")
        self.assertEqual(self.successResultOf(second).payload, b"two")

    def test_request_many_collects_within_window(self) -> None:
        protocol, _ = self.accept()
        reply = f"{self.connection.inbox_prefix}.1"

        replies = self.connection.request_many("service", b"", window=1.0)
        protocol.dataReceived(msg(reply, b"first"))
        self.reactor.advance(0.5)
        protocol.dataReceived(msg(reply, b"second"))
        self.assertNoResult(replies)
        self.reactor.advance(0.5)
        protocol.dataReceived(msg(reply, b"too late"))

        self.assertEqual([message.payload for message in self.successResultOf(replies)], [b"first", b"second"])
        self.assertIn(
            f"ignored a reply on {reply} that arrived after its request ended", self.logs.messages(LogLevel.debug)
        )

    def test_request_many_without_replies(self) -> None:
        self.accept()

        replies = self.connection.request_many("service", b"", window=1.0)
        self.reactor.advance(1.0)

        self.assertEqual(self.successResultOf(replies), [])

    def test_request_many_no_responders(self) -> None:
        protocol, _ = self.accept()

        replies = self.connection.request_many("service", b"", window=1.0)
        protocol.dataReceived(hmsg(f"{self.connection.inbox_prefix}.1", NO_RESPONDERS, b""))

        self.failureResultOf(replies, NoRespondersError)
        self.assertEqual(self.reactor.getDelayedCalls()[1:], [])

    def test_reply_after_reconnect_delivered(self) -> None:
        first, _ = self.accept()
        answer = self.connection.request("service", b"", timeout=5.0)

        self.lose(first)
        self.reactor.advance(1.0)
        second, transport = self.accept()
        second.dataReceived(msg(f"{self.connection.inbox_prefix}.1", b"answer"))

        self.assertEqual(len(self.inbox_commands(transport)), 1)
        self.assertEqual(self.successResultOf(answer).payload, b"answer")

    def test_stop_cancels_waiting_requests(self) -> None:
        protocol, _ = self.accept()
        answer = self.connection.request("service", b"", timeout=5.0)
        replies = self.connection.request_many("service", b"", window=5.0)

        stopped = self.connection.stopService()
        protocol.connectionLost(Failure(ConnectionDone()))

        self.failureResultOf(answer, CancelledError)
        self.failureResultOf(replies, CancelledError)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class DiscoveryTests(FakeServerMixin, TestCase):
    """Servers learned from the connect_urls of INFO join the rotation."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.logs = LogCapture(self)

    def start(self, url: str = SERVER_URL) -> NATSConnection:
        connection = NATSConnection(self.reactor, [url], reconnect_wait=1.0)
        connection.factory.jitter = 0
        connection.startService()
        return connection

    def server_urls(self, connection: NATSConnection) -> list[str]:
        return [server.url for server in connection.factory.servers]

    def test_connect_urls_join_rotation(self) -> None:
        connection = self.start()

        self.accept(connect_urls=["127.0.0.1:4222", "127.0.0.1:4223", "[::1]:4224"])

        self.assertEqual(
            self.server_urls(connection),
            [SERVER_URL, "nats://127.0.0.1:4223", "nats://[::1]:4224"],
        )
        self.assertIn(
            f"discovered NATS servers: nats://127.0.0.1:4223, nats://[::1]:4224 (advertised by {SERVER_URL})",
            self.logs.messages(LogLevel.info),
        )

    def test_async_info_adds_new_servers_once(self) -> None:
        connection = self.start()
        protocol, _ = self.accept(connect_urls=["127.0.0.1:4222", "127.0.0.1:4223"])

        protocol.dataReceived(info_line(connect_urls=["127.0.0.1:4223", "127.0.0.1:4225", "127.0.0.1:4225"]))
        protocol.dataReceived(info_line(connect_urls=["127.0.0.1:4225", "127.0.0.1:4223"]))

        self.assertEqual(
            self.server_urls(connection),
            [SERVER_URL, "nats://127.0.0.1:4223", "nats://127.0.0.1:4225"],
        )
        discovered = [line for line in self.logs.messages(LogLevel.info) if line.startswith("discovered")]
        self.assertEqual(len(discovered), 2)

    def test_invalid_connect_url_logged(self) -> None:
        connection = self.start()

        self.accept(connect_urls=["127.0.0.1:99999", 4223, "127.0.0.1:4226"])

        self.assertEqual(self.server_urls(connection), [SERVER_URL, "nats://127.0.0.1:4226"])
        warnings = self.logs.messages(LogLevel.warn)
        self.assertIn("ignored the invalid connect_urls entry '127.0.0.1:99999'", warnings[0])
        self.assertIn("ignored the invalid connect_urls entry 4223", warnings[1])

    def test_failover_to_discovered_server(self) -> None:
        connection = self.start()
        protocol, _ = self.accept(connect_urls=["127.0.0.1:4222", "127.0.0.1:4223"])

        self.lose(protocol)
        self.reactor.advance(1.0)
        self.accept()

        self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.1", 4223))
        self.assertEqual(connection.server_url, "nats://127.0.0.1:4223")

    def test_discovered_servers_keep_tls_scheme(self) -> None:
        connection = self.start("tls://127.0.0.1:4443")
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        protocol.makeConnection(TLSStringTransport())

        protocol.dataReceived(info_line(tls_required=True, connect_urls=["127.0.0.1:4443", "127.0.0.1:4444"]))

        self.assertEqual(self.server_urls(connection), ["tls://127.0.0.1:4443", "tls://127.0.0.1:4444"])


def server_reply(name: str, account: str, message: str = "jwt updated") -> dict[str, Any]:
    """Return nats-server's reply to a claim update that it applied or skipped."""
    return {
        "server": {"name": name, "host": "127.0.0.1", "id": "N" + name.upper(), "ver": "2.15.1"},
        "data": {"account": account, "code": 200, "message": message},
    }


def server_error(name: str, account: str, description: str) -> dict[str, Any]:
    """Return nats-server's reply to a claim update that it rejected."""
    return {
        "server": {"name": name, "host": "127.0.0.1", "id": "N" + name.upper(), "ver": "2.15.1"},
        "error": {"account": account, "code": 500, "description": description},
    }


# 2023-11-14T22:13:20Z, so that reactor times format as real dates.
START = 1_700_000_000.0


class AcknowledgementTests(FakeServerMixin, TestCase):
    """The replies of nats-servers to an account claim update: counted, logged and reported."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(START)
        self.logs = LogCapture(self)
        self.publisher = ClaimUpdatePublisher(
            self.reactor,
            [SERVER_URL],
            load_credentials(SYS_CREDS),
            connect_timeout=5.0,
            reconnect_wait=1.0,
            max_reconnects=-1,
            ack_window=1.0,
        )
        self.publisher.startService()
        self.protocol, self.transport = self.accept()

    def publish(self, account: str = SHOP, jwt: bytes = b"jwt-1") -> str:
        """Publish an account update and return the reply subject it was sent with."""
        self.transport.clear()
        self.publisher.publish_account_update(account, jwt)
        [pub] = [command for command in client_commands(self.transport.value()) if command[0] == b"PUB"]
        return pub[2].decode()

    def answer(self, reply: str, document: dict[str, Any] | bytes) -> None:
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.protocol.dataReceived(msg(reply, payload))

    def test_update_sent_with_reply_subject(self) -> None:
        reply = self.publish()

        self.assertTrue(reply.startswith(self.publisher.connection.inbox_prefix + "."))
        commands = client_commands(self.transport.value())
        self.assertEqual(commands[-1], (b"PING",))

    def test_updates_and_skips_counted(self) -> None:
        reply = self.publish()
        self.protocol.dataReceived(b"PONG\r\n")
        self.assertEqual(self.publisher.pending_count, 0)
        self.assertIsNone(self.publisher.last_acknowledged)

        self.reactor.advance(0.2)
        self.answer(reply, server_reply("n1", SHOP))
        self.answer(reply, server_reply("n2", SHOP))
        self.answer(reply, server_reply("n3", SHOP, "jwt update skipped"))
        self.reactor.advance(0.8)

        self.assertEqual(
            self.publisher.last_acknowledgements,
            ClaimUpdateAcknowledgements(SHOP, updated=("n1", "n2"), skipped=("n3",)),
        )
        self.assertEqual(self.publisher.last_acknowledged, START + 1.0)
        self.assertIn(
            f"account {SHOP[:12]}: jwt updated on 2 nats-server(s), skipped on 1",
            self.logs.messages(LogLevel.info),
        )
        self.assertIn(
            f"account {SHOP[:12]}: jwt updated on [n1, n2], skipped on [n3]",
            self.logs.messages(LogLevel.debug),
        )
        self.assertEqual(self.logs.messages(LogLevel.warn), [])

    def test_rejection_logged_as_warning(self) -> None:
        reply = self.publish()
        description = "jwt update resulted in error - account validation failed"

        self.answer(reply, server_error("n2", SHOP, description))
        self.answer(reply, server_reply("n1", SHOP, "jwt update skipped"))
        self.reactor.advance(1.0)

        [warning] = self.logs.messages(LogLevel.warn)
        self.assertEqual(warning, f"nats-server n2 REFUSED the JWT for account {SHOP[:12]}: {description}")
        self.assertIn(
            f"account {SHOP[:12]}: jwt updated on 0 nats-server(s), skipped on 1, rejected by 1",
            self.logs.messages(LogLevel.info),
        )
        acknowledgements = self.publisher.last_acknowledgements
        assert acknowledgements is not None
        self.assertEqual(acknowledgements.rejected, (("n2", description),))

    def test_rejections_leave_last_acknowledged(self) -> None:
        reply = self.publish()

        self.answer(reply, server_error("n1", SHOP, "jwt update resulted in error - subject does not match"))
        self.reactor.advance(1.0)

        self.assertIsNone(self.publisher.last_acknowledged)

    def test_unexpected_replies_ignored(self) -> None:
        reply = self.publish()

        self.answer(reply, b"not json")
        self.answer(reply, b"[1, 2]")
        self.answer(reply, server_reply("n1", ACME))
        self.answer(reply, {"server": {"name": "n1"}, "data": {"account": SHOP, "code": 200}})
        self.reactor.advance(1.0)

        warnings = self.logs.messages(LogLevel.warn)
        self.assertEqual(len(warnings), 4)
        self.assertIn(f"ignored an unexpected reply to the claim update for account {SHOP[:12]}", warnings[0])
        self.assertIn("not json", warnings[0])
        acknowledgements = self.publisher.last_acknowledgements
        assert acknowledgements is not None
        self.assertEqual(acknowledgements.unexpected, 4)
        self.assertEqual(acknowledgements.answered, 0)
        self.assertIn(
            f"account {SHOP[:12]}: no nats-server replied to the claim update within 1.0 s",
            self.logs.messages(LogLevel.info),
        )

    def test_no_answer_logged(self) -> None:
        self.publish()
        self.protocol.dataReceived(b"PONG\r\n")

        self.reactor.advance(1.0)

        self.assertIn(
            f"account {SHOP[:12]}: no nats-server replied to the claim update within 1.0 s",
            self.logs.messages(LogLevel.info),
        )
        self.assertIsNone(self.publisher.last_acknowledged)
        self.assertEqual(self.publisher.last_acknowledgements, ClaimUpdateAcknowledgements(SHOP))
        self.assertEqual(self.publisher.last_published, START)

    def test_no_responders_warned(self) -> None:
        reply = self.publish()

        self.protocol.dataReceived(hmsg(reply, NO_RESPONDERS, b""))

        [warning] = self.logs.messages(LogLevel.warn)
        self.assertIn(f"no nats-server received the claim update for account {SHOP[:12]}", warning)
        self.assertIn(SHOP_SUBJECT, warning)
        self.assertIn("system account", warning)

    def test_replies_after_window_not_counted(self) -> None:
        reply = self.publish()
        self.reactor.advance(1.0)

        self.answer(reply, server_reply("n1", SHOP))

        self.assertEqual(self.publisher.last_acknowledgements, ClaimUpdateAcknowledgements(SHOP))
        self.assertIsNone(self.publisher.last_acknowledged)

    def test_each_update_counted_separately(self) -> None:
        first = self.publish(SHOP, b"jwt-shop")
        second = self.publish(ACME, b"jwt-acme")

        self.answer(second, server_reply("n1", ACME))
        self.answer(first, server_reply("n1", SHOP, "jwt update skipped"))
        self.reactor.advance(1.0)

        info = self.logs.messages(LogLevel.info)
        self.assertIn(f"account {SHOP[:12]}: jwt updated on 0 nats-server(s), skipped on 1", info)
        self.assertIn(f"account {ACME[:12]}: jwt updated on 1 nats-server(s), skipped on 0", info)

    def test_healthz_reports_last_acknowledged(self) -> None:
        api = AccountServerAPI(self.reactor, MemoryStore(), None, publisher=self.publisher)
        stub = StubTreq(api.resource())
        reply = self.publish()
        self.protocol.dataReceived(b"PONG\r\n")
        self.answer(reply, server_reply("n1", SHOP))
        self.reactor.advance(1.0)

        response = self.successResultOf(stub.get("http://127.0.0.1/healthz"))
        report = json.loads(self.successResultOf(response.content()))

        expected = datetime.datetime.fromtimestamp(START + 1.0, tz=datetime.UTC).isoformat(timespec="seconds")
        self.assertEqual(report["nats"]["last_acknowledged"], expected)
        self.assertEqual(report["nats"]["last_acknowledged"], "2023-11-14T22:13:21+00:00")
        self.assertEqual(report["nats"]["last_published"], "2023-11-14T22:13:20+00:00")

    def test_healthz_before_acknowledgement(self) -> None:
        api = AccountServerAPI(self.reactor, MemoryStore(), None, publisher=self.publisher)

        response = self.successResultOf(StubTreq(api.resource()).get("http://127.0.0.1/healthz"))
        report = json.loads(self.successResultOf(response.content()))

        self.assertIsNone(report["nats"]["last_acknowledged"])


class ActivationUpdateTests(FakeServerMixin, TestCase):
    """Activation updates: their subject, pending and confirmation, and the journal."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.logs = LogCapture(self)
        folder = tempfile.mkdtemp(prefix="nasd-nats-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        self.journal = PendingJournal(os.path.join(folder, JOURNAL_NAME))
        self.publisher = ClaimUpdatePublisher(
            self.reactor,
            [SERVER_URL],
            load_credentials(SYS_CREDS),
            connect_timeout=5.0,
            reconnect_wait=1.0,
            max_reconnects=-1,
            journal=self.journal,
        )
        self.publisher.startService()

    def test_activation_published_without_reply(self) -> None:
        protocol, transport = self.accept()
        transport.clear()

        self.publisher.publish_activation_update(SHOP, HASH_ID, b"activation-jwt")

        subject = f"$SYS.ACCOUNT.{SHOP}.CLAIMS.ACTIVATE.{HASH_ID}"
        self.assertEqual(
            client_commands(transport.value()),
            [(b"PUB", subject.encode(), b"", b"activation-jwt"), (b"PING",)],
        )
        self.assertEqual(self.publisher.pending_count, 1)
        protocol.dataReceived(b"PONG\r\n")
        self.assertEqual(self.publisher.pending_count, 0)
        self.assertIn(
            f"published activation update {HASH_ID[:12]} for account {SHOP[:12]} to {SERVER_URL}",
            self.logs.messages(LogLevel.info),
        )

    def test_pending_keyed_by_subject(self) -> None:
        self.publisher.publish_account_update(SHOP, b"account-jwt")
        self.publisher.publish_activation_update(SHOP, HASH_ID, b"activation-old")
        self.publisher.publish_activation_update(SHOP, HASH_ID, b"activation-new")
        self.publisher.publish_activation_update(SHOP, "OTHERHASH", b"activation-other")
        self.assertEqual(self.publisher.pending_count, 3)

        _, transport = self.accept()

        payloads = [command[3] for command in client_commands(transport.value()) if command[0] == b"PUB"]
        self.assertEqual(payloads, [b"account-jwt", b"activation-new", b"activation-other"])

    def test_journal_records_only_accounts(self) -> None:
        self.publisher.publish_activation_update(SHOP, HASH_ID, b"activation-jwt")
        self.assertFalse(os.path.exists(self.journal.path))

        self.publisher.publish_account_update(ACME, b"account-jwt")

        self.assertEqual(PendingJournal(self.journal.path).load(), [ACME])

    def test_stop_drops_activations_with_warning(self) -> None:
        self.publisher.publish_activation_update(SHOP, HASH_ID, b"activation-jwt")
        self.publisher.publish_account_update(ACME, b"account-jwt")

        self.successResultOf(self.publisher.stopService())

        warnings = "\n".join(self.logs.messages(LogLevel.warn))
        self.assertIn("1 activation updates were never confirmed by NATS and are dropped at shutdown", warnings)
        self.assertIn(f"activation update {HASH_ID[:12]} for account {SHOP[:12]}", warnings)
        self.assertIn(f"1 claim updates were not confirmed by NATS before shutdown (accounts {ACME[:12]})", warnings)
        self.assertEqual(PendingJournal(self.journal.path).load(), [ACME])

    def test_invalid_activation_arguments_rejected(self) -> None:
        for account, hash_id in [("A.>", HASH_ID), (SHOP, "two.tokens"), (SHOP, "*"), (SHOP, ""), (SHOP, "a b")]:
            self.assertRaises(ValueError, self.publisher.publish_activation_update, account, hash_id, b"jwt")
        self.assertEqual(self.publisher.pending_count, 0)
