"""Account JWT stores: a durable directory store and a memory store with the same rules.

Both keep an index of every account in memory (the JWT bytes, jti, iat and exp), so a
GET never touches the disk. A save is refused when the stored JWT has a newer ``iat``:
an old JWT must never roll back a newer one, since that could undo a revocation.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from nasd.jwt import Token
from nasd.keys import is_account_key
from nasd.logs import observer

log = Logger(observer=observer)

FILE_MODE = 0o600
FOLDER_MODE = 0o700


class StoreError(Exception):
    """A JWT could not be written; nothing half-written is left behind."""


class ReadOnlyStoreError(StoreError):
    """A save was attempted on a read-only store."""


class StaleJWTError(Exception):
    """The JWT offered is older than the stored one (smaller ``iat``)."""

    def __init__(self, key: str, stored_iat: int, offered_iat: int) -> None:
        super().__init__(
            f"the stored JWT for account {key} is newer (iat {stored_iat}) than the one offered (iat {offered_iat})"
        )
        self.key = key
        self.stored_iat = stored_iat
        self.offered_iat = offered_iat


@dataclass(frozen=True)
class StoredJWT:
    """An account JWT as stored, with the claims needed to serve it."""

    key: str
    raw: bytes
    jti: str
    issued_at: int
    expires: int
    etag: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once here, so that serving the JWT formats nothing per request.
        object.__setattr__(self, "etag", f'"{self.jti}"'.encode())

    @classmethod
    def from_token(cls, token: Token) -> StoredJWT:
        return cls(token.subject, token.raw, token.jti, token.issued_at, token.expires)


class AccountStore(Protocol):
    """The store interface that the HTTP API and the NATS side use."""

    kind: str
    location: str | None
    readonly: bool

    def get(self, key: str) -> StoredJWT | None: ...

    def save(self, token: Token) -> Deferred[bool]: ...

    def keys(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...


class MemoryStore:
    """Keep account JWTs in memory only; nothing survives a restart."""

    kind = "memory"
    location: str | None = None

    def __init__(self, readonly: bool = False) -> None:
        self.readonly = readonly
        self._index: dict[str, StoredJWT] = {}
        self._locks: dict[str, DeferredLock] = {}

    def get(self, key: str) -> StoredJWT | None:
        return self._index.get(key)

    def keys(self) -> Iterator[str]:
        return iter(sorted(self._index))

    def __len__(self) -> int:
        return len(self._index)

    def save(self, token: Token) -> Deferred[bool]:
        """Store *token* unless the stored JWT is newer.

        Fires with True when the stored bytes changed and False when the same JWT was
        already stored. Fails with StaleJWTError, ReadOnlyStoreError or StoreError.
        """
        return self._serialized(token.subject, lambda: self._save(token))

    def _serialized(self, key: str, action: Callable[[], Any]) -> Deferred[bool]:
        """Run *action* under the key's lock so that the iat check and the write of one
        account never interleave with another save of the same account."""
        lock = self._locks.setdefault(key, DeferredLock())
        result: Deferred[bool] = lock.run(action)

        def release(outcome: object) -> object:
            if not lock.locked and not lock.waiting:
                self._locks.pop(key, None)
            return outcome

        result.addBoth(release)
        return result

    def _check(self, token: Token) -> StoredJWT | None:
        """Return the entry to store, or None when the same JWT is already stored."""
        if self.readonly:
            raise ReadOnlyStoreError("the store is read-only")
        if not is_account_key(token.subject):
            raise StoreError(f"cannot store a JWT under the invalid account key {token.subject[:60]!r}")
        current = self._index.get(token.subject)
        if current is not None:
            if current.raw == token.raw:
                return None
            if current.issued_at > token.issued_at:
                raise StaleJWTError(token.subject, current.issued_at, token.issued_at)
        return StoredJWT.from_token(token)

    def _save(self, token: Token) -> bool:
        entry = self._check(token)
        if entry is None:
            return False
        self._index[entry.key] = entry
        return True


class DirectoryStore(MemoryStore):
    """Keep account JWTs as ``<dir>/<KEY>.jwt`` files, or ``<dir>/<last two chars>/<KEY>.jwt``
    when sharded, written atomically and durably.

    A write goes to a temporary file in the target folder, which is synced, renamed over
    the target, and then the folder itself is synced, all in a thread-pool thread.
    """

    kind = "directory"

    def __init__(self, reactor: IReactorThreads, path: str, shard: bool = False, readonly: bool = False) -> None:
        super().__init__(readonly=readonly)
        self._reactor = reactor
        self.location = os.path.abspath(path)
        self.shard = shard

    def path_for(self, key: str) -> str:
        """Return the file path of an account key; only valid account keys become paths."""
        if not is_account_key(key):
            raise StoreError(f"cannot build a path from the invalid account key {key[:60]!r}")
        if self.shard:
            return os.path.join(self.location or "", key[-2:], key + ".jwt")
        return os.path.join(self.location or "", key + ".jwt")

    def open(self) -> None:
        """Create the folder when missing (unless read-only) and index every stored JWT.

        Files are indexed without verifying their signatures again: nasd verified each
        one before writing it. A file whose name is not an account key, or whose claims
        cannot be read or name another subject, is logged and skipped.
        """
        assert self.location is not None
        if not os.path.isdir(self.location):
            if self.readonly:
                raise StoreError(f"the store folder {self.location} does not exist")
            os.makedirs(self.location, mode=FOLDER_MODE, exist_ok=True)
        for path in self._stored_files():
            entry = _read_entry(path)
            if entry is not None:
                self._index[entry.key] = entry

    def _stored_files(self) -> Iterator[str]:
        assert self.location is not None
        folders = [self.location]
        if self.shard:
            folders = [
                os.path.join(self.location, name)
                for name in sorted(os.listdir(self.location))
                if len(name) == 2 and os.path.isdir(os.path.join(self.location, name))
            ]
        for folder in folders:
            for name in sorted(os.listdir(folder)):
                if name.endswith(".jwt") and not name.startswith("."):
                    key = name[: -len(".jwt")]
                    if not is_account_key(key) or (self.shard and os.path.basename(folder) != key[-2:]):
                        log.warn(
                            "ignoring {path}: the name is not <account key>.jwt in the expected folder",
                            path=os.path.join(folder, name),
                        )
                        continue
                    yield os.path.join(folder, name)

    def save(self, token: Token) -> Deferred[bool]:
        return self._serialized(token.subject, lambda: self._save_to_disk(token))

    def _save_to_disk(self, token: Token) -> Deferred[bool]:
        entry = self._check(token)
        if entry is None:
            return succeed(False)
        path = self.path_for(entry.key)
        written = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), write_durably, path, entry.raw)

        def written_ok(_: object) -> bool:
            self._index[entry.key] = entry
            return True

        return written.addCallback(written_ok)


def write_durably(path: str, data: bytes) -> None:
    """Replace *path* with *data* atomically, syncing the file and its folder."""
    folder = os.path.dirname(path)
    temporary = os.path.join(
        folder, f".{os.path.basename(path)}.{os.getpid()}.{binascii.hexlify(os.urandom(4)).decode()}.tmp"
    )
    try:
        os.makedirs(folder, mode=FOLDER_MODE, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
        _sync_folder(folder)
    except OSError as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise StoreError(f"writing {path} failed: {error.strerror or error}") from error


def _sync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_entry(path: str) -> StoredJWT | None:
    """Index one stored file by its unverified claims, or log why it cannot be served."""
    key = os.path.basename(path)[: -len(".jwt")]
    try:
        with open(path, "rb") as file:
            raw = file.read().strip()
        claims = _peek_claims(raw)
    except (OSError, ValueError) as error:
        log.warn("ignoring {path}: {error}", path=path, error=error)
        return None
    if claims.get("sub") != key:
        log.warn(
            "ignoring {path}: its JWT is for subject {subject!r}, not {key}",
            path=path,
            subject=str(claims.get("sub"))[:60],
            key=key,
        )
        return None
    return StoredJWT(key, raw, str(claims.get("jti", "")), _number(claims.get("iat")), _number(claims.get("exp")))


def _peek_claims(raw: bytes) -> dict[str, Any]:
    segments = raw.split(b".")
    if len(segments) != 3:
        raise ValueError("the file does not hold a JWT (expected 3 segments)")
    payload = segments[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"the JWT claims cannot be read: {error}") from None
    if not isinstance(claims, dict):
        raise ValueError("the JWT claims are not a JSON object")
    return claims


def _number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value)
