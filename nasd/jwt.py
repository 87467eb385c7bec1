"""Decode and verify NATS JWTs (v1 and v2) and check account claims as nats-server does.

A v2 token is signed over ``header.payload`` with ``alg: ed25519-nkey``; a v1 token is
signed over the payload segment alone. As in the Go jwt library, the signing rule is
chosen by the claims' version, not by the header.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any

from nasd.keys import InvalidKeyError, KeyKind, is_account_key, is_operator_key, is_public_key, verify_signature

MAX_TOKEN_SIZE = 1024 * 1024
MAX_INFO_LENGTH = 8 * 1024

_SEGMENT = re.compile(rb"^[A-Za-z0-9_-]*$")


class JWTError(ValueError):
    """A token that cannot be decoded, is badly signed or has unacceptable claims."""


@dataclass(frozen=True)
class Token:
    """A decoded JWT whose signature has been verified against its issuer."""

    raw: bytes
    header: dict[str, Any]
    claims: dict[str, Any]
    version: int
    signature: bytes = field(repr=False)

    @property
    def issuer(self) -> str:
        return str(self.claims.get("iss", ""))

    @property
    def subject(self) -> str:
        return str(self.claims.get("sub", ""))

    @property
    def name(self) -> str:
        return str(self.claims.get("name", ""))

    @property
    def jti(self) -> str:
        return str(self.claims.get("jti", ""))

    @property
    def issued_at(self) -> int:
        return _int_claim(self.claims, "iat")

    @property
    def expires(self) -> int:
        return _int_claim(self.claims, "exp")

    @property
    def not_before(self) -> int:
        return _int_claim(self.claims, "nbf")

    @property
    def nats(self) -> dict[str, Any]:
        section = self.claims.get("nats")
        return section if isinstance(section, dict) else {}

    @property
    def claim_type(self) -> str:
        if self.version == 1:
            return str(self.claims.get("type", ""))
        return str(self.nats.get("type", ""))

    def is_expired(self, now: float) -> bool:
        return self.expires > 0 and now > self.expires


def decode(token: bytes | str) -> Token:
    """Decode *token* and verify its signature with the issuer's public key.

    Surrounding whitespace (a trailing newline from a file or an HTTP body) is removed
    first; the returned ``raw`` is the token without it. Raises JWTError.
    """
    data = token.encode("ascii", "replace") if isinstance(token, str) else bytes(token)
    data = data.strip()
    if len(data) > MAX_TOKEN_SIZE:
        raise JWTError(f"token size {len(data)} exceeds the maximum of {MAX_TOKEN_SIZE} bytes")

    segments = data.split(b".")
    if len(segments) != 3:
        raise JWTError(f"expected 3 dot-separated segments, found {len(segments)}")
    header_segment, payload_segment, signature_segment = segments

    header = _decode_json_segment(header_segment, "header")
    claims = _decode_json_segment(payload_segment, "claims")
    signature = _decode_segment(signature_segment, "signature")
    _check_header(header)
    version = _claims_version(claims)

    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise JWTError("the claims have no issuer (iss)")
    signed = header_segment + b"." + payload_segment if version == 2 else payload_segment
    try:
        valid = verify_signature(issuer, signed, signature)
    except InvalidKeyError as error:
        raise JWTError(f"the issuer is not a valid public key: {error}") from None
    if not valid:
        raise JWTError(f"the signature does not verify with the issuer key {issuer[:12]} (v{version} rule)")

    return Token(raw=data, header=header, claims=claims, version=version, signature=signature)


def decode_account(token: bytes | str) -> Token:
    """Decode a token and require account claims issued by an operator or account key."""
    decoded = decode(token)
    if decoded.claim_type != "account":
        raise JWTError(f"expected an account JWT, got claim type {decoded.claim_type or 'none'!r}")
    if not (is_operator_key(decoded.issuer) or is_account_key(decoded.issuer)):
        raise JWTError("the issuer of an account JWT must be an operator or account key")
    return decoded


def decode_operator(token: bytes | str) -> Token:
    """Decode a token and require self-consistent operator claims."""
    decoded = decode(token)
    if decoded.claim_type != "operator":
        raise JWTError(f"expected an operator JWT, got claim type {decoded.claim_type or 'none'!r}")
    if not is_operator_key(decoded.issuer):
        raise JWTError("the issuer of an operator JWT must be an operator key")
    if not is_operator_key(decoded.subject):
        raise JWTError(f"the subject of an operator JWT must be an operator key, got {decoded.subject[:60]!r}")
    problems = _operator_problems(decoded.nats)
    if problems:
        raise JWTError("invalid operator claims: " + "; ".join(problems))
    return decoded


def read_decorated(text: str) -> str:
    """Return the JWT inside the first ``-----BEGIN ...-----`` frame, or the stripped text."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith("---") and "BEGIN" in line:
            for body in lines[index + 1 :]:
                if body.strip():
                    return body.strip()
    return text.strip()


@dataclass(frozen=True)
class Operator:
    """The trusted operator: its identity key and the signing keys allowed to sign accounts."""

    token: Token
    key: str
    name: str
    signing_keys: frozenset[str]
    system_account: str
    strict_signing_key_usage: bool

    @classmethod
    def from_token(cls, token: Token) -> Operator:
        nats = token.nats
        return cls(
            token=token,
            key=token.subject,
            name=token.name,
            signing_keys=frozenset(str(k) for k in nats.get("signing_keys") or ()),
            system_account=str(nats.get("system_account") or ""),
            strict_signing_key_usage=bool(nats.get("strict_signing_key_usage", False)),
        )

    def trusts(self, issuer: str) -> bool:
        """Return whether nats-server would accept an account JWT issued by *issuer*."""
        if issuer in self.signing_keys:
            return True
        return issuer == self.key and not self.strict_signing_key_usage


def account_problems(token: Token, now: float) -> list[str]:
    """List every reason nats-server would reject these account claims, time checks included."""
    problems: list[str] = []
    if not is_account_key(token.subject):
        problems.append(f"the subject {token.subject[:60]!r} is not a valid account key")
    if token.is_expired(now):
        problems.append(f"claim is expired (exp {format_timestamp(token.expires)})")
    if token.not_before > 0 and token.not_before > now:
        problems.append(f"claim is not yet valid (nbf {format_timestamp(token.not_before)})")
    problems.extend(_account_section_problems(token.nats))
    return problems


def format_timestamp(seconds: int) -> str:
    """Format Unix seconds as a UTC date and time."""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (out of range)"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def render_decoded(token: Token) -> str:
    """Render the header and claims as indented JSON, with dates next to iat, exp and nbf."""
    header = json.dumps(token.header, indent=4, ensure_ascii=False)
    claims = json.dumps(token.claims, indent=4, ensure_ascii=False)
    annotated = []
    for line in claims.splitlines():
        match = re.match(r'^    "(iat|exp|nbf)": (-?\d+)(,?)$', line)
        if match:
            line = f"{line}  // {format_timestamp(int(match.group(2)))}"
        annotated.append(line)
    return header + "\n" + "\n".join(annotated) + "\n"


def _decode_segment(segment: bytes, part: str) -> bytes:
    if not segment or not _SEGMENT.match(segment):
        raise JWTError(f"the {part} segment is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise JWTError(f"the {part} segment is not valid base64url") from None


def _decode_json_segment(segment: bytes, part: str) -> dict[str, Any]:
    data = _decode_segment(segment, part)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise JWTError(f"the {part} segment is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise JWTError(f"the {part} segment is not a JSON object")
    return value


def _check_header(header: dict[str, Any]) -> None:
    typ = str(header.get("typ", ""))
    alg = str(header.get("alg", ""))
    if typ.upper() != "JWT":
        raise JWTError(f"unsupported token type {typ!r} in the header")
    if alg.lower() not in ("ed25519", "ed25519-nkey"):
        raise JWTError(f"unsupported algorithm {alg!r} in the header")


def _claims_version(claims: dict[str, Any]) -> int:
    if "type" in claims:
        return 1
    nats = claims.get("nats")
    version = nats.get("version", 0) if isinstance(nats, dict) else 0
    if not isinstance(version, int) or isinstance(version, bool):
        raise JWTError(f"invalid claims version {version!r}")
    if version > 2:
        raise JWTError(f"the JWT was made by a newer library (version {version}); version 2 or less is supported")
    if version < 1:
        raise JWTError("the claims have neither a v1 'type' nor a v2 'nats.version'")
    return 1 if version == 1 else 2


def _int_claim(claims: dict[str, Any], name: str) -> int:
    value = claims.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value)


def _operator_problems(nats: dict[str, Any]) -> list[str]:
    problems = []
    for key in nats.get("signing_keys") or ():
        if not is_operator_key(key):
            problems.append(f"signing key {str(key)[:60]!r} is not an operator key")
    system_account = nats.get("system_account")
    if system_account and not is_account_key(system_account):
        problems.append(f"system_account {str(system_account)[:60]!r} is not an account key")
    return problems


def is_valid_subject(subject: object, wildcards: bool = True) -> bool:
    """Return whether *subject* is a well-formed NATS subject."""
    if not isinstance(subject, str) or not subject or len(subject) > 4096:
        return False
    if any(c in subject for c in " \t\r\n"):
        return False
    tokens = subject.split(".")
    for index, token in enumerate(tokens):
        if not token:
            return False
        if token == ">" and index != len(tokens) - 1:
            return False
        if not wildcards and token in ("*", ">"):
            return False
    return True


def _account_section_problems(nats: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    problems.extend(_import_problems(nats.get("imports")))
    problems.extend(_export_problems(nats.get("exports")))
    problems.extend(_signing_key_problems(nats.get("signing_keys")))
    problems.extend(_revocation_problems(nats.get("revocations"), "account"))
    problems.extend(_mapping_problems(nats.get("mappings")))
    problems.extend(_permission_problems(nats.get("default_permissions")))
    for name in ("description", "info_url"):
        value = nats.get(name)
        if isinstance(value, str) and len(value) > MAX_INFO_LENGTH:
            problems.append(f"{name} is longer than {MAX_INFO_LENGTH} characters")
    limits = nats.get("limits")
    if limits is not None and not isinstance(limits, dict):
        problems.append("limits must be an object")
    elif isinstance(limits, dict):
        for name, value in limits.items():
            if name == "tiered_limits" or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                problems.append(f"limit {name!r} must be a number")
    return problems


def _list_of_objects(value: Any, part: str, problems: list[str]) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        problems.append(f"{part} must be a list of objects")
        return []
    return value


def _import_problems(imports: Any) -> list[str]:
    problems: list[str] = []
    for number, item in enumerate(_list_of_objects(imports, "imports", problems), start=1):
        label = f"import {number} ({str(item.get('name') or item.get('subject'))[:60]!r})"
        if not is_account_key(item.get("account")):
            problems.append(f"{label}: account {str(item.get('account'))[:60]!r} is not a valid account key")
        subject = item.get("subject")
        if not is_valid_subject(subject):
            problems.append(f"{label}: invalid subject {str(subject)[:60]!r}")
        for name in ("local_subject", "to"):
            if item.get(name) and not is_valid_subject(item.get(name)):
                problems.append(f"{label}: invalid {name} {str(item.get(name))[:60]!r}")
        if item.get("type") not in ("stream", "service"):
            problems.append(f"{label}: type must be 'stream' or 'service'")
    return problems


def _export_problems(exports: Any) -> list[str]:
    problems: list[str] = []
    for number, item in enumerate(_list_of_objects(exports, "exports", problems), start=1):
        label = f"export {number} ({str(item.get('name') or item.get('subject'))[:60]!r})"
        subject = item.get("subject")
        if not is_valid_subject(subject):
            problems.append(f"{label}: invalid subject {str(subject)[:60]!r}")
        if item.get("type") not in ("stream", "service"):
            problems.append(f"{label}: type must be 'stream' or 'service'")
        response_type = item.get("response_type")
        if response_type not in (None, "", "Singleton", "Stream", "Chunked"):
            problems.append(f"{label}: unknown response_type {str(response_type)[:30]!r}")
        position = item.get("account_token_position")
        if position and isinstance(subject, str):
            tokens = subject.split(".")
            if not isinstance(position, int) or not 0 < position <= len(tokens) or tokens[position - 1] != "*":
                problems.append(f"{label}: account_token_position {position!r} does not point at a '*' token")
        problems.extend(_revocation_problems(item.get("revocations"), label))
    return problems


def _signing_key_problems(signing_keys: Any) -> list[str]:
    if signing_keys is None:
        return []
    if not isinstance(signing_keys, list):
        return ["signing_keys must be a list"]
    problems = []
    for entry in signing_keys:
        key = entry.get("key") if isinstance(entry, dict) else entry
        if isinstance(entry, dict) and entry.get("kind") != "user_scope":
            problems.append(f"signing key {str(key)[:60]!r} has unknown scope kind {str(entry.get('kind'))[:30]!r}")
        if not is_account_key(key):
            problems.append(f"signing key {str(key)[:60]!r} is not an account key")
    return problems


def _revocation_problems(revocations: Any, owner: str) -> list[str]:
    if revocations is None:
        return []
    if not isinstance(revocations, dict):
        return [f"{owner} revocations must be an object"]
    problems = []
    for key, when in revocations.items():
        if key != "*" and not (is_public_key(key, KeyKind.USER) or is_account_key(key)):
            problems.append(f"{owner} revocation of {str(key)[:60]!r}: not a user or account key")
        if isinstance(when, bool) or not isinstance(when, int):
            problems.append(f"{owner} revocation of {str(key)[:60]!r}: the time must be Unix seconds")
    return problems


def _mapping_problems(mappings: Any) -> list[str]:
    if mappings is None:
        return []
    if not isinstance(mappings, dict):
        return ["mappings must be an object"]
    problems = []
    for source, destinations in mappings.items():
        if not is_valid_subject(source):
            problems.append(f"mapping source {str(source)[:60]!r} is not a valid subject")
        if not isinstance(destinations, list):
            problems.append(f"mapping {str(source)[:60]!r} must list its destinations")
            continue
        total = 0.0
        for destination in destinations:
            if not isinstance(destination, dict) or not is_valid_subject(destination.get("subject")):
                problems.append(f"mapping {str(source)[:60]!r} has an invalid destination")
                continue
            weight = destination.get("weight", 0)
            total += weight if isinstance(weight, (int, float)) and destination.get("cluster") in (None, "") else 0
        if total > 100:
            problems.append(f"mapping {str(source)[:60]!r} has weights adding up to more than 100")
    return problems


def _permission_problems(permissions: Any) -> list[str]:
    if permissions is None:
        return []
    if not isinstance(permissions, dict):
        return ["default_permissions must be an object"]
    problems = []
    for direction in ("pub", "sub"):
        rules = permissions.get(direction) or {}
        if not isinstance(rules, dict):
            problems.append(f"default_permissions.{direction} must be an object")
            continue
        for kind in ("allow", "deny"):
            for subject in rules.get(kind) or ():
                # A subscribe permission may carry a queue group after a space.
                checked = subject.split(" ")[0] if direction == "sub" and isinstance(subject, str) else subject
                if not is_valid_subject(checked):
                    problems.append(f"default_permissions.{direction}.{kind}: invalid subject {str(subject)[:60]!r}")
    return problems
