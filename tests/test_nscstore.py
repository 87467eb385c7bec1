"""Tests for serving an nsc operator folder: the folder checks, the account index, the
watcher of the folder and the startup of nasd with store.nsc."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import nkeys
import pytest
from twisted.internet.inotify import IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_ISDIR, IN_MOVED_FROM, IN_MOVED_TO
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from nasd.config import Config, with_overrides
from nasd.jwt import Operator, decode_account, decode_operator
from nasd.nscstore import NscFolderError, NscStore, check_operator_folder
from nasd.service import StartupError, build_service
from nasd.store import ReadOnlyStoreError, trusted_account_check
from nasd.watch import QUIET_PERIOD, NscWatcher
from tests.test_watch import FakeNotifier, RecordingPublisher, resigned, untrusted, write
from tests.tokens import (
    ACME,
    OPERATOR_KEY,
    SHOP,
    STORE,
    SYS,
    account_claims,
    encode,
    fixture_jwt,
    fixture_seed,
    new_seed,
    public_key,
)


def copy_operator_folder(parent) -> str:
    """Copy the nsc fixture folder into *parent*, writable, and return the copy's path."""
    target = os.path.join(str(parent), "demo")
    shutil.copytree(STORE, target)
    for root, folders, files in os.walk(target):
        for name in folders:
            os.chmod(os.path.join(root, name), stat.S_IRWXU)
        for name in files:
            os.chmod(os.path.join(root, name), stat.S_IRUSR | stat.S_IWUSR)
    os.chmod(target, stat.S_IRWXU)
    return target


def new_account(name: str) -> tuple[str, bytes]:
    """Return the key and the operator-signed JWT of a new account, as `nsc add account` would make."""
    key = public_key(new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
    return key, encode(account_claims(key, name, int(time.time())), fixture_seed(OPERATOR_KEY))


@pytest.fixture
def messages():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda level: [formatEvent(event) for event in events if event.get("log_level") == level]
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def folder(tmp_path) -> str:
    return copy_operator_folder(tmp_path)


@pytest.fixture
def clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(time.time())  # the trust check compares exp and nbf with this clock
    return clock


@pytest.fixture
def store(folder, clock) -> NscStore:
    operator = Operator.from_token(decode_operator(fixture_jwt("demo")))
    store = NscStore(check_operator_folder(folder), trusted_account_check(operator, clock))
    store.open()
    return store


class Harness:
    """An NscStore with its watcher on a fake inotify."""

    def __init__(self, store: NscStore, clock: MemoryReactorClock) -> None:
        self.store = store
        self.clock = clock
        self.notifier = FakeNotifier()
        self.publisher = RecordingPublisher()
        self.watcher = NscWatcher(clock, store, self.publisher, clock=clock, notifier_factory=lambda: self.notifier)
        self.watcher.startService()
        self.accounts = store.folder.accounts

    def account_file(self, name: str) -> str:
        return self.store.folder.account_file(name)

    def settle(self) -> None:
        self.clock.advance(QUIET_PERIOD + 0.01)


@pytest.fixture
def watched(store, clock) -> Harness:
    harness = Harness(store, clock)
    yield harness
    harness.watcher.stopService()


def test_serves_accounts_by_key(store):
    for name, key in (("SYS", SYS), ("ACME", ACME), ("SHOP", SHOP)):
        entry = store.get(key)
        assert entry is not None, name
        assert entry.raw == fixture_jwt(name).strip()
    assert list(store.keys()) == sorted([SYS, ACME, SHOP])
    assert len(store) == 3


def test_store_interface(store, folder):
    assert store.kind == "nsc"
    assert store.readonly is True
    assert store.listed is True
    assert store.location == folder
    assert store.get(public_key(new_seed(nkeys.PREFIX_BYTE_ACCOUNT))) is None


def test_save_rejected(store):
    failures = []
    store.save(decode_account(fixture_jwt("ACME"))).addErrback(failures.append)
    assert failures[0].check(ReadOnlyStoreError)


def test_not_an_nsc_folder_reasons(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(NscFolderError, match="does not exist"):
        check_operator_folder(str(missing))

    folder = copy_operator_folder(tmp_path)
    marker = os.path.join(folder, ".nsc")
    os.unlink(marker)
    with pytest.raises(NscFolderError, match=r"is not an nsc operator folder: it has no \.nsc file"):
        check_operator_folder(folder)

    write(marker, b"{not json")
    with pytest.raises(NscFolderError, match=r"\.nsc is not valid JSON"):
        check_operator_folder(folder)

    write(marker, json.dumps({"name": "demo", "kind": "account"}).encode())
    with pytest.raises(NscFolderError, match=r"\.nsc has kind 'account', expected 'operator'"):
        check_operator_folder(folder)

    write(marker, json.dumps({"managed": False, "name": "demo", "kind": "operator", "version": "1"}).encode())
    os.rename(os.path.join(folder, "demo.jwt"), os.path.join(folder, "other.jwt"))
    with pytest.raises(NscFolderError, match=r"the operator JWT .*/demo/demo\.jwt is missing"):
        check_operator_folder(folder)

    os.rename(os.path.join(folder, "other.jwt"), os.path.join(folder, "demo.jwt"))
    shutil.rmtree(os.path.join(folder, "accounts"))
    with pytest.raises(NscFolderError, match="it has no accounts folder"):
        check_operator_folder(folder)


def test_folder_name_is_operator_name(folder):
    checked = check_operator_folder(folder)
    assert checked.name == "demo"
    assert checked.operator_jwt == os.path.join(folder, "demo.jwt")


def test_untrusted_account_skipped_at_open(folder, clock, messages):
    key = public_key(new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
    write(os.path.join(folder, "accounts", "ROGUE", "ROGUE.jwt"), untrusted(key))
    operator = Operator.from_token(decode_operator(fixture_jwt("demo")))
    store = NscStore(check_operator_folder(folder), trusted_account_check(operator, clock))
    store.open()
    assert store.get(key) is None
    assert len(store) == 3
    assert any("ROGUE.jwt: untrusted issuer" in line for line in messages(LogLevel.warn))


def test_folder_without_jwt_skipped_at_open(folder, store, messages):
    os.makedirs(os.path.join(folder, "accounts", "EMPTY"))
    store.open()
    assert len(store) == 3
    assert any("it has no EMPTY.jwt" in line for line in messages(LogLevel.warn))


def test_reload_edited_account(store):
    updated = resigned("ACME")
    write(store.folder.account_file("ACME"), updated)
    assert store.get(ACME).raw == fixture_jwt("ACME").strip()
    entry = store.reload("ACME")
    assert entry is not None
    assert entry.raw == updated
    assert store.get(ACME).raw == updated


def test_reload_untrusted_edit_stops_serving(store, messages):
    write(store.folder.account_file("ACME"), untrusted(ACME))
    assert store.reload("ACME") is None
    assert store.get(ACME) is None
    assert any("untrusted issuer" in line for line in messages(LogLevel.warn))


def test_reload_new_and_removed_folder(store, messages):
    key, jwt = new_account("NEW")
    write(store.folder.account_file("NEW"), jwt)
    assert store.reload("NEW").raw == jwt
    assert store.get(key).raw == jwt

    shutil.rmtree(os.path.join(store.folder.accounts, "NEW"))
    assert store.reload("NEW") is None
    assert store.get(key) is None
    assert any(f"no longer serving account {key}" in line for line in messages(LogLevel.info))


def test_duplicate_account_serves_latest(store, messages):
    older = fixture_jwt("ACME").strip()
    newer = resigned("ACME")
    write(store.folder.account_file("ACME2"), newer)
    assert store.reload("ACME2").raw == newer
    assert store.get(ACME).raw == newer
    assert any("all contain a JWT for account" in line for line in messages(LogLevel.warn))

    shutil.rmtree(os.path.join(store.folder.accounts, "ACME2"))
    store.reload("ACME2")
    assert store.get(ACME).raw == older


def test_watcher_watches_accounts_and_each_folder(watched):
    assert sorted(watched.notifier.watches) == sorted(
        [watched.accounts] + [os.path.join(watched.accounts, name) for name in ("ACME", "SHOP", "SYS")]
    )


def test_watcher_publishes_edited_account(watched):
    updated = resigned("ACME")
    write(watched.account_file("ACME"), updated)
    watched.notifier.fire(watched.account_file("ACME"), IN_CLOSE_WRITE)
    watched.notifier.fire(watched.account_file("ACME"), IN_CLOSE_WRITE)
    watched.settle()
    assert watched.publisher.updates == [(ACME, updated)]
    assert watched.store.get(ACME).raw == updated


def test_watcher_publishes_account_renamed_into_place(watched):
    updated = resigned("SHOP")
    temporary = os.path.join(watched.accounts, "SHOP", ".SHOP.jwt.tmp")
    write(temporary, updated)
    os.replace(temporary, watched.account_file("SHOP"))
    watched.notifier.fire(temporary, IN_MOVED_FROM)
    watched.notifier.fire(watched.account_file("SHOP"), IN_MOVED_TO)
    watched.settle()
    assert watched.publisher.updates == [(SHOP, updated)]


def test_watcher_new_account_folder_then_file(watched):
    # The folder appears first, and its JWT later: the original server crashed here.
    key, jwt = new_account("NEW")
    folder = os.path.join(watched.accounts, "NEW")
    os.mkdir(folder)
    watched.notifier.fire(folder, IN_CREATE | IN_ISDIR)
    assert folder in watched.notifier.watches
    watched.settle()
    assert watched.publisher.updates == []

    write(watched.account_file("NEW"), jwt)
    watched.notifier.fire(watched.account_file("NEW"), IN_CREATE)
    watched.notifier.fire(watched.account_file("NEW"), IN_CLOSE_WRITE)
    watched.settle()
    assert watched.publisher.updates == [(key, jwt)]
    assert watched.store.get(key).raw == jwt


def test_watcher_new_account_folder_with_file(watched):
    # nsc may write the JWT before the watch on the new folder exists.
    key, jwt = new_account("NEW")
    write(watched.account_file("NEW"), jwt)
    watched.notifier.fire(os.path.join(watched.accounts, "NEW"), IN_CREATE | IN_ISDIR)
    watched.settle()
    assert watched.publisher.updates == [(key, jwt)]


def test_watcher_removed_account_folder(watched):
    folder = os.path.join(watched.accounts, "SHOP")
    shutil.rmtree(folder)
    watched.notifier.fire(watched.account_file("SHOP"), IN_DELETE)
    watched.notifier.fire(folder, IN_DELETE | IN_ISDIR)
    assert folder not in watched.notifier.watches
    watched.settle()
    assert watched.store.get(SHOP) is None
    assert watched.publisher.updates == []


def test_watcher_ignores_other_files(watched):
    users = os.path.join(watched.accounts, "ACME", "users")
    watched.notifier.fire(users, IN_CREATE | IN_ISDIR)
    watched.notifier.fire(os.path.join(watched.accounts, "ACME", "notes.jwt"), IN_CLOSE_WRITE)
    watched.notifier.fire(os.path.join(watched.accounts, "ACME", ".ACME.jwt.swp"), IN_CLOSE_WRITE)
    assert watched.clock.getDelayedCalls() == []
    assert users not in watched.notifier.watches


def test_watcher_untrusted_edit_not_published(watched, messages):
    write(watched.account_file("ACME"), untrusted(ACME))
    watched.notifier.fire(watched.account_file("ACME"), IN_CLOSE_WRITE)
    watched.settle()
    assert watched.publisher.updates == []
    assert watched.store.get(ACME) is None
    assert len([line for line in messages(LogLevel.warn) if "untrusted issuer" in line]) == 1


def _nsc_config(folder: str, **changes) -> Config:
    config = with_overrides(Config(), http={"port": 0}, store={"nsc": folder})
    return with_overrides(config, **changes) if changes else config


def test_service_serves_nsc_folder(folder, messages):
    service = build_service(MemoryReactorClock(), _nsc_config(folder))
    assert isinstance(service.api.store, NscStore)
    assert service.api.operator.key == OPERATOR_KEY
    assert service.api.store.get(ACME).raw == fixture_jwt("ACME").strip()
    assert f"store: nsc operator folder {folder} (operator demo), 3 account(s)" in messages(LogLevel.info)
    assert any(isinstance(child, NscWatcher) for child in service)


def test_service_configured_operator_must_match(folder, tmp_path):
    other_seed = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
    claims = {"iat": int(time.time()), "name": "other", "sub": public_key(other_seed)}
    claims["nats"] = {"type": "operator", "version": 2}
    path = tmp_path / "other.jwt"
    path.write_bytes(encode(claims, other_seed))
    with pytest.raises(StartupError, match="is not the operator of the nsc folder"):
        build_service(MemoryReactorClock(), _nsc_config(folder, operator=str(path)))


def test_service_configured_same_operator_accepted(folder):
    service = build_service(MemoryReactorClock(), _nsc_config(folder, operator=str(STORE / "demo.jwt")))
    assert service.api.operator.key == OPERATOR_KEY


def test_service_rejects_non_nsc_folder(tmp_path):
    with pytest.raises(StartupError, match=r"is not an nsc operator folder: it has no \.nsc file"):
        build_service(MemoryReactorClock(), _nsc_config(str(tmp_path)))
