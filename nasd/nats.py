"""A small NATS client on Twisted, and the service that publishes account claim updates
with it so that running nats-servers apply each account JWT that nasd stores.

From the wire up: ``NATSClientProtocol`` is one connection (TLS upgrade, CONNECT,
PING/PONG, PUB, SUB, MSG and HMSG). ``NATSClientFactory`` connects to the configured and
discovered servers in turn. ``NATSConnection`` is the service that other parts of nasd
use to publish, subscribe and send requests. ``ClaimUpdatePublisher`` publishes claim
updates over a ``NATSConnection``.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from typing import Protocol as TypingProtocol
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import (
    Protocol,
    ReconnectingClientFactory,
    connectionDone,
)
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import nasd
from nasd.config import ClientTLSConfig
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
ACTIVATION_UPDATE_SUBJECT = "$SYS.ACCOUNT.{account}.CLAIMS.ACTIVATE.{hash_id}"

# The status that nats-server puts in the header of the reply to a request that no
# subscriber received, when the client sent no_responders in CONNECT.
NO_RESPONDERS_STATUS = 503

_ACCOUNT_KEY = re.compile(r"A[A-Z2-7]{55}")
_CONTROL_LINE = re.compile(rb"\s*(\S+)\s*(.*?)\s*", re.DOTALL)
_WHITESPACE = re.compile(r"\s")
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")
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


class ClientTLSError(ValueError):
    """A TLS file configured for connections to NATS is missing, unreadable or invalid."""


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


# TLS


@dataclass(frozen=True)
class ClientTLS:
    """Loaded TLS settings for connections to NATS servers.

    ``trust_root`` (an IOpenSSLTrustRoot provider, which twisted.internet.ssl does not
    export) verifies server certificates, and None means the platform's trust store.
    ``client_certificate`` is presented to servers that request one.

    NOTE: with a client certificate, pyOpenSSL 26.4 warns (DeprecationWarning) that
    Twisted 26.10's optionsForClientTLS passes it pyOpenSSL X509 and PKey objects.
    """

    trust_root: Any = None
    client_certificate: PrivateCertificate | None = None

    def options_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Build connection options that require TLS 1.2 or later and a server
        certificate valid for *hostname*, a DNS name or an IP address."""
        return optionsForClientTLS(
            hostname,
            trustRoot=self.trust_root,
            clientCertificate=self.client_certificate,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )


def load_client_tls(tls: ClientTLSConfig) -> ClientTLS | None:
    """Load the CA, certificate and key files of ``nats.tls``, or return None when none is set.

    Raises ClientTLSError naming the file when a file is missing, unreadable, not PEM,
    or when the certificate and key do not belong together or only one of them is set.
    The client certificate file may contain a chain, but only its first certificate is
    presented to the server.
    """
    if not tls.enabled:
        return None
    if tls.cert is not None and tls.key is None:
        raise ClientTLSError(f"nats.tls.cert {tls.cert} is set without nats.tls.key; set both or neither")
    if tls.key is not None and tls.cert is None:
        raise ClientTLSError(f"nats.tls.key {tls.key} is set without nats.tls.cert; set both or neither")

    trust_root = None
    if tls.root is not None:
        trust_root = trustRootFromCertificates(_load_certificates(tls.root, "nats.tls.root"))

    client_certificate = None
    if tls.cert is not None and tls.key is not None:
        client_certificate = _load_client_certificate(tls.cert, tls.key)
    return ClientTLS(trust_root=trust_root, client_certificate=client_certificate)


def _read_tls_file(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ClientTLSError(f"cannot read the {setting} file {path}: {error.strerror or error}") from None


def _load_certificates(path: str, setting: str) -> list[Certificate]:
    data = _read_tls_file(path, setting)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise ClientTLSError(f"the {setting} file {path} contains no valid PEM certificate: {error}") from None
    return [Certificate(crypto.X509.from_cryptography(certificate)) for certificate in certificates]


def _load_client_certificate(cert_path: str, key_path: str) -> PrivateCertificate:
    [certificate, *_] = _load_certificates(cert_path, "nats.tls.cert")
    data = _read_tls_file(key_path, "nats.tls.key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        # TypeError is cryptography's error for a key encrypted with a passphrase.
        raise ClientTLSError(
            f"the nats.tls.key file {key_path} is not a valid unencrypted PEM private key: {error}"
        ) from None

    certificate_key = certificate.original.to_cryptography().public_key()
    if _public_key_bytes(key.public_key()) != _public_key_bytes(certificate_key):
        raise ClientTLSError(f"the nats.tls.key file {key_path} does not match the certificate in {cert_path}")
    private_key = KeyPair(crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
    return PrivateCertificate.fromCertificateAndKeyPair(certificate, private_key)


def _public_key_bytes(key: Any) -> bytes:
    encoded: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return encoded


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
        _check_subject(subject, "subject")
        if reply is not None:
            _check_subject(reply, "reply subject")
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
        _check_subject(subject, "subject")
        _check_subject(sid, "subscription id")
        if queue is not None:
            _check_subject(queue, "queue group")
        fields = ["SUB", subject] + ([queue] if queue else []) + [sid]
        self._send(" ".join(fields).encode())

    def unsubscribe(self, sid: str) -> None:
        """Send UNSUB for the subscription id *sid*; raises NotConnectedError when not established."""
        self._require_established()
        _check_subject(sid, "subscription id")
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
            error=_reason_text(reason),
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


def _check_subject(subject: str, kind: str) -> None:
    if not subject or _WHITESPACE.search(subject):
        raise ValueError(f"invalid NATS {kind} {subject!r}: it must be non-empty without whitespace")


def _ignore_nats_error(failure: Failure) -> None:
    """Consume a failed keepalive PING, whose cause the protocol has already logged."""
    failure.trap(NATSError)


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
        _check_subject(subject, "subject")
        if queue is not None:
            _check_subject(queue, "queue group")
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


# Claim updates


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
    handles claim updates answers it: the replies received within ``ack_window``
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
    ) -> None:
        if ack_window <= 0:
            raise ValueError(f"ack_window must be more than 0 seconds, not {ack_window}")
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
        if not _SUBJECT_TOKEN.fullmatch(hash_id):
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

    def _send_update(self, update: _ClaimUpdate) -> None:
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
                "account {account}: no nats-server answered the claim update within {window} s",
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
    if not _ACCOUNT_KEY.fullmatch(account):
        raise ValueError(f"invalid account public key {account!r}")


def _reason_text(reason: Failure) -> str:
    """Return the error message of a connection failure without a trailing period."""
    return reason.getErrorMessage().rstrip(".")
