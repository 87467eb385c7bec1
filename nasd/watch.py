"""Watch the files of a read-only store with inotify, so that a changed account file is
served at once and its JWT is published on NATS when it is valid and trusted.

Two layouts are watched: a read-only store folder (flat, or sharded into two-character
folders) and an nsc operator folder. Events on one file are debounced: the file is read
and published once it has had no event for ``quiet_period`` seconds. Errors while
handling an event are logged and never stop nasd.

inotify is Linux only, and this module imports Twisted's inotify support, so import it
where a failure to import can be reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    INotify,
    INotifyError,
    humanReadableMask,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from nasd.keys import is_account_key
from nasd.logs import observer
from nasd.nscstore import NscStore
from nasd.store import DirectoryStore, StoredJWT

log = Logger(observer=observer)

# Seconds without an event on a file before it is read and published: an editor or
# `git pull` writes a file in several steps, and only the end result is published.
QUIET_PERIOD = 0.2

# Seconds after its first event at which a file that keeps changing is handled anyway.
MAX_DELAY = 2.0

# A file written in place (IN_MODIFY, IN_CLOSE_WRITE), created, renamed into or out of
# the folder, or deleted.
FILE_EVENTS = IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE
# The watched folder itself removed or renamed.
SELF_EVENTS = IN_DELETE_SELF | IN_MOVE_SELF
ADDED = IN_CREATE | IN_MOVED_TO
REMOVED = IN_DELETE | IN_MOVED_FROM

EventCallback = Callable[[object, FilePath[Any], int], None]


class Notifier(Protocol):
    """The part of Twisted's INotify that the watchers use, so that tests can pass a fake."""

    def watch(self, path: FilePath[Any], mask: int = ..., autoAdd: bool = ..., callbacks: Any = ...) -> Any: ...

    def ignore(self, path: FilePath[Any]) -> None: ...

    def close(self) -> None: ...


class UpdatePublisher(Protocol):
    def publish_account_update(self, account: str, jwt: bytes) -> None: ...


class StayingINotify(INotify):
    """An INotify that keeps its other watches when one watched folder is deleted.

    Twisted's INotify (seen in 26.10) drops the watch of a deleted folder and then
    closes its file descriptor, which ends every other watch too. Here only ``close``
    closes it; an unexpected close is logged.
    """

    closing = False

    def loseConnection(self) -> None:
        if self.closing:
            super().loseConnection()

    def close(self) -> None:
        self.closing = True
        self.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if not self.closing:
            log.error(
                "inotify stopped ({error}), so changed account files are no longer published until nasd restarts",
                error=reason.getErrorMessage(),
            )


def open_inotify(reactor: Any) -> Notifier:
    """Open an inotify file descriptor and start reading its events. Raises INotifyError."""
    notifier = StayingINotify(reactor)
    notifier.startReading()
    return notifier


def is_temporary(name: str) -> bool:
    """Return whether a file name is a hidden, backup, swap or temporary file of an editor or tool."""
    return name.startswith(".") or name.endswith(("~", ".swp", ".tmp"))


@dataclass
class _PendingChange:
    call: IDelayedCall
    first_event: float


class FolderWatcher(Service):
    """Watch folders with inotify and debounce the events of each file.

    A subclass chooses the folders in ``watch_folders``, turns an event into files to
    handle in ``file_event`` (calling ``schedule``), and handles a file whose events
    have settled in ``file_settled``.
    """

    def __init__(
        self,
        reactor: Any,
        folder: str,
        publisher: UpdatePublisher | None,
        clock: IReactorTime | None = None,
        notifier_factory: Callable[[], Notifier] | None = None,
        quiet_period: float = QUIET_PERIOD,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self.folder = folder
        self.publisher = publisher
        self.clock: IReactorTime = clock or reactor
        self.quiet_period = quiet_period
        self.max_delay = max_delay
        self._notifier_factory = notifier_factory or (lambda: open_inotify(reactor))
        self._notifier: Notifier | None = None
        self._pending: dict[str, _PendingChange] = {}
        self.watched: set[str] = set()

    def startService(self) -> None:
        super().startService()
        try:
            self._notifier = self._notifier_factory()
        except (INotifyError, OSError) as error:
            log.error("starting inotify failed ({error}), so changed account files are not published", error=error)
            return
        self.watch_folders()
        log.info(
            "store: watching {count} folder(s) in {path} for changed account files",
            count=len(self.watched),
            path=self.folder,
        )

    def stopService(self) -> None:
        super().stopService()
        for pending in self._pending.values():
            if pending.call.active():
                pending.call.cancel()
        self._pending.clear()
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None
        self.watched.clear()

    def watch_folders(self) -> None:
        raise NotImplementedError

    def file_event(self, path: str, mask: int) -> None:
        raise NotImplementedError

    def file_settled(self, path: str) -> None:
        raise NotImplementedError

    def watch_folder(self, path: str, mask: int) -> bool:
        """Start watching the folder *path* for the events in *mask*, logging a failure; return whether it worked."""
        if self._notifier is None:
            return False
        try:
            self._notifier.watch(FilePath(os.fsencode(path)), mask=mask | IN_ONLYDIR, callbacks=[self._event])
        except INotifyError as error:
            log.error(
                "cannot watch the folder {path}: {error} (the folder may have been removed, or the inotify "
                "watch limit fs.inotify.max_user_watches is reached); changes in it will not be published",
                path=path,
                error=error,
            )
            return False
        self.watched.add(path)
        log.debug("watching {path}", path=path)
        return True

    def unwatch_folder(self, path: str) -> None:
        """Stop watching *path*, unless inotify has already dropped its watch."""
        self.watched.discard(path)
        if self._notifier is None:
            return
        try:
            self._notifier.ignore(FilePath(os.fsencode(path)))
        except KeyError:
            pass

    def schedule(self, path: str) -> None:
        """Handle the file *path* once it has had no event for ``quiet_period`` seconds."""
        now = self.clock.seconds()
        pending = self._pending.get(path)
        if pending is None:
            call = self.clock.callLater(self.quiet_period, self._settle, path)
            self._pending[path] = _PendingChange(call, now)
        elif now - pending.first_event < self.max_delay:
            pending.call.reset(self.quiet_period)

    def publish(self, entry: StoredJWT, path: str) -> None:
        """Publish a changed account JWT on NATS, when NATS is configured."""
        if self.publisher is None:
            log.info(
                "{path} changed: serving the new JWT for account {account} ({jti}); "
                "NATS is not configured, so no claim update is published",
                path=path,
                account=entry.key,
                jti=entry.jti,
            )
            return
        log.info(
            "{path} changed: publishing the new JWT for account {account} ({jti})",
            path=path,
            account=entry.key,
            jti=entry.jti,
        )
        self.publisher.publish_account_update(entry.key, entry.raw)

    def _event(self, watch: object, filepath: FilePath[Any], mask: int) -> None:
        """Handle one inotify event and log any exception, because one raised here makes Twisted close inotify."""
        path = os.fsdecode(filepath.path)
        try:
            log.debug("{path}: {events}", path=path, events=", ".join(humanReadableMask(mask)))
            self.file_event(path, mask)
        except Exception:
            log.failure("handling the file event {events} on {path} failed", events=mask, path=path)

    def _settle(self, path: str) -> None:
        self._pending.pop(path, None)
        try:
            self.file_settled(path)
        except Exception:
            log.failure("handling the changed file {path} failed", path=path)


class DirectoryWatcher(FolderWatcher):
    """Watch a read-only DirectoryStore: ``<dir>/<KEY>.jwt``, or ``<dir>/<XY>/<KEY>.jwt``
    when sharded (``XY`` being the last two characters of the key).

    A change invalidates the key in the store at once, so the next GET reads the file.
    Once the file settles, the store reads it (verifying signature and trust with its
    check), and a JWT it serves is published. A removed file is logged.
    """

    def __init__(self, reactor: Any, store: DirectoryStore, publisher: UpdatePublisher | None, **options: Any) -> None:
        assert store.location is not None
        super().__init__(reactor, store.location, publisher, **options)
        self.store = store

    def watch_folders(self) -> None:
        if not self.store.shard:
            self.watch_folder(self.folder, FILE_EVENTS | SELF_EVENTS)
            return
        # The top folder is watched first, so that a shard folder created while the
        # existing ones are listed is still reported.
        self.watch_folder(self.folder, ADDED | REMOVED | SELF_EVENTS)
        with os.scandir(self.folder) as entries:
            shards = sorted(entry.path for entry in entries if self._is_shard_name(entry.name) and entry.is_dir())
        for shard in shards:
            self.watch_folder(shard, FILE_EVENTS | SELF_EVENTS)

    def file_event(self, path: str, mask: int) -> None:
        if mask & SELF_EVENTS:
            if path == self.folder:
                log.error(
                    "the store folder {path} was removed or renamed: no account is served from it "
                    "until it is back and nasd restarts",
                    path=path,
                )
            return
        parent, name = os.path.split(path)
        if mask & IN_ISDIR:
            if self.store.shard and parent == self.folder and self._is_shard_name(name):
                if mask & ADDED:
                    self._add_shard(path)
                elif mask & REMOVED:
                    self._remove_shard(path)
            return
        if is_temporary(name) or not name.endswith(".jwt"):
            return
        key = self._key_of(path)
        if key is not None:
            self.store.invalidate(key)
        self.schedule(path)

    def file_settled(self, path: str) -> None:
        key = self._key_of(path)
        if key is None:
            if os.path.lexists(path):
                log.warn("ignoring {path}: the name is not <account key>.jwt in the expected folder", path=path)
            return
        # The store reads the file when no read followed the last event, and logs why
        # a file it cannot serve is ignored.
        entry = self.store.get(key)
        if entry is not None:
            self.publish(entry, path)
        elif not os.path.lexists(path):
            log.info("{path} was removed: no longer serving account {account}", path=path, account=key)

    def _key_of(self, path: str) -> str | None:
        """Return the account key that *path* stores, or None when it is not a store file name."""
        parent, name = os.path.split(path)
        key = name[: -len(".jwt")]
        expected = os.path.join(self.folder, key[-2:]) if self.store.shard else self.folder
        if parent != expected or not is_account_key(key):
            return None
        return key

    def _is_shard_name(self, name: str) -> bool:
        return len(name) == 2 and not name.startswith(".")

    def _add_shard(self, path: str) -> None:
        """Watch a new shard folder and handle the files already in it, which may have
        arrived before the watch (a folder renamed into place, or `git pull`)."""
        if not self.watch_folder(path, FILE_EVENTS | SELF_EVENTS):
            return
        try:
            with os.scandir(path) as entries:
                names = [entry.name for entry in entries]
        except OSError as error:
            log.warn("cannot list the new shard folder {path}: {error}", path=path, error=error.strerror or error)
            return
        for name in names:
            self.file_event(os.path.join(path, name), IN_CREATE)

    def _remove_shard(self, path: str) -> None:
        """Stop watching a removed shard folder and stop serving the accounts it held.

        A folder renamed away reports no event for its files, so the keys known to the
        store in that shard are handled here.
        """
        self.unwatch_folder(path)
        shard = os.path.basename(path)
        for key in list(self.store.keys()):
            if key.endswith(shard):
                self.store.invalidate(key)
                self.schedule(os.path.join(path, key + ".jwt"))


class NscWatcher(FolderWatcher):
    """Watch an nsc operator folder: ``accounts/`` for account folders added or removed,
    and each ``accounts/<name>/`` for its ``<name>.jwt``.

    An account folder added is watched before its JWT is looked for, so a JWT written
    before or after the watch starts is picked up. A settled change reloads the account
    in the NscStore, and a JWT it serves is published.
    """

    def __init__(self, reactor: Any, store: NscStore, publisher: UpdatePublisher | None, **options: Any) -> None:
        super().__init__(reactor, store.folder.path, publisher, **options)
        self.store = store
        self.accounts = store.folder.accounts

    def watch_folders(self) -> None:
        self.watch_folder(self.accounts, ADDED | REMOVED | SELF_EVENTS)
        try:
            names = self.store.account_names()
        except OSError as error:
            log.error("cannot list {path}: {error}", path=self.accounts, error=error.strerror or error)
            return
        for name in names:
            self.watch_folder(os.path.join(self.accounts, name), FILE_EVENTS | SELF_EVENTS)

    def file_event(self, path: str, mask: int) -> None:
        if mask & SELF_EVENTS:
            if path == self.accounts:
                log.error(
                    "the accounts folder {path} was removed or renamed: account changes are no longer "
                    "noticed until nasd restarts",
                    path=path,
                )
            return
        parent, name = os.path.split(path)
        if parent == self.accounts:
            if mask & IN_ISDIR and not name.startswith("."):
                if mask & ADDED:
                    self.watch_folder(path, FILE_EVENTS | SELF_EVENTS)
                elif mask & REMOVED:
                    self.unwatch_folder(path)
                self.schedule(self.store.folder.account_file(name))
            return
        if os.path.dirname(parent) == self.accounts and name == os.path.basename(parent) + ".jwt":
            self.schedule(path)

    def file_settled(self, path: str) -> None:
        name = os.path.basename(os.path.dirname(path))
        entry = self.store.reload(name)
        if entry is not None:
            self.publish(entry, path)


def watcher_for(reactor: Any, store: object, publisher: UpdatePublisher | None) -> FolderWatcher | None:
    """Build the watcher of a store whose files nasd does not write, or return None for other stores."""
    if isinstance(store, NscStore):
        return NscWatcher(reactor, store, publisher)
    if isinstance(store, DirectoryStore) and store.readonly:
        return DirectoryWatcher(reactor, store, publisher)
    return None
