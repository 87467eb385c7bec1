"""Respond to the resolver requests that nats-server's NATS-based resolvers send, so that
nats-servers with ``resolver: { type: cache }`` (or ``full``) and other nasd instances
use nasd over NATS as they use nats-server full resolvers.

The subjects and replies follow nats-server's ``DirAccResolver`` (``server/accounts.go``):

* ``$SYS.REQ.ACCOUNT.<account>.CLAIMS.LOOKUP``: the stored account JWT, or an empty
  message when the account is unknown.
* ``$SYS.REQ.CLAIMS.UPDATE`` (what ``nsc push`` sends to a ``nats://`` URL) and
  ``$SYS.REQ.ACCOUNT.<account>.CLAIMS.UPDATE``: store the JWT and reply with a JSON
  document in nats-server's update reply format.
* ``$SYS.ACCOUNT.<account>.CLAIMS.UPDATE``: a claim update that a peer published. The
  JWT is stored and no reply is sent, because the publishing nasd counts the replies
  of nats-servers as acknowledgements.
* ``$SYS.REQ.CLAIMS.PACK`` (queue group ``responder``): one ``<account>|<jwt>``
  message per stored account and then an empty message, or only the empty message
  when the request's store hash equals this store's.
* ``$SYS.REQ.CLAIMS.LIST``: the stored account keys as JSON.
"""

from __future__ import annotations

import datetime
import json
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nasd import __version__
from nasd.jwt import Token
from nasd.keys import is_account_key, short_key
from nasd.logs import observer
from nasd.nats import MaxPayloadExceededError, Message, NATSConnection, NotConnectedError, Subscription
from nasd.replication import (
    PACK_REQUEST_SUBJECT,
    PACK_SEPARATOR,
    AccountUpdatePublisher,
    JWTMerger,
    MergeOutcome,
    MergeResult,
    SubscribingConnection,
)
from nasd.store import AccountStore, StoredJWT, pack_store, store_hash

log = Logger(observer=observer)

LOOKUP_SUBJECT = "$SYS.REQ.ACCOUNT.*.CLAIMS.LOOKUP"
UPDATE_REQUEST_SUBJECT = "$SYS.REQ.CLAIMS.UPDATE"
ACCOUNT_UPDATE_REQUEST_SUBJECT = "$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE"
UPDATE_NOTIFICATION_SUBJECT = "$SYS.ACCOUNT.*.CLAIMS.UPDATE"
LIST_REQUEST_SUBJECT = "$SYS.REQ.CLAIMS.LIST"

# nats-server full resolvers subscribe to pack requests in this queue group, so that
# one member responds to each request.
RESPONDER_QUEUE = "responder"

# Pack messages sent per request: a larger store is sent only in part.
MAX_PACK_MESSAGES = 100_000

# Pack messages published per reactor turn, so that sending a large pack does not
# hold up other work.
PACK_CHUNK = 500

# Pack and list requests handled at once. More are dropped, because each keeps a copy
# of the store's JWTs in memory.
MAX_CONCURRENT_PACKS = 4

# The start of the description of a rejected update, as nats-server words it.
UPDATE_ERROR = "jwt update resulted in error"

# The code of a rejected update: nats-server sends 500 for every error, and nasd sends
# the status its HTTP API responds with for the same error.
ERROR_CODES = {
    MergeOutcome.INVALID: 400,
    MergeOutcome.READ_ONLY: 405,
    MergeOutcome.OLDER: 409,
    MergeOutcome.FAILED: 500,
}


@dataclass
class ServerIdentity:
    """The ``server`` object of nasd's JSON replies, in the form nats-server gives its own.

    ``name`` is ``nasd-`` and random characters unless one is given, so that ``nsc push``
    lists each nasd instance that replied separately.
    """

    name: str = ""
    id: str = field(default_factory=lambda: "NASD" + secrets.token_hex(14).upper())
    host: str = field(default_factory=socket.gethostname)
    version: str = __version__
    sequence: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "nasd-" + self.id[-8:].lower()

    def describe(self, now: float) -> dict[str, Any]:
        """Return the ``server`` object of the next reply, sent at *now* (Unix seconds)."""
        self.sequence += 1
        time = datetime.datetime.fromtimestamp(now, tz=datetime.UTC).isoformat().replace("+00:00", "Z")
        return {
            "name": self.name,
            "host": self.host,
            "id": self.id,
            "ver": self.version,
            "seq": self.sequence,
            "time": time,
        }


class ResolverResponder(Service):
    """Subscribe to the resolver subjects on a NATS connection and reply from the store.

    The subscriptions are sent again on every reconnection by the connection. Update
    requests and peers' claim updates are stored through *merger*, so only newer JWTs
    that the operator trusts are stored.

    A JWT stored from ``$SYS.REQ.CLAIMS.UPDATE`` is also published as a claim update
    through *publisher*, because nats-servers with a URL resolver do not subscribe to
    that subject and would not see it otherwise. A JWT stored from a peer's claim update
    or from ``$SYS.REQ.ACCOUNT.<account>.CLAIMS.UPDATE`` is not published again: every
    nats-server subscribes to those subjects itself, and publishing them again would let
    peers send the same update back and forth.

    NOTE: the reply for an unknown account is an empty message, as nats-server's full
    resolver sends. A nats-server cache resolver that has seen no other servers
    takes the first reply, so with several nasd instances one that lacks a new account
    can reply first and the lookup fails until the instances have synchronised.
    """

    def __init__(
        self,
        clock: IReactorTime,
        connection: SubscribingConnection | NATSConnection,
        store: AccountStore,
        merger: JWTMerger,
        publisher: AccountUpdatePublisher | None = None,
        system_account: Token | None = None,
        identity: ServerIdentity | None = None,
    ) -> None:
        self.clock = clock
        self.connection = connection
        self.store = store
        self.merger = merger
        self.publisher = publisher
        self.system_account = system_account
        self.identity = identity or ServerIdentity()
        # Pack and list requests whose replies are being built or sent.
        self.in_progress = 0
        self._subscriptions: list[Subscription] = []

    def startService(self) -> None:
        super().startService()
        handlers: list[tuple[str, Callable[[Message], object], str | None]] = [
            (LOOKUP_SUBJECT, self.lookup, None),
            (UPDATE_REQUEST_SUBJECT, self.update_request, None),
            (ACCOUNT_UPDATE_REQUEST_SUBJECT, self.update_request, None),
            (PACK_REQUEST_SUBJECT, self.pack_request, RESPONDER_QUEUE),
            (LIST_REQUEST_SUBJECT, self.list_request, None),
        ]
        if not self.store.readonly:
            handlers.append((UPDATE_NOTIFICATION_SUBJECT, self.update_notification, None))
        for subject, handler, queue in handlers:
            self._subscriptions.append(self.connection.subscribe(subject, handler, queue))
        log.info(
            "resolver: replying to account lookups, update, pack and list requests over NATS as {name}{peers}",
            name=self.identity.name,
            peers="" if self.store.readonly else ", and storing the claim updates of peers",
        )

    def stopService(self) -> None:
        super().stopService()
        for subscription in self._subscriptions:
            self.connection.unsubscribe(subscription)
        self._subscriptions.clear()

    # Lookups

    def lookup(self, message: Message) -> None:
        """Reply with the stored JWT of the account named in the subject, or an empty message."""
        if not message.reply:
            log.debug("resolver: ignored a lookup without a reply subject on {subject}", subject=message.subject)
            return
        key = _account_in_subject(message.subject, 3, 6)
        entry = self._stored(key) if key is not None else None
        if entry is None:
            log.debug("resolver: lookup of unknown account {subject}", subject=message.subject)
            self._send(message.reply, b"")
            return
        log.debug("resolver: lookup of account {account}", account=short_key(entry.key))
        self._send(message.reply, entry.raw)

    def _stored(self, key: str) -> StoredJWT | None:
        entry = self.store.get(key)
        if entry is None and self.system_account is not None and key == self.system_account.subject:
            return StoredJWT.from_token(self.system_account)
        return entry

    # Updates

    def update_request(self, message: Message) -> Deferred[MergeResult] | None:
        """Store the JWT of an update request and reply in nats-server's format."""
        key: str | None = None
        if message.subject != UPDATE_REQUEST_SUBJECT:
            key = _account_in_subject(message.subject, 3, 6)
            if key is None:
                self._reply_update(message, MergeResult(MergeOutcome.INVALID, "", "the subject has no account key"))
                return None
        storing = self.merger.merge(key, message.payload)
        storing.addCallback(self._updated_by_request, message)
        return storing

    def _updated_by_request(self, result: MergeResult, message: Message) -> MergeResult:
        self._log_update(result, message.subject)
        if (
            result.outcome is MergeOutcome.STORED
            and message.subject == UPDATE_REQUEST_SUBJECT
            and self.publisher is not None
        ):
            entry = self.store.get(result.account)
            if entry is not None:
                self.publisher.publish_account_update(entry.key, entry.raw)
        self._reply_update(message, result)
        return result

    def update_notification(self, message: Message) -> Deferred[MergeResult] | None:
        """Store the JWT of a peer's claim update; send no reply."""
        key = _account_in_subject(message.subject, 2, 5)
        if key is None:
            log.warn("resolver: ignored a claim update on {subject}: no account key", subject=message.subject)
            return None
        storing = self.merger.merge(key, message.payload)
        storing.addCallback(self._log_update, message.subject)
        return storing

    def _log_update(self, result: MergeResult, subject: str) -> MergeResult:
        account = short_key(result.account) if result.account else "(unknown)"
        if result.outcome is MergeOutcome.STORED:
            log.info(
                "updated JWT for account - {account} - {jti} (from {subject})",
                account=account,
                jti=result.jti,
                subject=subject,
            )
        elif result.outcome is MergeOutcome.SAME:
            log.debug("same JWT for account - {account} - from {subject}", account=account, subject=subject)
        elif result.outcome is MergeOutcome.FAILED:
            log.error(
                "storing JWT for account - {account} - from {subject} failed: {reason}",
                account=account,
                subject=subject,
                reason=result.reason,
            )
        else:
            log.warn(
                "rejected JWT for account - {account} - from {subject}: {reason}",
                account=account,
                subject=subject,
                reason=result.reason,
            )
        return result

    def _reply_update(self, message: Message, result: MergeResult) -> None:
        if not message.reply:
            return
        document: dict[str, Any] = {"server": self.identity.describe(self.clock.seconds())}
        if result.outcome in (MergeOutcome.STORED, MergeOutcome.SAME):
            document["data"] = {"account": result.account, "code": 200, "message": "jwt updated"}
        else:
            document["error"] = {
                "account": result.account or "n/a",
                "code": ERROR_CODES[result.outcome],
                "description": f"{UPDATE_ERROR} - {result.reason}",
            }
        self._send(message.reply, json.dumps(document).encode())

    # Packs and lists

    def pack_request(self, message: Message) -> None:
        """Send the stored JWTs to the requester, unless its store hash is the same."""
        if self._without_reply(message):
            return
        assert message.reply is not None
        own_hash = store_hash(self.store)
        if message.payload == own_hash:
            log.debug("resolver: pack request with the same store hash {hash}", hash=own_hash.hex())
            self._send(message.reply, b"")
            return
        packing = pack_store(self.store, MAX_PACK_MESSAGES, self.clock.seconds())
        packing.addCallback(self._send_pack, message.reply, message.payload)
        self._track(packing, message.subject)

    def _send_pack(self, entries: list[StoredJWT], reply: str, their_hash: bytes) -> Deferred[None]:
        """Publish the pack in chunks of PACK_CHUNK messages, one reactor turn each, then the empty message."""
        done: Deferred[None] = Deferred()
        remaining = iter(entries)

        def send_chunk() -> None:
            for _ in range(PACK_CHUNK):
                entry = next(remaining, None)
                if entry is None:
                    self._send(reply, b"")
                    log.debug(
                        "resolver: replied to a pack request (store hash {hash}) with {count} JWTs",
                        hash=their_hash.hex() or "none",
                        count=len(entries),
                    )
                    done.callback(None)
                    return
                if not self._send(reply, entry.key.encode() + PACK_SEPARATOR + entry.raw):
                    done.callback(None)
                    return
            self.clock.callLater(0, send_chunk)

        send_chunk()
        return done

    def list_request(self, message: Message) -> None:
        """Reply with the keys of the stored accounts that have not expired, as nats-server does."""
        if self._without_reply(message):
            return
        listing = pack_store(self.store, MAX_PACK_MESSAGES, self.clock.seconds())
        listing.addCallback(self._send_list, message)
        self._track(listing, message.subject)

    def _send_list(self, entries: list[StoredJWT], message: Message) -> None:
        assert message.reply is not None
        document = {"server": self.identity.describe(self.clock.seconds()), "data": [entry.key for entry in entries]}
        self._send(message.reply, json.dumps(document).encode())
        log.debug("resolver: replied to a list request with {count} account keys", count=len(entries))

    def _without_reply(self, message: Message) -> bool:
        """Return whether a pack or list request gets no reply (logged): it has no reply subject,
        the store is still being listed, or MAX_CONCURRENT_PACKS requests are in progress."""
        if not message.reply:
            log.debug("resolver: ignored a request without a reply subject on {subject}", subject=message.subject)
            return True
        if not self.store.listed:
            log.debug("resolver: ignored a request on {subject}: the store is being listed", subject=message.subject)
            return True
        if self.in_progress >= MAX_CONCURRENT_PACKS:
            log.warn(
                "resolver: ignored a request on {subject}: {count} pack and list requests are in progress",
                subject=message.subject,
                count=self.in_progress,
            )
            return True
        return False

    def _track(self, reply: Deferred[Any], subject: str) -> None:
        """Count *reply* as in progress until it ends, and log it if it fails."""
        self.in_progress += 1

        def ended(result: object) -> None:
            self.in_progress -= 1
            if isinstance(result, Failure):
                log.failure("resolver: replying to a request on {subject} failed", result, subject=subject)

        reply.addBoth(ended)

    def _send(self, subject: str, payload: bytes) -> bool:
        """Publish a reply; return False when it could not be sent (logged)."""
        try:
            self.connection.publish(subject, payload)
        except NotConnectedError:
            log.debug("resolver: dropped a reply to {subject}: NATS is not connected", subject=subject)
            return False
        except MaxPayloadExceededError as error:
            log.error("resolver: cannot reply on {subject}: {error}", subject=subject, error=error)
            return False
        return True


def _account_in_subject(subject: str, position: int, tokens: int) -> str | None:
    """Return the account key at token *position* of a subject of *tokens* tokens, or None when it is not one."""
    parts = subject.split(".")
    if len(parts) != tokens or not is_account_key(parts[position]):
        return None
    return parts[position]
