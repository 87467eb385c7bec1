"""The HTTP API that nsc pushes account JWTs to and nats-server's URL resolver reads from."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Coroutine
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from nasd import __version__
from nasd.activations import (
    ActivationStore,
    MemoryActivationStore,
    StaleActivationError,
    StoredActivation,
    check_activation,
    parse_hash_id,
)
from nasd.jwt import JWTError, Operator, Token, decode, render_decoded
from nasd.keys import is_account_key, short_key
from nasd.logs import observer
from nasd.signing import SigningError, SigningService, check_self_signed, reply_text, signed_reply
from nasd.store import AccountStore, ReadOnlyStoreError, StaleJWTError, StoredJWT, StoreError, pack_store
from nasd.uploads import check_account_jwt

log = Logger(observer=observer)

MAX_BODY_SIZE = 1024 * 1024

# The default and maximum number of account JWTs in a pack (maxreplicationpack).
DEFAULT_MAX_PACK = 10_000
_PACK_MAX = re.compile(r"[0-9]{1,12}")

# Account JWTs change without notice (a revocation must take effect at once), so caches
# must revalidate every time; the ETag makes that cheap.
CACHE_CONTROL = b"no-cache"
NO_STORE = (
    (b"Cache-Control", b"no-cache, no-store, must-revalidate"),
    (b"Pragma", b"no-cache"),
    (b"Expires", b"0"),
)

# CORS: a page from any origin may read the API (GET, HEAD) and upload to it (POST).
# No Access-Control-Allow-Credentials is sent, so browsers send no cookies or HTTP
# authentication with these requests.
CORS_METHODS = (b"GET", b"HEAD", b"POST")
CORS_DEFAULT_HEADERS = b"Content-Type, If-None-Match"
# The time in seconds for which a browser may cache the response to a preflight request.
CORS_MAX_AGE = b"7200"
_HEADER_NAMES = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


class ClaimPublisher(Protocol):
    """The NATS side that the API uses: a queue for updates and the connection state."""

    @property
    def connected(self) -> bool: ...

    @property
    def server_url(self) -> str | None: ...

    @property
    def pending_count(self) -> int: ...

    @property
    def last_published(self) -> float | None: ...

    @property
    def last_acknowledged(self) -> float | None: ...

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
        activations: ActivationStore | None = None,
        signer: SigningService | None = None,
        max_pack: int = DEFAULT_MAX_PACK,
    ) -> None:
        self.clock = clock
        self.store = store
        self.operator = operator
        self.publisher = publisher
        self.system_account = system_account
        self.activations = activations if activations is not None else MemoryActivationStore(store.readonly)
        self.signer = signer
        self.max_pack = max_pack
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
        return self._send_jwt(request, entry, f"account {short_key(key)}")

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

        if token.issuer == key and self.signer is not None:
            try:
                reply = await self.signer.sign(token)
            except SigningError as error:
                return _text(request, error.status, str(error))
            signed = signed_reply(key, reply, self.operator, self.clock.seconds())
            if signed is None:
                log.info(
                    "{account} signing service accepted the JWT for processing ({jti})",
                    account=short_key(key),
                    jti=token.jti,
                )
                return _text(request, 202, reply_text(reply))
            log.info(
                "{account} signing service signed the JWT ({jti}) with {issuer}",
                account=short_key(key),
                jti=token.jti,
                issuer=short_key(signed.issuer),
            )
            token = signed

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
        """Decode and check an uploaded account JWT as nats-server would; raise JWTError.

        With a signing service, a JWT that the account signed itself is returned too,
        when its claims are valid, so that the service can sign it.
        """
        if not body.strip():
            raise JWTError("the request body is empty; send the account JWT as the body")
        now = self.clock.seconds()
        try:
            return check_account_jwt(key, body, self.operator, now, key_source=" named in the URL")
        except JWTError as error:
            message = str(error)
        # Without an operator, no JWT that a signing service returns could be trusted.
        self_signed = check_self_signed(key, body, now) if self.operator is not None else None
        if self_signed is not None:
            if self.signer is not None:
                return self_signed
            message = (
                "the JWT is self-signed by the account; the operator must sign it with its key or a signing key, "
                "because this account server has no signing service (signrequestsubject)"
            )
        raise JWTError(message)

    @app.route("/jwt/v1/activations", methods=["POST"])
    async def post_activation(self, request: IRequest) -> bytes:
        if self.activations.readonly:
            return _text(request, 405, "this account server is read-only: its store does not accept uploads")
        body = request.content.read(MAX_BODY_SIZE + 1)
        if len(body) > MAX_BODY_SIZE:
            return _text(request, 413, f"the request body is larger than {MAX_BODY_SIZE} bytes")

        try:
            activation = check_activation(body, self._account_jwt, self.operator, self.clock.seconds())
        except JWTError as error:
            log.info("rejected activation JWT - {reason}", reason=error)
            return _text(request, 400, str(error))

        try:
            changed = await self._track(self.activations.save(activation))
        except StaleActivationError as error:
            log.info("rejected activation JWT - {reason}", reason=error)
            return _text(request, 409, f"{error}; push an activation JWT issued later than the stored one")
        except ReadOnlyStoreError:
            return _text(request, 405, "this account server is read-only: its store does not accept uploads")
        except StoreError as error:
            log.error("storing activation JWT {hash_id} failed: {error}", hash_id=activation.hash_id, error=error)
            return _text(request, 500, "storing the activation JWT failed; nothing was changed, try again")

        issuer, hash_id = short_key(activation.issuer), activation.hash_id
        if changed:
            log.info("updated activation JWT - {issuer} - {hash_id}", issuer=issuer, hash_id=hash_id)
        else:
            log.info("same activation JWT pushed again - {issuer} - {hash_id}", issuer=issuer, hash_id=hash_id)
        self._notify_activation(activation, "an upload")
        return _body(request, 200, b"", b"text/plain; charset=utf-8")

    @app.route("/jwt/v1/activations/<text>", methods=["GET"])
    def get_activation(self, request: IRequest, text: str) -> bytes:
        # werkzeug has already percent-decoded *text*, so "%3D" arrives as "=".
        hash_id = parse_hash_id(text)
        if hash_id is None:
            return _text(request, 404, f"{text[:60]!r} is not an activation hash id (56 base32 characters)")
        entry = self.activations.get(hash_id)
        if entry is None:
            return _text(request, 404, f"no activation JWT is stored for hash id {hash_id}")

        if _flag(request, b"check") and 0 < entry.expires < self.clock.seconds():
            return _text(request, 404, f"the activation JWT {hash_id} expired at {entry.expires}")
        if _flag(request, b"notify"):
            self._notify_activation(entry, "a notify=true request")
        return self._send_jwt(request, entry, f"activation {hash_id}")

    def _account_jwt(self, key: str) -> bytes | None:
        entry = self._lookup(key)
        return entry.raw if entry is not None else None

    def _notify_activation(self, entry: StoredActivation, reason: str) -> None:
        # A publisher without publish_activation_update cannot announce activations, so
        # they are then stored and served only.
        publish = getattr(self.publisher, "publish_activation_update", None)
        if publish is None:
            log.debug(
                "not publishing activation JWT {hash_id} after {reason}: {why}",
                hash_id=entry.hash_id,
                reason=reason,
                why="NATS is not configured" if self.publisher is None else "the publisher cannot send activations",
            )
            return
        try:
            publish(entry.account, entry.hash_id, entry.raw)
        except ValueError as error:
            log.error("publishing activation JWT {hash_id} failed: {error}", hash_id=entry.hash_id, error=error)

    @app.route("/jwt/v1/pack", methods=["GET"])
    async def get_pack(self, request: IRequest) -> bytes:
        """Send up to ``max`` stored account JWTs that have not expired, one ``<key>|<jwt>`` line each."""
        limit = self.max_pack
        values = request.args.get(b"max")
        if values:
            text = values[0].decode("utf-8", "replace")
            if not _PACK_MAX.fullmatch(text):
                return _text(request, 400, f"bad max parameter {text[:60]!r}: expected a number from 0 to {limit}")
            if int(text) > limit:
                return _text(
                    request,
                    400,
                    f"bad max parameter {text!r}: no more than {limit} JWTs are allowed (maxreplicationpack)",
                )
            limit = int(text)
        if not self.store.listed:
            request.setHeader(b"Retry-After", b"5")
            return _text(request, 503, "the store is still being listed after startup; try again in a few seconds")

        entries = await pack_store(self.store, limit, self.clock.seconds())
        log.debug("pack of {count} account JWTs for {peer}", count=len(entries), peer=_peer(request))
        body = b"\n".join(entry.key.encode("ascii") + b"|" + entry.raw for entry in entries)
        return _body(request, 200, body, b"text/plain; charset=utf-8")

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
                last_acknowledged=_iso_time(self.publisher.last_acknowledged),
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

    def _send_jwt(self, request: IRequest, entry: ServedJWT, name: str) -> bytes:
        """Send a stored JWT in the form the text and decode flags request. *name* identifies it in log lines."""
        if _flag(request, b"decode"):
            try:
                return _text(request, 200, render_decoded(decode(entry.raw)))
            except JWTError as error:
                log.error("stored JWT of {name} cannot be decoded: {error}", name=name, error=error)
                return _text(request, 500, f"the stored JWT cannot be decoded: {error}")
        if _flag(request, b"text"):
            return _body(request, 200, entry.raw, b"text/plain; charset=utf-8")

        return send_jwt(request, entry)


class ServedJWT(Protocol):
    """A stored JWT as the API serves it: an account or an activation."""

    @property
    def raw(self) -> bytes: ...

    @property
    def jti(self) -> str: ...

    @property
    def etag(self) -> bytes: ...


def send_jwt(request: IRequest, entry: ServedJWT) -> bytes:
    """Send a stored JWT with its ETag, or 304 when the client already has it.

    ``Vary: Origin`` is sent because the CORS headers depend on the request's Origin.
    """
    headers = request.responseHeaders
    headers.setRawHeaders(b"ETag", [entry.etag])
    headers.setRawHeaders(b"Cache-Control", [CACHE_CONTROL])
    headers.setRawHeaders(b"Vary", [b"Origin"])
    if _etag_matches(request.getHeader(b"If-None-Match"), entry.jti):
        request.setResponseCode(304)
        return b""
    return _body(request, 200, entry.raw, b"application/jwt")


class AccountFastPath(Resource):
    """Serve ``GET``/``HEAD /jwt/v1/accounts/<key>`` for stored keys without Klein's routing.

    nats-servers fetch accounts in bursts, so this route skips the werkzeug URL map.
    Every other request, including account requests with query flags and unknown keys,
    goes to the Klein app, which returns the same response for these requests.

    CORS is handled here for every route, and only for requests with an Origin header:
    preflight requests get their response at once, and other requests get the CORS headers
    before they are served.
    """

    isLeaf = True

    def __init__(self, api: AccountServerAPI, app: Resource) -> None:
        super().__init__()
        self.api = api
        self.app = app

    def render(self, request: IRequest) -> Any:
        if request.requestHeaders.hasHeader(b"origin"):
            if request.method == b"OPTIONS" and request.requestHeaders.hasHeader(b"access-control-request-method"):
                return answer_preflight(request)
            if request.method in CORS_METHODS:
                add_cors_headers(request)
        if request.method in (b"GET", b"HEAD") and not request.args:
            key = _account_key_in_path(request.path)
            if key is not None and is_account_key(key):
                entry = self.api.store.get(key)
                if entry is not None:
                    return send_jwt(request, entry)
        elif request.method == b"POST" and not request.args:
            key = _account_key_in_path(request.path)
            if key is not None:
                return render_later(request, self.api.post_account(request, key))
        return self.app.render(request)


def _can_write(request: IRequest) -> bool:
    """Return whether the response is still open: not finished and the client still there."""
    return not getattr(request, "finished", False) and not getattr(request, "_disconnected", False)


def render_later(request: IRequest, response: Coroutine[Any, Any, bytes]) -> object:
    """Write the body that *response* produces when it is done; for a leaf resource's render."""

    def write(body: bytes) -> None:
        if _can_write(request):
            request.write(body)
            request.finish()

    def fail(failure: Failure) -> None:
        log.failure("request {method} {path} failed", failure, method=request.method, path=request.path)
        if _can_write(request):
            request.write(_text(request, 500, "internal error; see the server log"))
            request.finish()

    ensureDeferred(response).addCallbacks(write, fail)
    return NOT_DONE_YET


def add_cors_headers(request: IRequest) -> None:
    """Let a page from any origin read the response, and its ETag."""
    headers = request.responseHeaders
    headers.setRawHeaders(b"Access-Control-Allow-Origin", [b"*"])
    headers.setRawHeaders(b"Access-Control-Expose-Headers", [b"ETag"])


def answer_preflight(request: IRequest) -> bytes:
    """Respond to a CORS preflight request with 204, for any path.

    The requested headers are allowed when they form a list of header names, and
    CORS_DEFAULT_HEADERS otherwise.
    """
    requested = (request.getHeader(b"access-control-request-headers") or b"").strip()
    valid = 0 < len(requested) <= 1024 and _HEADER_NAMES.fullmatch(requested) is not None
    headers = request.responseHeaders
    headers.setRawHeaders(b"Access-Control-Allow-Origin", [b"*"])
    headers.setRawHeaders(b"Access-Control-Allow-Methods", [b", ".join(CORS_METHODS)])
    headers.setRawHeaders(b"Access-Control-Allow-Headers", [requested if valid else CORS_DEFAULT_HEADERS])
    headers.setRawHeaders(b"Access-Control-Max-Age", [CORS_MAX_AGE])
    headers.setRawHeaders(b"Vary", [b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"])
    request.setResponseCode(204)
    return b""


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
    # Bodies are JWTs whatever their Content-Type: never parse them as HTML forms into
    # request.args (a private flag of twisted.web's Request, seen in Twisted 26.10).
    _parsePOSTFormSubmission = False
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

(https:// when nasd serves HTTPS; see http.tls in the configuration.)

Routes

GET /jwt/v1/accounts/
    Returns 200 with an empty body. nats-server calls it at startup and does not
    start without a 200.

GET /jwt/v1/accounts/<account public key>
    Returns the stored account JWT (Content-Type application/jwt) with an ETag
    of the JWT's jti. A request whose If-None-Match matches gets 304. An unknown
    or malformed key gets 404. Query flags (each takes true, 1 or yes):
      text=true     return the JWT as text/plain
      decode=true   return the header and claims as indented JSON, with the
                    dates of iat, exp and nbf in UTC
      check=true    return 404 when the stored JWT has expired
      notify=true   also publish the JWT on NATS, as after an upload

POST /jwt/v1/accounts/<account public key>
    Stores the account JWT sent as the body (at most 1 MiB; a trailing newline
    is fine). nsc push sends this request. The JWT must be signed by the
    operator or one of its signing keys, be for the account in the URL, be
    valid now, and be no older (iat) than the JWT already stored. When a
    signing service is configured (signrequestsubject), a JWT that the account
    signed itself is sent to it as a NATS request, and the operator-signed JWT
    it replies with is stored instead. Answers:
      200  stored (or the same JWT was already stored); the JWT is then
           published on $SYS.ACCOUNT.<key>.CLAIMS.UPDATE
      202  the signing service replied with a message instead of a signed
           JWT (signing happens later); the body is its message, and
           nothing was stored
      400  the JWT is invalid or untrusted; the body says why
      405  the store is read-only
      409  the stored JWT is newer
      413  the body is larger than 1 MiB, or a self-signed JWT is larger
           than the NATS server's max_payload
      500  the JWT could not be written, or the signing service could not be
           reached or did not reply in time; nothing was changed

POST /jwt/v1/activations
    Stores the activation JWT sent as the body (at most 1 MiB, any
    Content-Type). nsc generate activation --push sends this request. The JWT
    must be an activation for a stream or service, for an account (sub), valid
    now, and issued by an account stored here and signed by the operator: by
    the account's own key, or by one of its signing keys with issuer_account
    set to the account. Answers like the account upload (200, 400, 405, 409,
    413, 500); after a 200 the JWT is published on NATS when NATS is
    configured.

GET /jwt/v1/activations/<hash id>
    Returns the stored activation JWT, like the account route (ETag, 304 and
    the text, decode, check and notify flags). The hash id is the one nsc
    prints: base32 of SHA-256("<iss>.<sub>.<subject>"), 56 characters ending in
    "====", where <subject> is the import subject cut before its first wildcard
    token ("_" when that is the first token). The padding may be sent
    percent-encoded (%3D) or left out.

GET /jwt/v1/pack?max=<number>
    Returns the stored account JWTs that have not expired, as text/plain lines
    "<account public key>|<account JWT>" joined by newlines, sorted by key.
    Another nasd started with primary: <this server's URL> imports them. max
    is the number of JWTs to return, from 0 to maxreplicationpack (10000
    unless configured). Without max, up to maxreplicationpack are returned. Any
    other max gets 400. Right after startup, while a large store is still
    being listed, the response is 503.

GET /jwt/v1/operator
    Returns the operator JWT this server trusts (404 when none is configured).
    Takes text=true and decode=true like the account route.

GET /jwt/v1/help
    Returns this text.

GET /healthz
    Returns 200 with a JSON report: the store, the number of accounts, and
    whether NATS is connected, with the number of updates still to publish and
    the UTC times of the last confirmed and the last acknowledged update.

CORS
    A request with an Origin header gets Access-Control-Allow-Origin: * (no
    credentials) and may read the ETag header. A preflight request (OPTIONS with
    Access-Control-Request-Method) gets 204, allowing GET, HEAD and POST and the
    requested headers.
"""
