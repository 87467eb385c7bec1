"""TLS between the claim update publisher and NATS: loading the nats.tls files, startup
errors, and live connections to a real nats-server on 127.0.0.1 with certificates from
a throwaway CA."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from nasd.config import ClientTLSConfig, Config, NATSConfig
from nasd.creds import load_credentials
from nasd.nats import ClaimUpdatePublisher, ClientTLS, ClientTLSError, load_client_tls
from nasd.service import StartupError, build_publisher
from tests.certs import PKI, make_pki
from tests.test_nats_live import (
    PUBLISHER_CREDS,
    SHOP_ACCOUNT,
    SHOP_ACCOUNT_JWT,
    LogCollector,
    NATSServerProcess,
    find_nats_server,
    free_port,
    read_jwt,
    wait_until,
)


def make_folder(test: TestCase) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="nasd-nats-tls-"))
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return folder


class LoadClientTLSTests(TestCase):
    """load_client_tls: what loads, and errors that name the file at fault."""

    def setUp(self) -> None:
        self.folder = make_folder(self)
        self.pki = make_pki(self.folder / "pki")

    def load_error(self, tls: ClientTLSConfig) -> str:
        error = self.assertRaises(ClientTLSError, load_client_tls, tls)
        self.assertIsInstance(error, ValueError)
        return str(error)

    def test_nothing_configured(self) -> None:
        self.assertIsNone(load_client_tls(ClientTLSConfig()))

    def test_root_only(self) -> None:
        tls = load_client_tls(ClientTLSConfig(root=str(self.pki.ca)))

        assert tls is not None
        self.assertIsNotNone(tls.trust_root)
        self.assertIsNone(tls.client_certificate)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(tls.options_for("127.0.0.1")))

    def test_root_with_client_certificate(self) -> None:
        tls = load_client_tls(
            ClientTLSConfig(root=str(self.pki.ca), cert=str(self.pki.client.cert), key=str(self.pki.client.key))
        )

        assert tls is not None
        assert tls.client_certificate is not None
        subject = tls.client_certificate.original.to_cryptography().subject
        self.assertEqual(subject.rfc4514_string(), "CN=client")

    def test_client_certificate_without_root(self) -> None:
        tls = load_client_tls(ClientTLSConfig(cert=str(self.pki.client.cert), key=str(self.pki.client.key)))

        assert tls is not None
        self.assertIsNone(tls.trust_root)
        self.assertIsNotNone(tls.client_certificate)

    def test_root_with_several_certificates(self) -> None:
        bundle = self.folder / "bundle.pem"
        bundle.write_bytes(self.pki.other_ca.read_bytes() + self.pki.ca.read_bytes())

        tls = load_client_tls(ClientTLSConfig(root=str(bundle)))

        assert tls is not None
        self.assertIsNotNone(tls.trust_root)

    def test_missing_root_named(self) -> None:
        missing = self.folder / "missing-ca.pem"

        message = self.load_error(ClientTLSConfig(root=str(missing)))

        self.assertEqual(message, f"cannot read the nats.tls.root file {missing}: No such file or directory")

    def test_unreadable_root_named(self) -> None:
        message = self.load_error(ClientTLSConfig(root=str(self.folder)))

        self.assertEqual(message, f"cannot read the nats.tls.root file {self.folder}: Is a directory")

    def test_invalid_root_named(self) -> None:
        for content in [b"not a certificate\n", self.pki.client.key.read_bytes(), b""]:
            root = self.folder / "root.pem"
            root.write_bytes(content)

            message = self.load_error(ClientTLSConfig(root=str(root)))

            self.assertIn(f"the nats.tls.root file {root} contains no valid PEM certificate", message)

    def test_cert_without_key_rejected(self) -> None:
        message = self.load_error(ClientTLSConfig(root=str(self.pki.ca), cert=str(self.pki.client.cert)))

        self.assertEqual(
            message, f"nats.tls.cert {self.pki.client.cert} is set without nats.tls.key; set both or neither"
        )

    def test_key_without_cert_rejected(self) -> None:
        message = self.load_error(ClientTLSConfig(key=str(self.pki.client.key)))

        self.assertIn(f"nats.tls.key {self.pki.client.key} is set without nats.tls.cert", message)

    def test_invalid_cert_named(self) -> None:
        message = self.load_error(ClientTLSConfig(cert=str(self.pki.client.key), key=str(self.pki.client.key)))

        self.assertIn(f"the nats.tls.cert file {self.pki.client.key} contains no valid PEM certificate", message)

    def test_missing_key_named(self) -> None:
        missing = self.folder / "missing-key.pem"

        message = self.load_error(ClientTLSConfig(cert=str(self.pki.client.cert), key=str(missing)))

        self.assertEqual(message, f"cannot read the nats.tls.key file {missing}: No such file or directory")

    def test_invalid_key_named(self) -> None:
        message = self.load_error(ClientTLSConfig(cert=str(self.pki.client.cert), key=str(self.pki.client.cert)))

        self.assertIn(
            f"the nats.tls.key file {self.pki.client.cert} is not a valid unencrypted PEM private key", message
        )

    def test_encrypted_key_named(self) -> None:
        key = serialization.load_pem_private_key(self.pki.client.key.read_bytes(), password=None)
        encrypted = self.folder / "encrypted-key.pem"
        encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )

        message = self.load_error(ClientTLSConfig(cert=str(self.pki.client.cert), key=str(encrypted)))

        self.assertIn(f"the nats.tls.key file {encrypted} is not a valid unencrypted PEM private key", message)

    def test_mismatched_key_named(self) -> None:
        message = self.load_error(ClientTLSConfig(cert=str(self.pki.client.cert), key=str(self.pki.stranger.key)))

        self.assertEqual(
            message,
            f"the nats.tls.key file {self.pki.stranger.key} does not match the certificate in {self.pki.client.cert}",
        )


class StartupTests(TestCase):
    """nats.tls in the service configuration."""

    def setUp(self) -> None:
        self.folder = make_folder(self)
        self.pki = make_pki(self.folder / "pki")

    def config(self, tls: ClientTLSConfig) -> Config:
        return Config(nats=NATSConfig(servers=("nats://127.0.0.1:4222",), tls=tls))

    def test_publisher_uses_tls(self) -> None:
        publisher = build_publisher(MemoryReactorClock(), self.config(ClientTLSConfig(root=str(self.pki.ca))))

        assert publisher is not None
        self.assertIsInstance(publisher.factory.options.tls, ClientTLS)

    def test_publisher_without_tls(self) -> None:
        publisher = build_publisher(MemoryReactorClock(), self.config(ClientTLSConfig()))

        assert publisher is not None
        self.assertIsNone(publisher.factory.options.tls)

    def test_bad_tls_file_stops_startup(self) -> None:
        missing = self.folder / "missing-ca.pem"

        error = self.assertRaises(
            StartupError, build_publisher, MemoryReactorClock(), self.config(ClientTLSConfig(root=str(missing)))
        )

        self.assertEqual(str(error), f"cannot read the nats.tls.root file {missing}: No such file or directory")

    def test_cert_without_key_stops_startup(self) -> None:
        config = self.config(ClientTLSConfig(cert=str(self.pki.client.cert)))

        error = self.assertRaises(StartupError, build_publisher, MemoryReactorClock(), config)

        self.assertIn("nats.tls.cert", str(error))
        self.assertIn(str(self.pki.client.cert), str(error))


def server_tls_block(pki: PKI, verify: bool) -> str:
    """Return a nats-server tls block with the test PKI's server certificate."""
    return (
        "tls {\n"
        f'  cert_file: "{pki.server.cert}"\n'
        f'  key_file: "{pki.server.key}"\n'
        f'  ca_file: "{pki.ca}"\n'
        f"  verify: {'true' if verify else 'false'}\n"
        "  timeout: 2\n"
        "}\n"
    )


class LiveTLSTests(TestCase):
    """The publisher against a real nats-server that requires TLS, or does not offer it."""

    timeout = 60

    def setUp(self) -> None:
        self.binary = find_nats_server()
        self.folder = make_folder(self)
        self.pki = make_pki(self.folder / "pki")
        self.port = free_port()
        self.logs = LogCollector(self)
        self.shop_jwt = read_jwt(SHOP_ACCOUNT_JWT)

    def start_server(self, tls: str) -> NATSServerProcess:
        # The protocol trace shows in the server log whether a CONNECT ever arrived.
        server = NATSServerProcess(str(self.folder), self.port, name="tls-server", extra=tls + "trace: true\n")
        self.addCleanup(server.stop)
        server.start(self.binary)
        return server

    def start_publisher(self, tls: ClientTLS | None, url: str | None = None) -> ClaimUpdatePublisher:
        publisher = ClaimUpdatePublisher(
            reactor,
            [url or f"nats://127.0.0.1:{self.port}"],
            load_credentials(PUBLISHER_CREDS),
            connect_timeout=5.0,
            reconnect_wait=0.2,
            max_reconnects=-1,
            name="nasd-tls-test",
            tls=tls,
        )
        publisher.startService()
        self.addCleanup(publisher.stopService)
        return publisher

    def load(self, root: Path, cert: Path | None = None, key: Path | None = None) -> ClientTLS:
        tls = load_client_tls(
            ClientTLSConfig(root=str(root), cert=str(cert) if cert else None, key=str(key) if key else None)
        )
        assert tls is not None
        return tls

    async def publish_and_confirm(self, publisher: ClaimUpdatePublisher, server: NATSServerProcess) -> None:
        """Publish SHOP, which the server has not loaded, and wait for its PONG and its
        "jwt update skipped" reply, which shows that the server read the update."""
        await wait_until(lambda: publisher.connected, "the publisher connects with TLS")
        publisher.publish_account_update(SHOP_ACCOUNT, self.shop_jwt)
        await wait_until(
            lambda: publisher.pending_count == 0 and publisher.last_acknowledgements is not None,
            "the update is confirmed and answered",
        )
        acknowledgements = publisher.last_acknowledgements
        assert acknowledgements is not None
        self.assertEqual(acknowledgements.skipped, ("tls-server",))
        self.assertEqual(len(self.logs.matching("(server name tls-server, version 2.15.1, TLS)", LogLevel.info)), 1)
        self.assertIn("CONNECT", server.read_log())

    async def wait_for_rejection(self, fragment: str, server: NATSServerProcess) -> str:
        """Wait for the error log line containing *fragment*, and check that the
        publisher stays disconnected and sent no CONNECT."""
        await wait_until(lambda: bool(self.logs.matching(fragment, LogLevel.error)), f"nasd logs {fragment!r}")
        self.assertNotIn("CONNECT", server.read_log())
        return self.logs.matching(fragment, LogLevel.error)[0]

    def test_server_verified_with_root(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._server_verified_with_root())

    async def _server_verified_with_root(self) -> None:
        server = self.start_server(server_tls_block(self.pki, verify=False))
        publisher = self.start_publisher(self.load(self.pki.ca))

        await self.publish_and_confirm(publisher, server)

    def test_tls_url_verifies_localhost(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._tls_url_verifies_localhost())

    async def _tls_url_verifies_localhost(self) -> None:
        server = self.start_server(server_tls_block(self.pki, verify=False))
        publisher = self.start_publisher(self.load(self.pki.ca), url=f"tls://localhost:{self.port}")

        await self.publish_and_confirm(publisher, server)
        self.assertEqual(publisher.server_url, f"tls://localhost:{self.port}")

    def test_client_certificate_accepted(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._client_certificate_accepted())

    async def _client_certificate_accepted(self) -> None:
        server = self.start_server(server_tls_block(self.pki, verify=True))
        tls = self.load(self.pki.ca, self.pki.client.cert, self.pki.client.key)
        publisher = self.start_publisher(tls)

        await self.publish_and_confirm(publisher, server)

    def test_missing_client_certificate_rejected(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._missing_client_certificate_rejected())

    async def _missing_client_certificate_rejected(self) -> None:
        server = self.start_server(server_tls_block(self.pki, verify=True))
        publisher = self.start_publisher(self.load(self.pki.ca))
        publisher.publish_account_update(SHOP_ACCOUNT, self.shop_jwt)

        message = await self.wait_for_rejection("failed before the NATS handshake", server)

        self.assertIn("nats.tls.cert and nats.tls.key", message)
        self.assertFalse(publisher.connected)
        self.assertEqual(publisher.pending_count, 1)

    def test_untrusted_server_rejected(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._untrusted_server_rejected())

    async def _untrusted_server_rejected(self) -> None:
        server = self.start_server(server_tls_block(self.pki, verify=False))
        publisher = self.start_publisher(self.load(self.pki.other_ca))
        publisher.publish_account_update(SHOP_ACCOUNT, self.shop_jwt)

        message = await self.wait_for_rejection("failed before the NATS handshake", server)

        self.assertIn(f"TLS connection to NATS server nats://127.0.0.1:{self.port} failed", message)
        self.assertIn("certificate verify failed", message)
        self.assertIn("check that nats.tls.root contains the CA that signed the server certificate", message)
        self.assertFalse(publisher.connected)
        self.assertEqual(publisher.pending_count, 1)
        self.assertIsNone(publisher.last_published)

    def test_server_without_tls_rejected(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._server_without_tls_rejected())

    async def _server_without_tls_rejected(self) -> None:
        server = self.start_server("")
        publisher = self.start_publisher(self.load(self.pki.ca))
        publisher.publish_account_update(SHOP_ACCOUNT, self.shop_jwt)

        message = await self.wait_for_rejection("does not offer TLS", server)

        self.assertIn("closing the connection without sending credentials", message)
        self.assertFalse(publisher.connected)
        self.assertEqual(publisher.pending_count, 1)
