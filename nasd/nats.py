"""A small NATS client on Twisted and the service that publishes account claim updates
with it, so that running nats-servers apply each account JWT that nasd stores."""

from __future__ import annotations

import json
import random
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from typing import Protocol as TypingProtocol
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import (
    Protocol,
    ReconnectingClientFactory,
    connectionDone,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

import nasd
from nasd.creds import Credentials, CredentialsFile
from nasd.journal import PendingJournal
from nasd.logs import observer

DEFAULT_PORT = 4222

# nats-server's MAX_CONTROL_LINE_SIZE: the longest protocol line, without CRLF, that
# the client accepts.
# NOTE: nats-server does not limit the INFO lines it sends, so an INFO with a very long
# connect_urls list (a large cluster) would exceed this and be treated as an error.
MAX_CONTROL_LINE = 4096

# nats-server's default max_payload (MAX_PAYLOAD_SIZE), used until INFO gives the value.
DEFAULT_MAX_PAYLOAD = 1024 * 1024

CLAIMS_UPDATE_SUBJECT = "$SYS.ACCOUNT.{account}.CLAIMS.UPDATE"

_ACCOUNT_KEY = re.compile(r"A[A-Z2-7]{55}")
_CONTROL_LINE = re.compile(rb"\s*(\S+)\s*(.*?)\s*", re.DOTALL)
_WHITESPACE = re.compile(r"\s")

# -ERR texts (lower-cased) after which nats-server keeps the connection open.
_NON_FATAL_ERRORS = (
    "permissions violation",
    "maximum subscriptions exceeded",
    "invalid subject",
    "invalid publish subject",
)


class ClientReactor(TypingProtocol):
    """The parts of IReactorTCP and IReactorTime that the NATS client uses."""

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = ...,
        bindAddress: Any = ...,
    ) -> IConnector: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall: ...

    def seconds(self) -> float: ...


class NATSError(Exception):
    """Base class of the errors that the NATS client raises or errbacks with."""


class NATSNotConnectedError(NATSError):
    """A publish or flush was requested without an established connection."""


class NATSConnectionClosedError(NATSError):
    """The connection closed before the PONG to a PING arrived."""


class NATSServerError(NATSError):
    """The server sent -ERR for an operation sent before a flush, but kept the connection."""


class MaxPayloadExceededError(NATSError, ValueError):
    """A payload is larger than the server's max_payload."""


@dataclass(frozen=True)
class ServerAddress:
    """A NATS server to connect to. ``tls`` is set for ``tls://`` URLs."""

    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        """The address as a URL, such as ``nats://127.0.0.1:4222``."""
        scheme = "tls" if self.tls else "nats"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_server(url: str) -> ServerAddress:
    """Parse ``nats://host:port``, ``tls://host:port``, ``host:port`` or ``host``.

    The port defaults to 4222. Raises ValueError naming the URL when it is malformed,
    has an unsupported scheme, or contains a user name, password, path or query.
    """
    text = url.strip()
    if not text:
        raise ValueError("invalid NATS server URL: the URL is empty")
    if "://" not in text:
        text = "nats://" + text

    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"invalid NATS server URL {url!r}: {error}") from None

    scheme = parts.scheme.lower()
    if scheme not in ("nats", "tls"):
        raise ValueError(f"invalid NATS server URL {url!r}: unsupported scheme {scheme}://, use nats:// or tls://")
    if parts.username is not None or parts.password is not None:
        # The URL is not repeated because it may contain a password.
        raise ValueError(
            f"invalid NATS server URL for host {parts.hostname}: user names and passwords "
            "in the URL are not supported, use a creds file"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid NATS server URL {url!r}: a path, query or fragment is not allowed")
    if not parts.hostname:
        raise ValueError(f"invalid NATS server URL {url!r}: the host is missing")
    if port == 0:
        raise ValueError(f"invalid NATS server URL {url!r}: port 0 is not allowed")

    return ServerAddress(parts.hostname, port or DEFAULT_PORT, tls=scheme == "tls")


def parse_server_url(url: str) -> tuple[str, int]:
    """Return the host and port of a NATS server URL, as parsed by parse_server."""
    address = parse_server(url)
    return address.host, address.port


@dataclass(frozen=True)
class ClientOptions:
    """Settings that apply to every connection of a NATS client.

    ``connect_timeout`` (seconds) bounds both the TCP connect and the handshake up to
    the PONG to the first PING. Every ``ping_interval`` seconds the client sends a
    PING, and it closes the connection as stale when a PING gets no PONG for a whole
    interval. With ``trace`` every protocol line is logged at debug level.

    With a CredentialsFile, each connection uses the file as it is then, so replaced
    creds take effect at the next reconnection without a restart.
    """

    credentials: Credentials | CredentialsFile | None = None
    name: str = "nasd"
    connect_timeout: float = 5.0
    ping_interval: float = 120.0
    trace: bool = False


@dataclass(frozen=True)
class Message:
    """A message that the server delivered with MSG."""

    subject: str
    sid: str
    reply: str | None
    payload: bytes


@dataclass
class _PongWaiter:
    """A PING waiting for its PONG, and the -ERR texts received while it waited."""

    deferred: Deferred[None]
    sent_at: float
    errors: list[str] = field(default_factory=list)


class _ProtocolViolation(Exception):
    """Input from the server that the client cannot parse."""


class NATSClientProtocol(Protocol):
    """One client connection to a NATS server.

    The server speaks first with INFO. The client then sends CONNECT (with the user JWT
    and the signed nonce when credentials are set) and a PING, and the connection is
    established when the matching PONG arrives. ``on_ready`` is called then, and
    ``on_lost`` when the connection closes. Malformed input from the server is logged
    and closes the connection instead of raising from dataReceived.
    """

    log = Logger(observer=observer)

    def __init__(
        self,
        clock: ClientReactor,
        options: ClientOptions,
        server_url: str,
        on_ready: Callable[[NATSClientProtocol], object] | None = None,
        on_lost: Callable[[NATSClientProtocol, Failure], object] | None = None,
        on_message: Callable[[Message], object] | None = None,
    ) -> None:
        self.clock = clock
        self.options = options
        self.server_url = server_url
        self.server_info: dict[str, Any] = {}
        self.established = False
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._on_message = on_message
        self._buffer = bytearray()
        self._message_header: tuple[str, str, str | None, int] | None = None
        self._pong_waiters: deque[_PongWaiter] = deque()
        self._closed_waiters: list[Deferred[None]] = []
        self._connect_sent = False
        self._closing = False
        self._lost = False
        self._handshake_timer: IDelayedCall | None = None
        self._ping_timer: IDelayedCall | None = None

    @property
    def max_payload(self) -> int:
        """The largest payload in bytes that the server accepts, from INFO."""
        value = self.server_info.get("max_payload")
        if isinstance(value, int) and value > 0:
            return value
        return DEFAULT_MAX_PAYLOAD

    @property
    def server_name(self) -> str:
        """The server's name from INFO, or its server_id when it has no name."""
        return str(self.server_info.get("server_name") or self.server_info.get("server_id", "?"))

    @property
    def server_version(self) -> str:
        """The nats-server version from INFO."""
        return str(self.server_info.get("version", "?"))

    # Connection events

    def connectionMade(self) -> None:
        self._handshake_timer = self.clock.callLater(self.options.connect_timeout, self._handshake_timed_out)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._closing = True
        self.established = False
        self._cancel_timers()

        waiters = list(self._pong_waiters)
        self._pong_waiters.clear()
        for waiter in waiters:
            if not waiter.deferred.called:
                error = NATSConnectionClosedError(
                    f"the connection to NATS server {self.server_url} closed before "
                    f"the PONG arrived: {reason.getErrorMessage()}"
                )
                waiter.deferred.errback(error)

        closed_waiters, self._closed_waiters = self._closed_waiters, []
        for closed in closed_waiters:
            if not closed.called:
                closed.callback(None)

        if self._on_lost is not None:
            self._on_lost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        try:
            self._parse_buffer()
        except _ProtocolViolation as violation:
            self.log.error(
                "protocol error from NATS server {server}: {error}; closing the connection",
                server=self.server_url,
                error=str(violation),
            )
            self._close()

    # Public operations

    def publish(self, subject: str, payload: bytes, reply: str | None = None) -> None:
        """Send PUB. Raise MaxPayloadExceededError instead when the payload is too large.

        Also raises NATSNotConnectedError before the connection is established and
        ValueError for a subject that is empty or contains whitespace. Call flush() to
        learn when the server has processed the message.
        """
        self._require_established()
        _check_subject(subject, "subject")
        if reply is not None:
            _check_subject(reply, "reply subject")
        limit = self.max_payload
        if len(payload) > limit:
            raise MaxPayloadExceededError(
                f"payload of {len(payload)} bytes for subject {subject} exceeds the "
                f"max_payload of {limit} bytes of NATS server {self.server_url}"
            )

        fields = ["PUB", subject] + ([reply] if reply else []) + [str(len(payload))]
        self._send(" ".join(fields).encode(), payload)

    def flush(self) -> Deferred[None]:
        """Send PING and return a Deferred that fires when its PONG arrives.

        The server processes operations in order, so the PONG means that every earlier
        PUB was processed. The Deferred fails with NATSServerError when the server
        reported a non-fatal -ERR (such as a permissions violation) for one of those
        operations, and with NATSConnectionClosedError when the connection closes first.
        """
        try:
            self._require_established()
        except NATSNotConnectedError as error:
            return fail(error)
        return self._send_ping()

    def disconnect(self) -> Deferred[None]:
        """Close the connection and return a Deferred that fires once it is closed."""
        if self._lost:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._closed_waiters.append(closed)
        self._close()
        return closed

    def abort(self) -> None:
        """Close the connection at once, dropping unsent data."""
        self._closing = True
        if self.transport is not None and not self._lost:
            cast(ITCPTransport, self.transport).abortConnection()

    # Parsing

    def _parse_buffer(self) -> None:
        while not self._closing:
            if self._message_header is not None:
                if not self._take_payload():
                    return
                continue
            line = self._take_line()
            if line is None:
                return
            self._handle_line(line)

    def _take_line(self) -> bytes | None:
        """Remove and return the next control line without its line end, if complete."""
        end = self._buffer.find(b"\n", 0, MAX_CONTROL_LINE + 2)
        if end < 0:
            if len(self._buffer) > MAX_CONTROL_LINE + 1:
                raise _ProtocolViolation(f"control line longer than the maximum of {MAX_CONTROL_LINE} bytes")
            return None

        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        if len(line) > MAX_CONTROL_LINE:
            raise _ProtocolViolation(f"control line longer than the maximum of {MAX_CONTROL_LINE} bytes")
        return line

    def _take_payload(self) -> bool:
        """Deliver the pending MSG once its payload and CRLF are buffered."""
        assert self._message_header is not None
        subject, sid, reply, size = self._message_header
        if len(self._buffer) < size + 2:
            return False
        if self._buffer[size : size + 2] != b"\r\n":
            raise _ProtocolViolation(f"MSG payload of {size} bytes is not followed by CRLF")

        payload = bytes(self._buffer[:size])
        del self._buffer[: size + 2]
        self._message_header = None
        self._trace("received {size} bytes of MSG payload from {server}", size=size)
        message = Message(subject=subject, sid=sid, reply=reply, payload=payload)
        if self._on_message is not None:
            self._on_message(message)
        return True

    def _handle_line(self, line: bytes) -> None:
        self._trace("received from {server}: {line}", line=line.decode("utf-8", "replace"))
        match = _CONTROL_LINE.fullmatch(line)
        if match is None:
            return  # an empty line
        operation = match.group(1).upper()
        arguments = match.group(2)

        if operation == b"INFO":
            self._handle_info(arguments)
        elif operation == b"MSG":
            self._handle_msg(arguments)
        elif operation == b"PING":
            self._send(b"PONG")
        elif operation == b"PONG":
            self._handle_pong()
        elif operation == b"+OK":
            pass
        elif operation == b"-ERR":
            self._handle_err(arguments)
        else:
            excerpt = operation[:32].decode("ascii", "replace")
            raise _ProtocolViolation(f"unknown protocol operation {excerpt!r}")

    def _handle_info(self, arguments: bytes) -> None:
        try:
            info = json.loads(arguments)
        except ValueError:
            raise _ProtocolViolation("INFO does not contain valid JSON") from None
        if not isinstance(info, dict):
            raise _ProtocolViolation("INFO does not contain a JSON object")

        self.server_info.update(info)
        if info.get("ldm"):
            self.log.info(
                "NATS server {server} is in lame duck mode and will close the connection soon",
                server=self.server_url,
            )
        if not self._connect_sent:
            self._start_handshake(info)

    def _handle_msg(self, arguments: bytes) -> None:
        fields = arguments.split()
        if len(fields) not in (3, 4) or not fields[-1].isdigit():
            excerpt = arguments[:64].decode("utf-8", "replace")
            raise _ProtocolViolation(f"malformed MSG arguments {excerpt!r}")

        size = int(fields[-1])
        if size > self.max_payload:
            raise _ProtocolViolation(f"MSG payload of {size} bytes exceeds max_payload of {self.max_payload} bytes")
        names = [name.decode("utf-8", "replace") for name in fields[:-1]]
        reply = names[2] if len(names) == 3 else None
        self._message_header = (names[0], names[1], reply, size)

    def _handle_pong(self) -> None:
        if not self._pong_waiters:
            self.log.debug(
                "ignored a PONG from {server} that matches no PING",
                server=self.server_url,
            )
            return
        waiter = self._pong_waiters.popleft()
        if waiter.deferred.called:
            return  # cancelled, for example by a timeout
        if waiter.errors:
            waiter.deferred.errback(NATSServerError("; ".join(waiter.errors)))
        else:
            waiter.deferred.callback(None)

    def _handle_err(self, arguments: bytes) -> None:
        text = arguments.decode("utf-8", "replace").strip().strip("'")
        lowered = text.lower()

        if "authorization violation" in lowered or "authentication" in lowered:
            self._log_authentication_error(text)
            self._close()
        elif lowered.startswith(_NON_FATAL_ERRORS):
            self.log.warn(
                "NATS server {server} reported '{error}'; the connection stays open",
                server=self.server_url,
                error=text,
            )
            # The error belongs to an operation sent before the oldest PING still waiting
            # for its PONG.
            if self._pong_waiters:
                self._pong_waiters[0].errors.append(text)
        else:
            self.log.error(
                "NATS server {server} reported '{error}'; closing the connection",
                server=self.server_url,
                error=text,
            )
            self._close()

    def _log_authentication_error(self, text: str) -> None:
        credentials = self.options.credentials
        if credentials is None:
            self.log.error(
                "NATS server {server} rejected the connection with '{error}'; "
                "no creds file is configured, but the server requires one",
                server=self.server_url,
                error=text,
            )
            return
        self.log.error(
            "NATS server {server} rejected the connection with '{error}'; check the user "
            "JWT and seed in creds file {creds_file} (user {user}), and that nats-server "
            "can resolve the user's account: with a URL resolver, store the system "
            "account JWT in nasd before nats-server starts",
            server=self.server_url,
            error=text,
            creds_file=credentials.path,
            user=credentials.public_key,
        )

    # Handshake and keepalive

    def _start_handshake(self, info: dict[str, Any]) -> None:
        self._connect_sent = True
        if info.get("tls_required"):
            self.log.error(
                "NATS server {server} requires TLS (tls_required in INFO), but nasd cannot "
                "connect with TLS yet; closing the connection",
                server=self.server_url,
            )
            self._close()
            return

        connect = self._connect_fields(info.get("nonce"))
        line = "CONNECT " + json.dumps(connect, separators=(",", ":"), sort_keys=True)
        redacted = {key: "<redacted>" if key in ("jwt", "sig") else value for key, value in connect.items()}
        traced = "CONNECT " + json.dumps(redacted, separators=(",", ":"), sort_keys=True)
        self._send(line.encode(), traced_line=traced)

        handshake = self._send_ping()
        handshake.addBoth(self._handshake_answered)

    def _connect_fields(self, nonce: object) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "echo": False,
            "protocol": 1,
            "lang": "python-twisted",
            "version": nasd.__version__,
            "name": self.options.name,
            "headers": False,
        }
        credentials = self.options.credentials
        if isinstance(credentials, CredentialsFile):
            credentials = credentials.current()
        if credentials is not None:
            fields["jwt"] = credentials.jwt
            # Servers that do not use nkeys send no nonce and expect no signature.
            if isinstance(nonce, str) and nonce:
                fields["sig"] = credentials.sign_nonce(nonce)
        return fields

    def _handshake_answered(self, result: None | Failure) -> None | Failure:
        if isinstance(result, Failure):
            if result.check(NATSConnectionClosedError):
                return None  # connectionLost has already reported the cause
            if not result.check(NATSServerError):
                return result
        self._become_established()
        return None

    def _become_established(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self.established = True
        self._ping_timer = self.clock.callLater(self.options.ping_interval, self._send_keepalive)
        if self._on_ready is not None:
            self._on_ready(self)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        self.log.error(
            "NATS server {server} did not complete the handshake within {timeout} s; closing the connection",
            server=self.server_url,
            timeout=self.options.connect_timeout,
        )
        self.abort()

    def _send_keepalive(self) -> None:
        self._ping_timer = None
        interval = self.options.ping_interval
        if self._pong_waiters and self.clock.seconds() - self._pong_waiters[0].sent_at >= interval:
            self.log.error(
                "NATS server {server} did not respond to a PING within {interval} s; closing the stale connection",
                server=self.server_url,
                interval=interval,
            )
            self.abort()
            return

        keepalive = self._send_ping()
        keepalive.addErrback(_ignore_nats_error)
        self._ping_timer = self.clock.callLater(interval, self._send_keepalive)

    # Writing

    def _send_ping(self) -> Deferred[None]:
        waiter = _PongWaiter(deferred=Deferred(), sent_at=self.clock.seconds())
        self._pong_waiters.append(waiter)
        self._send(b"PING")
        return waiter.deferred

    def _send(self, line: bytes, payload: bytes | None = None, traced_line: str | None = None) -> None:
        if self.options.trace:
            if traced_line is None:
                traced_line = line.decode("utf-8", "replace")
            self._trace("sent to {server}: {line}", line=traced_line)
        assert self.transport is not None
        if payload is None:
            self.transport.write(line + b"\r\n")
        else:
            self.transport.writeSequence([line, b"\r\n", payload, b"\r\n"])

    def _trace(self, format: str, **fields: object) -> None:
        if self.options.trace:
            self.log.debug(format, server=self.server_url, **fields)

    def _require_established(self) -> None:
        if not self.established or self._closing:
            raise NATSNotConnectedError(f"not connected to NATS server {self.server_url}")

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None and not self._lost:
            self.transport.loseConnection()

    def _cancel_timers(self) -> None:
        for timer in (self._handshake_timer, self._ping_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._handshake_timer = None
        self._ping_timer = None


def _check_subject(subject: str, kind: str) -> None:
    if not subject or _WHITESPACE.search(subject):
        raise ValueError(f"invalid NATS {kind} {subject!r}: it must be non-empty without whitespace")


def _ignore_nats_error(failure: Failure) -> None:
    """Consume a failed keepalive PING, whose cause the protocol has already logged."""
    failure.trap(NATSError)


class NATSClientFactory(ReconnectingClientFactory):
    """Connect to a list of NATS servers in turn and reconnect after every failure or loss.

    Each failed attempt and each lost connection moves on to the next server in the
    list. The wait before the next attempt starts at ``reconnect_wait`` seconds and grows
    by ``factor`` (1.5) per consecutive failure up to ten times ``reconnect_wait``, with
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
    ) -> None:
        if not servers:
            raise ValueError("no NATS servers are configured")
        if reconnect_wait <= 0:
            raise ValueError(f"reconnect_wait must be more than 0 seconds, not {reconnect_wait}")
        self.reactor = reactor
        # Twisted declares clock, maxDelay and maxRetries as None or int class attributes.
        self.clock = reactor  # type: ignore[assignment]
        self.servers = tuple(servers)
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
        )
        protocol.factory = self
        self.protocol_instance = protocol
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._retry_next_server(_reason_text(reason), lost=False)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        if not self.continueTrying:
            self.log.info(
                "closed the connection to NATS server {server}",
                server=self.current_server.url,
            )
            return
        self._retry_next_server(_reason_text(reason), lost=True)

    def _connect(self) -> None:
        self._callID = None
        server = self.current_server
        self.log.info("connecting to NATS server {server}", server=server.url)
        if server.tls:
            self._retry_next_server("TLS connections are not supported yet", lost=False)
            return
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

    def _protocol_ready(self, protocol: NATSClientProtocol) -> None:
        self.delay = self.initialDelay
        self.retries = 0
        self.log.info(
            "connected to NATS server {server} (server name {server_name}, version {version})",
            server=protocol.server_url,
            server_name=protocol.server_name,
            version=protocol.server_version,
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


class ClaimUpdatePublisher(Service):
    """Publish each new account JWT on ``$SYS.ACCOUNT.<account>.CLAIMS.UPDATE``.

    The latest JWT of each account stays pending until a PONG confirms that the NATS
    server processed its PUB. Updates accepted while NATS is down, or in flight when a
    connection drops, are therefore published again on the next connection. With a
    journal, the accounts still pending are also written to disk whenever NATS is
    unreachable and at shutdown, so that the next start can queue them again.
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
    ) -> None:
        addresses = [parse_server(url) for url in servers]
        options = ClientOptions(
            credentials=credentials,
            name=name,
            connect_timeout=connect_timeout,
            ping_interval=ping_interval,
            trace=trace,
        )
        self.reactor = reactor
        self.factory = NATSClientFactory(
            reactor,
            addresses,
            options,
            reconnect_wait=reconnect_wait,
            max_reconnects=max_reconnects,
            on_ready=self._connection_ready,
            on_lost=self._connection_lost,
        )
        self._stop_timeout = stop_timeout
        self._journal = journal
        self._pending: dict[str, bytes] = {}
        self._protocol: NATSClientProtocol | None = None
        self._last_published: float | None = None

    @property
    def connected(self) -> bool:
        """Whether a connection to a NATS server is established."""
        return self._protocol is not None

    @property
    def server_url(self) -> str | None:
        """The URL of the connected NATS server, or None."""
        return self._protocol.server_url if self._protocol is not None else None

    @property
    def pending_count(self) -> int:
        """The number of accounts whose latest update is not confirmed yet."""
        return len(self._pending)

    @property
    def last_published(self) -> float | None:
        """The reactor time of the last confirmed publish, or None."""
        return self._last_published

    def startService(self) -> None:
        super().startService()
        self.factory.start()

    def stopService(self) -> Deferred[None]:
        """Wait up to ``stop_timeout`` seconds for in-flight updates, then disconnect."""
        super().stopService()
        stopped = self._confirm_in_flight()
        stopped.addCallback(lambda _: self.factory.stop(self._stop_timeout))
        stopped.addCallback(lambda _: self._log_unpublished())
        return stopped

    def publish_account_update(self, account: str, jwt: bytes) -> None:
        """Publish the account JWT now if connected, else hold it for the next connection.

        Raises ValueError when ``account`` is not an account public key, because it
        becomes part of the subject.
        """
        if not _ACCOUNT_KEY.fullmatch(account):
            raise ValueError(f"invalid account public key {account!r}")
        self._pending[account] = jwt

        protocol = self._protocol
        if protocol is None:
            self.log.info(
                "NATS is not connected; holding the claim update for account {account}",
                account=account[:12],
            )
            self._record_pending()
            return
        self._send_update(protocol, account, jwt)

    def _send_update(self, protocol: NATSClientProtocol, account: str, jwt: bytes) -> None:
        subject = CLAIMS_UPDATE_SUBJECT.format(account=account)
        try:
            protocol.publish(subject, jwt)
        except MaxPayloadExceededError as error:
            self.log.error(
                "dropped the claim update for account {account}: {error}",
                account=account[:12],
                error=str(error),
            )
            self._forget(account, jwt)
            return
        except NATSNotConnectedError:
            return  # the update stays pending for the next connection

        confirmed = protocol.flush()
        confirmed.addCallbacks(
            self._update_confirmed,
            self._update_not_confirmed,
            callbackArgs=(account, jwt, protocol.server_url),
            errbackArgs=(account, protocol.server_url),
        )

    def _update_confirmed(self, _: None, account: str, jwt: bytes, server: str) -> None:
        self._last_published = self.reactor.seconds()
        self._forget(account, jwt)
        self.log.info(
            "published claim update for account {account} to {server}",
            account=account[:12],
            server=server,
        )

    def _update_not_confirmed(self, failure: Failure, account: str, server: str) -> None:
        if failure.check(NATSServerError):
            self.log.error(
                "NATS server {server} rejected the claim update for account {account}: "
                "{error}; it stays pending until the next connection",
                server=server,
                account=account[:12],
                error=failure.getErrorMessage(),
            )
        elif failure.check(NATSError):
            self.log.info(
                "the claim update for account {account} was not confirmed by {server} "
                "before the connection closed; it stays pending until the next connection",
                account=account[:12],
                server=server,
            )
        else:
            self.log.failure(
                "unexpected error while publishing the claim update for account {account}",
                failure,
                account=account[:12],
            )

    def _forget(self, account: str, jwt: bytes) -> None:
        """Remove the pending update unless a newer JWT has replaced it meanwhile."""
        if self._pending.get(account) == jwt:
            del self._pending[account]
        if not self._pending:
            self._record_pending()

    def _record_pending(self) -> None:
        """Write the accounts still pending to the journal, if there is one."""
        if self._journal is not None:
            self._journal.record(self._pending)

    def _connection_ready(self, protocol: NATSClientProtocol) -> None:
        self._protocol = protocol
        if self._pending:
            self.log.info(
                "publishing {count} pending claim updates to {server}",
                count=len(self._pending),
                server=protocol.server_url,
            )
        for account, jwt in list(self._pending.items()):
            self._send_update(protocol, account, jwt)

    def _connection_lost(self, protocol: NATSClientProtocol, reason: Failure) -> None:
        if self._protocol is protocol:
            self._protocol = None
        if self._pending:
            self._record_pending()

    def _confirm_in_flight(self) -> Deferred[None]:
        protocol = self._protocol
        if protocol is None or not self._pending:
            return succeed(None)
        flushed = protocol.flush()
        flushed.addTimeout(self._stop_timeout, cast(IReactorTime, self.reactor))
        flushed.addErrback(self._log_flush_failure, protocol.server_url)
        return flushed

    def _log_flush_failure(self, failure: Failure, server: str) -> None:
        self.log.warn(
            "NATS server {server} did not confirm the claim updates in flight before shutdown: {error}",
            server=server,
            error=failure.getErrorMessage() or failure.type.__name__,
        )

    def _log_unpublished(self) -> None:
        if not self._pending:
            return
        self._record_pending()
        if self._journal is not None:
            self.log.warn(
                "{count} claim updates were not confirmed by NATS before shutdown "
                "(accounts {accounts}); they are recorded in {path} and published after "
                "the next start",
                count=len(self._pending),
                accounts=", ".join(account[:12] for account in sorted(self._pending)),
                path=self._journal.path,
            )
            return
        self.log.warn(
            "{count} claim updates were never confirmed by NATS and are dropped at "
            "shutdown (accounts {accounts}); nats-servers can still fetch them over HTTP",
            count=len(self._pending),
            accounts=", ".join(account[:12] for account in sorted(self._pending)),
        )


def _reason_text(reason: Failure) -> str:
    """Return the error message of a connection failure without a trailing period."""
    return reason.getErrorMessage().rstrip(".")
