"""Activation tokens: the JWTs an exporting account signs to let another account import a
private stream or service, checked against nasd's accounts and stored by their hash id."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from nasd.jwt import JWTError, Operator, Token, decode, decode_account, format_timestamp, is_valid_subject
from nasd.keys import is_account_key
from nasd.logs import observer
from nasd.store import FileStamp, ReadOnlyStoreError, StoreError, write_durably

log = Logger(observer=observer)

# SHA-256 in base32 with padding: 52 characters and "====".
HASH_LENGTH = 56
ACTIVATIONS_FOLDER = "activations"

AccountLookup = Callable[[str], bytes | None]


class StaleActivationError(Exception):
    """The activation JWT offered is older than the stored one (smaller ``iat``)."""

    def __init__(self, hash_id: str, stored_iat: int, offered_iat: int) -> None:
        super().__init__(
            f"the stored activation JWT {hash_id} is newer (iat {stored_iat}) than the one offered (iat {offered_iat})"
        )
        self.hash_id = hash_id
        self.stored_iat = stored_iat
        self.offered_iat = offered_iat


def clean_subject(subject: str) -> str:
    """Cut an import subject at its first wildcard token, as the hash id does.

    ``foo.*`` and ``foo.*.bar`` become ``foo``, and a subject that starts with a
    wildcard becomes ``_``. A subject without wildcards is unchanged.
    """
    tokens = subject.split(".")
    for index, token in enumerate(tokens):
        if token in ("*", ">"):
            return ".".join(tokens[:index]) if index > 0 else "_"
    return subject


def hash_id(issuer: str, subject: str, import_subject: str) -> str:
    """Return nsc's hash id of an activation: base32 (with padding) of the SHA-256 of
    ``<iss>.<sub>.<cleaned import subject>``."""
    base = f"{issuer}.{subject}.{clean_subject(import_subject)}"
    return base64.b32encode(hashlib.sha256(base.encode("utf-8")).digest()).decode("ascii")


def parse_hash_id(text: str) -> str | None:
    """Return the canonical (padded) hash id in *text*, or None when it is not one.

    The padding may be left out. Only strings that pass this check become file names.
    """
    if len(text) == HASH_LENGTH - 4:
        text += "===="
    if len(text) != HASH_LENGTH or not text.isascii():
        return None
    try:
        digest = base64.b32decode(text)
    except (binascii.Error, ValueError):
        return None
    if len(digest) != 32 or base64.b32encode(digest).decode("ascii") != text:
        return None
    return text


@dataclass(frozen=True)
class StoredActivation:
    """An activation JWT as stored, with the claims needed to serve and announce it."""

    hash_id: str
    raw: bytes
    jti: str
    issued_at: int
    expires: int
    account: str
    issuer: str
    etag: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "etag", f'"{self.jti}"'.encode())

    @classmethod
    def from_token(cls, token: Token) -> StoredActivation:
        """Index a decoded activation token. Raises JWTError when it has no import subject."""
        fields = activation_fields(token)
        if not fields.import_subject:
            raise JWTError("the activation has no import subject (nats.subject)")
        return cls(
            hash_id=hash_id(token.issuer, token.subject, fields.import_subject),
            raw=token.raw,
            jti=token.jti,
            issued_at=token.issued_at,
            expires=token.expires,
            account=fields.issuer_account or token.issuer,
            issuer=token.issuer,
        )


@dataclass(frozen=True)
class ActivationFields:
    """The activation part of the claims, read from where the token's version keeps it."""

    import_subject: str
    kind: str
    issuer_account: str


def activation_fields(token: Token) -> ActivationFields:
    """Read the import subject, the import kind and the issuer account of an activation.

    A v2 token keeps them in ``nats.subject``, ``nats.kind`` and ``nats.issuer_account``.
    A v1 token (nats-io/jwt 1.x) names the kind ``nats.type`` and keeps
    ``issuer_account`` among the top-level claims.
    """
    nats = token.nats
    if token.version == 1:
        kind, issuer_account = nats.get("type"), token.claims.get("issuer_account")
    else:
        kind, issuer_account = nats.get("kind"), nats.get("issuer_account")
    subject = nats.get("subject")
    return ActivationFields(
        import_subject=subject if isinstance(subject, str) else "",
        kind=kind if isinstance(kind, str) else "",
        issuer_account=issuer_account if isinstance(issuer_account, str) else "",
    )


def check_activation(body: bytes, lookup: AccountLookup, operator: Operator | None, now: float) -> StoredActivation:
    """Decode an uploaded activation JWT and check it as nats-server checks an import's token.

    *lookup* returns the stored JWT of an account key, or None. The exporting account
    must be stored, trusted by *operator*, and be the issuer or own the signing key that
    issued the token. Raises JWTError with the first reason to reject it.
    """
    if not body.strip():
        raise JWTError("the request body is empty; send the activation JWT as the body")
    try:
        token = decode(body)
    except JWTError as error:
        raise JWTError(f"invalid JWT: {error}") from None
    if token.claim_type != "activation":
        raise JWTError(f"expected an activation JWT, got claim type {token.claim_type or 'none'!r}")

    fields = activation_fields(token)
    _check_claims(token, fields, now)
    _check_exporting_account(token, fields, lookup, operator)
    return StoredActivation.from_token(token)


def _check_claims(token: Token, fields: ActivationFields, now: float) -> None:
    if not is_account_key(token.subject):
        raise JWTError(f"the subject {token.subject[:60]!r} is not an account public key (the importing account)")
    if not is_valid_subject(fields.import_subject):
        raise JWTError(f"the import subject (nats.subject) {fields.import_subject[:60]!r} is not a valid subject")
    if fields.kind not in ("stream", "service"):
        raise JWTError(f"the import kind {fields.kind[:30]!r} is neither 'stream' nor 'service'")
    if fields.kind == "service" and any(part in ("*", ">") for part in fields.import_subject.split(".")):
        raise JWTError(f"a service activation cannot have a wildcard subject, got {fields.import_subject[:60]!r}")
    if fields.issuer_account and not is_account_key(fields.issuer_account):
        raise JWTError(f"issuer_account {fields.issuer_account[:60]!r} is not an account public key")
    if token.is_expired(now):
        raise JWTError(f"the activation JWT expired at {format_timestamp(token.expires)}")
    if token.not_before > 0 and token.not_before > now:
        raise JWTError(f"the activation JWT is not valid before {format_timestamp(token.not_before)}")


def _check_exporting_account(
    token: Token, fields: ActivationFields, lookup: AccountLookup, operator: Operator | None
) -> None:
    issuer = token.issuer
    account_key = fields.issuer_account or issuer
    if not is_account_key(account_key):
        raise JWTError(f"the issuer {issuer[:60]} is not an account key; the exporting account must sign activations")

    stored = lookup(account_key)
    if stored is None:
        if not fields.issuer_account:
            raise JWTError(
                f"the issuer {issuer} is not an account stored on this server; push the exporting account first, "
                "or set issuer_account when an account signing key signs the activation"
            )
        raise JWTError(f"account {account_key} is not stored on this server; push the exporting account first")
    try:
        account = decode_account(stored)
    except JWTError as error:
        raise JWTError(f"the stored JWT of account {account_key} cannot be decoded: {error}") from None
    if operator is None:
        raise JWTError("no operator is configured on this account server, so no account can be trusted")
    if not operator.trusts(account.issuer):
        raise JWTError(f"the stored JWT of account {account_key} is not signed by operator {operator.name}")

    if issuer != account_key and issuer not in account_signing_keys(account):
        raise JWTError(f"the issuer {issuer} is not a signing key of account {account_key}")


def account_signing_keys(account: Token) -> set[str]:
    """Return the signing keys of an account: plain keys and the keys of scoped entries."""
    keys = set()
    for entry in account.nats.get("signing_keys") or ():
        key = entry.get("key") if isinstance(entry, dict) else entry
        if isinstance(key, str):
            keys.add(key)
    return keys


class ActivationStore(Protocol):
    """The activation store interface that the HTTP API uses."""

    kind: str
    location: str | None
    readonly: bool

    def get(self, hash_id: str) -> StoredActivation | None: ...

    def save(self, activation: StoredActivation) -> Deferred[bool]: ...


class MemoryActivationStore:
    """Keep activation JWTs in memory only; nothing survives a restart."""

    kind = "memory"
    location: str | None = None

    def __init__(self, readonly: bool = False) -> None:
        self.readonly = readonly
        self._index: dict[str, StoredActivation] = {}
        self._locks: dict[str, DeferredLock] = {}

    def get(self, hash_id: str) -> StoredActivation | None:
        return self._index.get(hash_id)

    def __len__(self) -> int:
        return len(self._index)

    def save(self, activation: StoredActivation) -> Deferred[bool]:
        """Store *activation* unless the stored one with the same hash id is newer.

        Fires with True when the stored bytes changed and False when the same JWT was
        already stored. Fails with StaleActivationError, ReadOnlyStoreError or StoreError.
        """
        return self._serialized(activation.hash_id, lambda: self._save(activation))

    def _serialized(self, hash_id: str, action: Callable[[], Any]) -> Deferred[bool]:
        """Run *action* under the hash id's lock, so the iat check and the write of one
        activation never interleave with another save of it."""
        lock = self._locks.setdefault(hash_id, DeferredLock())
        result: Deferred[bool] = lock.run(action)

        def release(outcome: object) -> object:
            if not lock.locked and not lock.waiting:
                self._locks.pop(hash_id, None)
            return outcome

        result.addBoth(release)
        return result

    def _check(self, activation: StoredActivation, current: StoredActivation | None) -> bool:
        """Return whether *activation* should replace *current*, or raise when it must not."""
        if self.readonly:
            raise ReadOnlyStoreError("the store is read-only")
        if parse_hash_id(activation.hash_id) != activation.hash_id:
            raise StoreError(f"cannot store an activation under the invalid hash id {activation.hash_id[:60]!r}")
        if current is None:
            return True
        if current.raw == activation.raw:
            return False
        if current.issued_at > activation.issued_at:
            raise StaleActivationError(activation.hash_id, current.issued_at, activation.issued_at)
        return True

    def _save(self, activation: StoredActivation) -> bool:
        if not self._check(activation, self._index.get(activation.hash_id)):
            return False
        self._index[activation.hash_id] = activation
        return True


class DirectoryActivationStore(MemoryActivationStore):
    """Keep activation JWTs as ``<folder>/<hash id without padding>.jwt`` files.

    The folder is ``activations`` inside the account store folder, created (mode 0700)
    with the first activation. Files are written with the account store's atomic and
    durable write, and read again when their stat changes. A file is served only when
    its JWT decodes, its signature verifies and its hash id matches the file name. The
    trust checks of an upload are not repeated for files placed by hand.
    """

    kind = "directory"

    def __init__(self, reactor: IReactorThreads, path: str, readonly: bool = False) -> None:
        super().__init__(readonly=readonly)
        self._reactor = reactor
        self.location = os.path.abspath(path)
        self._stamps: dict[str, FileStamp] = {}

    def path_for(self, hash_id: str) -> str:
        """Return the file path of a hash id. Only valid hash ids become paths."""
        canonical = parse_hash_id(hash_id)
        if canonical is None:
            raise StoreError(f"cannot build a path from the invalid hash id {hash_id[:60]!r}")
        return os.path.join(self.location or "", canonical.rstrip("=") + ".jwt")

    def get(self, hash_id: str) -> StoredActivation | None:
        """Return the stored activation of *hash_id*, reading its file when it changed.

        NOTE: every call stats the file, and a changed file is read, on the calling
        (reactor) thread.
        """
        if parse_hash_id(hash_id) != hash_id:
            return None
        path = self.path_for(hash_id)
        try:
            status = os.stat(path)
        except OSError:
            self._forget(hash_id)
            return None
        stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        if self._stamps.get(hash_id) == stamp and hash_id in self._index:
            return self._index[hash_id]

        entry = _read_activation(path, hash_id)
        self._forget(hash_id)
        if entry is not None:
            self._index[hash_id] = entry
            self._stamps[hash_id] = stamp
        return entry

    def _forget(self, hash_id: str) -> None:
        self._index.pop(hash_id, None)
        self._stamps.pop(hash_id, None)

    def save(self, activation: StoredActivation) -> Deferred[bool]:
        return self._serialized(activation.hash_id, lambda: self._save_to_disk(activation))

    def _save_to_disk(self, activation: StoredActivation) -> Deferred[bool]:
        if not self._check(activation, self.get(activation.hash_id)):
            return succeed(False)
        path = self.path_for(activation.hash_id)
        written = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), write_durably, path, activation.raw)

        def written_ok(stamp: FileStamp) -> bool:
            self._index[activation.hash_id] = activation
            self._stamps[activation.hash_id] = stamp
            return True

        return written.addCallback(written_ok)


def _read_activation(path: str, expected_hash_id: str) -> StoredActivation | None:
    """Read one stored activation file, or log why it cannot be served."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
        token = decode(raw)
        if token.claim_type != "activation":
            raise JWTError(f"expected an activation JWT, got claim type {token.claim_type or 'none'!r}")
        entry = StoredActivation.from_token(token)
    except (OSError, JWTError) as error:
        log.warn("ignoring {path}: {error}", path=path, error=error)
        return None
    if entry.hash_id != expected_hash_id:
        log.warn(
            "ignoring {path}: its JWT has hash id {actual}, not the one in its name",
            path=path,
            actual=entry.hash_id,
        )
        return None
    return entry


def open_activation_store(
    reactor: IReactorThreads, account_store_location: str | None, readonly: bool
) -> MemoryActivationStore:
    """Return a directory activation store beside the account JWTs, or a memory one when
    the account store has no folder."""
    if account_store_location is None:
        return MemoryActivationStore(readonly=readonly)
    folder = os.path.join(account_store_location, ACTIVATIONS_FOLDER)
    log.info("activations: directory {path}", path=folder)
    return DirectoryActivationStore(reactor, folder, readonly=readonly)
