"""Send self-signed account JWTs to a signing service over NATS, and read its replies.

With a managed operator, nsc pushes account JWTs that the account signed itself. nasd
sends each one as a NATS request to ``signrequestsubject``. The signing service replies
with the operator-signed JWT, which nasd stores like an upload, or with a text message
when signing happens later, out of band (HTTP 202 Accepted).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from nasd.jwt import JWTError, Operator, Token, account_problems, decode_account
from nasd.keys import short_key
from nasd.logs import observer
from nasd.nats import (
    MaxPayloadExceededError,
    Message,
    NATSError,
    NoRespondersError,
    NotConnectedError,
    RequestTimeoutError,
)
from nasd.uploads import check_account_jwt

log = Logger(observer=observer)

# The part of a reply that goes back to the HTTP client as the body of a 202 response.
MAX_REPLY_TEXT = 64 * 1024

_JWT_SHAPE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class SigningError(Exception):
    """A signing request that got no reply nasd can use; the message is for the HTTP client.

    ``status`` is the HTTP status to respond with.
    """

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class RequestConnection(Protocol):
    """The part of a NATS connection that the signing service uses."""

    def request(self, subject: str, payload: bytes, timeout: float) -> Deferred[Message]: ...


class SigningService:
    """A client of the signing service subscribed to *subject*, which waits *timeout* seconds for each reply.

    *connection* returns the NATS connection to send requests on, or None when there is none.
    """

    def __init__(self, connection: Callable[[], RequestConnection | None], subject: str, timeout: float) -> None:
        self.connection = connection
        self.subject = subject
        self.timeout = timeout

    async def sign(self, token: Token) -> bytes:
        """Send the raw JWT to the signing service and return the payload of its reply.

        Raises SigningError with a message for the HTTP client when nasd is not
        connected to NATS, when no signing service is subscribed, when none replies
        in time, or when the JWT is larger than the NATS server's max_payload.
        """
        connection = self.connection()
        try:
            if connection is None:
                raise NotConnectedError("NATS is not configured")
            reply = await connection.request(self.subject, token.raw, self.timeout)
        except (NATSError, CancelledError) as error:
            message, status = self._describe(error)
            log.error(
                "{account} signing request on {subject} failed ({jti}): {reason} ({error})",
                account=short_key(token.subject),
                subject=self.subject,
                jti=token.jti,
                reason=message,
                error=str(error) or type(error).__name__,
            )
            raise SigningError(message, status) from None
        return reply.payload

    def _describe(self, error: Exception) -> tuple[str, int]:
        """Return the message for the HTTP client and the HTTP status for a failed request."""
        if isinstance(error, NotConnectedError):
            return "the signing service cannot be reached: nasd is not connected to NATS", 500
        if isinstance(error, RequestTimeoutError):
            return f"the signing service did not answer within {self.timeout:g} s", 500
        if isinstance(error, NoRespondersError):
            return f"no signing service is subscribed to {self.subject}", 500
        if isinstance(error, MaxPayloadExceededError):
            return f"the JWT is too large to send to the signing service: {error}", 413
        if isinstance(error, CancelledError):
            return "the signing request was cancelled because nasd is stopping", 500
        return f"the signing request on {self.subject} failed: {error}", 500


def check_self_signed(key: str, body: bytes, now: float) -> Token | None:
    """Return the upload decoded when it is an account JWT for *key* signed by that account's own key.

    Returns None for every other body, which check_account_jwt then rejects with its
    reason. Raises JWTError when a self-signed JWT has invalid claims (expired, not yet
    valid or malformed), so that such a JWT is never sent to the signing service.
    """
    try:
        token = decode_account(body)
    except JWTError:
        return None
    if token.subject != key or token.issuer != key:
        return None
    problems = account_problems(token, now)
    if problems:
        raise JWTError("invalid account claims: " + "; ".join(problems))
    return token


def signed_reply(key: str, payload: bytes, operator: Operator | None, now: float) -> Token | None:
    """Return the reply of the signing service as a checked account JWT for *key*, or None.

    A reply that is not shaped like a JWT is a message for the client, so None is
    returned without a log line. A JWT that check_account_jwt rejects (untrusted
    issuer, another account, invalid claims) is logged as a warning, and None is
    returned too.
    """
    if _JWT_SHAPE.fullmatch(payload.strip()) is None:
        return None
    try:
        return check_account_jwt(key, payload, operator, now)
    except JWTError as error:
        log.warn(
            "{account} the signing service replied with a JWT that cannot be stored: {error}",
            account=short_key(key),
            error=error,
        )
        return None


def reply_text(payload: bytes) -> str:
    """Return the first MAX_REPLY_TEXT bytes of a reply as text, invalid UTF-8 replaced."""
    return payload[:MAX_REPLY_TEXT].decode("utf-8", "replace")
