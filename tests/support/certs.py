"""Self-signed certificates made in the test: a CA, and a certificate it signs for the data plane
(server and client use, for the DNS name ``hsd-dataplane`` and the IP 127.0.0.1)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                   subject)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_tls_files(directory: Path, name: str = "hsd-dataplane") -> dict[str, str]:
    """Write ``ca.pem``, ``cert.pem``/``key.pem`` (signed by the CA) and ``other-ca.pem`` /
    ``other-cert.pem`` / ``other-key.pem`` (a stranger's CA and certificate) into ``directory``;
    return their paths by stem."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix in ("", "other-"):
        ca_key = _key()
        ca = _cert(f"{prefix}hsd-test-ca", ca_key, None, ca_key, ca=True)
        key = _key()
        cert = _cert(name, key, ca.subject, ca_key, ca=False,
                     sans=(x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
        for stem, data in ((f"{prefix}ca", ca.public_bytes(serialization.Encoding.PEM)),
                           (f"{prefix}cert", cert.public_bytes(serialization.Encoding.PEM)),
                           (f"{prefix}key", _pem_key(key))):
            path = directory / f"{stem}.pem"
            path.write_bytes(data)
            out[stem] = str(path)
    return out
