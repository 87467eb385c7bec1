"""Tests for replication: merging JWTs from peers and a primary, the store hash, the pack
requests to peers, the /jwt/v1/pack route and the import from a primary."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from nasd import replication
from nasd.config import Config, with_overrides
from nasd.http import AccountServerAPI
from nasd.jwt import decode_account
from nasd.replication import (
    JWTMerger,
    MergeCounts,
    MergeOutcome,
    PackLines,
    PeerSync,
    PrimaryImport,
)
from nasd.service import StartupError, add_replication
from nasd.store import DirectoryStore, MemoryStore, StoredJWT, compute_store_hash, store_hash
from tests.test_http import NOW, fixture_operator, operator_seed, resign, signing_seed
from tests.test_resolver import FakeConnection, capture_log, untrusted_jwt, warnings_in
from tests.tokens import ACME, SHOP, SYS, fixture_jwt

PACK = "$SYS.REQ.CLAIMS.PACK"
PRIMARY = "http://primary.test"


def line(key: str, raw: bytes) -> bytes:
    return key.encode() + b"|" + raw


def infos_in(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events if event.get("log_level") == LogLevel.info]


def errors_in(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events if event.get("log_level") == LogLevel.error]


class MergerTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.merger = JWTMerger(self.clock, self.store, fixture_operator())

    def merge_line(self, data: bytes) -> MergeOutcome:
        return self.successResultOf(self.merger.merge_line(data)).outcome

    def test_newer_trusted_stored(self):
        self.successResultOf(self.store.save(decode_account(fixture_jwt("SHOP"))))
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        self.assertEqual(self.merge_line(line(SHOP, newer)), MergeOutcome.STORED)
        self.assertEqual(self.store.get(SHOP).raw, newer)

    def test_same_unchanged(self):
        self.successResultOf(self.store.save(decode_account(fixture_jwt("SHOP"))))
        self.assertEqual(self.merge_line(line(SHOP, fixture_jwt("SHOP"))), MergeOutcome.SAME)

    def test_older_not_stored(self):
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        self.successResultOf(self.store.save(decode_account(newer)))
        self.assertEqual(self.merge_line(line(SHOP, fixture_jwt("SHOP"))), MergeOutcome.OLDER)
        self.assertEqual(self.store.get(SHOP).raw, newer)

    def test_untrusted_not_stored(self):
        result = self.successResultOf(self.merger.merge_line(line(SHOP, untrusted_jwt("SHOP", NOW - 10))))
        self.assertEqual(result.outcome, MergeOutcome.INVALID)
        self.assertIn("untrusted issuer", result.reason)
        self.assertIsNone(self.store.get(SHOP))

    def test_expired_not_stored(self):
        expired = resign("SHOP", operator_seed(), iat=NOW - 100, exp=NOW - 60)
        self.assertEqual(self.merge_line(line(SHOP, expired)), MergeOutcome.INVALID)
        self.assertIsNone(self.store.get(SHOP))

    def test_key_mismatch_not_stored(self):
        self.assertEqual(self.merge_line(line(ACME, fixture_jwt("SHOP"))), MergeOutcome.INVALID)
        self.assertEqual(len(self.store), 0)

    def test_malformed_lines_rejected(self):
        for data in (b"no separator", line(SHOP, b"a|b"), b"NOTAKEY|" + fixture_jwt("SHOP"), line(SHOP, b"")):
            result = self.successResultOf(self.merger.merge_line(data))
            self.assertEqual(result.outcome, MergeOutcome.INVALID, data)
            self.assertTrue(result.reason, data)
        self.assertEqual(len(self.store), 0)

    def test_key_from_jwt_when_none(self):
        result = self.successResultOf(self.merger.merge(None, fixture_jwt("ACME")))
        self.assertEqual((result.outcome, result.account), (MergeOutcome.STORED, ACME))

    def test_readonly_store(self):
        merger = JWTMerger(self.clock, MemoryStore(readonly=True), fixture_operator())
        result = self.successResultOf(merger.merge(SHOP, fixture_jwt("SHOP")))
        self.assertEqual(result.outcome, MergeOutcome.READ_ONLY)

    def test_waiting_merges_bounded(self):
        self.patch(replication, "MAX_WAITING_MERGES", 0)
        result = self.successResultOf(self.merger.merge(SHOP, fixture_jwt("SHOP")))
        self.assertEqual(result.outcome, MergeOutcome.FAILED)
        self.assertIsNone(self.store.get(SHOP))

    def test_counts(self):
        counts = MergeCounts()
        for data in (line(SHOP, fixture_jwt("SHOP")), line(SHOP, fixture_jwt("SHOP")), b"garbage"):
            counts.add(self.successResultOf(self.merger.merge_line(data)))
        self.assertEqual((counts.imported, counts.unchanged, counts.rejected), (1, 1, 1))


def xor_of_sha256(jwts: list[bytes]) -> bytes:
    """nats-server's DirJWTStore hash, computed independently: bytewise XOR of SHA-256 digests."""
    result = bytearray(32)
    for raw in jwts:
        for index, byte in enumerate(hashlib.sha256(raw).digest()):
            result[index] ^= byte
    return bytes(result)


class StoreHashTests(TestCase):
    def setUp(self) -> None:
        parent = tempfile.mkdtemp(prefix="nasd-hash-")
        self.addCleanup(shutil.rmtree, parent, ignore_errors=True)
        self.folder = os.path.join(parent, "store")

    def test_empty_store_zero(self):
        self.assertEqual(MemoryStore().store_hash, bytes(32))
        self.assertEqual(compute_store_hash([]), bytes(32))

    def test_definition_matches_nats_server(self):
        jwts = [fixture_jwt("SHOP"), fixture_jwt("ACME"), fixture_jwt("SYS")]
        self.assertEqual(compute_store_hash(jwts), xor_of_sha256(jwts))

    def test_memory_store_maintained_across_saves(self):
        store = MemoryStore()
        for name in ("SHOP", "ACME"):
            self.successResultOf(store.save(decode_account(fixture_jwt(name))))
        self.assertEqual(store.store_hash, xor_of_sha256([fixture_jwt("SHOP"), fixture_jwt("ACME")]))
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        self.successResultOf(store.save(decode_account(newer)))
        self.assertEqual(store.store_hash, xor_of_sha256([newer, fixture_jwt("ACME")]))

    async def test_directory_store_listing_and_saves(self):
        first = DirectoryStore(reactor, self.folder, shard=True)
        first.open()
        for name in ("SHOP", "ACME"):
            await first.save(decode_account(fixture_jwt(name)))

        store = DirectoryStore(reactor, self.folder, shard=True)
        store.open(list_keys=False)
        self.assertFalse(store.listed)
        listing = store.list_in_background()
        # A save while the listing thread runs counts once, with the newer JWT.
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        await store.save(decode_account(newer))
        self.assertEqual(await listing, 2)
        self.assertTrue(store.listed)
        self.assertEqual(store.store_hash, xor_of_sha256([newer, fixture_jwt("ACME")]))

        await store.save(decode_account(fixture_jwt("SYS")))
        expected = xor_of_sha256([newer, fixture_jwt("ACME"), fixture_jwt("SYS")])
        self.assertEqual(store.store_hash, expected)
        entries = [store.get(key) for key in store.keys()]
        self.assertEqual(store.store_hash, compute_store_hash(entry.raw for entry in entries))

    async def test_directory_store_deleted_file(self):
        store = DirectoryStore(reactor, self.folder)
        store.open()
        await store.save(decode_account(fixture_jwt("SHOP")))
        await store.save(decode_account(fixture_jwt("ACME")))
        os.unlink(store.path_for(SHOP))
        store.invalidate(SHOP)
        self.assertIsNone(store.get(SHOP))
        self.assertEqual(store.store_hash, xor_of_sha256([fixture_jwt("ACME")]))

    async def test_when_listed_waits(self):
        store = DirectoryStore(reactor, self.folder)
        store.open(list_keys=False)
        waiting = store.when_listed()
        self.assertNoResult(waiting)
        await store.list_in_background()
        self.successResultOf(waiting)
        self.successResultOf(store.when_listed())

    def test_store_without_maintained_hash(self):
        class ListedStore:
            def __init__(self, entries: list[StoredJWT]) -> None:
                self.entries = {entry.key: entry for entry in entries}

            def keys(self):
                return iter(sorted(self.entries))

            def get(self, key: str):
                return self.entries.get(key)

        entries = [StoredJWT.from_token(decode_account(fixture_jwt(name))) for name in ("SHOP", "ACME")]
        expected = xor_of_sha256([fixture_jwt("SHOP"), fixture_jwt("ACME")])
        self.assertEqual(store_hash(ListedStore(entries)), expected)


class UnlistedStore(MemoryStore):
    """A memory store that behaves as a directory store whose listing has not ended."""

    listed = False

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[Deferred[None]] = []

    def when_listed(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.waiters.append(waiter)
        return waiter

    def finish_listing(self) -> None:
        self.listed = True
        for waiter in self.waiters:
            waiter.callback(None)


class PeerSyncTests(TestCase):
    def publish_account_update(self, account: str, jwt: bytes) -> None:
        """Record what PeerSync hands to the claim update publisher (this test case)."""
        self.updates.append((account, jwt))

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.connection = FakeConnection(connected=False)

    def start(self, interval: float = 10.0, store: MemoryStore | None = None) -> PeerSync:
        store = store if store is not None else self.store
        merger = JWTMerger(self.clock, store, fixture_operator())
        self.updates: list[tuple[str, bytes]] = []
        sync = PeerSync(self.clock, self.connection, store, merger, interval, self)
        sync.startService()
        self.addCleanup(sync.stopService)
        return sync

    def requests(self) -> list[tuple[str, bytes, str | None]]:
        return [sent for sent in self.connection.published if sent[0] == PACK]

    def test_request_on_connect(self):
        self.successResultOf(self.store.save(decode_account(fixture_jwt("SHOP"))))
        sync = self.start()
        self.assertEqual(self.requests(), [])
        self.connection.connect()
        self.assertEqual(self.requests(), [(PACK, xor_of_sha256([fixture_jwt("SHOP")]), f"{sync.inbox}.1")])
        self.connection.connect()
        self.assertEqual(len(self.requests()), 2)

    def test_periodic_requests(self):
        self.start(interval=10)
        self.connection.connected = True
        self.clock.advance(9)
        self.assertEqual(self.requests(), [])
        self.clock.advance(1)
        self.assertEqual(len(self.requests()), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.requests()), 2)

    def test_interval_zero_only_on_connect(self):
        self.start(interval=0)
        self.connection.connected = True
        self.clock.advance(3600)
        self.assertEqual(self.requests(), [])
        self.connection.connect()
        self.assertEqual(len(self.requests()), 1)

    def test_disconnected_sends_nothing(self):
        self.start(interval=10)
        self.clock.advance(30)
        self.assertEqual(self.connection.published, [])

    def test_waits_for_listing(self):
        store = UnlistedStore()
        self.start(store=store)
        self.connection.connect()
        self.clock.advance(10)
        self.assertEqual(self.requests(), [])
        store.finish_listing()
        self.assertEqual(len(self.requests()), 1)

    def test_stop_ends_timer_and_subscription(self):
        sync = self.start(interval=10)
        sync.stopService()
        self.connection.connected = True
        self.clock.advance(30)
        self.assertEqual(self.requests(), [])
        self.assertEqual(self.connection.subscriptions, [])

    def test_replies_merged_newer_trusted_only(self):
        self.successResultOf(self.store.save(decode_account(fixture_jwt("ACME"))))
        newer_shop = resign("SHOP", signing_seed(), iat=NOW - 10)
        sync = self.start()
        self.connection.connect()
        events = capture_log(self)
        inbox = f"{sync.inbox}.1"
        for payload in (
            line(SHOP, newer_shop),
            line(ACME, fixture_jwt("ACME")),
            line(SYS, untrusted_jwt("SYS", NOW - 10)),
            b"",
        ):
            self.connection.deliver(inbox, payload)

        self.assertEqual(self.store.get(SHOP).raw, newer_shop)
        self.assertIsNone(self.store.get(SYS))
        # Only the pack request goes out on the connection itself, and only the newer
        # JWT is handed to the claim update publisher.
        self.assertEqual(len(self.connection.published), 1)
        self.assertEqual(self.updates, [(SHOP, newer_shop)])
        self.assertIn(
            "peers: merged 1 newer account JWTs from a peer's pack; 1 were older or the same, 1 rejected",
            infos_in(events),
        )
        warnings = warnings_in(events)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("untrusted issuer", warnings[0])
        self.assertEqual(sync.requests, {})

    def test_older_from_peer_silent(self):
        newer = resign("SHOP", signing_seed(), iat=NOW - 10)
        self.successResultOf(self.store.save(decode_account(newer)))
        sync = self.start()
        self.connection.connect()
        events = capture_log(self)
        self.connection.deliver(f"{sync.inbox}.1", line(SHOP, fixture_jwt("SHOP")))
        self.connection.deliver(f"{sync.inbox}.1", b"")
        self.assertEqual(self.store.get(SHOP).raw, newer)
        self.assertEqual(warnings_in(events), [])
        self.assertEqual(infos_in(events), [])

    def test_replies_per_request_bounded(self):
        self.patch(replication, "MAX_PACK_REPLIES", 1)
        sync = self.start()
        self.connection.connect()
        events = capture_log(self)
        self.connection.deliver(f"{sync.inbox}.1", line(SHOP, fixture_jwt("SHOP")))
        self.connection.deliver(f"{sync.inbox}.1", line(ACME, fixture_jwt("ACME")))
        self.connection.deliver(f"{sync.inbox}.1", line(SYS, fixture_jwt("SYS")))
        self.assertIsNotNone(self.store.get(SHOP))
        self.assertIsNone(self.store.get(ACME))
        self.assertIsNone(self.store.get(SYS))
        self.assertEqual(len(warnings_in(events)), 1)

    def test_oversized_reply_rejected(self):
        self.patch(replication, "MAX_PACK_LINE", 100)
        sync = self.start()
        self.connection.connect()
        self.connection.deliver(f"{sync.inbox}.1", line(SHOP, fixture_jwt("SHOP")))
        self.assertIsNone(self.store.get(SHOP))

    def test_reply_after_end_ignored(self):
        sync = self.start()
        self.connection.connect()
        self.connection.deliver(f"{sync.inbox}.1", b"")
        self.connection.deliver(f"{sync.inbox}.1", line(SHOP, fixture_jwt("SHOP")))
        self.connection.deliver(f"{sync.inbox}.99", line(SHOP, fixture_jwt("SHOP")))
        self.assertIsNone(self.store.get(SHOP))

    def test_no_responders_ends_request(self):
        sync = self.start()
        self.connection.connect()
        self.connection.deliver(f"{sync.inbox}.1", b"", status=503)
        self.assertEqual(sync.requests, {})

    def test_open_requests_bounded(self):
        self.patch(replication, "MAX_OPEN_REQUESTS", 2)
        sync = self.start(interval=1)
        self.connection.connect()
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(list(sync.requests), ["2", "3"])


class PackRouteTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        for name in ("SHOP", "ACME", "SYS"):
            self.successResultOf(self.store.save(decode_account(fixture_jwt(name))))
        self.expected = [
            line(key, fixture_jwt(name)) for key, name in sorted([(SHOP, "SHOP"), (ACME, "ACME"), (SYS, "SYS")])
        ]

    def get(self, path: str, max_pack: int = 10_000, store: Any = None) -> tuple[int, bytes, list[bytes] | None]:
        api = AccountServerAPI(
            self.clock, store if store is not None else self.store, fixture_operator(), max_pack=max_pack
        )
        stub = StubTreq(api.resource())
        response = self.successResultOf(stub.get("http://nasd.test" + path))
        body = self.successResultOf(response.content())
        return response.code, body, response.headers.getRawHeaders(b"content-type")

    def test_default_returns_all(self):
        code, body, content_type = self.get("/jwt/v1/pack")
        self.assertEqual(code, 200)
        self.assertEqual(content_type, [b"text/plain; charset=utf-8"])
        self.assertEqual(body, b"\n".join(self.expected))

    def test_max_limits(self):
        code, body, _ = self.get("/jwt/v1/pack?max=2")
        self.assertEqual(code, 200)
        self.assertEqual(body, b"\n".join(self.expected[:2]))

    def test_cap_is_default(self):
        code, body, _ = self.get("/jwt/v1/pack", max_pack=1)
        self.assertEqual((code, body), (200, self.expected[0]))

    def test_over_cap_rejected(self):
        code, body, _ = self.get("/jwt/v1/pack?max=3", max_pack=2)
        self.assertEqual(code, 400)
        self.assertIn(b"no more than 2 JWTs are allowed (maxreplicationpack)", body)

    def test_max_zero_empty(self):
        self.assertEqual(self.get("/jwt/v1/pack?max=0")[:2], (200, b""))

    def test_cap_zero_empty(self):
        self.assertEqual(self.get("/jwt/v1/pack", max_pack=0)[:2], (200, b""))
        self.assertEqual(self.get("/jwt/v1/pack?max=1", max_pack=0)[0], 400)

    def test_bad_or_negative_max_rejected(self):
        for value in ("-1", "abc", "", "1.5", "+2", "%201", "99999999999999"):
            code, body, _ = self.get(f"/jwt/v1/pack?max={value}")
            self.assertEqual(code, 400, value)
            self.assertIn(b"bad max parameter", body, value)

    def test_expired_left_out(self):
        expired = resign("SHOP", operator_seed(), iat=NOW - 100, exp=NOW + 10)
        self.successResultOf(self.store.save(decode_account(expired)))
        self.clock.advance(60)
        code, body, _ = self.get("/jwt/v1/pack")
        self.assertEqual(code, 200)
        self.assertNotIn(SHOP.encode(), body)
        self.assertEqual(len(body.split(b"\n")), 2)

    def test_unlisted_store_unavailable(self):
        code, body, _ = self.get("/jwt/v1/pack", store=UnlistedStore())
        self.assertEqual(code, 503)
        self.assertIn(b"still being listed", body)

    async def test_directory_store_read_in_thread(self):
        folder = tempfile.mkdtemp(prefix="nasd-pack-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        store = DirectoryStore(reactor, folder, shard=True)
        store.open()
        for name in ("SHOP", "ACME"):
            await store.save(decode_account(fixture_jwt(name)))
        entries = await store.pack(10, NOW)
        self.assertEqual([entry.key for entry in entries], sorted([SHOP, ACME]))
        self.assertEqual([entry.raw for entry in await store.pack(1, NOW)], [entries[0].raw])


class PrimaryResource(Resource):
    """A primary that responds to every request with a fixed status and body."""

    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.requests: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append(request.uri)
        request.setResponseCode(self.code)
        return self.body


class RefusingClient:
    """An HTTP client whose requests fail as with a primary that is down, or get no response."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.urls: list[str] = []

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.urls.append(url)
        if self.hang:
            return Deferred()
        return fail(ConnectionRefusedError("Connection refused"))


class PrimaryImportTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.merger = JWTMerger(self.clock, self.store, fixture_operator())
        self.events = capture_log(self)

    def importer(self, client: Any, max_pack: int = 10_000) -> PrimaryImport:
        return PrimaryImport(self.clock, client, PRIMARY + "/", max_pack, 5.0, self.merger)

    def primary_api(self) -> StubTreq:
        primary_store = MemoryStore()
        for name in ("SHOP", "ACME", "SYS"):
            self.successResultOf(primary_store.save(decode_account(fixture_jwt(name))))
        api = AccountServerAPI(self.clock, primary_store, fixture_operator())
        return StubTreq(api.resource())

    def test_success(self):
        newer_acme = resign("ACME", signing_seed(), iat=NOW - 10)
        self.successResultOf(self.store.save(decode_account(newer_acme)))
        counts = self.successResultOf(ensure(self.importer(self.primary_api()).run()))
        self.assertEqual((counts.imported, counts.unchanged, counts.rejected), (2, 1, 0))
        self.assertEqual(self.store.get(SHOP).raw, fixture_jwt("SHOP"))
        self.assertEqual(self.store.get(SYS).raw, fixture_jwt("SYS"))
        self.assertEqual(self.store.get(ACME).raw, newer_acme)
        self.assertIn(
            f"imported 2 account JWTs from the primary {PRIMARY}; 1 were older or the same, 0 rejected",
            infos_in(self.events),
        )

    def test_requests_max(self):
        resource = PrimaryResource(200, b"")
        self.successResultOf(ensure(self.importer(StubTreq(resource), max_pack=7).run()))
        self.assertEqual(resource.requests, [b"/jwt/v1/pack?max=7"])

    def test_partial_garbage_skipped(self):
        body = b"\n".join(
            [
                b"<html>not a pack</html>",
                line(SHOP, fixture_jwt("SHOP")),
                line(ACME, untrusted_jwt("ACME", NOW - 10)),
                b"",
                line(SYS, fixture_jwt("SYS")),
            ]
        )
        counts = self.successResultOf(ensure(self.importer(StubTreq(PrimaryResource(200, body))).run()))
        self.assertEqual((counts.imported, counts.unchanged, counts.rejected), (2, 0, 2))
        self.assertIsNotNone(self.store.get(SHOP))
        self.assertIsNotNone(self.store.get(SYS))
        self.assertIsNone(self.store.get(ACME))
        self.assertEqual(len(warnings_in(self.events)), 2)

    def test_more_lines_than_requested_ignored(self):
        body = b"\n".join(line(key, fixture_jwt(name)) for key, name in ((SHOP, "SHOP"), (ACME, "ACME")))
        counts = self.successResultOf(ensure(self.importer(StubTreq(PrimaryResource(200, body)), max_pack=1).run()))
        self.assertEqual(counts.imported, 1)
        self.assertEqual(len(self.store), 1)

    def test_primary_down(self):
        client = RefusingClient()
        self.assertIsNone(self.successResultOf(ensure(self.importer(client).run())))
        errors = errors_in(self.events)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("cannot connect", errors[0])
        self.assertIn("going on with the account JWTs already stored", errors[0])

    def test_non_200(self):
        resource = PrimaryResource(500, b"internal error")
        self.assertIsNone(self.successResultOf(ensure(self.importer(StubTreq(resource)).run())))
        self.assertEqual(len(self.store), 0)
        errors = errors_in(self.events)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("it responded with status 500: 'internal error'", errors[0])

    def test_timeout(self):
        running = ensure(self.importer(RefusingClient(hang=True)).run())
        self.assertNoResult(running)
        self.clock.advance(5)
        self.assertIsNone(self.successResultOf(running))
        self.assertIn("did not arrive within 5.0 s", errors_in(self.events)[0])

    def test_max_zero_skipped(self):
        client = RefusingClient()
        self.assertIsNone(self.successResultOf(ensure(self.importer(client, max_pack=0).run())))
        self.assertEqual(client.urls, [])
        self.assertIn(f"primary: not importing from {PRIMARY}: maxreplicationpack is 0", infos_in(self.events))

    def test_start_does_not_wait(self):
        importer = self.importer(RefusingClient(hang=True))
        importer.startService()
        self.assertTrue(importer.running)
        self.assertNoResult(importer.done)
        self.clock.advance(5)
        self.assertIsNone(self.successResultOf(importer.done))


def ensure(coroutine: Any) -> Deferred[Any]:
    return ensureDeferred(coroutine)


class PackLinesTests(TestCase):
    def test_lines_across_chunks(self):
        lines: list[bytes] = []
        splitter = PackLines(lines.append, lambda number: None)
        for chunk in (b"AB", b"C\nDE", b"F\n\nGH"):
            splitter.feed(chunk)
        splitter.close()
        self.assertEqual(lines, [b"ABC", b"DEF", b"GH"])

    def test_long_line_dropped(self):
        self.patch(replication, "MAX_PACK_LINE", 4)
        lines: list[bytes] = []
        too_long: list[int] = []
        splitter = PackLines(lines.append, too_long.append)
        splitter.feed(b"ok\n0123")
        splitter.feed(b"456789\nend")
        splitter.close()
        self.assertEqual(lines, [b"ok", b"end"])
        self.assertEqual(too_long, [2])


class WiringTests(TestCase):
    def test_negative_max_pack_rejected(self):
        config = with_overrides(Config(), max_replication_pack=-1)
        with self.assertRaises(StartupError) as raised:
            add_replication(Clock(), config, MemoryStore(), None, None, None, MultiService())
        self.assertIn("maxreplicationpack must be 0 or more", str(raised.exception))

    def test_primary_with_readonly_store_rejected(self):
        config = with_overrides(Config(), primary=PRIMARY)
        with self.assertRaises(StartupError):
            add_replication(Clock(), config, MemoryStore(readonly=True), None, None, None, MultiService())

    def test_primary_import_added(self):
        parent = MultiService()
        add_replication(Clock(), with_overrides(Config(), primary=PRIMARY), MemoryStore(), None, None, None, parent)
        kinds = [type(service).__name__ for service in parent]
        self.assertEqual(kinds, ["JWTMerger", "PrimaryImport"])
