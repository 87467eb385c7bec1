"""Serve the accounts of an nsc operator folder, read-only.

nsc keeps an operator as ``<folder>/<operator>.jwt`` beside a ``.nsc`` marker file, and
each account as ``<folder>/accounts/<name>/<name>.jwt``. NscStore indexes those account
JWTs by their subject (the account public key), serving only the ones that are validly
signed and trusted by the operator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from nasd.jwt import JWTError, Token, decode_account
from nasd.logs import observer
from nasd.store import AccountCheck, ReadOnlyStoreError, StoredJWT

log = Logger(observer=observer)

MARKER_NAME = ".nsc"
ACCOUNTS_FOLDER = "accounts"


class NscFolderError(Exception):
    """A folder that is not a usable nsc operator folder; the message names what is missing."""


@dataclass(frozen=True)
class OperatorFolder:
    """An nsc operator folder whose layout has been checked."""

    path: str
    name: str

    @property
    def operator_jwt(self) -> str:
        """The path of the operator JWT, named after the folder as nsc names it."""
        return os.path.join(self.path, self.name + ".jwt")

    @property
    def accounts(self) -> str:
        return os.path.join(self.path, ACCOUNTS_FOLDER)

    def account_file(self, name: str) -> str:
        """Return the path of the JWT of the account folder *name*."""
        return os.path.join(self.accounts, name, name + ".jwt")


def check_operator_folder(path: str) -> OperatorFolder:
    """Check that *path* is an nsc operator folder and return it. Raises NscFolderError naming what is missing."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise NscFolderError(f"the nsc operator folder {path} does not exist or is not a folder")
    marker = os.path.join(path, MARKER_NAME)
    problem = f"{path} is not an nsc operator folder"
    try:
        with open(marker, "rb") as file:
            text = file.read()
    except FileNotFoundError:
        raise NscFolderError(f"{problem}: it has no {MARKER_NAME} file") from None
    except OSError as error:
        raise NscFolderError(f"{problem}: cannot read {marker}: {error.strerror or error}") from None
    try:
        description = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NscFolderError(f"{problem}: {marker} is not valid JSON ({error})") from None
    kind = description.get("kind") if isinstance(description, dict) else None
    if kind != "operator":
        raise NscFolderError(f"{problem}: {marker} has kind {kind!r}, expected 'operator'")

    folder = OperatorFolder(path, os.path.basename(path))
    if not os.path.isfile(folder.operator_jwt):
        raise NscFolderError(f"{problem}: the operator JWT {folder.operator_jwt} is missing")
    if not os.path.isdir(folder.accounts):
        raise NscFolderError(f"{problem}: it has no {ACCOUNTS_FOLDER} folder ({folder.accounts})")
    return folder


class NscStore:
    """The accounts of an nsc operator folder, indexed by account public key.

    The index is built by ``open`` and updated by ``reload``, which the folder watcher
    calls for each account file that changes. When two account folders contain a JWT
    for the same account, the one with the latest ``iat`` is served.

    NOTE: without a running watcher (inotify is Linux only), changes to the folder are
    not seen until nasd restarts. The operator JWT is read once at startup, so accounts
    signed with a signing key added to the operator later are rejected until a restart.
    """

    kind = "nsc"
    readonly = True
    listed = True

    def __init__(self, folder: OperatorFolder, check: AccountCheck) -> None:
        self.folder = folder
        self.location: str | None = folder.path
        self.check = check
        self._by_name: dict[str, StoredJWT] = {}
        self._by_key: dict[str, StoredJWT] = {}

    def open(self) -> None:
        """Read every account folder. A folder whose JWT is missing, invalid or untrusted is logged and skipped."""
        for name in self.account_names():
            entry = self._read(name)
            if entry is None and not os.path.lexists(self.folder.account_file(name)):
                log.warn(
                    "ignoring the account folder {path}: it has no {name}.jwt",
                    path=os.path.join(self.folder.accounts, name),
                    name=name,
                )
            if entry is not None:
                self._by_name[name] = entry
        for key in {entry.key for entry in self._by_name.values()}:
            self._choose(key)

    def account_names(self) -> list[str]:
        """List the account folders of ``accounts/``, skipping hidden names."""
        with os.scandir(self.folder.accounts) as entries:
            return sorted(entry.name for entry in entries if not entry.name.startswith(".") and entry.is_dir())

    def reload(self, name: str) -> StoredJWT | None:
        """Read the JWT of the account folder *name* again and update the index.

        Returns the entry now served from that folder, or None when the folder or its JWT
        is gone, invalid or untrusted (each logged), or when another folder's JWT for the
        same account is served instead.
        """
        previous = self._by_name.pop(name, None)
        entry = self._read(name)
        if entry is not None:
            self._by_name[name] = entry
        for key in {item.key for item in (previous, entry) if item is not None}:
            self._choose(key)

        if entry is None and previous is not None and not os.path.lexists(self.folder.account_file(name)):
            log.info(
                "{path} was removed: no longer serving account {account} from it",
                path=self.folder.account_file(name),
                account=previous.key,
            )
        if entry is not None and self._by_key.get(entry.key) is entry:
            return entry
        return None

    def get(self, key: str) -> StoredJWT | None:
        return self._by_key.get(key)

    def save(self, token: Token) -> Deferred[bool]:
        return fail(ReadOnlyStoreError(f"the nsc operator folder {self.folder.path} is served read-only"))

    def keys(self) -> Iterator[str]:
        return iter(sorted(self._by_key))

    def __len__(self) -> int:
        return len(self._by_key)

    def _read(self, name: str) -> StoredJWT | None:
        """Read and verify one account JWT, logging why it cannot be served unless the file is missing."""
        path = self.folder.account_file(name)
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            log.warn("ignoring {path}: cannot read it: {error}", path=path, error=error.strerror or error)
            return None
        try:
            token = decode_account(raw)
            self.check(token)
        except JWTError as error:
            log.warn("ignoring {path}: {error}", path=path, error=error)
            return None
        return StoredJWT.from_token(token)

    def _choose(self, key: str) -> None:
        """Serve the latest JWT of *key* among the account folders, or stop serving it."""
        candidates = sorted((entry.issued_at, name, entry) for name, entry in self._by_name.items() if entry.key == key)
        if not candidates:
            self._by_key.pop(key, None)
            return
        _, chosen, entry = candidates[-1]
        if len(candidates) > 1:
            log.warn(
                "the account folders {names} all contain a JWT for account {account}; serving the one in {chosen}",
                names=", ".join(name for _, name, _ in candidates),
                account=key,
                chosen=chosen,
            )
        self._by_key[key] = entry
