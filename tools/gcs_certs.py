"""A throwaway test CA and a TLS server certificate for the GCS hosts (local emulator only).

The private keys live next to the certificates in a temporary folder and sign nothing else;
clients trust them only through `CURL_CA_BUNDLE` in the emulator's environment.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib

from tools.gcs_proxy import GCS_HOSTS


@dataclasses.dataclass(frozen=True)
class Certificates:
    """PEM files of the throwaway CA and the server certificate it signed."""

    ca_cert: str
    server_cert: str
    server_key: str


def make_certificates(
    directory: str | os.PathLike, hosts: tuple[str, ...] = GCS_HOSTS
) -> Certificates:
    """Writes a test CA and a server certificate for `hosts`, localhost and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "boneage-tpu test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(h) for h in (*hosts, "localhost")]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = pathlib.Path(directory)
    pem = serialization.Encoding.PEM
    paths = Certificates(str(out / "ca.pem"), str(out / "server.pem"), str(out / "server.key"))
    pathlib.Path(paths.ca_cert).write_bytes(ca_cert.public_bytes(pem))
    # The chain lets clients that only know the CA verify the leaf.
    pathlib.Path(paths.server_cert).write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    pathlib.Path(paths.server_key).write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths
