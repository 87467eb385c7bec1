"""Account JWT stores: a durable directory store and a memory store with the same rules.

A save is refused when the stored JWT has a newer ``iat``: an old JWT must never roll
back a newer one, since that could undo a revocation.

Each store keeps a store hash, the XOR of the SHA-256 digests of every stored JWT (32
zero bytes when empty), which is how nats-server's directory store (``DirJWTStore``)
defines it. Peers compare stores with it in the pack protocol.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from nasd.jwt import JWTError, Operator, Token, account_problems, decode_account
from nasd.keys import KeyKind, is_account_key, is_public_key
from nasd.logs import observer

log = Logger(observer=observer)

FILE_MODE = 0o600
FOLDER_MODE = 0o700

# Parsed files kept in memory by a DirectoryStore (an estimated 1.5 KB each for a 1 KB JWT).
DEFAULT_CACHE_SIZE = 10_000

# How long a cached file is served before its stat is compared with the disk again, in
# seconds: changes made outside nasd (by hand, or by another process) show within it.
RECHECK_INTERVAL = 1.0

FileStamp = tuple[int, int, int]

HASH_SIZE = hashlib.sha256().digest_size

# A check of an account JWT read from a file that nasd did not write itself (a read-only
# store): it raises JWTError when the JWT must not be served.
AccountCheck = Callable[[Token], None]


def trusted_account_check(operator: Operator, clock: IReactorTime) -> AccountCheck:
    """Build an AccountCheck that raises JWTError unless *operator* trusts the issuer and
    the claims pass the checks nats-server applies, expiry included."""

    def check(token: Token) -> None:
        if operator.strict_signing_key_usage and not operator.trusts(token.issuer):
            raise JWTError(
                f"untrusted issuer {token.issuer}: operator {operator.name} ({operator.key}) "
                "accepts only accounts signed by one of its signing keys"
            )
        if not operator.trusts(token.issuer):
            raise JWTError(
                f"untrusted issuer {token.issuer}: it is neither operator {operator.name} ({operator.key}) "
                "nor one of its signing keys"
            )
        problems = account_problems(token, clock.seconds())
        if problems:
            raise JWTError("invalid account claims: " + "; ".join(problems))

    return check


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
    listed: bool

    def get(self, key: str) -> StoredJWT | None: ...

    def save(self, token: Token) -> Deferred[bool]: ...

    def keys(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...


class MemoryStore:
    """Keep account JWTs in memory only; nothing survives a restart."""

    kind = "memory"
    location: str | None = None
    listed = True

    def __init__(self, readonly: bool = False) -> None:
        self.readonly = readonly
        self._index: dict[str, StoredJWT] = {}
        self._locks: dict[str, DeferredLock] = {}
        # The SHA-256 digest of each stored JWT, and their XOR, as integers.
        self._digests: dict[str, int] = {}
        self._hash = 0

    def get(self, key: str) -> StoredJWT | None:
        return self._index.get(key)

    def keys(self) -> Iterator[str]:
        return iter(sorted(self._index))

    def __len__(self) -> int:
        return len(self._index)

    @property
    def store_hash(self) -> bytes:
        """The XOR of the SHA-256 digests of the stored JWTs (32 bytes)."""
        return self._hash.to_bytes(HASH_SIZE, "big")

    def when_listed(self) -> Deferred[None]:
        """Return a Deferred that fires once every stored account key is known; at once here."""
        return succeed(None)

    def pack(self, limit: int, now: float) -> Deferred[list[StoredJWT]]:
        """Fire with up to *limit* stored JWTs that have not expired at *now*, sorted by account key."""
        return succeed(_unexpired((self._index[key] for key in sorted(self._index)), limit, now))

    def _record_digest(self, key: str, raw: bytes | None) -> None:
        """Replace the digest of *key* in the store hash by the digest of *raw* (None: no JWT)."""
        self._hash ^= self._digests.pop(key, 0)
        if raw is not None:
            digest = jwt_digest(raw)
            self._digests[key] = digest
            self._hash ^= digest

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

    def _check(self, token: Token, current: StoredJWT | None) -> StoredJWT | None:
        """Return the entry to store in place of *current*, or None when it is the same JWT."""
        if self.readonly:
            raise ReadOnlyStoreError("the store is read-only")
        if not is_account_key(token.subject):
            raise StoreError(f"cannot store a JWT under the invalid account key {token.subject[:60]!r}")
        if current is not None:
            if current.raw == token.raw:
                return None
            if current.issued_at > token.issued_at:
                raise StaleJWTError(token.subject, current.issued_at, token.issued_at)
        return StoredJWT.from_token(token)

    def _save(self, token: Token) -> bool:
        entry = self._check(token, self._index.get(token.subject))
        if entry is None:
            return False
        self._index[entry.key] = entry
        self._record_digest(entry.key, entry.raw)
        return True


@dataclass
class _CachedFile:
    """A parsed store file, the stamp it had when read, and when the stamp was last checked."""

    stamp: FileStamp
    entry: StoredJWT | None
    checked_at: float


class DirectoryStore(MemoryStore):
    """Keep account JWTs as ``<dir>/<KEY>.jwt`` files, or ``<dir>/<last two chars>/<KEY>.jwt``
    when sharded, written atomically and durably.

    A write goes to a temporary file in the target folder, which is synced, renamed over
    the target, and then the folder itself is synced, all in a thread-pool thread.

    Files are served when first requested, not after startup, so startup time does not
    grow with the number of accounts. The listing reads every file once in a thread to
    compute the store hash, at startup or in the background. Until it ends, ``listed``
    is false and the store hash covers only the files read so far.
    Up to ``cache_size`` parsed files are kept in memory.
    A GET compares the file's stat (mtime, size, inode) with the cached one when the
    last comparison is older than RECHECK_INTERVAL, so a file replaced by another
    process or by hand is read again.

    With a ``check``, every file read is decoded with its signature verified and passed
    to the check, and a file that fails either is logged and not served. A read-only
    store needs this, because nasd did not verify its files when they were written.

    NOTE: a file missing from the page cache is read on the reactor thread, which
    blocks it for the duration of one small read.
    """

    kind = "directory"

    def __init__(
        self,
        reactor: IReactorThreads,
        path: str,
        shard: bool = False,
        readonly: bool = False,
        cache_size: int = DEFAULT_CACHE_SIZE,
        check: AccountCheck | None = None,
    ) -> None:
        super().__init__(readonly=readonly)
        self._reactor = reactor
        self.location = os.path.abspath(path)
        self.shard = shard
        self.cache_size = cache_size
        self.check = check
        self._cache: OrderedDict[str, _CachedFile] = OrderedDict()
        self._keys: set[str] = set()
        self.listed = False
        self._listing_waiters: list[Deferred[None]] = []

    def path_for(self, key: str) -> str:
        """Return the file path of an account key; only valid account keys become paths."""
        if not is_account_key(key):
            raise StoreError(f"cannot build a path from the invalid account key {key[:60]!r}")
        return self._path(key)

    def _path(self, key: str) -> str:
        if self.shard:
            return os.path.join(self.location or "", key[-2:], key + ".jwt")
        return os.path.join(self.location or "", key + ".jwt")

    def open(self, list_keys: bool = True) -> None:
        """Create the folder when missing (unless read-only) and list the stored account keys.

        Only names are listed. A file whose name is not an account key, or that sits in
        the wrong shard folder, is logged and never served. With ``list_keys`` false,
        list_in_background lists them later, so that a large store does not delay
        startup. Files are served before the listing ends.
        """
        assert self.location is not None
        if not os.path.isdir(self.location):
            if self.readonly:
                raise StoreError(f"the store folder {self.location} does not exist")
            make_folder_durably(self.location)
        if list_keys:
            self._listed(*self._list_and_hash(compute_hash=True))

    def list_in_background(self, compute_hash: bool = True) -> Deferred[int]:
        """List the stored account keys and, with *compute_hash*, compute the store hash, in
        a thread; fires with the number of keys.

        The hash reads every file, so it is skipped when nothing compares stores (no NATS
        connection, hence no peers): listing the names alone is much cheaper.
        """
        listing = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._list_and_hash, compute_hash)

        def listed(result: tuple[set[str], dict[str, int]]) -> int:
            self._listed(*result)
            return len(self._keys)

        return listing.addCallback(listed)

    def when_listed(self) -> Deferred[None]:
        """Return a Deferred that fires once the listing has ended; it never fires when the listing fails."""
        if self.listed:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._listing_waiters.append(waiter)
        return waiter

    def _list_and_hash(self, compute_hash: bool) -> tuple[set[str], dict[str, int]]:
        """Return the stored account keys and, with *compute_hash*, the digest of each file
        that can be served.

        Runs in a thread: it reads files and touches no state of the store.
        """
        keys = set(self._stored_keys())
        digests: dict[str, int] = {}
        if not compute_hash:
            return keys, digests
        for key in keys:
            entry = _read_entry(self._path(key), self.check, quiet=True)
            if entry is not None:
                digests[key] = jwt_digest(entry.raw)
        return keys, digests

    def _listed(self, keys: set[str], digests: dict[str, int]) -> None:
        self._keys |= keys
        for key, digest in digests.items():
            # A save or a read since the listing thread started recorded a digest at least
            # as recent as the listing's, so that one stays.
            if key not in self._digests:
                self._digests[key] = digest
                self._hash ^= digest
        self.listed = True
        waiters, self._listing_waiters = self._listing_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def pack(self, limit: int, now: float) -> Deferred[list[StoredJWT]]:
        """Read up to *limit* stored JWTs that have not expired at *now*, sorted by account
        key, in a thread; fires with them.

        Files are read from disk without the cache, so a large pack does not evict the
        JWTs that nats-servers request.
        """
        keys = sorted(self._keys)

        def read() -> list[StoredJWT]:
            # Quietly: a file that cannot be served is logged when a request reads it.
            entries = (_read_entry(self._path(key), self.check, quiet=True) for key in keys)
            return _unexpired((entry for entry in entries if entry is not None), limit, now)

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), read)

    def _stored_keys(self) -> Iterator[str]:
        assert self.location is not None
        folders = [self.location]
        if self.shard:
            with os.scandir(self.location) as entries:
                folders = [entry.path for entry in entries if len(entry.name) == 2 and entry.is_dir()]
        for folder in folders:
            with os.scandir(folder) as entries:
                names = [entry.name for entry in entries]
            for name in names:
                if not name.endswith(".jwt") or name.startswith("."):
                    continue
                key = name[: -len(".jwt")]
                # is_public_key rather than the cached is_account_key: listing every key
                # would fill the cache with keys that are rarely requested.
                if is_public_key(key, KeyKind.ACCOUNT) and (not self.shard or os.path.basename(folder) == key[-2:]):
                    yield key
                else:
                    log.warn(
                        "ignoring {path}: the name is not <account key>.jwt in the expected folder",
                        path=os.path.join(folder, name),
                    )

    def get(self, key: str) -> StoredJWT | None:
        """Return the stored JWT of *key*, reading its file when it changed or is not cached.

        A cached file is checked against the disk at most every RECHECK_INTERVAL seconds.
        """
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached.checked_at < RECHECK_INTERVAL:
            self._cache.move_to_end(key)
            return cached.entry

        if not is_account_key(key):
            return None
        path = self._path(key)
        try:
            status = os.stat(path)
        except OSError:
            self._cache.pop(key, None)
            self._keys.discard(key)
            self._record_digest(key, None)
            return None

        stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        if cached is not None and cached.stamp == stamp:
            cached.checked_at = now
            self._cache.move_to_end(key)
            return cached.entry

        entry = _read_entry(path, self.check)
        self._remember(key, stamp, entry)
        return entry

    def invalidate(self, key: str) -> None:
        """Forget the cached file of *key*, so that the next get reads the file again at once."""
        self._cache.pop(key, None)

    def keys(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def _remember(self, key: str, stamp: FileStamp, entry: StoredJWT | None) -> None:
        """Cache a parsed file (or None for a file that cannot be served, so it is logged once)
        and update the store hash with it."""
        self._cache[key] = _CachedFile(stamp, entry, time.monotonic())
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        if entry is not None:
            self._keys.add(key)
        self._record_digest(key, entry.raw if entry is not None else None)

    def save(self, token: Token) -> Deferred[bool]:
        return self._serialized(token.subject, lambda: self._save_to_disk(token))

    def _save_to_disk(self, token: Token) -> Deferred[bool]:
        entry = self._check(token, self.get(token.subject))
        if entry is None:
            return succeed(False)
        path = self.path_for(entry.key)
        written = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), write_durably, path, entry.raw)

        def written_ok(stamp: FileStamp) -> bool:
            self._remember(entry.key, stamp, entry)
            return True

        return written.addCallback(written_ok)


def write_durably(path: str, data: bytes) -> FileStamp:
    """Replace *path* with *data* atomically, syncing the file and its folder.

    Returns the new file's stamp: (mtime in ns, size, inode).
    """
    folder = os.path.dirname(path)
    temporary = os.path.join(
        folder, f".{os.path.basename(path)}.{os.getpid()}.{binascii.hexlify(os.urandom(4)).decode()}.tmp"
    )
    try:
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileNotFoundError:
            make_folder_durably(folder)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
            status = os.fstat(descriptor)
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
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def make_folder_durably(folder: str) -> None:
    """Create *folder* (mode 0700) and its missing parents, syncing each new entry's parent
    so that the folder survives a crash together with the files written into it."""
    parent = os.path.dirname(folder)
    if parent != folder and not os.path.isdir(parent):
        make_folder_durably(parent)
    try:
        os.mkdir(folder, FOLDER_MODE)
    except FileExistsError:
        if not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", folder) from None
        return
    _sync_folder(parent)


def _sync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_entry(path: str, check: AccountCheck | None = None, quiet: bool = False) -> StoredJWT | None:
    """Index one stored file, or log why it cannot be served (skip it silently when *quiet*).

    Without *check* the claims are read unverified, since nasd verified the JWT before
    writing it. With *check* the signature is verified and the check must pass.
    """
    warn = _skip_silently if quiet else log.warn
    key = os.path.basename(path)[: -len(".jwt")]
    token = None
    try:
        with open(path, "rb") as file:
            raw = file.read().strip()
        if check is None:
            claims = _peek_claims(raw)
        else:
            token = decode_account(raw)
            claims = token.claims
    except (OSError, ValueError) as error:
        # JWTError is a ValueError: a file that is not a validly signed account JWT.
        warn("ignoring {path}: {error}", path=path, error=error)
        return None
    if claims.get("sub") != key:
        warn(
            "ignoring {path}: its JWT is for subject {subject!r}, not {key}",
            path=path,
            subject=str(claims.get("sub"))[:60],
            key=key,
        )
        return None
    if check is not None and token is not None:
        try:
            check(token)
        except JWTError as error:
            warn("ignoring {path}: {error}", path=path, error=error)
            return None
    return StoredJWT(key, raw, str(claims.get("jti", "")), _number(claims.get("iat")), _number(claims.get("exp")))


def _skip_silently(format: str, **fields: object) -> None:
    pass


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


def jwt_digest(raw: bytes) -> int:
    """Return the SHA-256 digest of a JWT as an integer, the form the store hash XORs."""
    return int.from_bytes(hashlib.sha256(raw).digest(), "big")


def compute_store_hash(jwts: Iterable[bytes]) -> bytes:
    """Compute the store hash of the JWTs *jwts* from scratch (32 bytes)."""
    value = 0
    for raw in jwts:
        value ^= jwt_digest(raw)
    return value.to_bytes(HASH_SIZE, "big")


def store_hash(store: AccountStore) -> bytes:
    """Return the store hash of *store*.

    NOTE: a store without a maintained hash (the nsc folder store) has it computed from
    all of its JWTs on every call, which is cheap only for the small stores nsc keeps.
    """
    maintained = getattr(store, "store_hash", None)
    if isinstance(maintained, bytes):
        return maintained
    return compute_store_hash(entry.raw for entry in map(store.get, list(store.keys())) if entry is not None)


def pack_store(store: AccountStore, limit: int, now: float) -> Deferred[list[StoredJWT]]:
    """Fire with up to *limit* stored JWTs of *store* that have not expired at *now*, sorted by account key."""
    pack = getattr(store, "pack", None)
    if pack is not None:
        return pack(limit, now)
    entries = (store.get(key) for key in store.keys())
    return succeed(_unexpired((entry for entry in entries if entry is not None), limit, now))


def when_listed(store: AccountStore) -> Deferred[None]:
    """Return a Deferred that fires once every account key of *store* is known."""
    waiting = getattr(store, "when_listed", None)
    if waiting is not None:
        return waiting()
    return succeed(None)


def _unexpired(entries: Iterable[StoredJWT], limit: int, now: float) -> list[StoredJWT]:
    """Return the first *limit* of *entries* that have not expired at *now*."""
    chosen: list[StoredJWT] = []
    if limit <= 0:
        return chosen
    for entry in entries:
        if 0 < entry.expires < now:
            continue
        chosen.append(entry)
        if len(chosen) >= limit:
            break
    return chosen
