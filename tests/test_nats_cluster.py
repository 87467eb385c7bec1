"""Live tests of the claim update publisher against a cluster of two real nats-servers
on 127.0.0.1: discovery of the second server, failover to it, and the acknowledgements
of both servers to each account update."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from nasd.creds import load_credentials
from nasd.nats import ClaimUpdateAcknowledgements, ClaimUpdatePublisher
from tests.test_nats_live import (
    FIXTURES,
    PUBLISHER_CREDS,
    SHOP_ACCOUNT,
    SHOP_ACCOUNT_JWT,
    SYS_ACCOUNT,
    SYS_ACCOUNT_JWT,
    WAIT_TIMEOUT,
    LogCollector,
    NatsPyClient,
    NATSServerProcess,
    find_nats_server,
    free_port,
    wait_until,
)
from tests.tokens import ACME, OPERATOR_SIGNING_KEY, encode, fixture_claims, fixture_seed

ACME_ACCOUNT_JWT = f"{FIXTURES}/stores/demo/accounts/ACME/ACME.jwt"
ALICE_CREDS = f"{FIXTURES}/keys/creds/demo/ACME/alice.creds"
CLUSTER_NAME = "nasd-test"

# Seconds within which the publisher collects the replies to one update.
ACK_WINDOW = 1.0


def acme_update(max_subscriptions: int) -> bytes:
    """Re-sign the ACME fixture with the operator signing key, a current iat and a
    changed subscription limit, so that every call with a new limit makes a new JWT."""
    claims = fixture_claims("ACME")
    claims.pop("jti")
    claims["iat"] = int(time.time())
    claims["nats"]["limits"]["subs"] = max_subscriptions
    return encode(claims, fixture_seed(OPERATOR_SIGNING_KEY))


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2.0) as response:
        document: dict[str, Any] = json.load(response)
        return document


class ClusterNode:
    """One nats-server of the test cluster with its client, route and monitoring ports."""

    def __init__(self, directory: str, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.route_port = free_port()
        self.monitor_port = free_port()
        self.process: NATSServerProcess | None = None
        self.directory = directory

    def configure(self, peer: ClusterNode) -> None:
        extra = (
            f"http: 127.0.0.1:{self.monitor_port}\n"
            "cluster {\n"
            f"  name: {CLUSTER_NAME}\n"
            f"  listen: 127.0.0.1:{self.route_port}\n"
            f"  routes: [nats-route://127.0.0.1:{peer.route_port}]\n"
            "}\n"
        )
        preload = {SYS_ACCOUNT: SYS_ACCOUNT_JWT, ACME: ACME_ACCOUNT_JWT, SHOP_ACCOUNT: SHOP_ACCOUNT_JWT}
        self.process = NATSServerProcess(self.directory, self.port, name=self.name, preload=preload, extra=extra)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def route_peers(self) -> set[str]:
        """Return the names of the servers that /routez lists routes to (nats-server 2.10
        and later open several routes per peer), or none when it cannot be read."""
        try:
            routes = get_json(f"http://127.0.0.1:{self.monitor_port}/routez")["routes"] or []
        except (OSError, ValueError, KeyError):
            return set()
        return {route.get("remote_name") for route in routes}


class ClusterTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.binary = find_nats_server()
        directory = tempfile.mkdtemp(prefix="nasd-nats-cluster-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.first = ClusterNode(directory, "n1")
        self.second = ClusterNode(directory, "n2")
        self.first.configure(self.second)
        self.second.configure(self.first)
        self.logs = LogCollector(self)

    def start_node(self, node: ClusterNode) -> None:
        assert node.process is not None
        self.addCleanup(node.process.stop)
        node.process.start(self.binary)

    def kill_node(self, node: ClusterNode) -> None:
        assert node.process is not None
        node.process.stop()

    def start_client(self, url: str, creds: str) -> NatsPyClient:
        client = NatsPyClient(url, creds)
        self.addCleanup(client.stop)
        client.start()
        return client

    async def wait_for_routes(self) -> None:
        """Wait until both servers report their route to each other."""

        def connected() -> bool:
            return self.second.name in self.first.route_peers() and self.first.name in self.second.route_peers()

        deadline = time.monotonic() + WAIT_TIMEOUT
        while not await deferToThread(connected):
            if time.monotonic() > deadline:
                raise AssertionError(f"the two nats-servers did not form a cluster within {WAIT_TIMEOUT} s")
            await wait_until(lambda: True, "a short pause", timeout=1.0)

    async def publish_and_count(
        self, publisher: ClaimUpdatePublisher, jwt: bytes, expected_replies: int
    ) -> ClaimUpdateAcknowledgements:
        """Publish an ACME update and return its acknowledgements once *expected_replies*
        servers have replied. A server whose interest has not spread through the route yet
        may miss an update, so it is published again, up to five times."""
        for _ in range(5):
            publisher.last_acknowledgements = None
            publisher.publish_account_update(ACME, jwt)
            await wait_until(
                lambda: publisher.last_acknowledgements is not None,
                "the replies to the update are counted",
                timeout=ACK_WINDOW + WAIT_TIMEOUT,
            )
            acknowledgements = publisher.last_acknowledgements
            assert acknowledgements is not None
            if acknowledgements.answered >= expected_replies:
                return acknowledgements
        raise AssertionError(f"fewer than {expected_replies} nats-servers answered five updates: {acknowledgements}")

    def start_publisher(self) -> ClaimUpdatePublisher:
        publisher = ClaimUpdatePublisher(
            reactor,
            [self.first.url],
            load_credentials(PUBLISHER_CREDS),
            connect_timeout=5.0,
            reconnect_wait=0.2,
            max_reconnects=-1,
            name="nasd-cluster-test",
            ack_window=ACK_WINDOW,
        )
        publisher.startService()
        self.addCleanup(publisher.stopService)
        return publisher

    def test_discovery_failover_and_acknowledgements(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._discovery_failover_and_acknowledgements())

    async def _discovery_failover_and_acknowledgements(self) -> None:
        self.start_node(self.first)
        self.start_node(self.second)
        await self.wait_for_routes()

        # Only n1 is configured; n2 is learned from the connect_urls of n1's INFO.
        publisher = self.start_publisher()
        await wait_until(lambda: publisher.connected, "the publisher connects to n1")
        self.assertEqual(publisher.server_url, self.first.url)
        await wait_until(
            lambda: self.second.url in [server.url for server in publisher.factory.servers],
            "the publisher discovers n2",
        )
        self.assertEqual(
            self.logs.matching(f"discovered NATS servers: {self.second.url}", LogLevel.info),
            [f"discovered NATS servers: {self.second.url} (advertised by {self.first.url})"],
        )

        # alice's connection makes n1 load ACME, so n1 applies the update and n2 skips it.
        self.start_client(self.first.url, ALICE_CREDS)
        first = await self.publish_and_count(publisher, acme_update(1001), expected_replies=2)
        self.assertEqual(first, ClaimUpdateAcknowledgements(ACME, updated=("n1",), skipped=("n2",)))
        self.assertEqual(
            len(self.logs.matching(f"account {ACME[:12]}: jwt updated on 1 nats-server(s), skipped on 1")), 1
        )
        self.assertIsNotNone(publisher.last_acknowledged)

        # Killing n1 moves the publisher to the discovered n2.
        self.kill_node(self.first)
        await wait_until(lambda: publisher.server_url == self.second.url, "the publisher fails over to n2")
        self.assertTrue(publisher.connected)
        self.assertTrue(self.logs.matching(f"lost the connection to NATS server {self.first.url}", LogLevel.warn))

        # With n1 back in the cluster, and alice now on n2, n2 applies and n1 skips.
        assert self.first.process is not None
        self.first.process.start(self.binary)
        await self.wait_for_routes()
        self.start_client(self.second.url, ALICE_CREDS)
        second = await self.publish_and_count(publisher, acme_update(1002), expected_replies=2)
        self.assertEqual(second, ClaimUpdateAcknowledgements(ACME, updated=("n2",), skipped=("n1",)))
        self.assertEqual(publisher.pending_count, 0)
        self.assertEqual(self.logs.lines(LogLevel.error), [])
