"""TLS for connections to NATS servers: the trust root and the client certificate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)

from nasd.config import ClientTLSConfig


class ClientTLSError(ValueError):
    """A TLS file configured for connections to NATS is missing, unreadable or invalid."""


@dataclass(frozen=True)
class ClientTLS:
    """Loaded TLS settings for connections to NATS servers.

    ``trust_root`` (an IOpenSSLTrustRoot provider, which twisted.internet.ssl does not
    export) verifies server certificates, and None means the platform's trust store.
    ``client_certificate`` is presented to servers that request one.

    NOTE: with a client certificate, pyOpenSSL 26.4 warns (DeprecationWarning) that
    Twisted 26.10's optionsForClientTLS passes it pyOpenSSL X509 and PKey objects.
    """

    trust_root: Any = None
    client_certificate: PrivateCertificate | None = None

    def options_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Build connection options that require TLS 1.2 or later and a server
        certificate valid for *hostname*, a DNS name or an IP address."""
        return optionsForClientTLS(
            hostname,
            trustRoot=self.trust_root,
            clientCertificate=self.client_certificate,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )


def load_client_tls(tls: ClientTLSConfig) -> ClientTLS | None:
    """Load the CA, certificate and key files of ``nats.tls``, or return None when none is set.

    Raises ClientTLSError naming the file when a file is missing, unreadable, not PEM,
    or when the certificate and key do not belong together or only one of them is set.
    The client certificate file may contain a chain, but only its first certificate is
    presented to the server.
    """
    if not tls.enabled:
        return None
    if tls.cert is not None and tls.key is None:
        raise ClientTLSError(f"nats.tls.cert {tls.cert} is set without nats.tls.key; set both or neither")
    if tls.key is not None and tls.cert is None:
        raise ClientTLSError(f"nats.tls.key {tls.key} is set without nats.tls.cert; set both or neither")

    trust_root = None
    if tls.root is not None:
        trust_root = trustRootFromCertificates(_load_certificates(tls.root, "nats.tls.root"))

    client_certificate = None
    if tls.cert is not None and tls.key is not None:
        client_certificate = _load_client_certificate(tls.cert, tls.key)
    return ClientTLS(trust_root=trust_root, client_certificate=client_certificate)


def _read_tls_file(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ClientTLSError(f"cannot read the {setting} file {path}: {error.strerror or error}") from None


def _load_certificates(path: str, setting: str) -> list[Certificate]:
    data = _read_tls_file(path, setting)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise ClientTLSError(f"the {setting} file {path} contains no valid PEM certificate: {error}") from None
    return [Certificate(crypto.X509.from_cryptography(certificate)) for certificate in certificates]


def _load_client_certificate(cert_path: str, key_path: str) -> PrivateCertificate:
    [certificate, *_] = _load_certificates(cert_path, "nats.tls.cert")
    data = _read_tls_file(key_path, "nats.tls.key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        # TypeError is cryptography's error for a key encrypted with a passphrase.
        raise ClientTLSError(
            f"the nats.tls.key file {key_path} is not a valid unencrypted PEM private key: {error}"
        ) from None

    certificate_key = certificate.original.to_cryptography().public_key()
    if _public_key_bytes(key.public_key()) != _public_key_bytes(certificate_key):
        raise ClientTLSError(f"the nats.tls.key file {key_path} does not match the certificate in {cert_path}")
    private_key = KeyPair(crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
    return PrivateCertificate.fromCertificateAndKeyPair(certificate, private_key)


def _public_key_bytes(key: Any) -> bytes:
    encoded: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return encoded
