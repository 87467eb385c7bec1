"""One connection to a NATS server: the NATS client protocol on Twisted (TLS upgrade,
CONNECT with the signed nonce, PING/PONG, PUB, SUB, MSG and HMSG)."""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from typing import Protocol as TypingProtocol
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IHandshakeListener,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import (
    Protocol,
    connectionDone,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import nasd
from nasd.creds import Credentials, CredentialsFile
from nasd.logs import observer
from nasd.nats.tls import ClientTLS

DEFAULT_PORT = 4222

# nats-server's MAX_CONTROL_LINE_SIZE: the longest protocol line, without CRLF, that
# the client accepts.
MAX_CONTROL_LINE = 4096

# nats-server does not limit the INFO lines it sends, and the connect_urls of a large
# cluster can make one longer than MAX_CONTROL_LINE, so INFO gets a limit of its own.
MAX_INFO_LINE = 256 * 1024

# nats-server's default max_payload (MAX_PAYLOAD_SIZE), used until INFO gives the value.
DEFAULT_MAX_PAYLOAD = 1024 * 1024

CLAIMS_UPDATE_SUBJECT = "$SYS.ACCOUNT.{account}.CLAIMS.UPDATE"
ACTIVATION_UPDATE_SUBJECT = "$SYS.ACCOUNT.{account}.CLAIMS.ACTIVATE.{hash_id}"

# The status that nats-server puts in the header of the reply to a request that no
# subscriber received, when the client sent no_responders in CONNECT.
NO_RESPONDERS_STATUS = 503

ACCOUNT_KEY_PATTERN = re.compile(r"A[A-Z2-7]{55}")
_CONTROL_LINE = re.compile(rb"\s*(\S+)\s*(.*?)\s*", re.DOTALL)
_WHITESPACE = re.compile(r"\s")
SUBJECT_TOKEN_PATTERN = re.compile(r"[^\s.*>]+")
_HEADER_VERSION = "NATS/1.0"

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


class NotConnectedError(NATSError):
    """A publish, subscribe, flush or request was made without an established connection."""


class NATSConnectionClosedError(NATSError):
    """The connection closed before the PONG to a PING arrived."""


class NATSServerError(NATSError):
    """The server sent -ERR for an operation sent before a flush, but kept the connection."""


class NoRespondersError(NATSError):
    """nats-server reported that no subscriber received a request (status 503)."""


class RequestTimeoutError(NATSError):
    """No reply to a request arrived within its timeout."""


class MaxPayloadExceededError(NATSError, ValueError):
    """A payload is larger than the server's max_payload."""


# Server addresses


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


# Options and messages


@dataclass(frozen=True)
class ClientOptions:
    """Settings that apply to every connection of a NATS client.

    ``connect_timeout`` (seconds) bounds both the TCP connect and the handshake, TLS
    included, up to the PONG to the first PING. Every ``ping_interval`` seconds the
    client sends a PING, and it closes the connection as stale when a PING gets no PONG
    for a whole interval. With ``trace`` every protocol line is logged at debug level.

    With ``tls`` set, every connection must use TLS. Without it, TLS is used for
    ``tls://`` servers and for servers that require it, verified against the platform's
    trust store.

    With a CredentialsFile, each connection uses the file as it is then, so replaced
    creds take effect at the next reconnection without a restart.
    """

    credentials: Credentials | CredentialsFile | None = None
    name: str = "nasd"
    connect_timeout: float = 5.0
    ping_interval: float = 120.0
    trace: bool = False
    tls: ClientTLS | None = None


@dataclass(frozen=True)
class Message:
    """A message that the server delivered with MSG or HMSG.

    ``status`` and ``description`` come from the header line ``NATS/1.0 <status>
    <description>`` of an HMSG, and ``headers`` keeps the header fields in order.
    """

    subject: str
    sid: str
    reply: str | None
    payload: bytes
    headers: tuple[tuple[str, str], ...] = ()
    status: int | None = None
    description: str = ""

    def header(self, name: str) -> str | None:
        """Return the first value of the header field *name* (matched exactly), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def parse_headers(block: bytes) -> tuple[int | None, str, tuple[tuple[str, str], ...]]:
    """Parse an HMSG header block into its status, description and fields.

    The block starts with ``NATS/1.0``, optionally followed by a three-digit status and
    a description, then ``Name: Value`` lines, and ends with an empty line. Raises
    ValueError for a block in another form.
    """
    lines = block.decode("utf-8", "replace").split("\r\n")
    first = lines[0]
    if first != _HEADER_VERSION and not first.startswith(_HEADER_VERSION + " "):
        raise ValueError(f"the header block starts with {first[:40]!r} instead of {_HEADER_VERSION}")

    status = None
    code, _, description = first[len(_HEADER_VERSION) :].strip().partition(" ")
    if code:
        if len(code) != 3 or not code.isdigit():
            raise ValueError(f"invalid status {code[:20]!r} in the header line")
        status = int(code)

    fields = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise ValueError(f"invalid header line {line[:40]!r}")
        fields.append((name.strip(), value.strip()))
    return status, description.strip(), tuple(fields)


@dataclass
class _PongWaiter:
    """A PING waiting for its PONG, and the -ERR texts received while it waited."""

    deferred: Deferred[None]
    sent_at: float
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Frame:
    """The control line of a MSG or HMSG whose payload has not fully arrived.

    ``size`` counts the header block and the payload; ``header_size`` is None for MSG.
    """

    subject: str
    sid: str
    reply: str | None
    size: int
    header_size: int | None


class _ProtocolViolation(Exception):
    """Input from the server that the client cannot parse."""


# One connection


@implementer(IHandshakeListener)
class NATSClientProtocol(Protocol):
    """One client connection to a NATS server.

    The server speaks first with INFO. When TLS is required (by the server, the
    ``tls://`` URL or the TLS options), the client upgrades the connection right after
    this plaintext INFO, and sends nothing more until the server certificate is
    verified. A client that requires TLS closes the connection to a server that does
    not offer it. The client then sends CONNECT (with the user JWT and the signed nonce
    when credentials are set) and a PING, and the connection is established when the
    matching PONG arrives. ``on_ready`` is called then, and ``on_lost`` when the
    connection closes; ``on_info`` gets every INFO, ``on_message`` every MSG and HMSG.
    Malformed input from the server is logged and closes the connection instead of
    raising from dataReceived.
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
        on_info: Callable[[NATSClientProtocol, dict[str, Any]], object] | None = None,
    ) -> None:
        self.clock = clock
        self.options = options
        self.server = parse_server(server_url)
        self.server_url = server_url
        self.server_info: dict[str, Any] = {}
        self.established = False
        self.tls_started = False
        self._tls_handshake_done = False
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._on_message = on_message
        self._on_info = on_info
        self._buffer = bytearray()
        self._frame: _Frame | None = None
        self._pong_waiters: deque[_PongWaiter] = deque()
        self._closed_waiters: list[Deferred[None]] = []
        self._handshake_started = False
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
        closed_by_client = self._closing
        self._lost = True
        self._closing = True
        if self.tls_started and not self.established and not closed_by_client:
            self._log_tls_failure(reason)
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

    def handshakeCompleted(self) -> None:
        """Send CONNECT once the TLS handshake has verified the server certificate."""
        self._tls_handshake_done = True
        self._trace("TLS handshake with {server} completed")
        if not self._closing:
            self._send_connect()

    # Public operations

    def publish(self, subject: str, payload: bytes, reply: str | None = None) -> None:
        """Send PUB. Raise MaxPayloadExceededError instead when the payload is too large.

        Also raises NotConnectedError before the connection is established and
        ValueError for a subject that is empty or contains whitespace. Call flush() to
        learn when the server has processed the message.
        """
        self.check_publish(subject, payload, reply)
        fields = ["PUB", subject] + ([reply] if reply else []) + [str(len(payload))]
        self._send(" ".join(fields).encode(), payload)

    def check_publish(self, subject: str, payload: bytes, reply: str | None = None) -> None:
        """Raise the error that publish() would raise for these arguments, without sending anything."""
        self._require_established()
        check_subject(subject, "subject")
        if reply is not None:
            check_subject(reply, "reply subject")
        limit = self.max_payload
        if len(payload) > limit:
            raise MaxPayloadExceededError(
                f"payload of {len(payload)} bytes for subject {subject} exceeds the "
                f"max_payload of {limit} bytes of NATS server {self.server_url}"
            )

    def subscribe(self, subject: str, sid: str, queue: str | None = None) -> None:
        """Send SUB for *subject* (wildcards allowed) with the subscription id *sid*.

        Raises NotConnectedError before the connection is established and ValueError for
        an empty subject, queue group or sid, or one that contains whitespace.
        """
        self._require_established()
        check_subject(subject, "subject")
        check_subject(sid, "subscription id")
        if queue is not None:
            check_subject(queue, "queue group")
        fields = ["SUB", subject] + ([queue] if queue else []) + [sid]
        self._send(" ".join(fields).encode())

    def unsubscribe(self, sid: str) -> None:
        """Send UNSUB for the subscription id *sid*; raises NotConnectedError when not established."""
        self._require_established()
        check_subject(sid, "subscription id")
        self._send(b"UNSUB " + sid.encode())

    def flush(self) -> Deferred[None]:
        """Send PING and return a Deferred that fires when its PONG arrives.

        The server processes operations in order, so the PONG means that every earlier
        PUB was processed. The Deferred fails with NATSServerError when the server
        reported a non-fatal -ERR (such as a permissions violation) for one of those
        operations, and with NATSConnectionClosedError when the connection closes first.
        """
        try:
            self._require_established()
        except NotConnectedError as error:
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
            if self._frame is not None:
                if not self._take_payload(self._frame):
                    return
                continue
            line = self._take_line()
            if line is None:
                return
            self._handle_line(line)

    def _take_line(self) -> bytes | None:
        """Remove and return the next control line without its line end, if complete."""
        limit = MAX_INFO_LINE if self._buffer[:5].upper() == b"INFO " else MAX_CONTROL_LINE
        end = self._buffer.find(b"\n", 0, limit + 2)
        if end < 0:
            if len(self._buffer) > limit + 1:
                raise _ProtocolViolation(f"control line longer than the maximum of {limit} bytes")
            return None

        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        if len(line) > limit:
            raise _ProtocolViolation(f"control line longer than the maximum of {limit} bytes")
        return line

    def _take_payload(self, frame: _Frame) -> bool:
        """Deliver the pending MSG or HMSG once its payload and CRLF are buffered."""
        size = frame.size
        if len(self._buffer) < size + 2:
            return False
        if self._buffer[size : size + 2] != b"\r\n":
            raise _ProtocolViolation(f"message payload of {size} bytes is not followed by CRLF")

        data = bytes(self._buffer[:size])
        del self._buffer[: size + 2]
        self._frame = None
        self._trace("received {size} bytes of message payload from {server}", size=size)

        if frame.header_size is None:
            message = Message(subject=frame.subject, sid=frame.sid, reply=frame.reply, payload=data)
        else:
            try:
                status, description, headers = parse_headers(data[: frame.header_size])
            except ValueError as error:
                self.log.warn(
                    "dropped a message on {subject} from NATS server {server} with invalid headers: {error}",
                    subject=frame.subject,
                    server=self.server_url,
                    error=str(error),
                )
                return True
            message = Message(
                subject=frame.subject,
                sid=frame.sid,
                reply=frame.reply,
                payload=data[frame.header_size :],
                headers=headers,
                status=status,
                description=description,
            )
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
            self._frame = self._parse_frame(arguments, with_headers=False)
        elif operation == b"HMSG":
            self._frame = self._parse_frame(arguments, with_headers=True)
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
        if self._on_info is not None:
            self._on_info(self, info)
        if not self._handshake_started:
            self._start_handshake(info)

    def _parse_frame(self, arguments: bytes, with_headers: bool) -> _Frame:
        """Parse ``<subject> <sid> [reply] <size>`` (MSG) or ``... <header size> <size>`` (HMSG)."""
        operation = "HMSG" if with_headers else "MSG"
        sizes = 2 if with_headers else 1
        fields = arguments.split()
        if len(fields) - sizes not in (2, 3) or not all(size.isdigit() for size in fields[-sizes:]):
            excerpt = arguments[:64].decode("utf-8", "replace")
            raise _ProtocolViolation(f"malformed {operation} arguments {excerpt!r}")

        size = int(fields[-1])
        header_size = int(fields[-2]) if with_headers else None
        if header_size is not None and header_size > size:
            raise _ProtocolViolation(f"HMSG header size {header_size} exceeds its total size {size}")
        if size > self.max_payload:
            raise _ProtocolViolation(
                f"{operation} payload of {size} bytes exceeds max_payload of {self.max_payload} bytes"
            )
        names = [name.decode("utf-8", "replace") for name in fields[:-sizes]]
        reply = names[2] if len(names) == 3 else None
        return _Frame(names[0], names[1], reply, size, header_size)

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

    # TLS

    def _start_handshake(self, info: dict[str, Any]) -> None:
        """Upgrade to TLS, or close a connection without the TLS that the settings require, then send CONNECT."""
        self._handshake_started = True
        server_requires = bool(info.get("tls_required"))
        server_offers = server_requires or bool(info.get("tls_available"))
        client_requires = self.server.tls or self.options.tls is not None

        if server_requires or (client_requires and server_offers):
            self._start_tls()
        elif client_requires:
            reason = "a tls:// URL" if self.server.tls else "nats.tls is configured"
            self.log.error(
                "NATS server {server} does not offer TLS (no tls_required or tls_available "
                "in INFO), but nasd requires TLS ({reason}); closing the connection without "
                "sending credentials",
                server=self.server_url,
                reason=reason,
            )
            self._close()
        else:
            self._send_connect()

    def _start_tls(self) -> None:
        if self._buffer:
            raise _ProtocolViolation("the server sent data after INFO instead of waiting for the TLS handshake")
        transport = ITLSTransport(self.transport, None)
        if transport is None:
            raise _ProtocolViolation("TLS is required, but the transport cannot start TLS")

        tls = self.options.tls if self.options.tls is not None else ClientTLS()
        self.tls_started = True
        self._trace("starting TLS with {server}, verifying host {host}", host=self.server.host)
        transport.startTLS(tls.options_for(self.server.host))

    def _log_tls_failure(self, reason: Failure) -> None:
        if not self._tls_handshake_done:
            hint = (
                f"check that nats.tls.root contains the CA that signed the server certificate "
                f"and that the certificate names {self.server.host}"
            )
        else:
            hint = "the server may require a client certificate (nats.tls.cert and nats.tls.key) that it trusts"
        self.log.error(
            "TLS connection to NATS server {server} failed before the NATS handshake: {error}; {hint}",
            server=self.server_url,
            error=reason_text(reason),
            hint=hint,
        )

    # Handshake and keepalive

    def _send_connect(self) -> None:
        connect = self._connect_fields(self.server_info)
        line = "CONNECT " + json.dumps(connect, separators=(",", ":"), sort_keys=True)
        redacted = {key: "<redacted>" if key in ("jwt", "sig") else value for key, value in connect.items()}
        traced = "CONNECT " + json.dumps(redacted, separators=(",", ":"), sort_keys=True)
        self._send(line.encode(), traced_line=traced)

        handshake = self._send_ping()
        handshake.addBoth(self._handshake_answered)

    def _connect_fields(self, info: dict[str, Any]) -> dict[str, Any]:
        # no_responders needs headers, and both need a server that supports headers.
        headers = bool(info.get("headers"))
        fields: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "echo": False,
            "protocol": 1,
            "lang": "python-twisted",
            "version": nasd.__version__,
            "name": self.options.name,
            "headers": headers,
            "no_responders": headers,
            "tls_required": self.tls_started,
        }
        credentials = self.options.credentials
        if isinstance(credentials, CredentialsFile):
            credentials = credentials.current()
        if credentials is not None:
            fields["jwt"] = credentials.jwt
            # Servers that do not use nkeys send no nonce and expect no signature.
            nonce = info.get("nonce")
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
            raise NotConnectedError(f"not connected to NATS server {self.server_url}")

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


def check_subject(subject: str, kind: str) -> None:
    if not subject or _WHITESPACE.search(subject):
        raise ValueError(f"invalid NATS {kind} {subject!r}: it must be non-empty without whitespace")


def _ignore_nats_error(failure: Failure) -> None:
    """Consume a failed keepalive PING, whose cause the protocol has already logged."""
    failure.trap(NATSError)


def reason_text(reason: Failure) -> str:
    """Return the error message of a connection failure without a trailing period."""
    return reason.getErrorMessage().rstrip(".")
