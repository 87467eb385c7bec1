"""Generate the benchmark's operator, system account, creds file and signed account JWTs.

Everything is made fresh with random keys. A generated set is kept in a folder named
after its sizes, so the rounds of one run (and later runs given the same --cache folder)
reuse it instead of signing every JWT again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import nkeys

# Bump when the layout or the claims change, so that an old cache is not reused.
CACHE_FORMAT = 1

JWT_HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=")

# Accounts signed per worker task, large enough that the cost of each task does not matter.
CHUNK_SIZE = 2000

# Below this many accounts a worker pool costs more than it saves.
POOL_THRESHOLD = 5000

FILE_MODE = 0o600
FOLDER_MODE = 0o700


@dataclass(frozen=True)
class AccountSet:
    """Paths of one generated set. Each *.txt file has one ``<key> <jwt>`` line per account."""

    folder: Path
    operator_jwt: Path
    system_account: str
    system_account_jwt: bytes
    creds: Path
    stored: Path
    sequential: Path
    concurrent: Path
    notify: Path
    seconds: float
    generated: bool


def encode_public_key(raw: bytes, prefix: int) -> str:
    """Encode a 32-byte ed25519 public key as an nkeys public key (base32 with CRC-16)."""
    data = bytes([prefix]) + raw
    data += bytes(nkeys.crc16_checksum(data))
    return base64.b32encode(data).rstrip(b"=").decode()


def new_key_pair(prefix: int) -> tuple[bytes, str]:
    """Return a fresh (seed, public key) pair of the given nkeys prefix."""
    raw = os.urandom(32)
    seed = nkeys.encode_seed(raw, prefix)
    public = encode_public_key(bytes(nacl.signing.SigningKey(raw).verify_key), prefix)
    return seed, public


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def sign_jwt(claims: dict[str, Any], signer: nacl.signing.SigningKey, issuer: str) -> bytes:
    """Sign v2 claims as nsc does: set iss and a jti made from a hash of the claims."""
    claims = dict(claims)
    claims["iss"] = issuer
    digest = hashlib.sha256(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signed = JWT_HEADER + b"." + payload
    return signed + b"." + _b64(signer.sign(signed).signature)


def signer_from_seed(seed: bytes) -> tuple[nacl.signing.SigningKey, str]:
    """Return the signing key of an nkeys seed and its public key."""
    prefix, raw = nkeys.decode_seed(bytearray(seed))
    signer = nacl.signing.SigningKey(bytes(raw))
    return signer, encode_public_key(bytes(signer.verify_key), prefix)


def account_claims(key: str, name: str, issued_at: int) -> dict[str, Any]:
    """Build account claims shaped like an nsc account with limits, exports and a signing key.

    The signing key is a well-formed account public key whose seed is thrown away, since
    no user is ever signed with it. A JWT of these claims is about 1,170 bytes.
    """
    signing_key = encode_public_key(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT)
    return {
        "iat": issued_at,
        "name": name,
        "sub": key,
        "nats": {
            "exports": [
                {"name": "help", "subject": "help.>", "type": "service", "response_type": "Singleton"},
                {"name": "orders", "subject": "orders.>", "type": "stream"},
            ],
            "limits": {
                "subs": 1000,
                "data": 10485760,
                "payload": 1048576,
                "imports": 10,
                "exports": 10,
                "wildcards": True,
                "conn": 100,
                "leaf": 0,
                "streams": -1,
                "consumer": -1,
                "max_ack_pending": -1,
                "mem_max_stream_bytes": -1,
                "disk_max_stream_bytes": -1,
            },
            "signing_keys": [signing_key],
            "default_permissions": {"pub": {}, "sub": {}},
            "authorization": {},
            "type": "account",
            "version": 2,
        },
    }


def sign_accounts(operator_seed: bytes, label: str, start: int, count: int, issued_at: int) -> bytes:
    """Make *count* new accounts signed by the operator and return them as ``<key> <jwt>`` lines."""
    signer, operator_key = signer_from_seed(operator_seed)
    lines = []
    for index in range(start, start + count):
        _, key = new_key_pair(nkeys.PREFIX_BYTE_ACCOUNT)
        claims = account_claims(key, f"{label}-{index:06d}", issued_at)
        lines.append(key.encode() + b" " + sign_jwt(claims, signer, operator_key) + b"\n")
    return b"".join(lines)


def _sign_chunk(arguments: tuple[bytes, str, int, int, int]) -> bytes:
    return sign_accounts(*arguments)


def _init_worker() -> None:
    """Leave Ctrl-C to the parent and let SIGTERM from Pool.terminate() end a worker quietly.

    Forked workers inherit the parent's handlers, which turn both signals into
    KeyboardInterrupt and would print a traceback from every worker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_accounts(path: Path, operator_seed: bytes, label: str, count: int, issued_at: int, workers: int) -> None:
    """Write *count* signed accounts to *path*, in a pool of *workers* processes when large."""
    tasks = [
        (operator_seed, label, start, min(CHUNK_SIZE, count - start), issued_at)
        for start in range(0, count, CHUNK_SIZE)
    ]
    with open(path, "wb") as output:
        if count < POOL_THRESHOLD or workers < 2:
            for task in tasks:
                output.write(_sign_chunk(task))
            return
        # The pool is closed and its workers are terminated when the block exits, also on
        # Ctrl-C, so no signing process outlives the benchmark.
        with multiprocessing.Pool(workers, initializer=_init_worker) as pool:
            for chunk in pool.imap(_sign_chunk, tasks):
                output.write(chunk)


def user_creds(user_jwt: bytes, user_seed: bytes) -> bytes:
    """Frame a user JWT and its seed in the creds file format that nsc writes."""
    return (
        b"-----BEGIN NATS USER JWT-----\n" + user_jwt + b"\n------END NATS USER JWT------\n\n"
        b"************************* IMPORTANT *************************\n"
        b"NKEY Seed printed below can be used to sign and prove identity.\n"
        b"NKEYs are sensitive and should be treated as secrets.\n\n"
        b"-----BEGIN USER NKEY SEED-----\n" + user_seed + b"\n------END USER NKEY SEED------\n\n"
        b"*************************************************************\n"
    )


def write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(descriptor, "wb") as output:
        output.write(data)


def write_identities(folder: Path, issued_at: int) -> None:
    """Write the operator, the system account and a system user's creds file into *folder*."""
    operator_seed, operator_key = new_key_pair(nkeys.PREFIX_BYTE_OPERATOR)
    system_seed, system_key = new_key_pair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user_key = new_key_pair(nkeys.PREFIX_BYTE_USER)
    operator_signer, _ = signer_from_seed(operator_seed)
    system_signer, _ = signer_from_seed(system_seed)

    operator_claims = {
        "iat": issued_at,
        "name": "nasd-bench",
        "sub": operator_key,
        "nats": {"system_account": system_key, "type": "operator", "version": 2},
    }
    system_claims = {
        "iat": issued_at,
        "name": "SYS",
        "sub": system_key,
        "nats": {
            "limits": {
                "subs": -1,
                "data": -1,
                "payload": -1,
                "imports": -1,
                "exports": -1,
                "wildcards": True,
                "conn": -1,
                "leaf": -1,
            },
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2,
        },
    }
    user_claims = {
        "iat": issued_at,
        "name": "sys",
        "sub": user_key,
        "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2},
    }

    write_private(folder / "operator.seed", operator_seed + b"\n")
    (folder / "operator.jwt").write_bytes(sign_jwt(operator_claims, operator_signer, operator_key))
    (folder / "system.jwt").write_bytes(
        system_key.encode() + b" " + sign_jwt(system_claims, operator_signer, operator_key)
    )
    user_jwt = sign_jwt(user_claims, system_signer, system_key)
    write_private(folder / "sys.creds", user_creds(user_jwt, user_seed))


def load_or_generate(
    cache: Path, count: int, sequential: int, concurrent: int, notify: int, workers: int
) -> AccountSet:
    """Return the set of *count* stored accounts plus the not-yet-stored POST pools,
    generating it unless *cache* already has a complete one of the same sizes."""
    folder = cache / f"v{CACHE_FORMAT}-n{count}-seq{sequential}-conc{concurrent}-notify{notify}"
    marker = folder / "complete"
    started = time.monotonic()
    generated = not marker.exists()
    if generated:
        folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
        marker.unlink(missing_ok=True)
        issued_at = int(time.time())
        write_identities(folder, issued_at)
        operator_seed = (folder / "operator.seed").read_bytes().strip()
        pools = {"stored": count, "sequential": sequential, "concurrent": concurrent, "notify": notify}
        for name, size in pools.items():
            write_accounts(folder / f"{name}.txt", operator_seed, name, size, issued_at, workers)
        marker.write_text(json.dumps({"generated_at": issued_at, "seconds": time.monotonic() - started}) + "\n")
    seconds = json.loads(marker.read_text())["seconds"]
    system_key, system_jwt = (folder / "system.jwt").read_bytes().split(b" ", 1)
    return AccountSet(
        folder=folder,
        operator_jwt=folder / "operator.jwt",
        system_account=system_key.decode(),
        system_account_jwt=system_jwt.strip(),
        creds=folder / "sys.creds",
        stored=folder / "stored.txt",
        sequential=folder / "sequential.txt",
        concurrent=folder / "concurrent.txt",
        notify=folder / "notify.txt",
        seconds=seconds,
        generated=generated,
    )


def read_accounts(path: Path) -> list[tuple[str, bytes]]:
    """Read a file of ``<key> <jwt>`` lines into (key, JWT) pairs."""
    accounts = []
    with open(path, "rb") as lines:
        for line in lines:
            key, jwt = line.rstrip(b"\n").split(b" ", 1)
            accounts.append((key.decode(), jwt))
    return accounts


def store_path(store: Path, key: str) -> Path:
    """Return where nasd's sharded store keeps *key*: ``<store>/<last two chars>/<key>.jwt``."""
    return store / key[-2:] / f"{key}.jwt"


def write_store(store: Path, accounts: list[tuple[str, bytes]]) -> None:
    """Write JWTs into a sharded store as nasd does: files 0600 in folders 0700."""
    store.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    os.chmod(store, FOLDER_MODE)
    for key, jwt in accounts:
        path = store_path(store, key)
        if not path.parent.is_dir():
            path.parent.mkdir(mode=FOLDER_MODE)
            os.chmod(path.parent, FOLDER_MODE)
        write_private(path, jwt)
