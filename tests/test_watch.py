"""Tests for the watcher of a read-only store folder and the verification of the files it serves.

Most tests call the inotify callback that the watcher registered, with the path and
event mask inotify would pass, and move a Clock past the quiet period. The tests in
RealINotifyTests open a real inotify descriptor and read its events by hand.
"""

from __future__ import annotations

import os
import time

import nkeys
import pytest
from twisted.internet.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    INotifyError,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath

from nasd.config import Config, with_overrides
from nasd.jwt import Operator, decode_operator
from nasd.service import StartupError, build_service
from nasd.store import DirectoryStore, trusted_account_check
from nasd.watch import QUIET_PERIOD, DirectoryWatcher, StayingINotify, is_temporary
from tests.tokens import (
    ACME,
    OPERATOR_KEY,
    OPERATOR_SIGNING_KEY,
    SHOP,
    STORE,
    SYS,
    account_claims,
    encode,
    fixture_claims,
    fixture_jwt,
    fixture_seed,
    new_seed,
    public_key,
)


class FakeNotifier:
    """Record the folders watched and the callbacks registered, as INotify would keep them."""

    def __init__(self) -> None:
        self.watches: dict[str, tuple[int, list]] = {}
        self.closed = False

    def watch(self, path, mask=0, autoAdd=False, callbacks=None):
        self.watches[os.fsdecode(path.path)] = (mask, list(callbacks or ()))
        return len(self.watches)

    def ignore(self, path):
        del self.watches[os.fsdecode(path.path)]

    def close(self) -> None:
        self.closed = True

    def fire(self, path: str, mask: int, watched: str | None = None) -> None:
        """Deliver an event on *path* to the callbacks of the watch of *watched*, by default its folder."""
        _, callbacks = self.watches[watched or os.path.dirname(path)]
        for callback in callbacks:
            callback(None, FilePath(path.encode()), mask)


class RecordingPublisher:
    def __init__(self) -> None:
        self.updates: list[tuple[str, bytes]] = []

    def publish_account_update(self, account: str, jwt: bytes) -> None:
        self.updates.append((account, jwt))


def resigned(name: str, seconds_later: int = 10, seed_key: str = OPERATOR_KEY) -> bytes:
    """Return the fixture account *name* signed again with a later iat, as `nsc edit account` would."""
    claims = fixture_claims(name)
    claims.pop("jti")
    claims["iat"] = int(time.time()) + seconds_later
    return encode(claims, fixture_seed(seed_key))


def untrusted(key: str) -> bytes:
    """Return a well-formed account JWT for *key* signed by an operator nasd does not trust."""
    return encode(account_claims(key, "X", int(time.time())), new_seed(nkeys.PREFIX_BYTE_OPERATOR))


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)


@pytest.fixture
def messages():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda level: [formatEvent(event) for event in events if event.get("log_level") == level]
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def operator() -> Operator:
    return Operator.from_token(decode_operator(fixture_jwt("demo")))


class Harness:
    """A read-only DirectoryStore with its watcher, a fake inotify, a Clock and a publisher."""

    def __init__(self, folder: str, operator: Operator, shard: bool = False, notifier=None) -> None:
        self.folder = folder
        self.clock = MemoryReactorClock()
        self.clock.advance(time.time())  # the trust check compares exp and nbf with this clock
        self.store = DirectoryStore(
            self.clock, folder, shard=shard, readonly=True, check=trusted_account_check(operator, self.clock)
        )
        self.store.open()
        self.notifier = notifier or FakeNotifier()
        self.publisher = RecordingPublisher()
        self.watcher = DirectoryWatcher(
            self.clock, self.store, self.publisher, clock=self.clock, notifier_factory=lambda: self.notifier
        )
        self.watcher.startService()

    def path(self, key: str) -> str:
        if self.store.shard:
            return os.path.join(self.folder, key[-2:], key + ".jwt")
        return os.path.join(self.folder, key + ".jwt")

    def settle(self) -> None:
        self.clock.advance(QUIET_PERIOD + 0.01)


@pytest.fixture
def flat(tmp_path, operator) -> Harness:
    folder = tmp_path / "jwt"
    folder.mkdir()
    write(str(folder / f"{ACME}.jwt"), fixture_jwt("ACME"))
    harness = Harness(str(folder), operator)
    yield harness
    harness.watcher.stopService()


@pytest.fixture
def sharded(tmp_path, operator) -> Harness:
    folder = tmp_path / "jwt"
    write(str(folder / ACME[-2:] / f"{ACME}.jwt"), fixture_jwt("ACME"))
    write(str(folder / SYS[-2:] / f"{SYS}.jwt"), fixture_jwt("SYS"))
    harness = Harness(str(folder), operator, shard=True)
    yield harness
    harness.watcher.stopService()


def test_write_in_place_published_once(flat):
    assert flat.store.get(ACME).raw == fixture_jwt("ACME")
    updated = resigned("ACME")
    write(flat.path(ACME), updated)
    flat.notifier.fire(flat.path(ACME), IN_MODIFY)
    flat.notifier.fire(flat.path(ACME), IN_CLOSE_WRITE)

    assert flat.store.get(ACME).raw == updated, "the store must read the file again at once"
    assert flat.publisher.updates == []
    flat.settle()
    assert flat.publisher.updates == [(ACME, updated)]


def test_created_file_published(flat):
    write(flat.path(SHOP), fixture_jwt("SHOP"))
    flat.notifier.fire(flat.path(SHOP), IN_CREATE)
    flat.notifier.fire(flat.path(SHOP), IN_CLOSE_WRITE)
    flat.settle()
    assert flat.publisher.updates == [(SHOP, fixture_jwt("SHOP"))]
    assert flat.store.get(SHOP).raw == fixture_jwt("SHOP")


def test_renamed_into_place_published(flat):
    temporary = os.path.join(flat.folder, f".{ACME}.jwt.1234.tmp")
    updated = resigned("ACME")
    write(temporary, updated)
    flat.notifier.fire(temporary, IN_CREATE)
    flat.notifier.fire(temporary, IN_CLOSE_WRITE)
    os.replace(temporary, flat.path(ACME))
    flat.notifier.fire(temporary, IN_MOVED_FROM)
    flat.notifier.fire(flat.path(ACME), IN_MOVED_TO)
    flat.settle()
    assert flat.publisher.updates == [(ACME, updated)]
    assert flat.store.get(ACME).raw == updated


def test_deleted_file_not_served(flat, messages):
    assert flat.store.get(ACME) is not None
    os.unlink(flat.path(ACME))
    flat.notifier.fire(flat.path(ACME), IN_DELETE)
    assert flat.store.get(ACME) is None
    flat.settle()
    assert flat.publisher.updates == []
    assert any(f"no longer serving account {ACME}" in line for line in messages(LogLevel.info))


def test_renamed_away_not_served(flat):
    flat.store.get(ACME)
    os.replace(flat.path(ACME), flat.path(ACME) + ".old")
    flat.notifier.fire(flat.path(ACME), IN_MOVED_FROM)
    flat.notifier.fire(flat.path(ACME) + ".old", IN_MOVED_TO)
    flat.settle()
    assert flat.store.get(ACME) is None
    assert flat.publisher.updates == []


@pytest.mark.parametrize("name", [f".{SHOP}.jwt", f"{SHOP}.jwt~", f"{SHOP}.jwt.swp", f"{SHOP}.jwt.tmp", "4913"])
def test_temporary_files_ignored(flat, name):
    path = os.path.join(flat.folder, name)
    write(path, fixture_jwt("SHOP"))
    flat.notifier.fire(path, IN_CREATE)
    flat.notifier.fire(path, IN_CLOSE_WRITE)
    assert flat.clock.getDelayedCalls() == []
    flat.settle()
    assert flat.publisher.updates == []


def test_temporary_names():
    assert is_temporary(".ACME.jwt")
    assert is_temporary("ACME.jwt~")
    assert is_temporary("ACME.jwt.swp")
    assert is_temporary("x.tmp")
    assert not is_temporary(f"{ACME}.jwt")


def test_untrusted_file_not_served(flat, messages):
    write(flat.path(SHOP), untrusted(SHOP))
    flat.notifier.fire(flat.path(SHOP), IN_CREATE)
    flat.notifier.fire(flat.path(SHOP), IN_CLOSE_WRITE)
    flat.settle()
    assert flat.store.get(SHOP) is None
    assert flat.publisher.updates == []
    warnings = [line for line in messages(LogLevel.warn) if SHOP in line]
    assert len(warnings) == 1, warnings
    assert "untrusted issuer" in warnings[0]


def test_untrusted_logged_once_per_change(flat, messages):
    write(flat.path(SHOP), untrusted(SHOP))
    flat.notifier.fire(flat.path(SHOP), IN_CLOSE_WRITE)
    # GETs between the change and the end of the quiet period read the file once.
    assert flat.store.get(SHOP) is None
    assert flat.store.get(SHOP) is None
    flat.settle()
    write(flat.path(SHOP), untrusted(SHOP))
    flat.notifier.fire(flat.path(SHOP), IN_CLOSE_WRITE)
    flat.settle()
    assert len([line for line in messages(LogLevel.warn) if SHOP in line]) == 2


def test_bad_signature_not_served(flat, messages):
    header, payload, signature = resigned("ACME").split(b".")
    forged = fixture_jwt("ACME").split(b".")[1]
    write(flat.path(ACME), b".".join([header, forged, signature]))
    flat.notifier.fire(flat.path(ACME), IN_CLOSE_WRITE)
    flat.settle()
    assert flat.store.get(ACME) is None
    assert flat.publisher.updates == []
    assert any("signature does not verify" in line for line in messages(LogLevel.warn))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"not a jwt", "expected 3 dot-separated segments"),
        (fixture_jwt("demo"), "expected an account JWT"),
        (fixture_jwt("SHOP"), f"is for subject {SHOP!r}, not {ACME}"),
    ],
)
def test_invalid_file_logged_not_served(flat, messages, content, reason):
    write(flat.path(ACME), content)
    flat.notifier.fire(flat.path(ACME), IN_CLOSE_WRITE)
    flat.settle()
    assert flat.store.get(ACME) is None
    assert flat.publisher.updates == []
    assert any(reason in line for line in messages(LogLevel.warn)), messages(LogLevel.warn)


def test_expired_account_not_served(flat, messages):
    claims = account_claims(SHOP, "SHOP", int(time.time()) - 100)
    claims["exp"] = int(time.time()) - 10
    write(flat.path(SHOP), encode(claims, fixture_seed(OPERATOR_KEY)))
    flat.notifier.fire(flat.path(SHOP), IN_CLOSE_WRITE)
    flat.settle()
    assert flat.store.get(SHOP) is None
    assert any("claim is expired" in line for line in messages(LogLevel.warn))


def test_signing_key_accepted(flat):
    updated = resigned("ACME", seed_key=OPERATOR_SIGNING_KEY)
    write(flat.path(ACME), updated)
    flat.notifier.fire(flat.path(ACME), IN_CLOSE_WRITE)
    flat.settle()
    assert flat.publisher.updates == [(ACME, updated)]


def test_misnamed_file_logged(flat, messages):
    path = os.path.join(flat.folder, "acme.jwt")
    write(path, fixture_jwt("ACME"))
    flat.notifier.fire(path, IN_CLOSE_WRITE)
    flat.settle()
    assert flat.publisher.updates == []
    assert any("acme.jwt: the name is not <account key>.jwt" in line for line in messages(LogLevel.warn))


def test_burst_published_once(flat):
    updated = resigned("ACME")
    for _ in range(5):
        write(flat.path(ACME), updated)
        flat.notifier.fire(flat.path(ACME), IN_MODIFY)
        flat.clock.advance(QUIET_PERIOD / 2)
    assert flat.publisher.updates == []
    flat.settle()
    assert flat.publisher.updates == [(ACME, updated)]


def test_endless_changes_hit_max_delay(flat):
    updated = resigned("ACME")
    write(flat.path(ACME), updated)
    for _ in range(40):
        flat.notifier.fire(flat.path(ACME), IN_MODIFY)
        flat.clock.advance(QUIET_PERIOD / 2)
    assert len(flat.publisher.updates) >= 1
    assert flat.publisher.updates[0] == (ACME, updated)


def test_each_file_debounced_separately(flat):
    write(flat.path(SHOP), fixture_jwt("SHOP"))
    write(flat.path(SYS), fixture_jwt("SYS"))
    flat.notifier.fire(flat.path(SHOP), IN_CLOSE_WRITE)
    flat.notifier.fire(flat.path(SYS), IN_CLOSE_WRITE)
    flat.settle()
    assert sorted(flat.publisher.updates) == sorted([(SHOP, fixture_jwt("SHOP")), (SYS, fixture_jwt("SYS"))])


def test_no_publisher_still_serves(tmp_path, operator, messages):
    harness = Harness(str(tmp_path), operator)
    harness.watcher.publisher = None
    write(harness.path(SHOP), fixture_jwt("SHOP"))
    harness.notifier.fire(harness.path(SHOP), IN_CLOSE_WRITE)
    harness.settle()
    assert harness.store.get(SHOP).raw == fixture_jwt("SHOP")
    assert any("NATS is not configured" in line for line in messages(LogLevel.info))


def test_publisher_error_logged_not_raised(flat, messages):
    def broken(account, jwt):
        raise RuntimeError("boom")

    flat.publisher.publish_account_update = broken
    write(flat.path(ACME), resigned("ACME"))
    flat.notifier.fire(flat.path(ACME), IN_CLOSE_WRITE)
    flat.settle()
    assert any("handling the changed file" in line for line in messages(LogLevel.critical))


def test_event_error_logged_not_raised(flat, messages):
    def broken(key):
        raise RuntimeError("boom")

    flat.store.invalidate = broken
    flat.notifier.fire(flat.path(ACME), IN_CLOSE_WRITE)
    assert any("handling the file event" in line for line in messages(LogLevel.critical))


def test_sharded_folders_watched(sharded):
    assert sorted(sharded.notifier.watches) == sorted(
        [sharded.folder, os.path.join(sharded.folder, ACME[-2:]), os.path.join(sharded.folder, SYS[-2:])]
    )


def test_new_shard_folder_watched(sharded):
    shard = os.path.join(sharded.folder, SHOP[-2:])
    os.mkdir(shard)
    sharded.notifier.fire(shard, IN_CREATE | IN_ISDIR)
    assert shard in sharded.notifier.watches

    write(sharded.path(SHOP), fixture_jwt("SHOP"))
    sharded.notifier.fire(sharded.path(SHOP), IN_CREATE)
    sharded.notifier.fire(sharded.path(SHOP), IN_CLOSE_WRITE)
    sharded.settle()
    assert sharded.publisher.updates == [(SHOP, fixture_jwt("SHOP"))]


def test_shard_renamed_in_published(sharded, tmp_path):
    outside = tmp_path / "incoming" / SHOP[-2:]
    write(str(outside / f"{SHOP}.jwt"), fixture_jwt("SHOP"))
    shard = os.path.join(sharded.folder, SHOP[-2:])
    os.replace(outside, shard)
    sharded.notifier.fire(shard, IN_MOVED_TO | IN_ISDIR)
    sharded.settle()
    assert shard in sharded.notifier.watches
    assert sharded.publisher.updates == [(SHOP, fixture_jwt("SHOP"))]


def test_shard_folder_renamed_away_not_served(sharded, tmp_path):
    assert sharded.store.get(ACME) is not None
    shard = os.path.join(sharded.folder, ACME[-2:])
    os.replace(shard, tmp_path / "moved")
    sharded.notifier.fire(shard, IN_MOVED_FROM | IN_ISDIR)
    assert shard not in sharded.notifier.watches
    assert sharded.store.get(ACME) is None
    sharded.settle()
    assert sharded.publisher.updates == []


def test_file_in_wrong_shard_ignored(sharded, messages):
    wrong = os.path.join(sharded.folder, ACME[-2:], f"{SHOP}.jwt")
    write(wrong, fixture_jwt("SHOP"))
    sharded.notifier.fire(wrong, IN_CLOSE_WRITE)
    sharded.settle()
    assert sharded.publisher.updates == []
    assert sharded.store.get(SHOP) is None
    assert any("in the expected folder" in line for line in messages(LogLevel.warn))


def test_store_folder_removed_logged(sharded, messages):
    sharded.notifier.fire(sharded.folder, IN_DELETE_SELF, watched=sharded.folder)
    assert any("was removed or renamed" in line for line in messages(LogLevel.error))


def test_inotify_failure_logged_not_raised(tmp_path, operator, messages):
    def fail():
        raise INotifyError("INotify initialization error.")

    store = DirectoryStore(MemoryReactorClock(), str(tmp_path), readonly=True)
    store.open()
    watcher = DirectoryWatcher(MemoryReactorClock(), store, RecordingPublisher(), notifier_factory=fail)
    watcher.startService()
    assert watcher.running
    assert any("starting inotify failed" in line for line in messages(LogLevel.error))


def test_stop_cancels_pending_and_closes(flat):
    flat.notifier.fire(flat.path(ACME), IN_CLOSE_WRITE)
    flat.watcher.stopService()
    assert flat.notifier.closed
    assert flat.clock.getDelayedCalls() == []


def test_writable_store_reads_unverified(tmp_path):
    # A writable store reads its own files without verifying them again.
    key = public_key(new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
    write(str(tmp_path / f"{key}.jwt"), untrusted(key))
    store = DirectoryStore(MemoryReactorClock(), str(tmp_path))
    store.open()
    assert store.get(key) is not None


def test_invalidate_rereads_at_once(tmp_path, operator):
    write(str(tmp_path / f"{ACME}.jwt"), fixture_jwt("ACME"))
    store = DirectoryStore(MemoryReactorClock(), str(tmp_path), readonly=True)
    store.open()
    assert store.get(ACME).raw == fixture_jwt("ACME")
    updated = resigned("ACME")
    write(str(tmp_path / f"{ACME}.jwt"), updated)
    store.invalidate(ACME)
    assert store.get(ACME).raw == updated


class TestRealINotify:
    """The watcher on a real inotify descriptor; events are read with doRead, without a running reactor."""

    @pytest.fixture
    def real(self, tmp_path, operator):
        folder = tmp_path / "jwt"
        write(str(folder / SYS[-2:] / f"{SYS}.jwt"), fixture_jwt("SYS"))
        reactor = MemoryReactorClock()
        notifier = StayingINotify(reactor)
        harness = Harness(str(folder), operator, shard=True, notifier=notifier)
        harness.read = notifier.doRead
        yield harness
        harness.watcher.stopService()
        assert not notifier.connected

    def test_create_rename_and_delete(self, real):
        write(real.path(SHOP), fixture_jwt("SHOP"))
        real.read()
        # The new shard folder is watched after its creation event, and the file
        # written before that is found by listing the folder.
        assert os.path.join(real.folder, SHOP[-2:]) in real.watcher.watched
        real.settle()
        assert real.publisher.updates == [(SHOP, fixture_jwt("SHOP"))]

        updated = resigned("SHOP")
        temporary = os.path.join(real.folder, SHOP[-2:], ".incoming.tmp")
        write(temporary, updated)
        os.replace(temporary, real.path(SHOP))
        real.read()
        real.settle()
        assert real.publisher.updates[-1] == (SHOP, updated)

        os.unlink(real.path(SHOP))
        real.read()
        real.settle()
        assert real.store.get(SHOP) is None
        assert len(real.publisher.updates) == 2

    def test_deleted_shard_keeps_other_watches(self, real):
        shard = os.path.join(real.folder, SYS[-2:])
        os.unlink(os.path.join(shard, f"{SYS}.jwt"))
        os.rmdir(shard)
        real.read()
        real.settle()
        assert real.notifier.connected, "deleting one folder must not close inotify"
        assert real.store.get(SYS) is None

        write(real.path(ACME), fixture_jwt("ACME"))
        real.read()
        real.settle()
        assert real.publisher.updates == [(ACME, fixture_jwt("ACME"))]


def _readonly_config(folder: str, **changes) -> Config:
    config = with_overrides(
        Config(operator=str(STORE / "demo.jwt")), http={"port": 0}, store={"dir": folder, "readonly": True}
    )
    return with_overrides(config, **changes) if changes else config


def test_service_watches_readonly_store(tmp_path):
    service = build_service(MemoryReactorClock(), _readonly_config(str(tmp_path)))
    assert service.api.store.check is not None
    assert [type(child) for child in service if isinstance(child, DirectoryWatcher)] == [DirectoryWatcher]


def test_service_does_not_watch_writable_store(tmp_path):
    service = build_service(MemoryReactorClock(), _readonly_config(str(tmp_path), store={"readonly": False}))
    assert service.api.store.check is None
    assert not any(isinstance(child, DirectoryWatcher) for child in service)


def test_service_readonly_needs_operator(tmp_path):
    with pytest.raises(StartupError, match="store.readonly: .* needs operator"):
        build_service(MemoryReactorClock(), _readonly_config(str(tmp_path), operator=None))


def test_service_readonly_missing_folder_stops(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(StartupError, match=f"cannot open the store folder {missing}: .* does not exist"):
        build_service(MemoryReactorClock(), _readonly_config(missing))
