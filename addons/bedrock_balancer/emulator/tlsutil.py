"""A throw-away certificate authority and server certificate for the emulator's TLS listeners.

Clients are pointed at the CA file (boto3 ``verify=ca_path``, ``AWS_CA_BUNDLE``, mitmproxy's
``ssl_verify_upstream_trusted_ca``), so certificate verification stays on everywhere, as it should
in production. The server certificate names ``localhost``, ``127.0.0.1`` and ``::1``.

Keys are EC P-256: generating them takes about a millisecond, so a fresh temporary directory per
emulator costs nothing. A given ``cert_dir`` is reused while its files are present and the server
certificate has more than a day left; files are written to a temporary name and renamed, so two
processes sharing the directory never read a half-written file. The extensions (basic constraints,
key usage, subject and authority key identifiers) are the ones strict verifiers (OpenSSL's
``X509_STRICT``, Python 3.13's default) insist on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "emulator-ca.pem"
CA_KEY_FILE = "emulator-ca-key.pem"
SERVER_CERT_FILE = "emulator-server.pem"
SERVER_KEY_FILE = "emulator-server-key.pem"

SERVER_DNS_NAMES = ("localhost",)
SERVER_IP_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class CertificatePaths:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def ensure_certificates(cert_dir: str | os.PathLike[str]) -> CertificatePaths:
    """Return the CA and server certificate in ``cert_dir``, creating them if needed."""
    directory = Path(cert_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = CertificatePaths(
        ca_cert=directory / CA_CERT_FILE,
        server_cert=directory / SERVER_CERT_FILE,
        server_key=directory / SERVER_KEY_FILE,
    )
    if not _still_usable(paths):
        _generate(directory, paths)
    return paths


def server_ssl_context(paths: CertificatePaths) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.server_cert, paths.server_key)
    # HTTP/1.1 only: advertising h2 would invite clients the emulator cannot serve.
    context.set_alpn_protocols(["http/1.1"])
    return context


def _still_usable(paths: CertificatePaths) -> bool:
    if not (paths.ca_cert.exists() and paths.server_cert.exists() and paths.server_key.exists()):
        return False
    try:
        certificate = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    except ValueError:
        return False
    remaining = certificate.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    return remaining > dt.timedelta(days=1)


def _generate(directory: Path, paths: CertificatePaths) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bedrock-balancer emulator test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in SERVER_DNS_NAMES]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IP_ADDRESSES]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        # Under 398 days: the longest validity some TLS clients accept for a server certificate.
        .not_valid_after(now + dt.timedelta(days=397))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    # Key before certificate, CA last: a reader that finds a file finds the ones it depends on.
    _write_atomically(directory / CA_KEY_FILE, _private_pem(ca_key))
    _write_atomically(paths.server_key, _private_pem(server_key))
    _write_atomically(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_atomically(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.chmod(temporary, 0o600 if b"PRIVATE KEY" in data else 0o644)
    os.replace(temporary, path)
