"""Tests for the NATS resolver responder: lookups, update requests, peers' claim updates,
pack and list requests, driven through a fake NATS connection and a Clock."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import nkeys
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from nasd import resolver as resolver_module
from nasd.jwt import decode_account
from nasd.nats import Message, NotConnectedError, Subscription
from nasd.replication import JWTMerger
from nasd.resolver import ResolverResponder, ServerIdentity
from nasd.store import MemoryStore, compute_store_hash, store_hash
from tests.test_http import NOW, fixture_operator, operator_seed, resign, signing_seed
from tests.tokens import ACME, SHOP, SYS, fixture_jwt, new_seed

LOOKUP = "$SYS.REQ.ACCOUNT.{key}.CLAIMS.LOOKUP"
NOTIFICATION = "$SYS.ACCOUNT.{key}.CLAIMS.UPDATE"
ACCOUNT_REQUEST = "$SYS.REQ.ACCOUNT.{key}.CLAIMS.UPDATE"
UPDATE_REQUEST = "$SYS.REQ.CLAIMS.UPDATE"
PACK = "$SYS.REQ.CLAIMS.PACK"
LIST = "$SYS.REQ.CLAIMS.LIST"
INBOX = "_INBOX.test.1"


def subject_matches(pattern: str, subject: str) -> bool:
    """Match a NATS subject against a subscription subject with ``*`` and ``>`` wildcards."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


class FakeConnection:
    """A NATSConnection stand-in: it records subscriptions and publications and delivers
    messages to the matching subscriptions when a test calls ``deliver``."""

    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.subscriptions: list[Subscription] = []
        self.published: list[tuple[str, bytes, str | None]] = []
        self.ready_callbacks: list[Callable[[], object]] = []
        self._next_sid = 1

    def subscribe(self, subject: str, callback: Callable[[Message], object], queue: str | None = None) -> Subscription:
        subscription = Subscription(str(self._next_sid), subject, queue, callback)
        self._next_sid += 1
        self.subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.active = False
        self.subscriptions.remove(subscription)

    def publish(self, subject: str, payload: bytes, reply: str | None = None) -> None:
        if not self.connected:
            raise NotConnectedError("not connected to any NATS server")
        self.published.append((subject, payload, reply))

    def add_ready_callback(self, callback: Callable[[], object]) -> None:
        self.ready_callbacks.append(callback)

    def connect(self) -> None:
        self.connected = True
        for callback in self.ready_callbacks:
            callback()

    def deliver(self, subject: str, payload: bytes = b"", reply: str | None = None, status: int | None = None) -> list:
        """Deliver one message to every matching subscription; return the callbacks' results."""
        results = []
        for subscription in list(self.subscriptions):
            if subject_matches(subscription.subject, subject):
                message = Message(subject, subscription.sid, reply, payload, status=status)
                results.append(subscription.callback(message))
        return results

    def sent_to(self, subject: str) -> list[bytes]:
        return [payload for sent_subject, payload, _ in self.published if sent_subject == subject]


class RecordingUpdates:
    """A claim update publisher that records what it is asked to publish."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish_account_update(self, account: str, jwt: bytes) -> None:
        self.published.append((account, jwt))


def capture_log(test: TestCase) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def warnings_in(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events if event.get("log_level") == LogLevel.warn]


def untrusted_jwt(name: str, iat: int) -> bytes:
    """Sign fixture account *name* with an operator key that is not the fixture operator."""
    return resign(name, new_seed(nkeys.PREFIX_BYTE_OPERATOR), iat=iat)


class ResponderTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.connection = FakeConnection()
        self.updates = RecordingUpdates()
        self.responder = self.build(self.store)

    def build(self, store: MemoryStore, **options: Any) -> ResolverResponder:
        merger = JWTMerger(self.clock, store, fixture_operator())
        responder = ResolverResponder(
            self.clock,
            self.connection,
            store,
            merger,
            self.updates,
            identity=ServerIdentity(name="nasd-test", host="host.test", id="NTEST"),
            **options,
        )
        responder.startService()
        self.addCleanup(responder.stopService)
        return responder

    def store_jwt(self, raw: bytes) -> None:
        self.successResultOf(self.store.save(decode_account(raw)))

    def reply_document(self) -> dict[str, Any]:
        payloads = self.connection.sent_to(INBOX)
        self.assertEqual(len(payloads), 1, payloads)
        return json.loads(payloads[0])


class SubscriptionTests(ResponderTestCase):
    def test_subjects_and_queue_group(self):
        subscribed = {(subscription.subject, subscription.queue) for subscription in self.connection.subscriptions}
        self.assertEqual(
            subscribed,
            {
                ("$SYS.REQ.ACCOUNT.*.CLAIMS.LOOKUP", None),
                ("$SYS.REQ.CLAIMS.UPDATE", None),
                ("$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE", None),
                ("$SYS.ACCOUNT.*.CLAIMS.UPDATE", None),
                ("$SYS.REQ.CLAIMS.PACK", "responder"),
                ("$SYS.REQ.CLAIMS.LIST", None),
            },
        )

    def test_readonly_store_ignores_peer_updates(self):
        self.responder.stopService()
        self.build(MemoryStore(readonly=True))
        subjects = [subscription.subject for subscription in self.connection.subscriptions]
        self.assertNotIn("$SYS.ACCOUNT.*.CLAIMS.UPDATE", subjects)
        self.assertIn("$SYS.REQ.CLAIMS.UPDATE", subjects)

    def test_stop_unsubscribes(self):
        self.responder.stopService()
        self.assertEqual(self.connection.subscriptions, [])


class LookupTests(ResponderTestCase):
    def test_known_account(self):
        self.store_jwt(fixture_jwt("SHOP"))
        self.connection.deliver(LOOKUP.format(key=SHOP), reply=INBOX)
        self.assertEqual(self.connection.sent_to(INBOX), [fixture_jwt("SHOP")])

    def test_unknown_account_empty_reply(self):
        self.connection.deliver(LOOKUP.format(key=ACME), reply=INBOX)
        self.assertEqual(self.connection.sent_to(INBOX), [b""])

    def test_invalid_key_empty_reply(self):
        self.store_jwt(fixture_jwt("SHOP"))
        broken = SHOP[:-1] + ("A" if SHOP[-1] != "A" else "B")
        for key in (broken, "ABC", SHOP.lower()):
            self.connection.deliver(LOOKUP.format(key=key), reply=INBOX)
        self.assertEqual(self.connection.sent_to(INBOX), [b"", b"", b""])

    def test_system_account_fallback(self):
        self.responder.stopService()
        self.build(self.store, system_account=decode_account(fixture_jwt("SYS")))
        self.connection.deliver(LOOKUP.format(key=SYS), reply=INBOX)
        self.assertEqual(self.connection.sent_to(INBOX), [fixture_jwt("SYS")])

    def test_no_reply_subject_ignored(self):
        self.store_jwt(fixture_jwt("SHOP"))
        self.connection.deliver(LOOKUP.format(key=SHOP))
        self.assertEqual(self.connection.published, [])

    def test_disconnected_reply_dropped(self):
        self.connection.connected = False
        self.connection.deliver(LOOKUP.format(key=SHOP), reply=INBOX)
        self.assertEqual(self.connection.published, [])


class UpdateRequestTests(ResponderTestCase):
    def request(self, subject: str, payload: bytes) -> dict[str, Any]:
        results = self.connection.deliver(subject, payload, reply=INBOX)
        self.assertEqual(len(results), 1)
        self.successResultOf(results[0])
        return self.reply_document()

    def assertError(self, document: dict[str, Any], account: str, code: int, fragment: str) -> None:
        self.assertNotIn("data", document)
        error = document["error"]
        self.assertEqual(error["account"], account)
        self.assertEqual(error["code"], code)
        self.assertTrue(error["description"].startswith("jwt update resulted in error - "), error)
        self.assertIn(fragment, error["description"])

    def test_stored_and_published(self):
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        document = self.request(UPDATE_REQUEST, newer)
        self.assertEqual(document["data"], {"account": SHOP, "code": 200, "message": "jwt updated"})
        self.assertEqual(self.store.get(SHOP).raw, newer)
        # nats-servers with a URL resolver do not subscribe to $SYS.REQ.CLAIMS.UPDATE.
        self.assertEqual(self.updates.published, [(SHOP, newer)])

    def test_server_object(self):
        document = self.request(UPDATE_REQUEST, fixture_jwt("SHOP"))
        server = document["server"]
        self.assertEqual(server["name"], "nasd-test")
        self.assertEqual(server["host"], "host.test")
        self.assertEqual(server["id"], "NTEST")
        self.assertEqual(server["seq"], 1)
        self.assertEqual(server["time"], "2026-12-05T19:37:35Z")
        self.assertIn("ver", server)

    def test_same_jwt_not_published_again(self):
        self.store_jwt(fixture_jwt("SHOP"))
        document = self.request(UPDATE_REQUEST, fixture_jwt("SHOP"))
        self.assertEqual(document["data"]["code"], 200)
        self.assertEqual(self.updates.published, [])

    def test_account_subject_stored_not_published(self):
        document = self.request(ACCOUNT_REQUEST.format(key=SHOP), fixture_jwt("SHOP"))
        self.assertEqual(document["data"]["message"], "jwt updated")
        self.assertEqual(self.store.get(SHOP).raw, fixture_jwt("SHOP"))
        self.assertEqual(self.updates.published, [])

    def test_untrusted_issuer_rejected(self):
        document = self.request(UPDATE_REQUEST, untrusted_jwt("SHOP", NOW - 10))
        self.assertError(document, SHOP, 400, "untrusted issuer")
        self.assertIsNone(self.store.get(SHOP))

    def test_subject_mismatch_rejected(self):
        document = self.request(ACCOUNT_REQUEST.format(key=ACME), fixture_jwt("SHOP"))
        self.assertError(document, ACME, 400, f"the JWT is for account {SHOP}, not for {ACME}")
        self.assertIsNone(self.store.get(SHOP))
        self.assertIsNone(self.store.get(ACME))

    def test_expired_rejected(self):
        expired = resign("SHOP", operator_seed(), iat=NOW - 100, exp=NOW - 60)
        document = self.request(UPDATE_REQUEST, expired)
        self.assertError(document, SHOP, 400, "expired")
        self.assertIsNone(self.store.get(SHOP))

    def test_older_iat_rejected(self):
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        self.store_jwt(newer)
        document = self.request(UPDATE_REQUEST, fixture_jwt("SHOP"))
        self.assertError(document, SHOP, 409, "is newer")
        self.assertEqual(self.store.get(SHOP).raw, newer)
        self.assertEqual(self.updates.published, [])

    def test_garbage_rejected(self):
        document = self.request(UPDATE_REQUEST, b"not a JWT")
        self.assertError(document, "n/a", 400, "invalid JWT")

    def test_empty_rejected(self):
        document = self.request(UPDATE_REQUEST, b"")
        self.assertError(document, "n/a", 400, "the JWT is empty")

    def test_invalid_key_in_subject_rejected(self):
        self.connection.deliver(ACCOUNT_REQUEST.format(key="NOTAKEY"), fixture_jwt("SHOP"), reply=INBOX)
        self.assertError(self.reply_document(), "n/a", 400, "no account key")
        self.assertIsNone(self.store.get(SHOP))

    def test_readonly_store_rejected(self):
        self.responder.stopService()
        self.build(MemoryStore(readonly=True))
        self.connection.deliver(UPDATE_REQUEST, fixture_jwt("SHOP"), reply=INBOX)
        self.assertError(self.reply_document(), SHOP, 405, "read-only")

    def test_rejection_logged_with_subject(self):
        events = capture_log(self)
        self.request(UPDATE_REQUEST, untrusted_jwt("SHOP", NOW - 10))
        warnings = warnings_in(events)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"from {UPDATE_REQUEST}: untrusted issuer", warnings[0])


class PeerNotificationTests(ResponderTestCase):
    def notify(self, key: str, payload: bytes) -> None:
        results = self.connection.deliver(NOTIFICATION.format(key=key), payload, reply=INBOX)
        self.assertEqual(len(results), 1)
        self.successResultOf(results[0])

    def test_stored_without_reply_or_publication(self):
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        self.notify(SHOP, newer)
        self.assertEqual(self.store.get(SHOP).raw, newer)
        self.assertEqual(self.connection.published, [])
        self.assertEqual(self.updates.published, [])

    def test_forged_rejected_and_logged(self):
        self.store_jwt(fixture_jwt("SHOP"))
        events = capture_log(self)
        self.notify(SHOP, untrusted_jwt("SHOP", NOW - 10))
        self.assertEqual(self.store.get(SHOP).raw, fixture_jwt("SHOP"))
        self.assertEqual(self.connection.published, [])
        warnings = warnings_in(events)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(NOTIFICATION.format(key=SHOP), warnings[0])
        self.assertIn("untrusted issuer", warnings[0])

    def test_older_rejected_and_logged(self):
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        self.store_jwt(newer)
        events = capture_log(self)
        self.notify(SHOP, fixture_jwt("SHOP"))
        self.assertEqual(self.store.get(SHOP).raw, newer)
        warnings = warnings_in(events)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("is newer", warnings[0])

    def test_subject_mismatch_rejected(self):
        self.notify(ACME, fixture_jwt("SHOP"))
        self.assertIsNone(self.store.get(SHOP))
        self.assertIsNone(self.store.get(ACME))


class PackTests(ResponderTestCase):
    def setUp(self) -> None:
        super().setUp()
        for name in ("SHOP", "ACME", "SYS"):
            self.store_jwt(fixture_jwt(name))

    def test_one_message_per_account_then_end(self):
        self.connection.deliver(PACK, b"", reply=INBOX)
        expected = [
            key.encode() + b"|" + fixture_jwt(name)
            for key, name in sorted([(SHOP, "SHOP"), (ACME, "ACME"), (SYS, "SYS")])
        ]
        self.assertEqual(self.connection.sent_to(INBOX), [*expected, b""])

    def test_other_hash_gets_pack(self):
        other = compute_store_hash([fixture_jwt("SHOP")])
        self.connection.deliver(PACK, other, reply=INBOX)
        payloads = self.connection.sent_to(INBOX)
        self.assertEqual(len(payloads), 4)
        self.assertEqual(payloads[-1], b"")

    def test_equal_hash_only_end_marker(self):
        self.connection.deliver(PACK, store_hash(self.store), reply=INBOX)
        self.assertEqual(self.connection.sent_to(INBOX), [b""])

    def test_expired_left_out(self):
        expired = resign("SHOP", operator_seed(), iat=NOW - 100, exp=NOW + 10)
        self.store_jwt(expired)
        self.clock.advance(60)
        self.connection.deliver(PACK, b"", reply=INBOX)
        keys = [payload.split(b"|")[0] for payload in self.connection.sent_to(INBOX)]
        self.assertEqual(keys, [*sorted([ACME.encode(), SYS.encode()]), b""])

    def test_sent_in_chunks(self):
        self.patch(resolver_module, "PACK_CHUNK", 2)
        self.connection.deliver(PACK, b"", reply=INBOX)
        self.assertEqual(len(self.connection.sent_to(INBOX)), 2)
        self.clock.advance(0)
        self.assertEqual(len(self.connection.sent_to(INBOX)), 4)
        self.assertEqual(self.connection.sent_to(INBOX)[-1], b"")
        self.assertEqual(self.responder.in_progress, 0)

    def test_stops_when_disconnected(self):
        self.patch(resolver_module, "PACK_CHUNK", 1)
        self.connection.deliver(PACK, b"", reply=INBOX)
        self.connection.connected = False
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(self.connection.sent_to(INBOX)), 1)
        self.assertEqual(self.responder.in_progress, 0)

    def test_concurrent_packs_bounded(self):
        self.patch(resolver_module, "PACK_CHUNK", 1)
        self.patch(resolver_module, "MAX_CONCURRENT_PACKS", 2)
        for number in range(3):
            self.connection.deliver(PACK, b"", reply=f"_INBOX.test.{number}")
        self.assertEqual(self.connection.sent_to("_INBOX.test.2"), [])
        self.assertEqual(self.responder.in_progress, 2)
        for _ in range(4):
            self.clock.advance(0)
        self.assertEqual(len(self.connection.sent_to("_INBOX.test.0")), 4)
        self.assertEqual(self.responder.in_progress, 0)

    def test_unlisted_store_no_reply(self):
        self.store.listed = False
        self.connection.deliver(PACK, b"", reply=INBOX)
        self.connection.deliver(LIST, b"", reply=INBOX)
        self.assertEqual(self.connection.published, [])

    def test_no_reply_subject_ignored(self):
        self.connection.deliver(PACK, b"")
        self.assertEqual(self.connection.published, [])

    def test_list_reply(self):
        self.connection.deliver(LIST, b"", reply=INBOX)
        document = self.reply_document()
        self.assertEqual(document["data"], sorted([SHOP, ACME, SYS]))
        self.assertEqual(document["server"]["name"], "nasd-test")


class IdentityTests(TestCase):
    def test_names_unique(self):
        first, second = ServerIdentity(), ServerIdentity()
        self.assertTrue(first.name.startswith("nasd-"))
        self.assertNotEqual(first.name, second.name)
        self.assertNotEqual(first.id, second.id)

    def test_sequence_counts_replies(self):
        identity = ServerIdentity()
        self.assertEqual([identity.describe(0)["seq"] for _ in range(3)], [1, 2, 3])
