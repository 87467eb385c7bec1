"""The checks every account JWT passes before nasd stores it, whatever brought it in.

An HTTP upload, a NATS update request, a peer's notification and a primary's pack all
go through ``check_account_jwt``, so no source can store an untrusted JWT.
"""

from __future__ import annotations

from nasd.jwt import JWTError, Operator, Token, account_problems, decode_account


def check_account_jwt(key: str, body: bytes, operator: Operator | None, now: float, key_source: str = "") -> Token:
    """Decode and check an account JWT for *key* as nats-server would; raise JWTError.

    The JWT must be validly signed, be for account *key*, be issued by the operator or
    one of its signing keys, be valid at *now* and have well-formed claims.
    *key_source* follows the expected key in the mismatch message, such as " named in
    the URL".
    """
    if not body.strip():
        raise JWTError("the JWT is empty")
    try:
        token = decode_account(body)
    except JWTError as error:
        raise JWTError(f"invalid JWT: {error}") from None
    if token.subject != key:
        raise JWTError(f"the JWT is for account {token.subject[:60]}, not for {key}{key_source}")
    check_issuer(token, operator)
    problems = account_problems(token, now)
    if problems:
        raise JWTError("invalid account claims: " + "; ".join(problems))
    return token


def check_issuer(token: Token, operator: Operator | None) -> None:
    """Raise JWTError unless *operator* trusts the issuer of the account JWT *token*."""
    if operator is None:
        raise JWTError(
            "no operator is configured on this account server, so no account JWT can be trusted; "
            "set operator (the operator JWT file) in its configuration"
        )
    if operator.trusts(token.issuer):
        return
    if token.issuer == token.subject:
        raise JWTError(
            "the JWT is self-signed by the account; sign it with the operator key or an operator signing key"
        )
    if token.issuer == operator.key:
        raise JWTError(
            f"operator {operator.name} requires strict signing key usage; sign the account with one of its signing keys"
        )
    raise JWTError(
        f"untrusted issuer {token.issuer}: it is neither operator {operator.name} "
        f"({operator.key}) nor one of its signing keys"
    )
