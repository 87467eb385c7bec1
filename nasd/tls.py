"""HTTPS for nasd's API: loading the certificate, its key and the CA of client certificates."""

from __future__ import annotations

import datetime
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger

from nasd.config import ServerTLSConfig
from nasd.logs import observer

log = Logger(observer=observer)


class ServerTLSError(ValueError):
    """An HTTPS setting or file that cannot be used; the message names the setting and file."""


def load_server_tls(tls: ServerTLSConfig) -> CertificateOptions | None:
    """Load the HTTPS certificate, its key and the client CA, or return None without HTTPS.

    Raises ServerTLSError naming the setting and file at fault: a missing or unreadable
    file, a file that is not PEM of the expected kind, or a key that does not match
    the certificate.
    """
    if not tls.enabled:
        if tls.ca is not None or tls.verify:
            raise ServerTLSError("http.tls.ca and http.tls.verify need http.tls.cert and http.tls.key (HTTPS) as well")
        return None
    if tls.cert is None or tls.key is None:
        missing, present = ("http.tls.cert", "http.tls.key") if tls.cert is None else ("http.tls.key", "http.tls.cert")
        raise ServerTLSError(f"{present} is set but {missing} is not; HTTPS needs both")
    if tls.verify and tls.ca is None:
        raise ServerTLSError(
            "http.tls.verify is true but http.tls.ca is not set; "
            "set it to the CA file that signs the client certificates"
        )

    chain = _load_certificates(tls.cert, "http.tls.cert")
    key = _load_private_key(tls.key)
    if _public_key_der(chain[0].public_key()) != _public_key_der(key.public_key()):
        raise ServerTLSError(f"the private key {tls.key} (http.tls.key) does not match the certificate {tls.cert}")
    client_cas = _load_certificates(tls.ca, "http.tls.ca") if tls.ca is not None else []
    if tls.ca is not None and not tls.verify:
        log.warn("http.tls.ca {path} has no effect unless http.tls.verify is true", path=tls.ca)

    # NOTE: pyOpenSSL 26.4 warns (DeprecationWarning) about the X509 and PKey objects
    # below, but Twisted 26.10's CertificateOptions documents and types exactly these.
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(cert) for cert in chain[1:]],
        verify=tls.verify,
        caCerts=[crypto.X509.from_cryptography(cert) for cert in client_cas] if tls.verify else None,
        requireCertificate=tls.verify,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()
    except SSL.Error as error:
        raise ServerTLSError(f"the TLS settings for {tls.cert} and {tls.key} cannot be used: {error}") from None

    subject = chain[0].subject.rfc4514_string()
    log.info("HTTPS: certificate {cert} ({subject}), key {key}", cert=tls.cert, subject=subject, key=tls.key)
    expires = chain[0].not_valid_after_utc
    if expires < datetime.datetime.now(datetime.UTC):
        log.warn("HTTPS: the certificate {cert} expired on {date}; clients will reject it", cert=tls.cert, date=expires)
    if tls.verify:
        log.info("HTTPS: clients must present a certificate signed by a CA in {path}", path=tls.ca)
    return options


def _load_certificates(path: str, setting: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ServerTLSError(f"cannot read {setting} {path}: {_reason(error)}") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ServerTLSError(f"{setting} {path} is not a PEM certificate file") from None


def _load_private_key(path: str) -> Any:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ServerTLSError(f"cannot read http.tls.key {path}: {_reason(error)}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ServerTLSError(f"http.tls.key {path} is encrypted; nasd needs the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ServerTLSError(f"http.tls.key {path} is not a PEM private key") from None


def _public_key_der(key: Any) -> bytes:
    return cast(bytes, key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
