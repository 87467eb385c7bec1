"""Reconnection across configured and discovered servers, and the connection service that
the rest of nasd uses to publish, subscribe and send requests."""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IReactorTime,
)
from twisted.internet.protocol import (
    ReconnectingClientFactory,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from nasd.logs import observer
from nasd.nats.protocol import (
    DEFAULT_MAX_PAYLOAD,
    NO_RESPONDERS_STATUS,
    ClientOptions,
    ClientReactor,
    Message,
    NATSClientProtocol,
    NoRespondersError,
    NotConnectedError,
    RequestTimeoutError,
    ServerAddress,
    check_subject,
    parse_server,
    reason_text,
)

# Reconnection and discovery


class NATSClientFactory(ReconnectingClientFactory):
    """Connect to a list of NATS servers in turn and reconnect after every failure or loss.

    Each failed attempt and each lost connection moves on to the next server in the
    list. The servers that a connected server advertises in the ``connect_urls`` of its
    INFO (the other members of its cluster) join the end of the list, with the scheme
    of the server that advertised them, and stay there until nasd restarts. TLS
    verifies each server against the host it is reached at, so a discovered IP address
    must be named in the server certificate.

    The wait before the next attempt starts at ``reconnect_wait`` seconds and grows by
    ``factor`` (1.5) per consecutive failure up to ten times ``reconnect_wait``, with
    ±10% random jitter so that several nasd instances do not reconnect in step. The wait
    and the count of failures reset when a connection is established (the PONG to the
    first PING), not when TCP connects, so a server that rejects the credentials is
    retried with the growing wait. After ``max_reconnects`` consecutive failures the
    factory gives up (a negative value retries forever).
    """

    log = Logger(observer=observer)
    noisy = False
    factor = 1.5
    jitter = 0.1

    def __init__(
        self,
        reactor: ClientReactor,
        servers: Sequence[ServerAddress],
        options: ClientOptions,
        reconnect_wait: float,
        max_reconnects: int,
        on_ready: Callable[[NATSClientProtocol], object] | None = None,
        on_lost: Callable[[NATSClientProtocol, Failure], object] | None = None,
        on_message: Callable[[Message], object] | None = None,
    ) -> None:
        if not servers:
            raise ValueError("no NATS servers are configured")
        if reconnect_wait <= 0:
            raise ValueError(f"reconnect_wait must be more than 0 seconds, not {reconnect_wait}")
        self.reactor = reactor
        # Twisted declares clock, maxDelay and maxRetries as None or int class attributes.
        self.clock = reactor  # type: ignore[assignment]
        self.servers = list(servers)
        self.options = options
        self.initialDelay = reconnect_wait
        self.delay = reconnect_wait
        self.maxDelay = reconnect_wait * 10  # type: ignore[assignment]
        self.maxRetries = None if max_reconnects < 0 else max_reconnects  # type: ignore[assignment]
        self.gave_up = False
        self.protocol_instance: NATSClientProtocol | None = None
        self._server_index = 0
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._on_message = on_message

    @property
    def current_server(self) -> ServerAddress:
        """The server of the current or next connection attempt."""
        return self.servers[self._server_index]

    def start(self) -> None:
        """Start connecting to the first server in the list."""
        self.continueTrying = 1
        self.gave_up = False
        self.delay = self.initialDelay
        self.retries = 0
        self._server_index = 0
        self._connect()

    def stop(self, timeout: float) -> Deferred[None]:
        """Stop retrying and close the connection, aborting it after ``timeout`` seconds.

        The Deferred fires when the connection is closed.
        """
        self.stopTrying()
        protocol = self.protocol_instance
        if protocol is None:
            return succeed(None)

        closed = protocol.disconnect()
        closed.addTimeout(timeout, cast(IReactorTime, self.reactor))
        closed.addErrback(self._abort_after_timeout, protocol)
        return closed

    def buildProtocol(self, addr: IAddress | None) -> NATSClientProtocol:
        protocol = NATSClientProtocol(
            self.reactor,
            self.options,
            server_url=self.current_server.url,
            on_ready=self._protocol_ready,
            on_lost=self._protocol_lost,
            on_message=self._on_message,
            on_info=self._protocol_info,
        )
        protocol.factory = self
        self.protocol_instance = protocol
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._retry_next_server(reason_text(reason), lost=False)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        if not self.continueTrying:
            self.log.info(
                "closed the connection to NATS server {server}",
                server=self.current_server.url,
            )
            return
        self._retry_next_server(reason_text(reason), lost=True)

    def _connect(self) -> None:
        self._callID = None
        server = self.current_server
        self.log.info("connecting to NATS server {server}", server=server.url)
        self.connector = self.reactor.connectTCP(  # type: ignore[assignment]
            server.host, server.port, self, timeout=self.options.connect_timeout
        )

    def _retry_next_server(self, reason: str, lost: bool) -> None:
        if not self.continueTrying:
            return
        server = self.current_server.url
        self._server_index = (self._server_index + 1) % len(self.servers)
        self.retries += 1
        event = "lost the connection to" if lost else "failed to connect to"

        if self.maxRetries is not None and self.retries > self.maxRetries:
            self.gave_up = True
            self.continueTrying = 0
            self.log.error(
                "{event} NATS server {server}: {reason}; giving up after {failures} "
                "consecutive failures (max_reconnects is {max_reconnects}), so claim "
                "updates stay pending until nasd restarts",
                event=event,
                server=server,
                reason=reason,
                failures=self.retries,
                max_reconnects=self.maxRetries,
            )
            return

        delay = self._next_delay()
        self.log.warn(
            "{event} NATS server {server}: {reason}; trying {next_server} in {delay:.1f} s "
            "(consecutive failure {failures})",
            event=event,
            server=server,
            reason=reason,
            next_server=self.current_server.url,
            delay=delay,
            failures=self.retries,
        )
        self._callID = self.reactor.callLater(delay, self._connect)  # type: ignore[assignment]

    def _next_delay(self) -> float:
        delay = self.delay
        if self.jitter:
            delay *= random.uniform(1 - self.jitter, 1 + self.jitter)
        self.delay = min(self.delay * self.factor, self.maxDelay)
        return delay

    def _protocol_info(self, protocol: NATSClientProtocol, info: dict[str, Any]) -> None:
        """Add the servers in the ``connect_urls`` of an INFO to the list, once each."""
        urls = info.get("connect_urls")
        if not isinstance(urls, list):
            return
        known = {(server.host, server.port) for server in self.servers}
        discovered = []
        for url in urls:
            try:
                address = parse_server(url) if isinstance(url, str) else None
            except ValueError:
                address = None
            if address is None:
                self.log.warn(
                    "ignored the invalid connect_urls entry {url!r} from NATS server {server}",
                    url=url,
                    server=protocol.server_url,
                )
                continue
            if (address.host, address.port) in known:
                continue
            known.add((address.host, address.port))
            discovered.append(ServerAddress(address.host, address.port, tls=protocol.server.tls))

        if discovered:
            self.servers.extend(discovered)
            self.log.info(
                "discovered NATS servers: {servers} (advertised by {server})",
                servers=", ".join(server.url for server in discovered),
                server=protocol.server_url,
            )

    def _protocol_ready(self, protocol: NATSClientProtocol) -> None:
        self.delay = self.initialDelay
        self.retries = 0
        self.log.info(
            "connected to NATS server {server} (server name {server_name}, version {version}{tls})",
            server=protocol.server_url,
            server_name=protocol.server_name,
            version=protocol.server_version,
            tls=", TLS" if protocol.tls_started else "",
        )
        if self._on_ready is not None:
            self._on_ready(protocol)

    def _protocol_lost(self, protocol: NATSClientProtocol, reason: Failure) -> None:
        if self.protocol_instance is protocol:
            self.protocol_instance = None
        if self._on_lost is not None:
            self._on_lost(protocol, reason)

    def _abort_after_timeout(self, failure: Failure, protocol: NATSClientProtocol) -> None:
        failure.trap(TimeoutError, CancelledError)
        self.log.warn(
            "NATS server {server} did not close the connection in time; aborting it",
            server=protocol.server_url,
        )
        protocol.abort()


# The connection service


@dataclass(eq=False)
class Subscription:
    """A subscription of a NATSConnection, sent again after every reconnection until
    it is unsubscribed. ``callback`` gets each Message delivered to it."""

    sid: str
    subject: str
    queue: str | None
    callback: Callable[[Message], object]
    active: bool = True


@dataclass(eq=False)
class _Request:
    """A request waiting for replies on its inbox subject.

    ``replies`` collects every reply for request_many and is None for a single request.
    """

    subject: str
    timeout: float
    deferred: Deferred[Any]
    replies: list[Message] | None
    timer: IDelayedCall | None = None


class NATSConnection(Service):
    """A NATS connection that survives server failures: publish, subscribe and request.

    The factory keeps connecting to the configured and discovered servers. Subscriptions
    are sent again on every new connection. Requests share one wildcard subscription,
    ``_INBOX.<random>.*``, and each gets its own reply subject under it. Publishing
    needs an established connection, because nothing is buffered while disconnected.
    Users keep what they must send again and send it from a callback given to
    add_ready_callback.
    """

    log = Logger(observer=observer)

    def __init__(
        self,
        reactor: ClientReactor,
        servers: Sequence[str],
        options: ClientOptions | None = None,
        reconnect_wait: float = 1.0,
        max_reconnects: int = -1,
        stop_timeout: float = 2.0,
    ) -> None:
        self.reactor = reactor
        self.factory = NATSClientFactory(
            reactor,
            [parse_server(url) for url in servers],
            options or ClientOptions(),
            reconnect_wait=reconnect_wait,
            max_reconnects=max_reconnects,
            on_ready=self._protocol_ready,
            on_lost=self._protocol_lost,
            on_message=self._dispatch,
        )
        self.inbox_prefix = f"_INBOX.{secrets.token_hex(11)}"
        self._stop_timeout = stop_timeout
        self._protocol: NATSClientProtocol | None = None
        self._subscriptions: dict[str, Subscription] = {}
        self._next_sid = 1
        self._inbox: Subscription | None = None
        self._requests: dict[str, _Request] = {}
        self._next_request = 1
        self._ready_callbacks: list[Callable[[], object]] = []
        self._lost_callbacks: list[Callable[[Failure], object]] = []

    @property
    def connected(self) -> bool:
        """Whether a connection to a NATS server is established."""
        return self._protocol is not None

    @property
    def server_url(self) -> str | None:
        """The URL of the connected NATS server, or None."""
        return self._protocol.server_url if self._protocol is not None else None

    @property
    def server_name(self) -> str | None:
        """The name of the connected NATS server from its INFO, or None."""
        return self._protocol.server_name if self._protocol is not None else None

    @property
    def max_payload(self) -> int:
        """The max_payload of the connected server, or nats-server's default when disconnected."""
        return self._protocol.max_payload if self._protocol is not None else DEFAULT_MAX_PAYLOAD

    def add_ready_callback(self, callback: Callable[[], object]) -> None:
        """Call *callback* each time a connection is established, after the
        subscriptions have been sent again on it."""
        self._ready_callbacks.append(callback)

    def add_lost_callback(self, callback: Callable[[Failure], object]) -> None:
        """Call *callback* with the reason each time an established connection is lost."""
        self._lost_callbacks.append(callback)

    def startService(self) -> None:
        super().startService()
        self.factory.start()

    def stopService(self) -> Deferred[None]:
        """Cancel the requests still waiting, then close the connection within ``stop_timeout`` seconds."""
        super().stopService()
        for request in list(self._requests.values()):
            request.deferred.cancel()
        return self.factory.stop(self._stop_timeout)

    # Publishing and subscribing

    def publish(self, subject: str, payload: bytes, reply: str | None = None) -> None:
        """Send a message now; raise NotConnectedError when no connection is established.

        Also raises MaxPayloadExceededError for a payload over the server's max_payload
        and ValueError for an empty subject or one with whitespace.
        """
        self._require_protocol().publish(subject, payload, reply)

    def flush(self) -> Deferred[None]:
        """Return a Deferred that fires once the server has processed everything sent so far.

        It fails with NotConnectedError when no connection is established, and as
        NATSClientProtocol.flush describes otherwise.
        """
        if self._protocol is None:
            return fail(self._not_connected())
        return self._protocol.flush()

    def subscribe(self, subject: str, callback: Callable[[Message], object], queue: str | None = None) -> Subscription:
        """Subscribe *callback* to *subject* (wildcards allowed), in the queue group *queue* if given.

        The SUB is sent now when connected, and on every later connection. Raises
        ValueError for an empty subject or queue group, or one that contains whitespace.
        An exception raised by the callback is logged and does not affect the connection.
        """
        check_subject(subject, "subject")
        if queue is not None:
            check_subject(queue, "queue group")
        subscription = Subscription(str(self._next_sid), subject, queue, callback)
        self._next_sid += 1
        self._subscriptions[subscription.sid] = subscription
        if self._protocol is not None:
            self._protocol.subscribe(subject, subscription.sid, queue)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop the subscription; messages for it that are already on the way are dropped."""
        if self._subscriptions.pop(subscription.sid, None) is None:
            return
        subscription.active = False
        if self._protocol is not None:
            self._protocol.unsubscribe(subscription.sid)

    # Requests

    def request(self, subject: str, payload: bytes, timeout: float) -> Deferred[Message]:
        """Publish a request and return a Deferred that fires with the first reply.

        The Deferred fails with NoRespondersError when nats-server reports that no
        subscriber received the request, RequestTimeoutError after *timeout* seconds
        without a reply, and NotConnectedError when no connection is established. A
        reply still arrives when the connection changes meanwhile, if the responder
        sends it after the inbox subscription is back. Raises MaxPayloadExceededError
        and ValueError as publish does.
        """
        return cast("Deferred[Message]", self._start_request(subject, payload, timeout, collect=False))

    def request_many(self, subject: str, payload: bytes, window: float) -> Deferred[list[Message]]:
        """Publish a request and return a Deferred that fires with every reply received
        within *window* seconds, possibly none.

        The Deferred fails early with NoRespondersError or NotConnectedError, and raises
        as request does.
        """
        return cast("Deferred[list[Message]]", self._start_request(subject, payload, window, collect=True))

    def _start_request(self, subject: str, payload: bytes, timeout: float, collect: bool) -> Deferred[Any]:
        if timeout <= 0:
            raise ValueError(f"a request timeout must be more than 0 seconds, not {timeout}")
        protocol = self._protocol
        if protocol is None:
            return fail(self._not_connected())

        token = str(self._next_request)
        reply = f"{self.inbox_prefix}.{token}"
        # The inbox SUB goes out before the PUB, so the server routes every reply to it.
        protocol.check_publish(subject, payload, reply)
        self._subscribe_inbox()
        self._next_request += 1
        protocol.publish(subject, payload, reply)

        deferred: Deferred[Any] = Deferred(lambda _: self._forget_request(token))
        request = _Request(subject, timeout, deferred, replies=[] if collect else None)
        request.timer = self.reactor.callLater(timeout, self._request_expired, token)
        self._requests[token] = request
        return deferred

    def _subscribe_inbox(self) -> None:
        if self._inbox is None:
            self._inbox = self.subscribe(f"{self.inbox_prefix}.*", self._inbox_message)

    def _inbox_message(self, message: Message) -> None:
        token = message.subject[len(self.inbox_prefix) + 1 :]
        request = self._requests.get(token)
        if request is None:
            self.log.debug("ignored a reply on {subject} that arrived after its request ended", subject=message.subject)
            return

        if message.status == NO_RESPONDERS_STATUS:
            self._forget_request(token)
            request.deferred.errback(NoRespondersError(f"no subscriber received the request on {request.subject}"))
        elif request.replies is None:
            self._forget_request(token)
            request.deferred.callback(message)
        else:
            request.replies.append(message)

    def _request_expired(self, token: str) -> None:
        request = self._requests.pop(token)
        request.timer = None
        if request.replies is not None:
            request.deferred.callback(request.replies)
            return
        error = RequestTimeoutError(f"no reply to the request on {request.subject} within {request.timeout} s")
        request.deferred.errback(error)

    def _forget_request(self, token: str) -> None:
        request = self._requests.pop(token, None)
        if request is not None and request.timer is not None and request.timer.active():
            request.timer.cancel()

    # Connection events

    def _dispatch(self, message: Message) -> None:
        subscription = self._subscriptions.get(message.sid)
        if subscription is None:
            self.log.debug(
                "ignored a message on {subject} for subscription id {sid}, which is unsubscribed",
                subject=message.subject,
                sid=message.sid,
            )
            return
        try:
            subscription.callback(message)
        except Exception:
            self.log.failure(
                "the callback of the subscription to {subject} failed on a message on {message_subject}",
                subject=subscription.subject,
                message_subject=message.subject,
            )

    def _protocol_ready(self, protocol: NATSClientProtocol) -> None:
        self._protocol = protocol
        for subscription in self._subscriptions.values():
            protocol.subscribe(subscription.subject, subscription.sid, subscription.queue)
        for ready in list(self._ready_callbacks):
            try:
                ready()
            except Exception:
                self.log.failure("a callback for the new connection to {server} failed", server=protocol.server_url)

    def _protocol_lost(self, protocol: NATSClientProtocol, reason: Failure) -> None:
        if self._protocol is not protocol:
            return  # it was never established
        self._protocol = None
        for lost in list(self._lost_callbacks):
            try:
                lost(reason)
            except Exception:
                self.log.failure("a callback for the lost connection to {server} failed", server=protocol.server_url)

    def _require_protocol(self) -> NATSClientProtocol:
        if self._protocol is None:
            raise self._not_connected()
        return self._protocol

    def _not_connected(self) -> NotConnectedError:
        servers = ", ".join(server.url for server in self.factory.servers)
        return NotConnectedError(f"not connected to any NATS server (trying {servers})")
