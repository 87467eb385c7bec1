"""Tests for the memory and directory stores: atomic writes, rollback refusal, sharding."""

import errno
import os
import shutil
import stat
import tempfile

import nkeys
from twisted.internet import reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from nasd import store as store_module
from nasd.jwt import Token, decode_account
from nasd.store import DirectoryStore, MemoryStore, ReadOnlyStoreError, StaleJWTError, StoreError
from tests.tokens import (
    ACME,
    OPERATOR_KEY,
    SHOP,
    account_claims,
    encode,
    fixture_jwt,
    fixture_seed,
    new_seed,
    public_key,
)


def _account(key: str, iat: int, name: str = "X", **nats) -> Token:
    return decode_account(encode(account_claims(key, name, iat, **nats), fixture_seed(OPERATOR_KEY)))


class MemoryStoreTests(unittest.TestCase):
    def test_save_then_get(self):
        store = MemoryStore()
        token = decode_account(fixture_jwt("SHOP"))
        changed = self.successResultOf(store.save(token))
        self.assertTrue(changed)
        entry = store.get(SHOP)
        self.assertEqual(entry.raw, fixture_jwt("SHOP"))
        self.assertEqual(entry.jti, token.jti)
        self.assertEqual(len(store), 1)

    def test_same_jwt_again_unchanged(self):
        store = MemoryStore()
        token = decode_account(fixture_jwt("SHOP"))
        self.successResultOf(store.save(token))
        self.assertFalse(self.successResultOf(store.save(token)))

    def test_older_iat_rejected(self):
        store = MemoryStore()
        newer, older = _account(SHOP, 2000), _account(SHOP, 1000)
        self.successResultOf(store.save(newer))
        failure = self.failureResultOf(store.save(older), StaleJWTError)
        self.assertEqual(failure.value.stored_iat, 2000)
        self.assertEqual(failure.value.offered_iat, 1000)
        self.assertEqual(store.get(SHOP).raw, newer.raw)

    def test_equal_iat_replaces(self):
        store = MemoryStore()
        first, second = _account(SHOP, 1000, "A"), _account(SHOP, 1000, "B")
        self.successResultOf(store.save(first))
        self.assertTrue(self.successResultOf(store.save(second)))
        self.assertEqual(store.get(SHOP).raw, second.raw)

    def test_readonly_rejects_save(self):
        store = MemoryStore(readonly=True)
        self.failureResultOf(store.save(_account(SHOP, 1)), ReadOnlyStoreError)

    def test_keys_sorted(self):
        store = MemoryStore()
        self.successResultOf(store.save(_account(SHOP, 1)))
        self.successResultOf(store.save(_account(ACME, 1)))
        self.assertEqual(list(store.keys()), sorted([SHOP, ACME]))


class DirectoryStoreTests(unittest.TestCase):
    def setUp(self):
        parent = tempfile.mkdtemp(prefix="nasd-store-")
        self.addCleanup(shutil.rmtree, parent, ignore_errors=True)
        self.folder = os.path.join(parent, "store")

    def _open(self, shard=False, readonly=False) -> DirectoryStore:
        store = DirectoryStore(reactor, self.folder, shard=shard, readonly=readonly)
        store.open()
        return store

    async def test_flat_layout_and_modes(self):
        store = self._open()
        await store.save(decode_account(fixture_jwt("SHOP")))
        path = os.path.join(self.folder, SHOP + ".jwt")
        with open(path, "rb") as file:
            self.assertEqual(file.read(), fixture_jwt("SHOP"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.folder).st_mode), 0o700)

    async def test_sharded_layout(self):
        store = self._open(shard=True)
        await store.save(decode_account(fixture_jwt("SHOP")))
        path = os.path.join(self.folder, SHOP[-2:], SHOP + ".jwt")
        self.assertTrue(os.path.isfile(path))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)

    async def test_reopen_restores_index(self):
        store = self._open(shard=True)
        token = _account(ACME, 500)
        await store.save(token)
        reopened = self._open(shard=True)
        entry = reopened.get(ACME)
        self.assertEqual(entry.raw, token.raw)
        self.assertEqual(entry.issued_at, 500)
        self.assertEqual(entry.jti, token.jti)

    async def test_older_iat_leaves_file(self):
        store = self._open()
        newer = _account(SHOP, 2000)
        await store.save(newer)
        with self.assertRaises(StaleJWTError):
            await store.save(_account(SHOP, 1999))
        with open(store.path_for(SHOP), "rb") as file:
            self.assertEqual(file.read(), newer.raw)

    async def test_rollback_refused_after_restart(self):
        store = self._open()
        await store.save(_account(SHOP, 2000))
        with self.assertRaises(StaleJWTError):
            await self._open().save(_account(SHOP, 10))

    async def test_no_temporary_files_left(self):
        store = self._open()
        for iat in range(1, 6):
            await store.save(_account(SHOP, iat))
        self.assertEqual(os.listdir(self.folder), [SHOP + ".jwt"])

    async def test_failed_write_keeps_old_file(self):
        store = self._open()
        old = _account(SHOP, 1)
        await store.save(old)

        def failing_fsync(descriptor: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        self.patch(os, "fsync", failing_fsync)
        with self.assertRaises(StoreError):
            await store.save(_account(SHOP, 2))
        self.assertEqual(store.get(SHOP).raw, old.raw)
        with open(store.path_for(SHOP), "rb") as file:
            self.assertEqual(file.read(), old.raw)
        self.assertEqual(os.listdir(self.folder), [SHOP + ".jwt"])

    async def test_failed_write_in_blocked_shard(self):
        store = self._open(shard=True)
        blocker = os.path.join(self.folder, SHOP[-2:])
        with open(blocker, "w") as file:
            file.write("not a folder")
        with self.assertRaises(StoreError):
            await store.save(_account(SHOP, 1))
        self.assertIsNone(store.get(SHOP))
        self.assertEqual(sorted(os.listdir(self.folder)), [SHOP[-2:]])

    def test_invalid_key_never_becomes_path(self):
        store = self._open()
        for key in (
            "../../etc/passwd",
            ACME[:-1] + ("A" if ACME[-1] != "A" else "B"),
            public_key(new_seed(nkeys.PREFIX_BYTE_USER)),
        ):
            with self.assertRaises(StoreError):
                store.path_for(key)

    def test_open_skips_foreign_files(self):
        os.makedirs(self.folder)
        with open(os.path.join(self.folder, "notes.jwt"), "w") as file:
            file.write("hello")
        with open(os.path.join(self.folder, ACME + ".jwt"), "wb") as file:
            file.write(fixture_jwt("SHOP"))
        with open(os.path.join(self.folder, SHOP + ".jwt"), "wb") as file:
            file.write(b"garbage")
        store = self._open()
        self.assertIsNone(store.get(ACME))
        self.assertIsNone(store.get(SHOP))
        self.assertNotIn("notes", list(store.keys()))

    def test_bad_file_logged_once(self):
        os.makedirs(self.folder)
        with open(os.path.join(self.folder, SHOP + ".jwt"), "wb") as file:
            file.write(b"garbage")
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = self._open()
        for _ in range(3):
            self.assertIsNone(store.get(SHOP))
        warnings = [event for event in events if event.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1)

    async def test_external_replacement_served(self):
        self.patch(store_module, "RECHECK_INTERVAL", 0)
        store = self._open()
        await store.save(_account(SHOP, 1))
        replacement = _account(SHOP, 2)
        temporary = store.path_for(SHOP) + ".new"
        with open(temporary, "wb") as file:
            file.write(replacement.raw)
        os.replace(temporary, store.path_for(SHOP))
        self.assertEqual(store.get(SHOP).raw, replacement.raw)

    async def test_deleted_file_not_served(self):
        self.patch(store_module, "RECHECK_INTERVAL", 0)
        store = self._open()
        await store.save(_account(SHOP, 1))
        os.unlink(store.path_for(SHOP))
        self.assertIsNone(store.get(SHOP))
        self.assertEqual(len(store), 0)

    async def test_recheck_waits_for_interval(self):
        self.patch(store_module, "RECHECK_INTERVAL", 3600)
        store = self._open()
        first = _account(SHOP, 1)
        await store.save(first)
        os.unlink(store.path_for(SHOP))
        self.assertEqual(store.get(SHOP).raw, first.raw)

    async def test_cache_stays_bounded(self):
        store = DirectoryStore(reactor, self.folder, shard=True, cache_size=2)
        store.open()
        keys = [public_key(new_seed(nkeys.PREFIX_BYTE_ACCOUNT)) for _ in range(4)]
        for key in keys:
            await store.save(_account(key, 1))
        self.assertEqual(len(store._cache), 2)
        self.assertEqual(len(store), 4)
        for key in keys:
            self.assertEqual(store.get(key).key, key)

    def test_open_counts_existing_files(self):
        os.makedirs(os.path.join(self.folder, SHOP[-2:]))
        with open(os.path.join(self.folder, SHOP[-2:], SHOP + ".jwt"), "wb") as file:
            file.write(fixture_jwt("SHOP"))
        store = self._open(shard=True)
        self.assertEqual(list(store.keys()), [SHOP])
        self.assertEqual(store.get(SHOP).raw, fixture_jwt("SHOP"))

    def test_open_creates_missing_folder(self):
        self._open()
        self.assertTrue(os.path.isdir(self.folder))

    def test_readonly_missing_folder_fails(self):
        with self.assertRaises(StoreError):
            self._open(readonly=True)

    async def test_concurrent_saves_keep_newest(self):
        store = self._open()
        tokens = [_account(SHOP, iat) for iat in (5, 3, 9, 1, 7)]
        results = [store.save(token) for token in tokens]
        outcomes = []
        for result in results:
            try:
                outcomes.append(await result)
            except StaleJWTError:
                outcomes.append("stale")
        self.assertEqual(outcomes, [True, "stale", True, "stale", "stale"])
        self.assertEqual(store.get(SHOP).issued_at, 9)
        self.assertEqual(self._open().get(SHOP).issued_at, 9)


class DurableFolderTests(unittest.TestCase):
    def test_new_shard_folder_synced_in_parent(self):
        parent = tempfile.mkdtemp(prefix="nasd-store-")
        self.addCleanup(shutil.rmtree, parent, ignore_errors=True)
        synced = []
        self.patch(store_module, "_sync_folder", synced.append)
        path = os.path.join(parent, "a", "b", "KEY.jwt")
        store_module.write_durably(path, b"x")
        self.assertEqual(synced, [parent, os.path.join(parent, "a"), os.path.join(parent, "a", "b")])
        with open(path, "rb") as file:
            self.assertEqual(file.read(), b"x")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(parent, "a")).st_mode), 0o700)


class ListingTests(unittest.TestCase):
    async def test_listing_without_hash_reads_no_file(self):
        parent = tempfile.mkdtemp(prefix="nasd-store-")
        self.addCleanup(shutil.rmtree, parent, ignore_errors=True)
        first = DirectoryStore(reactor, parent, shard=True)
        first.open()
        await first.save(decode_account(fixture_jwt("SHOP")))

        reads = []
        self.patch(store_module, "_read_entry", lambda *arguments, **keywords: reads.append(arguments))
        store = DirectoryStore(reactor, parent, shard=True)
        store.open(list_keys=False)
        count = await store.list_in_background(compute_hash=False)
        self.assertEqual(count, 1)
        self.assertEqual(reads, [])
        self.assertTrue(store.listed)
