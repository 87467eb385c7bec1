"""Bring account JWTs from other account servers into the store: the packs that peers
send over NATS, and the pack of a primary fetched over HTTP at startup.

Every JWT goes through ``check_account_jwt`` and the store's iat check, so a peer or a
primary can neither store an untrusted JWT nor roll an account back to an older one.
JWTs merged here are not published as claim updates: the server that first accepted
them published them already.
"""

from __future__ import annotations

import enum
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import treq
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    TimeoutError,
    ensureDeferred,
    succeed,
)
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

from nasd.jwt import MAX_TOKEN_SIZE, JWTError, Operator, decode_account
from nasd.keys import is_account_key, short_key
from nasd.logs import observer
from nasd.nats import (
    NO_RESPONDERS_STATUS,
    MaxPayloadExceededError,
    Message,
    NATSConnection,
    NotConnectedError,
    Subscription,
)
from nasd.store import AccountStore, ReadOnlyStoreError, StaleJWTError, StoreError, store_hash, when_listed
from nasd.uploads import check_account_jwt

log = Logger(observer=observer)

PACK_REQUEST_SUBJECT = "$SYS.REQ.CLAIMS.PACK"

# A pack line is "<account public key>|<account JWT>".
PACK_SEPARATOR = b"|"
MAX_PACK_LINE = 56 + len(PACK_SEPARATOR) + MAX_TOKEN_SIZE

# Saves that run at once, and saves that may wait for them. A JWT offered while this
# many wait is rejected, so a flood of messages cannot queue unbounded work.
MERGE_CONCURRENCY = 4
MAX_WAITING_MERGES = 20_000

# Pack replies merged per pack request; a larger store is compared only in part.
MAX_PACK_REPLIES = 100_000

# Pack requests whose replies are still merged; an older one is forgotten when a newer
# one would exceed this number.
MAX_OPEN_REQUESTS = 4

# Rejected JWTs logged one by one per pack; the rest are only counted.
MAX_LOGGED_REJECTIONS = 10


class MergeOutcome(enum.Enum):
    """The outcome of one JWT offered to the store."""

    STORED = "stored"
    SAME = "same"
    OLDER = "older"
    INVALID = "invalid"
    READ_ONLY = "read-only"
    FAILED = "failed"


@dataclass(frozen=True)
class MergeResult:
    """The outcome for one offered JWT, with the reason when it was not stored.

    ``account`` is "" when no account key could be read.
    """

    outcome: MergeOutcome
    account: str
    reason: str = ""
    jti: str = ""


@dataclass
class MergeCounts:
    """How many JWTs of one pack were stored, were older or the same as the stored ones,
    or were rejected (invalid, untrusted, or not storable)."""

    imported: int = 0
    unchanged: int = 0
    rejected: int = 0

    def add(self, result: MergeResult) -> None:
        if result.outcome is MergeOutcome.STORED:
            self.imported += 1
        elif result.outcome in (MergeOutcome.SAME, MergeOutcome.OLDER):
            self.unchanged += 1
        else:
            self.rejected += 1


class AccountUpdatePublisher(Protocol):
    """The part of the claim update publisher that peer sync and the responder use."""

    def publish_account_update(self, account: str, jwt: bytes) -> None: ...


class JWTMerger(Service):
    """Check account JWTs from NATS or a primary and store the newer, trusted ones.

    At most MERGE_CONCURRENCY saves run at once. At shutdown the service waits for the
    saves in progress, so that no write is cut short.
    """

    def __init__(self, clock: IReactorTime, store: AccountStore, operator: Operator | None) -> None:
        self.clock = clock
        self.store = store
        self.operator = operator
        self._semaphore = DeferredSemaphore(MERGE_CONCURRENCY)
        self._in_flight: set[Deferred[MergeResult]] = set()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return DeferredList(list(self._in_flight), consumeErrors=True)

    def merge_line(self, line: bytes) -> Deferred[MergeResult]:
        """Check and store one ``<account>|<jwt>`` pack line; the Deferred never fails."""
        parts = line.strip().split(PACK_SEPARATOR)
        if len(parts) != 2:
            reason = f"the pack line {_excerpt(line)} is not <account public key>|<account JWT>"
            return succeed(MergeResult(MergeOutcome.INVALID, "", reason))
        key = parts[0].decode("ascii", "replace")
        if not is_account_key(key):
            reason = f"the pack line starts with {key[:60]!r}, which is not an account public key"
            return succeed(MergeResult(MergeOutcome.INVALID, "", reason))
        return self.merge(key, parts[1])

    def merge(self, key: str | None, raw: bytes) -> Deferred[MergeResult]:
        """Check the account JWT *raw* for account *key* and store it unless the stored JWT
        is the same or newer. With *key* None, the JWT's own subject is the account.

        The Deferred never fails: every error becomes a MergeResult.
        """
        raw = raw.strip()
        if not raw:
            return succeed(MergeResult(MergeOutcome.INVALID, key or "", "the JWT is empty"))
        if key is None:
            try:
                key = decode_account(raw).subject
            except JWTError as error:
                return succeed(MergeResult(MergeOutcome.INVALID, "", f"invalid JWT: {error}"))
        elif not is_account_key(key):
            return succeed(MergeResult(MergeOutcome.INVALID, "", f"{key[:60]!r} is not an account public key"))

        current = self.store.get(key)
        if current is not None and current.raw == raw:
            return succeed(MergeResult(MergeOutcome.SAME, key, jti=current.jti))
        try:
            token = check_account_jwt(key, raw, self.operator, self.clock.seconds())
        except JWTError as error:
            return succeed(MergeResult(MergeOutcome.INVALID, key, str(error)))
        if len(self._semaphore.waiting) >= MAX_WAITING_MERGES:
            reason = f"{MAX_WAITING_MERGES} JWTs are already waiting to be stored"
            return succeed(MergeResult(MergeOutcome.FAILED, key, reason, token.jti))

        saving = self._semaphore.run(self.store.save, token)
        merged: Deferred[MergeResult] = saving.addCallbacks(
            lambda changed: MergeResult(MergeOutcome.STORED if changed else MergeOutcome.SAME, key, jti=token.jti),
            lambda failure: _save_failed(failure, key, token.jti),
        )
        self._in_flight.add(merged)
        merged.addBoth(self._forget, merged)
        return merged

    def _forget(self, result: object, merged: Deferred[MergeResult]) -> object:
        self._in_flight.discard(merged)
        return result


def _save_failed(failure: Failure, key: str, jti: str) -> MergeResult:
    if failure.check(StaleJWTError):
        return MergeResult(MergeOutcome.OLDER, key, failure.getErrorMessage(), jti)
    if failure.check(ReadOnlyStoreError):
        return MergeResult(MergeOutcome.READ_ONLY, key, "the store is read-only", jti)
    if failure.check(StoreError):
        return MergeResult(MergeOutcome.FAILED, key, failure.getErrorMessage(), jti)
    log.failure("storing the JWT for account {account} failed", failure, account=short_key(key))
    return MergeResult(MergeOutcome.FAILED, key, "an internal error; see the log", jti)


def _excerpt(data: bytes) -> str:
    return repr(data[:60].decode("utf-8", "replace")) + ("..." if len(data) > 60 else "")


class RejectionLog:
    """Log the rejected JWTs of one pack at warning, the first MAX_LOGGED_REJECTIONS one by one."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.count = 0

    def add(self, result: MergeResult) -> None:
        if result.outcome not in (MergeOutcome.INVALID, MergeOutcome.READ_ONLY, MergeOutcome.FAILED):
            return
        self.count += 1
        if self.count <= MAX_LOGGED_REJECTIONS:
            log.warn(
                "rejected the JWT for account {account} from {source}: {reason}",
                account=short_key(result.account) if result.account else "(unknown)",
                source=self.source,
                reason=result.reason,
            )

    def close(self) -> None:
        """Log how many rejections were not logged one by one."""
        if self.count > MAX_LOGGED_REJECTIONS:
            log.warn(
                "{count} more JWTs from {source} were rejected and not logged one by one",
                count=self.count - MAX_LOGGED_REJECTIONS,
                source=self.source,
            )


# Peers over NATS


class SubscribingConnection(Protocol):
    """The parts of NATSConnection that the resolver responder uses."""

    @property
    def connected(self) -> bool: ...

    def publish(self, subject: str, payload: bytes, reply: str | None = None) -> None: ...

    def subscribe(
        self, subject: str, callback: Callable[[Message], object], queue: str | None = None
    ) -> Subscription: ...

    def unsubscribe(self, subscription: Subscription) -> None: ...


class PeerConnection(SubscribingConnection, Protocol):
    """The parts of NATSConnection that PeerSync uses."""

    def add_ready_callback(self, callback: Callable[[], object]) -> None: ...


@dataclass
class _PackRequest:
    """One pack request and the replies merged for it so far."""

    number: int
    counts: MergeCounts = field(default_factory=MergeCounts)
    replies: int = 0
    merges: list[Deferred[MergeResult]] = field(default_factory=list)
    rejections: RejectionLog = field(default_factory=lambda: RejectionLog("a peer's pack"))
    over_limit: bool = False


class PeerSync(Service):
    """Compare the store with the peers' over NATS and merge what they have that is newer.

    Right after each connection, and every ``interval`` seconds (never when 0), it sends
    a pack request on ``$SYS.REQ.CLAIMS.PACK`` with the store hash as payload. One
    member of the queue group ``responder`` (a peer nasd or a nats-server full
    resolver) replies with an empty message when its store hash is the same, and
    otherwise with one ``<account>|<jwt>`` message per account and then the empty
    message. At most MAX_PACK_REPLIES replies per request are merged.

    The requests are sent only once the store is listed, because the store hash of a
    store still being listed would differ from every peer's.
    """

    def __init__(
        self,
        clock: IReactorTime,
        connection: PeerConnection | NATSConnection,
        store: AccountStore,
        merger: JWTMerger,
        interval: float,
        publisher: AccountUpdatePublisher | None = None,
    ) -> None:
        self.clock = clock
        self.connection = connection
        self.store = store
        self.merger = merger
        self.interval = interval
        self.publisher = publisher
        self.inbox = f"_INBOX.{secrets.token_hex(11)}"
        self.requests: OrderedDict[str, _PackRequest] = OrderedDict()
        self._next_request = 1
        self._subscription: Subscription | None = None
        self._loop: LoopingCall | None = None
        self._waiting_for_listing = False
        connection.add_ready_callback(self._connected)

    def startService(self) -> None:
        super().startService()
        self._subscription = self.connection.subscribe(f"{self.inbox}.*", self._reply)
        if self.interval > 0:
            self._loop = LoopingCall(self.sync)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda failure: log.failure("the periodic pack request failed", failure)
            )
            log.info("peers: comparing the store with its peers every {interval} s", interval=self.interval)
        else:
            log.info("peers: comparing the store with its peers only after each NATS connection (syncinterval 0)")

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._subscription is not None:
            self.connection.unsubscribe(self._subscription)
            self._subscription = None

    def _connected(self) -> None:
        if self.running:
            self.sync()

    def sync(self) -> None:
        """Send a pack request with the store hash, unless NATS is down or the store is not listed yet."""
        if not self.connection.connected:
            log.debug("peers: not sending a pack request: NATS is not connected")
            return
        if not self.store.listed:
            if not self._waiting_for_listing:
                self._waiting_for_listing = True
                log.debug("peers: the pack request waits until the store is listed")
                when_listed(self.store).addCallback(self._listing_ended)
            return

        number = self._next_request
        self._next_request += 1
        own_hash = store_hash(self.store)
        self.requests[str(number)] = _PackRequest(number)
        while len(self.requests) > MAX_OPEN_REQUESTS:
            _, forgotten = self.requests.popitem(last=False)
            log.debug("peers: the replies to pack request {number} did not end in time", number=forgotten.number)
        try:
            self.connection.publish(PACK_REQUEST_SUBJECT, own_hash, reply=f"{self.inbox}.{number}")
        except (NotConnectedError, MaxPayloadExceededError) as error:
            self.requests.pop(str(number), None)
            log.debug("peers: sending pack request {number} failed: {error}", number=number, error=error)
            return
        log.debug("peers: sent pack request {number} with store hash {hash}", number=number, hash=own_hash.hex())

    def _listing_ended(self, _: None) -> None:
        self._waiting_for_listing = False
        if self.running:
            self.sync()

    def _reply(self, message: Message) -> None:
        token = message.subject[len(self.inbox) + 1 :]
        request = self.requests.get(token)
        if request is None:
            log.debug("peers: ignored a reply on {subject}: its pack request has ended", subject=message.subject)
            return
        if message.status == NO_RESPONDERS_STATUS:
            del self.requests[token]
            log.debug("peers: no peer responded to pack request {number}", number=request.number)
            return
        if message.status is not None or not message.payload:
            del self.requests[token]
            self._finish(request)
            return

        request.replies += 1
        if request.replies > MAX_PACK_REPLIES:
            if not request.over_limit:
                request.over_limit = True
                log.warn(
                    "peers: pack request {number} got more than {limit} replies; the rest are ignored",
                    number=request.number,
                    limit=MAX_PACK_REPLIES,
                )
            return
        if len(message.payload) > MAX_PACK_LINE:
            result = MergeResult(MergeOutcome.INVALID, "", f"the pack message is larger than {MAX_PACK_LINE} bytes")
            self._count(result, request)
            return
        merging = self.merger.merge_line(message.payload)
        request.merges.append(merging)
        merging.addCallback(self._count, request)

    def _count(self, result: MergeResult, request: _PackRequest) -> None:
        request.counts.add(result)
        request.rejections.add(result)
        if result.outcome is MergeOutcome.STORED:
            log.debug(
                "peers: stored the JWT for account {account} ({jti}) from a peer's pack",
                account=short_key(result.account),
                jti=result.jti,
            )
            self._publish(result.account)

    def _publish(self, account: str) -> None:
        """Publish a JWT merged from a pack, because nats-servers may hold an older one.

        After an outage, this instance may have published its own older JWT for the
        account before the pack brought the newer one. Merges are not triggered by
        claim updates, so this cannot loop between peers.
        """
        entry = self.store.get(account)
        if self.publisher is not None and entry is not None:
            self.publisher.publish_account_update(account, entry.raw)

    def _finish(self, request: _PackRequest) -> None:
        """Log what the replies to one pack request changed, once their merges are done."""

        def report(_: object) -> None:
            counts = request.counts
            request.rejections.close()
            if request.replies == 0:
                log.debug(
                    "peers: the peer that responded to pack request {number} sent no JWTs "
                    "(its store hash is the same, or its store is empty)",
                    number=request.number,
                )
            elif counts.imported or counts.rejected:
                log.info(
                    "peers: merged {imported} newer account JWTs from a peer's pack; "
                    "{unchanged} were older or the same, {rejected} rejected",
                    imported=counts.imported,
                    unchanged=counts.unchanged,
                    rejected=counts.rejected,
                )
            else:
                log.debug(
                    "peers: the peer's pack for request {number} had nothing newer ({count} JWTs)",
                    number=request.number,
                    count=counts.unchanged,
                )

        DeferredList(request.merges).addCallback(report)


# The primary over HTTP


class PackClient(Protocol):
    """The part of treq's HTTPClient (or StubTreq) that PrimaryImport uses."""

    def get(self, url: str, /, *, headers: Any = ...) -> Deferred[Any]: ...


class PackLines:
    """Split a streamed pack body into lines of at most MAX_PACK_LINE bytes.

    A longer line is dropped and reported once through *too_long*, so a body without
    newlines cannot grow the buffer without bound.
    """

    def __init__(self, line: Callable[[bytes], None], too_long: Callable[[int], None]) -> None:
        self._line = line
        self._too_long = too_long
        self._buffer = bytearray()
        self._skipping = False
        self._number = 0

    def feed(self, data: bytes) -> None:
        while data:
            end = data.find(b"\n")
            if end < 0:
                self._append(data)
                return
            self._append(data[:end])
            self._end_line()
            data = data[end + 1 :]

    def close(self) -> None:
        """End the last line, which has no newline after it."""
        if self._buffer or self._skipping:
            self._end_line()

    def _append(self, data: bytes) -> None:
        if self._skipping:
            return
        self._buffer += data
        if len(self._buffer) > MAX_PACK_LINE:
            self._skipping = True
            self._buffer.clear()

    def _end_line(self) -> None:
        self._number += 1
        if self._skipping:
            self._skipping = False
            self._too_long(self._number)
        elif self._buffer.strip():
            self._line(bytes(self._buffer))
        self._buffer.clear()


class PrimaryImport(Service):
    """Import the account JWTs of a primary account server once, when nasd starts.

    It requests ``GET <primary>/jwt/v1/pack?max=<max_pack>`` and merges the lines of the
    response as they arrive, at most *max_pack* of them. The whole transfer must end
    within *timeout* seconds. A primary that is down, or responds with another status
    than 200 or with lines that are not trusted account JWTs, is logged, and nasd goes
    on with the JWTs it has. HTTP is served meanwhile.
    """

    def __init__(
        self,
        clock: IReactorTime,
        client: PackClient,
        primary: str,
        max_pack: int,
        timeout: float,
        merger: JWTMerger,
    ) -> None:
        self.clock = clock
        self.client = client
        self.primary = primary.rstrip("/")
        self.max_pack = max_pack
        self.timeout = timeout
        self.merger = merger
        self.done: Deferred[MergeCounts | None] | None = None

    @property
    def url(self) -> str:
        return f"{self.primary}/jwt/v1/pack?max={self.max_pack}"

    def startService(self) -> None:
        super().startService()
        self.done = ensureDeferred(self.run())
        self.done.addErrback(
            lambda failure: log.failure("importing from the primary {url} failed", failure, url=self.url)
        )

    async def run(self) -> MergeCounts | None:
        """Import the primary's pack; return the counts, or None when the import failed or is turned off."""
        if self.max_pack == 0:
            log.info("primary: not importing from {primary}: maxreplicationpack is 0", primary=self.primary)
            return None
        log.info("primary: importing account JWTs from {url}", url=self.url)
        state = _Import(RejectionLog(f"the primary {self.primary}"))
        transfer = ensureDeferred(self._transfer(state))
        transfer.addTimeout(self.timeout, self.clock)
        reason: str | None = None
        try:
            await transfer
        except (TimeoutError, CancelledError):
            reason = f"the pack did not arrive within {self.timeout} s (replicationtimeout)"
        except _PrimaryRefused as error:
            reason = str(error)
        except (ConnectError, DNSLookupError, OSError) as error:
            reason = f"cannot connect: {_reason(error)}"
        except (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed) as error:
            reason = f"the request failed: {_reason(error)}"
        await DeferredList(state.merges)
        state.rejections.close()

        counts = state.counts
        if reason is not None:
            received = ""
            if state.merges:
                received = f" ({counts.imported} imported from the {len(state.merges)} lines received before)"
            log.error(
                "primary: importing from {url} failed: {reason}; going on with the account JWTs already stored"
                "{received}",
                url=self.url,
                reason=reason,
                received=received,
            )
            return None
        log.info(
            "imported {imported} account JWTs from the primary {primary}; {unchanged} were older or the same, "
            "{rejected} rejected",
            imported=counts.imported,
            primary=self.primary,
            unchanged=counts.unchanged,
            rejected=counts.rejected,
        )
        return counts

    async def _transfer(self, state: _Import) -> None:
        response = await self.client.get(self.url, headers={b"Accept": [b"text/plain"]})
        if response.code != 200:
            body = await treq.content(response)
            text = body[:200].decode("utf-8", "replace").strip()
            raise _PrimaryRefused(f"it responded with status {response.code}: {text!r}")

        def line(data: bytes) -> None:
            if len(state.merges) < self.max_pack:
                merging = self.merger.merge_line(data)
                merging.addCallback(self._count, state)
                state.merges.append(merging)
            elif not state.over_limit:
                state.over_limit = True
                log.warn(
                    "primary: {primary} sent more than the {limit} lines requested; the rest are ignored",
                    primary=self.primary,
                    limit=self.max_pack,
                )

        def too_long(number: int) -> None:
            self._count(
                MergeResult(MergeOutcome.INVALID, "", f"line {number} is longer than {MAX_PACK_LINE} bytes"), state
            )

        lines = PackLines(line, too_long)
        await treq.collect(response, lines.feed)
        lines.close()

    def _count(self, result: MergeResult, state: _Import) -> MergeResult:
        state.counts.add(result)
        state.rejections.add(result)
        if result.outcome is MergeOutcome.STORED:
            log.debug(
                "primary: stored the JWT for account {account} ({jti})",
                account=short_key(result.account),
                jti=result.jti,
            )
        return result


@dataclass
class _Import:
    """The progress of one import from the primary."""

    rejections: RejectionLog
    counts: MergeCounts = field(default_factory=MergeCounts)
    merges: list[Deferred[MergeResult]] = field(default_factory=list)
    over_limit: bool = False


class _PrimaryRefused(Exception):
    """The primary responded to the pack request with a status other than 200."""


def _reason(error: BaseException) -> str:
    """Return the error message of a failed HTTP request, without a trailing period."""
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons:
        text = "; ".join(reason.getErrorMessage() for reason in reasons if isinstance(reason, Failure))
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error) or type(error).__name__
    return text.rstrip(". ")
