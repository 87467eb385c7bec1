"""Load a NATS user credentials (creds) file: the user JWT and the nkey seed that signs
the server's nonce when nasd connects to NATS."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field

import nkeys
from twisted.logger import Logger

from nasd.logs import observer

log = Logger(observer=observer)

# A frame line such as "-----BEGIN NATS USER JWT-----" or "------END USER NKEY SEED------".
# nsc writes 5 dashes around BEGIN lines and 6 around END lines. The NATS client
# libraries accept any run of 3 or more, and so does nasd.
_FRAME_LINE = re.compile(r"^\s*-{3,}\s*(BEGIN|END)\s+(.*?)\s*-{3,}\s*$")

_JWT_LABEL = "BEGIN NATS USER JWT"
_SEED_LABEL = "BEGIN USER NKEY SEED"

# A user seed is "SU" followed by 56 base32 characters: 2 prefix bytes, the 32-byte
# Ed25519 seed and a CRC16, 36 bytes in all.
_SEED_BYTES = 36

_KEY_KINDS = {
    nkeys.PREFIX_BYTE_OPERATOR: "operator",
    nkeys.PREFIX_BYTE_ACCOUNT: "account",
    nkeys.PREFIX_BYTE_USER: "user",
    nkeys.PREFIX_BYTE_SERVER: "server",
    nkeys.PREFIX_BYTE_CLUSTER: "cluster",
}


class CredsError(ValueError):
    """A creds file that is missing, unreadable or malformed.

    The message names the file and the problem. It never contains the seed.
    """


@dataclass(frozen=True)
class Credentials:
    """A user JWT and the seed of the user nkey that the JWT was issued to."""

    path: str
    jwt: str
    seed: bytes = field(repr=False)
    public_key: str

    def sign_nonce(self, nonce: str) -> str:
        """Sign the server's nonce with the seed and return the signature for CONNECT.

        The signature covers the ASCII bytes of the nonce exactly as INFO sent it and
        is encoded as base64url without padding, which nats-server accepts.
        """
        key_pair = nkeys.from_seed(self.seed)
        signature = key_pair.sign(nonce.encode())
        return base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")


def load_credentials(path: str) -> Credentials:
    """Read and check the creds file at ``path``.

    The user JWT and seed may be framed as nsc writes them (CRLF line ends are fine).
    A seed on a line of its own without a frame is also accepted, as the NATS client
    libraries do. Raises CredsError when the file is missing or unreadable, when either
    part is missing, when the seed is not a valid user seed, or when the seed's public
    key is not the JWT's subject.
    """
    text = _read_text(path)
    blocks = _framed_blocks(text)

    jwt = blocks.get(_JWT_LABEL)
    if jwt is None:
        raise CredsError(f'creds file {path}: no "{_JWT_LABEL}" block found')
    subject = _user_jwt_subject(path, jwt)

    seed_text = blocks.get(_SEED_LABEL) or _unframed_seed(text)
    if seed_text is None:
        raise CredsError(f'creds file {path}: no "{_SEED_LABEL}" block found')
    seed = seed_text.encode("ascii")
    _check_user_seed(path, seed)

    public_key = nkeys.from_seed(seed).public_key.decode("ascii")
    if public_key != subject:
        raise CredsError(
            f"creds file {path}: the seed belongs to user {public_key}, but the JWT was issued to {subject}"
        )
    return Credentials(path=path, jwt=jwt, seed=seed, public_key=public_key)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as creds_file:
            data = creds_file.read()
    except FileNotFoundError:
        raise CredsError(f"creds file {path}: file not found") from None
    except OSError as error:
        raise CredsError(f"creds file {path}: cannot be read: {error.strerror}") from None

    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise CredsError(f"creds file {path}: contains non-ASCII bytes, so it is not a creds file") from None


def _framed_blocks(text: str) -> dict[str, str]:
    """Map each "BEGIN <label>" frame to the stripped text up to its END line.

    Only the first block of each label counts. A block with no END line runs to the
    end of the file.
    """
    blocks: dict[str, str] = {}
    label: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        frame = _FRAME_LINE.match(line)
        if frame is None:
            if label is not None:
                body.append(line)
            continue

        if label is not None:
            blocks.setdefault(label, "\n".join(body).strip())
            label = None
        if frame.group(1) == "BEGIN":
            label = "BEGIN " + " ".join(frame.group(2).split()).upper()
            body = []

    if label is not None:
        blocks.setdefault(label, "\n".join(body).strip())
    return blocks


def _unframed_seed(text: str) -> str | None:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("SU", "SA", "SO")):
            return stripped
    return None


def _user_jwt_subject(path: str, jwt: str) -> str:
    """Return the ``sub`` claim of the user JWT, which is the user's public key."""
    parts = jwt.split(".")
    if len(parts) != 3 or any(char.isspace() for char in jwt):
        raise CredsError(
            f'creds file {path}: the "{_JWT_LABEL}" block is not a JWT (expected one line of three dot-separated parts)'
        )

    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError):
        raise CredsError(f"creds file {path}: the user JWT's claims are not base64url-encoded JSON") from None
    if not isinstance(claims, dict):
        raise CredsError(f"creds file {path}: the user JWT's claims are not a JSON object")

    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject.startswith("U"):
        raise CredsError(f"creds file {path}: the JWT subject {subject!r} is not a user public key")
    nats_claims = claims.get("nats")
    if isinstance(nats_claims, dict) and nats_claims.get("type", "user") != "user":
        raise CredsError(f"creds file {path}: the JWT is a {nats_claims['type']} JWT, not a user JWT")
    return subject


def _check_user_seed(path: str, seed: bytes) -> None:
    """Raise CredsError unless ``seed`` is a well-formed user seed with a valid CRC16.

    nkeys 0.2.1 does not check the checksum itself. The error never quotes the seed.
    """
    try:
        raw = base64.b32decode(seed + b"=" * (-len(seed) % 8))
    except binascii.Error:
        raise CredsError(f"creds file {path}: the nkey seed is not valid base32") from None
    if len(raw) != _SEED_BYTES:
        raise CredsError(
            f"creds file {path}: the nkey seed has the wrong length ({len(raw)} bytes decoded, expected {_SEED_BYTES})"
        )

    checksum = int.from_bytes(raw[-2:], "little")
    if binascii.crc_hqx(raw[:-2], 0) != checksum:
        raise CredsError(
            f"creds file {path}: the nkey seed has an invalid CRC16 checksum (the seed is damaged or mistyped)"
        )

    if raw[0] & 0xF8 != nkeys.PREFIX_BYTE_SEED:
        raise CredsError(f"creds file {path}: the nkey seed block does not contain a seed")
    key_type = ((raw[0] & 0x07) << 5) | ((raw[1] & 0xF8) >> 3)
    if key_type != nkeys.PREFIX_BYTE_USER:
        kind = _KEY_KINDS.get(key_type, "unknown")
        raise CredsError(f"creds file {path}: the nkey seed is for a key of type {kind}, not a user")


class CredentialsFile:
    """A creds file read again when it changes, so rotated creds apply at the next connection.

    When the changed file cannot be loaded, the error is logged and the credentials
    loaded before stay in use.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._credentials = load_credentials(path)
        self._stamp = _file_stamp(path)

    @property
    def public_key(self) -> str:
        return self._credentials.public_key

    def current(self) -> Credentials:
        """Return the credentials, reloading the file first when it changed on disk."""
        stamp = _file_stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return self._credentials
        self._stamp = stamp
        try:
            credentials = load_credentials(self.path)
        except CredsError as error:
            log.error("{error}; keeping the credentials loaded before", error=str(error))
            return self._credentials
        if credentials.public_key != self._credentials.public_key:
            log.info(
                "creds file {path} changed: now connecting as user {user}", path=self.path, user=credentials.public_key
            )
        self._credentials = credentials
        return credentials


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino
