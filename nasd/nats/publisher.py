"""Publishing account claim updates (and activations) so that running nats-servers apply
each JWT that nasd stores, with pending updates kept until NATS confirms them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from nasd.creds import Credentials, CredentialsFile
from nasd.journal import PendingJournal
from nasd.logs import observer
from nasd.nats.connection import NATSClientFactory, NATSConnection
from nasd.nats.protocol import (
    ACCOUNT_KEY_PATTERN,
    ACTIVATION_UPDATE_SUBJECT,
    CLAIMS_UPDATE_SUBJECT,
    SUBJECT_TOKEN_PATTERN,
    ClientOptions,
    ClientReactor,
    MaxPayloadExceededError,
    Message,
    NATSError,
    NATSServerError,
    NoRespondersError,
    NotConnectedError,
)
from nasd.nats.tls import ClientTLS


@dataclass(frozen=True)
class ClaimUpdateAcknowledgements:
    """The replies of nats-servers to one account claim update, by server name.

    ``rejected`` pairs each server name with its error description, and ``unexpected``
    counts replies that were not JSON or not in nats-server's reply format.
    """

    account: str
    updated: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()
    unexpected: int = 0

    @property
    def answered(self) -> int:
        """The number of replies in nats-server's format."""
        return len(self.updated) + len(self.skipped) + len(self.rejected)


@dataclass(frozen=True)
class _ClaimUpdate:
    """A JWT to publish on ``subject``; ``hash_id`` is set for activation updates."""

    subject: str
    account: str
    jwt: bytes
    hash_id: str | None = None

    @property
    def description(self) -> str:
        if self.hash_id is None:
            return f"claim update for account {self.account[:12]}"
        return f"activation update {self.hash_id[:12]} for account {self.account[:12]}"


class ClaimUpdatePublisher(Service):
    """Publish account JWTs on ``$SYS.ACCOUNT.<account>.CLAIMS.UPDATE`` and activation
    JWTs on ``$SYS.ACCOUNT.<account>.CLAIMS.ACTIVATE.<hash id>``.

    The latest JWT of each subject stays pending until a PONG confirms that the NATS
    server processed its PUB. Updates accepted while NATS is down, or in flight when a
    connection drops, are therefore published again on the next connection. With a
    journal, the accounts whose updates are still pending are also written to disk
    whenever NATS is unreachable and at shutdown, so that the next start can queue them
    again. The journal lists accounts only, so pending activation updates are lost at
    shutdown.

    Each account update is published with a reply subject, and every nats-server that
    handles claim updates replies to it: the replies received within ``ack_window``
    seconds are counted and logged, and a refusal is logged as a warning. Activation
    updates are published without a reply subject, because nats-server does not handle
    them (other account servers may subscribe to them). ``connection`` is the
    NATSConnection, which other parts of nasd may use too.
    """

    log = Logger(observer=observer)

    def __init__(
        self,
        reactor: ClientReactor,
        servers: Sequence[str],
        credentials: Credentials | CredentialsFile | None,
        connect_timeout: float,
        reconnect_wait: float,
        max_reconnects: int,
        name: str = "nasd",
        trace: bool = False,
        ping_interval: float = 120.0,
        stop_timeout: float = 2.0,
        journal: PendingJournal | None = None,
        tls: ClientTLS | None = None,
        ack_window: float = 1.0,
        latest_jwt: Callable[[str], bytes | None] | None = None,
    ) -> None:
        if ack_window <= 0:
            raise ValueError(f"ack_window must be more than 0 seconds, not {ack_window}")
        self._latest_jwt = latest_jwt
        options = ClientOptions(
            credentials=credentials,
            name=name,
            connect_timeout=connect_timeout,
            ping_interval=ping_interval,
            trace=trace,
            tls=tls,
        )
        self.reactor = reactor
        self.connection = NATSConnection(
            reactor,
            servers,
            options,
            reconnect_wait=reconnect_wait,
            max_reconnects=max_reconnects,
            stop_timeout=stop_timeout,
        )
        self.connection.add_ready_callback(self._connection_ready)
        self.connection.add_lost_callback(self._connection_lost)
        self.last_acknowledgements: ClaimUpdateAcknowledgements | None = None
        self._ack_window = ack_window
        self._stop_timeout = stop_timeout
        self._journal = journal
        self._pending: dict[str, _ClaimUpdate] = {}
        self._last_published: float | None = None
        self._last_acknowledged: float | None = None

    @property
    def factory(self) -> NATSClientFactory:
        """The reconnecting client factory of the connection."""
        return self.connection.factory

    @property
    def connected(self) -> bool:
        """Whether a connection to a NATS server is established."""
        return self.connection.connected

    @property
    def server_url(self) -> str | None:
        """The URL of the connected NATS server, or None."""
        return self.connection.server_url

    @property
    def pending_count(self) -> int:
        """The number of account and activation updates not confirmed yet."""
        return len(self._pending)

    @property
    def last_published(self) -> float | None:
        """The reactor time of the last confirmed publish, or None."""
        return self._last_published

    @property
    def last_acknowledged(self) -> float | None:
        """The reactor time at which the replies to the last account update that some
        nats-server applied or skipped were counted, or None."""
        return self._last_acknowledged

    def startService(self) -> None:
        super().startService()
        self.connection.startService()

    def stopService(self) -> Deferred[None]:
        """Wait up to ``stop_timeout`` seconds for in-flight updates, then disconnect."""
        super().stopService()
        stopped = self._confirm_in_flight()
        stopped.addCallback(lambda _: self.connection.stopService())
        stopped.addCallback(lambda _: self._log_unpublished())
        return stopped

    def publish_account_update(self, account: str, jwt: bytes) -> None:
        """Publish the account JWT now if connected, else hold it for the next connection.

        Raises ValueError when ``account`` is not an account public key, because it
        becomes part of the subject.
        """
        _check_account(account)
        self._queue(_ClaimUpdate(CLAIMS_UPDATE_SUBJECT.format(account=account), account, jwt))

    def publish_activation_update(self, account: str, hash_id: str, jwt: bytes) -> None:
        """Publish the activation JWT now if connected, else hold it for the next connection.

        ``account`` is the account the activation is issued for, and ``hash_id`` the
        activation's hash ID. Raises ValueError when either cannot be a subject token.
        """
        _check_account(account)
        if not SUBJECT_TOKEN_PATTERN.fullmatch(hash_id):
            raise ValueError(f"invalid activation hash ID {hash_id!r}: it must be one subject token")
        subject = ACTIVATION_UPDATE_SUBJECT.format(account=account, hash_id=hash_id)
        self._queue(_ClaimUpdate(subject, account, jwt, hash_id))

    def _queue(self, update: _ClaimUpdate) -> None:
        self._pending[update.subject] = update
        if not self.connection.connected:
            self.log.info("NATS is not connected; holding the {update}", update=update.description)
            self._record_pending()
            return
        self._send_update(update)

    def _newest(self, update: _ClaimUpdate) -> _ClaimUpdate:
        """Replace the JWT of an account update with the newest one stored, if it changed.

        The store never goes back to an older JWT, while a held update may be older than
        what a peer has stored here since: publishing it would roll nats-servers back.
        """
        if self._latest_jwt is None or update.hash_id is not None:
            return update
        newest = self._latest_jwt(update.account)
        if newest is None or newest == update.jwt:
            return update
        update = dataclasses.replace(update, jwt=newest)
        self._pending[update.subject] = update
        return update

    def _send_update(self, update: _ClaimUpdate) -> None:
        update = self._newest(update)
        try:
            if update.hash_id is None:
                replies = self.connection.request_many(update.subject, update.jwt, self._ack_window)
                replies.addCallbacks(
                    self._count_acknowledgements,
                    self._acknowledgements_failed,
                    callbackArgs=(update.account,),
                    errbackArgs=(update,),
                )
            else:
                self.connection.publish(update.subject, update.jwt)
        except MaxPayloadExceededError as error:
            self.log.error("dropped the {update}: {error}", update=update.description, error=str(error))
            self._forget(update)
            return
        except NotConnectedError:
            return  # the update stays pending for the next connection

        server = self.connection.server_url
        confirmed = self.connection.flush()
        confirmed.addCallbacks(
            self._update_confirmed,
            self._update_not_confirmed,
            callbackArgs=(update, server),
            errbackArgs=(update, server),
        )

    def _update_confirmed(self, _: None, update: _ClaimUpdate, server: str) -> None:
        self._last_published = self.reactor.seconds()
        self._forget(update)
        self.log.info("published {update} to {server}", update=update.description, server=server)

    def _update_not_confirmed(self, failure: Failure, update: _ClaimUpdate, server: str) -> None:
        if failure.check(NATSServerError):
            self.log.error(
                "NATS server {server} rejected the {update}: {error}; it stays pending until the next connection",
                server=server,
                update=update.description,
                error=failure.getErrorMessage(),
            )
        elif failure.check(NATSError):
            self.log.info(
                "the {update} was not confirmed by {server} before the connection closed; "
                "it stays pending until the next connection",
                update=update.description,
                server=server,
            )
        else:
            self.log.failure("unexpected error while publishing the {update}", failure, update=update.description)

    # Acknowledgements

    def _count_acknowledgements(self, replies: list[Message], account: str) -> None:
        acknowledgements = count_acknowledgements(account, replies)
        self.last_acknowledgements = acknowledgements
        short = account[:12]

        for reply in replies:
            if _classify_reply(account, reply)[0] == "unexpected":
                self.log.warn(
                    "ignored an unexpected reply to the claim update for account {account}: {reply!r}",
                    account=short,
                    reply=reply.payload[:200].decode("utf-8", "replace"),
                )
        for server, description in acknowledgements.rejected:
            self.log.warn(
                "nats-server {server} REFUSED the JWT for account {account}: {description}",
                server=server,
                account=short,
                description=description,
            )

        if not acknowledgements.answered:
            self.log.info(
                "account {account}: no nats-server replied to the claim update within {window} s",
                account=short,
                window=self._ack_window,
            )
            return
        if acknowledgements.updated or acknowledgements.skipped:
            self._last_acknowledged = self.reactor.seconds()
        rejected = f", rejected by {len(acknowledgements.rejected)}" if acknowledgements.rejected else ""
        self.log.info(
            "account {account}: jwt updated on {updated} nats-server(s), skipped on {skipped}{rejected}",
            account=short,
            updated=len(acknowledgements.updated),
            skipped=len(acknowledgements.skipped),
            rejected=rejected,
        )
        self.log.debug(
            "account {account}: jwt updated on [{updated}], skipped on [{skipped}]",
            account=short,
            updated=", ".join(acknowledgements.updated),
            skipped=", ".join(acknowledgements.skipped),
        )

    def _acknowledgements_failed(self, failure: Failure, update: _ClaimUpdate) -> None:
        if failure.check(NoRespondersError):
            self.log.warn(
                "no nats-server received the claim update for account {account}: nothing "
                "subscribes to {subject} (no responders), so the NATS user in "
                "nats.usercredentials must belong to the system account",
                account=update.account[:12],
                subject=update.subject,
            )
        elif failure.check(CancelledError, NotConnectedError):
            self.log.debug(
                "stopped waiting for replies to the {update}: {error}",
                update=update.description,
                error=failure.getErrorMessage() or failure.type.__name__,
            )
        else:
            self.log.failure(
                "unexpected error while counting the replies to the {update}", failure, update=update.description
            )

    # Pending updates

    def _forget(self, update: _ClaimUpdate) -> None:
        """Remove the pending update unless a newer JWT has replaced it meanwhile."""
        if self._pending.get(update.subject) == update:
            del self._pending[update.subject]
        if not self._pending_accounts():
            self._record_pending()

    def _pending_accounts(self) -> list[str]:
        return [update.account for update in self._pending.values() if update.hash_id is None]

    def _record_pending(self) -> None:
        """Write the accounts whose updates are still pending to the journal, if there is one."""
        if self._journal is not None:
            self._journal.record(self._pending_accounts())

    def _connection_ready(self) -> None:
        if self._pending:
            self.log.info(
                "publishing {count} pending claim updates to {server}",
                count=len(self._pending),
                server=self.connection.server_url,
            )
        for update in list(self._pending.values()):
            self._send_update(update)

    def _connection_lost(self, reason: Failure) -> None:
        if self._pending:
            self._record_pending()

    def _confirm_in_flight(self) -> Deferred[None]:
        if not self.connection.connected or not self._pending:
            return succeed(None)
        server = self.connection.server_url
        flushed = self.connection.flush()
        flushed.addTimeout(self._stop_timeout, cast(IReactorTime, self.reactor))
        flushed.addErrback(self._log_flush_failure, server)
        return flushed

    def _log_flush_failure(self, failure: Failure, server: str | None) -> None:
        self.log.warn(
            "NATS server {server} did not confirm the claim updates in flight before shutdown: {error}",
            server=server,
            error=failure.getErrorMessage() or failure.type.__name__,
        )

    def _log_unpublished(self) -> None:
        activations = [update for update in self._pending.values() if update.hash_id is not None]
        if activations:
            self.log.warn(
                "{count} activation updates were never confirmed by NATS and are dropped at shutdown ({updates})",
                count=len(activations),
                updates=", ".join(update.description for update in activations),
            )

        accounts = sorted(self._pending_accounts())
        if not accounts:
            return
        self._record_pending()
        if self._journal is not None:
            self.log.warn(
                "{count} claim updates were not confirmed by NATS before shutdown "
                "(accounts {accounts}); they are recorded in {path} and published after "
                "the next start",
                count=len(accounts),
                accounts=", ".join(account[:12] for account in accounts),
                path=self._journal.path,
            )
            return
        self.log.warn(
            "{count} claim updates were never confirmed by NATS and are dropped at "
            "shutdown (accounts {accounts}); nats-servers can still fetch them over HTTP",
            count=len(accounts),
            accounts=", ".join(account[:12] for account in accounts),
        )


def count_acknowledgements(account: str, replies: Iterable[Message]) -> ClaimUpdateAcknowledgements:
    """Sort the replies of nats-servers to a claim update of *account* by outcome.

    nats-server replies with ``{"server": {"name": ...}, "data": {"account": ...,
    "code": 200, "message": "jwt updated"}}`` (or ``"jwt update skipped"`` when it has
    not loaded the account), and with ``{"server": ..., "error": {"description": ...}}``
    when it rejects the JWT. Any other reply counts as unexpected.
    """
    updated: list[str] = []
    skipped: list[str] = []
    rejected: list[tuple[str, str]] = []
    unexpected = 0
    for reply in replies:
        outcome, server, text = _classify_reply(account, reply)
        if outcome == "updated":
            updated.append(server)
        elif outcome == "skipped":
            skipped.append(server)
        elif outcome == "rejected":
            rejected.append((server, text))
        else:
            unexpected += 1
    return ClaimUpdateAcknowledgements(account, tuple(updated), tuple(skipped), tuple(rejected), unexpected)


def _classify_reply(account: str, reply: Message) -> tuple[str, str, str]:
    """Return the outcome ("updated", "skipped", "rejected" or "unexpected"), the server
    name and the message or error description of one reply to a claim update."""
    if reply.status is not None:
        return "unexpected", "?", ""
    try:
        document = json.loads(reply.payload)
    except ValueError:
        return "unexpected", "?", ""
    if not isinstance(document, dict):
        return "unexpected", "?", ""

    server = document.get("server")
    name = "?"
    if isinstance(server, dict):
        name = str(server.get("name") or server.get("id") or "?")

    error = document.get("error")
    if isinstance(error, dict):
        description = error.get("description")
        return "rejected", name, str(description) if description else json.dumps(error)

    data = document.get("data")
    if not isinstance(data, dict) or data.get("account") != account or data.get("code") != 200:
        return "unexpected", name, ""
    message = data.get("message")
    if not isinstance(message, str):
        return "unexpected", name, ""
    return ("skipped" if "skipped" in message else "updated"), name, message


def _check_account(account: str) -> None:
    if not ACCOUNT_KEY_PATTERN.fullmatch(account):
        raise ValueError(f"invalid account public key {account!r}")
