"""The HTTP API that nsc pushes account JWTs to and nats-server's URL resolver reads from."""

from __future__ import annotations

import datetime
import json
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from nasd import __version__
from nasd.jwt import JWTError, Operator, Token, account_problems, decode, decode_account, render_decoded
from nasd.keys import is_account_key, short_key
from nasd.logs import observer
from nasd.store import AccountStore, ReadOnlyStoreError, StaleJWTError, StoredJWT, StoreError

log = Logger(observer=observer)

MAX_BODY_SIZE = 1024 * 1024

# Account JWTs change without notice (a revocation must take effect at once), so caches
# must revalidate every time; the ETag makes that cheap.
CACHE_CONTROL = b"no-cache"
NO_STORE = (
    (b"Cache-Control", b"no-cache, no-store, must-revalidate"),
    (b"Pragma", b"no-cache"),
    (b"Expires", b"0"),
)


class ClaimPublisher(Protocol):
    """The NATS side as the API sees it: a queue for updates and the connection state."""

    @property
    def connected(self) -> bool: ...

    @property
    def server_url(self) -> str | None: ...

    @property
    def pending_count(self) -> int: ...

    @property
    def last_published(self) -> float | None: ...

    def publish_account_update(self, account: str, jwt: bytes) -> None: ...


class AccountServerAPI:
    """Serve and accept account JWTs; one instance per running server."""

    app = Klein()
    app.url_map.merge_slashes = False

    def __init__(
        self,
        clock: IReactorTime,
        store: AccountStore,
        operator: Operator | None,
        publisher: ClaimPublisher | None = None,
        system_account: Token | None = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.operator = operator
        self.publisher = publisher
        self.system_account = system_account
        self.in_flight: set[Deferred[bool]] = set()

    def resource(self) -> Resource:
        """Return the root resource: the account fast path in front of the Klein app."""
        return AccountFastPath(self, self.app.resource())

    # The resolver check: nats-server does not start unless this route returns 200.

    @app.route("/jwt/v1/accounts", methods=["GET"])
    @app.route("/jwt/v1/accounts/", methods=["GET"])
    @app.route("/jwt/v1//accounts", methods=["GET"])
    @app.route("/jwt/v1//accounts/", methods=["GET"])
    def resolver_check(self, request: IRequest) -> bytes:
        log.debug("resolver check from {peer}", peer=_peer(request))
        for name, value in NO_STORE:
            request.setHeader(name, value)
        return _body(request, 200, b"", b"text/plain; charset=utf-8")

    @app.route("/jwt/v1/accounts/<key>", methods=["GET"])
    @app.route("/jwt/v1//accounts/<key>", methods=["GET"])
    def get_account(self, request: IRequest, key: str) -> bytes:
        if not is_account_key(key):
            return _text(request, 404, f"{key[:60]!r} is not a valid account public key")
        entry = self._lookup(key)
        if entry is None:
            return _text(request, 404, f"no JWT is stored for account {key}")

        if _flag(request, b"check") and 0 < entry.expires < self.clock.seconds():
            return _text(request, 404, f"the JWT for account {key} expired at {entry.expires}")
        if _flag(request, b"notify"):
            self._notify(entry, "a notify=true request")
        return self._send_jwt(request, entry)

    @app.route("/jwt/v1/accounts/<key>", methods=["POST"])
    @app.route("/jwt/v1//accounts/<key>", methods=["POST"])
    async def post_account(self, request: IRequest, key: str) -> bytes:
        if self.store.readonly:
            request.setHeader(b"Allow", b"GET, HEAD")
            return _text(request, 405, "this account server is read-only: its store does not accept uploads")
        body = request.content.read(MAX_BODY_SIZE + 1)
        if len(body) > MAX_BODY_SIZE:
            return _text(request, 413, f"the request body is larger than {MAX_BODY_SIZE} bytes")
        if not is_account_key(key):
            return _text(request, 400, f"{key[:60]!r} in the URL is not a valid account public key")

        try:
            token = self.check_upload(key, body)
        except JWTError as error:
            log.info("rejected JWT for account - {account} - {reason}", account=short_key(key), reason=error)
            return _text(request, 400, str(error))

        try:
            changed = await self._track(self.store.save(token))
        except StaleJWTError as error:
            log.info("rejected JWT for account - {account} - {reason}", account=short_key(key), reason=error)
            return _text(request, 409, f"{error}; push a JWT issued later than the stored one")
        except ReadOnlyStoreError:
            request.setHeader(b"Allow", b"GET, HEAD")
            return _text(request, 405, "this account server is read-only: its store does not accept uploads")
        except StoreError as error:
            log.error("storing JWT for account - {account} - failed: {error}", account=short_key(key), error=error)
            return _text(request, 500, "storing the JWT failed; the stored JWT is unchanged, try again")

        if changed:
            log.info("updated JWT for account - {account} - {jti}", account=short_key(key), jti=token.jti)
        else:
            log.info("same JWT pushed again for account - {account} - {jti}", account=short_key(key), jti=token.jti)
        entry = self.store.get(key)
        if entry is not None:
            self._notify(entry, "an upload")
        return _body(request, 200, b"", b"text/plain; charset=utf-8")

    def check_upload(self, key: str, body: bytes) -> Token:
        """Decode and check an uploaded account JWT as nats-server would; raise JWTError."""
        if not body.strip():
            raise JWTError("the request body is empty; send the account JWT as the body")
        try:
            token = decode_account(body)
        except JWTError as error:
            raise JWTError(f"invalid JWT: {error}") from None
        if token.subject != key:
            raise JWTError(f"the JWT is for account {token.subject[:60]}, not for {key} named in the URL")
        self._check_issuer(token)
        problems = account_problems(token, self.clock.seconds())
        if problems:
            raise JWTError("invalid account claims: " + "; ".join(problems))
        return token

    def _check_issuer(self, token: Token) -> None:
        if self.operator is None:
            raise JWTError(
                "no operator is configured on this account server, so no account JWT can be trusted; "
                "set operator (the operator JWT file) in its configuration"
            )
        if self.operator.trusts(token.issuer):
            return
        if token.issuer == token.subject:
            raise JWTError(
                "the JWT is self-signed by the account; sign it with the operator key or an operator signing key"
            )
        if token.issuer == self.operator.key:
            raise JWTError(
                f"operator {self.operator.name} requires strict signing key usage; "
                "sign the account with one of its signing keys"
            )
        raise JWTError(
            f"untrusted issuer {token.issuer}: it is neither operator {self.operator.name} "
            f"({self.operator.key}) nor one of its signing keys"
        )

    @app.route("/jwt/v1/operator", methods=["GET"])
    def get_operator(self, request: IRequest) -> bytes:
        if self.operator is None:
            return _text(request, 404, "no operator JWT is configured on this account server")
        token = self.operator.token
        if _flag(request, b"decode"):
            return _text(request, 200, render_decoded(token))
        content_type = b"text/plain; charset=utf-8" if _flag(request, b"text") else b"application/jwt"
        return _body(request, 200, token.raw, content_type)

    @app.route("/jwt/v1/help", methods=["GET"])
    def get_help(self, request: IRequest) -> bytes:
        return _text(request, 200, HELP_TEXT)

    @app.route("/healthz", methods=["GET"])
    def get_health(self, request: IRequest) -> bytes:
        report: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "store": {
                "kind": self.store.kind,
                "accounts": len(self.store) if self.store.listed else None,
                "readonly": self.store.readonly,
            },
            "nats": {"configured": self.publisher is not None, "connected": False},
        }
        if self.publisher is not None:
            report["nats"].update(
                connected=self.publisher.connected,
                server=self.publisher.server_url,
                pending_updates=self.publisher.pending_count,
                last_published=_iso_time(self.publisher.last_published),
            )
        body = json.dumps(report, indent=2).encode() + b"\n"
        request.setHeader(b"Cache-Control", b"no-store")
        return _body(request, 200, body, b"application/json")

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Any) -> bytes:
        return _text(request, 404, "not found; see /jwt/v1/help for the routes this server has")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Any) -> bytes:
        allowed = sorted(set(failure.value.valid_methods or ()))
        request.setHeader(b"Allow", ", ".join(allowed).encode())
        method = request.method.decode("ascii", "replace")
        return _text(request, 405, f"method {method} is not allowed here; allowed: {', '.join(allowed)}")

    def _track(self, saving: Deferred[bool]) -> Deferred[bool]:
        """Remember a save in progress until it ends, so that shutdown can wait for it."""
        self.in_flight.add(saving)

        def forget(result: object) -> object:
            self.in_flight.discard(saving)
            return result

        saving.addBoth(forget)
        return saving

    def _lookup(self, key: str) -> StoredJWT | None:
        entry = self.store.get(key)
        if entry is None and self.system_account is not None and key == self.system_account.subject:
            return StoredJWT.from_token(self.system_account)
        return entry

    def _notify(self, entry: StoredJWT, reason: str) -> None:
        if self.publisher is None:
            log.debug(
                "not publishing the JWT for account - {account} - after {reason}: NATS is not configured",
                account=short_key(entry.key),
                reason=reason,
            )
            return
        self.publisher.publish_account_update(entry.key, entry.raw)

    def _send_jwt(self, request: IRequest, entry: StoredJWT) -> bytes:
        if _flag(request, b"decode"):
            try:
                return _text(request, 200, render_decoded(decode(entry.raw)))
            except JWTError as error:
                log.error(
                    "stored JWT for account - {account} - cannot be decoded: {error}",
                    account=short_key(entry.key),
                    error=error,
                )
                return _text(request, 500, f"the stored JWT cannot be decoded: {error}")
        if _flag(request, b"text"):
            return _body(request, 200, entry.raw, b"text/plain; charset=utf-8")

        return send_account_jwt(request, entry)


def send_account_jwt(request: IRequest, entry: StoredJWT) -> bytes:
    """Send a stored JWT with its ETag, or 304 when the client already has it."""
    headers = request.responseHeaders
    headers.setRawHeaders(b"ETag", [entry.etag])
    headers.setRawHeaders(b"Cache-Control", [CACHE_CONTROL])
    if _etag_matches(request.getHeader(b"If-None-Match"), entry.jti):
        request.setResponseCode(304)
        return b""
    return _body(request, 200, entry.raw, b"application/jwt")


class AccountFastPath(Resource):
    """Serve ``GET``/``HEAD /jwt/v1/accounts/<key>`` for stored keys without Klein's routing.

    nats-servers fetch accounts in bursts, so this route skips the werkzeug URL map.
    Every other request, including account requests with query flags and unknown keys,
    goes to the Klein app, which gives the same answer for these requests.
    """

    isLeaf = True

    def __init__(self, api: AccountServerAPI, app: Resource) -> None:
        super().__init__()
        self.api = api
        self.app = app

    def render(self, request: IRequest) -> Any:
        if request.method in (b"GET", b"HEAD") and not request.args:
            key = _account_key_in_path(request.path)
            if key is not None and is_account_key(key):
                entry = self.api.store.get(key)
                if entry is not None:
                    return send_account_jwt(request, entry)
        return self.app.render(request)


_ACCOUNT_PREFIXES = (b"/jwt/v1/accounts/", b"/jwt/v1//accounts/")


def _account_key_in_path(path: bytes) -> str | None:
    for prefix in _ACCOUNT_PREFIXES:
        if path.startswith(prefix):
            key = path[len(prefix) :]
            if len(key) == 56 and key.isalnum():
                return key.decode("ascii")
    return None


def _flag(request: IRequest, name: bytes) -> bool:
    values = request.args.get(name) or []
    return bool(values) and values[0].lower() in (b"true", b"1", b"yes")


def _etag_matches(header: bytes | str | None, jti: str) -> bool:
    """Return whether an If-None-Match header matches the ETag of *jti* (weak comparison)."""
    if header is None:
        return False
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    for candidate in text.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == f'"{jti}"':
            return True
    return False


def _body(request: IRequest, code: int, body: bytes, content_type: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return body


def _text(request: IRequest, code: int, message: str) -> bytes:
    body = message if message.endswith("\n") else message + "\n"
    return _body(request, code, body.encode("utf-8"), b"text/plain; charset=utf-8")


def _iso_time(seconds: float | None) -> str | None:
    """Format Unix seconds as an ISO 8601 UTC time, or None."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).isoformat(timespec="seconds")


def _peer(request: IRequest) -> str:
    address = request.getClientAddress()
    return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"


class BoundedRequest(Request):
    """An HTTP request whose body may not exceed MAX_BODY_SIZE.

    twisted.web buffers a whole body before routing, so a request that announces or
    sends more gets a 413 response and the connection is closed before more is buffered.
    """

    max_body_size = MAX_BODY_SIZE
    _received = 0
    _rejected = False

    def gotLength(self, length: int | None) -> None:
        self._received = 0
        self._rejected = False
        if length is not None and length > self.max_body_size:
            self._reject_oversized()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self.max_body_size:
            self._reject_oversized()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def _reject_oversized(self) -> None:
        self._rejected = True
        body = f"the request body is larger than {self.max_body_size} bytes\n".encode()
        channel = self.channel
        if channel is None or channel.transport is None:
            return
        channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        channel.transport.loseConnection()


HELP_TEXT = """\
nasd - NATS account server

nasd stores operator-signed account JWTs and serves them to nats-server's URL
resolver. Configure nats-server with:

    resolver: URL(http://<host>:<port>/jwt/v1/accounts/)

Routes

GET /jwt/v1/accounts/
    Returns 200 with an empty body. nats-server calls it at startup and does not
    start without a 200.

GET /jwt/v1/accounts/<account public key>
    Returns the stored account JWT (Content-Type application/jwt) with an ETag
    of the JWT's jti. A request whose If-None-Match matches gets 304. An unknown
    or malformed key gets 404. Query flags (each takes true):
      text=true     return the JWT as text/plain
      decode=true   return the header and claims as indented JSON, with the
                    dates of iat, exp and nbf in UTC
      check=true    return 404 when the stored JWT has expired
      notify=true   also publish the JWT on NATS, as after an upload

POST /jwt/v1/accounts/<account public key>
    Stores the account JWT sent as the body (at most 1 MiB; a trailing newline
    is fine). nsc push sends this request. The JWT must be signed by the
    operator or one of its signing keys, be for the account in the URL, be
    valid now, and be no older (iat) than the JWT already stored. Answers:
      200  stored (or the same JWT was already stored); the JWT is then
           published on $SYS.ACCOUNT.<key>.CLAIMS.UPDATE
      400  the JWT is invalid or untrusted; the body says why
      405  the store is read-only
      409  the stored JWT is newer
      413  the body is larger than 1 MiB
      500  the JWT could not be written; nothing was changed

GET /jwt/v1/operator
    Returns the operator JWT this server trusts (404 when none is configured).
    Takes text=true and decode=true like the account route.

GET /jwt/v1/help
    Returns this text.

GET /healthz
    Returns 200 with a JSON report: the store, the number of accounts, and
    whether NATS is connected, with the number of updates still to publish.
"""
