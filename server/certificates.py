"""Create a private CA and a SuperLink TLS certificate (`fedlora certs`).

Key type: RSA 3072 for both the CA and the server. The SuperLink serves one
port through gRPC (BoringSSL) and uvicorn (OpenSSL), and clients connect with
gRPC or the Flower CLI; RSA is accepted by every one of those stacks without
curve negotiation caveats, and it is what Flower's own certificate scripts use.
3072 bits gives 128-bit security (NIST) where 2048 gives only 112.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.key_files import refuse_existing, write_file

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
RSA_KEY_BITS = 3072
# Tolerate small clock differences between the coordinator and partner sites.
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificatePaths:
    """Where `create_certificates` wrote the CA and server files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def create_certificates(
    out_dir: str | Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    overwrite: bool = False,
) -> CertificatePaths:
    """Write a self-signed CA and a server certificate it signs into `out_dir`.

    The server certificate's SubjectAlternativeName lists every host: entries
    that parse as IP addresses become IP SANs, all others DNS SANs. Private keys
    are written with mode 0600. Raises FileExistsError naming the first file
    that already exists unless `overwrite` is true, and ValueError for empty
    hosts or a non-positive `days`.
    """
    if isinstance(hosts, str):
        # A bare string would otherwise be read as one host per character.
        hosts = [hosts]
    names = _subject_alt_names(hosts)
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    out = Path(out_dir).expanduser()
    paths = CertificatePaths(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    # Check every target before writing any, so a refusal leaves no mixed set.
    if not overwrite:
        refuse_existing(
            [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
        )

    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - CLOCK_SKEW, now + dt.timedelta(days=days)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    ca_cert = _ca_certificate(ca_key, not_before, not_after)
    server_key = rsa.generate_private_key(
        public_exponent=65537, key_size=RSA_KEY_BITS
    )
    server_cert = _server_certificate(
        server_key, ca_key, ca_cert, names, not_before, not_after
    )

    out.mkdir(parents=True, exist_ok=True)
    write_file(paths.ca_key, _key_pem(ca_key), 0o600, overwrite)
    write_file(paths.ca_cert, _cert_pem(ca_cert), 0o644, overwrite)
    write_file(paths.server_key, _key_pem(server_key), 0o600, overwrite)
    write_file(paths.server_cert, _cert_pem(server_cert), 0o644, overwrite)
    return paths


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Turn host strings into IP or DNS SAN entries, dropping duplicates."""
    if not hosts:
        raise ValueError("at least one host is required")
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not host or host != host.strip():
            raise ValueError(f"invalid host {host!r}: empty or has surrounding spaces")
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        if name not in names:
            names.append(name)
    return names


def _ca_certificate(
    key: rsa.RSAPrivateKey, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    """Build the self-signed CA, allowed to sign end-entity certificates only."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora CA")])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .sign(key, hashes.SHA256())
    )


# pylint: disable-next=too-many-arguments,too-many-positional-arguments
def _server_certificate(
    key: rsa.RSAPrivateKey,
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    names: list[x509.GeneralName],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """Build the TLS server certificate; clients match hosts against its SANs."""
    # A fixed CN: TLS clients match on the SANs, and a CN is capped at 64
    # characters, which a long DNS name could exceed.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora SuperLink")])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        # Strict verifiers (e.g. Python 3.13's default) require the AKI.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM, as the SuperLink reads it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    """Serialise a certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_main(argv: list[str] | None = None) -> int:
    """Command line for `fedlora certs`: create the CA and SuperLink certificate."""
    parser = argparse.ArgumentParser(
        prog="fedlora certs",
        description="Create a private CA and a TLS certificate for the SuperLink.",
    )
    parser.add_argument(
        "--out", default="certificates", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="H",
        help="DNS name or IP address sites use to reach the SuperLink; repeatable "
        f"(default: {' and '.join(DEFAULT_HOSTS)})",
    )
    parser.add_argument(
        "--days", type=int, default=365, help="validity in days (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing files in --out"
    )
    args = parser.parse_args(argv)
    hosts = args.hosts or list(DEFAULT_HOSTS)
    try:
        paths = create_certificates(args.out, hosts, args.days, args.overwrite)
    except (OSError, ValueError) as err:
        print(f"fedlora certs: error: {err}", file=sys.stderr)
        return 1

    print(f"CA certificate:     {paths.ca_cert}  (give this to every site)")
    print(f"CA private key:     {paths.ca_key}  (keep secret; signs new certificates)")
    print(f"Server certificate: {paths.server_cert}  (valid for {', '.join(hosts)})")
    print(f"Server private key: {paths.server_key}  (keep secret)")
    print("\nStart the SuperLink with (docs/deploy.md, step 3):")
    print(
        f"  fedlora superlink --site-keys {paths.ca_cert.parent.parent / 'site-keys'} "
        f"--ssl-ca-certfile {paths.ca_cert} --ssl-certfile {paths.server_cert} --ssl-keyfile {paths.server_key} "
        f"--enable-supernode-auth --database {paths.ca_cert.parent.parent / 'superlink.db'} "
        "--disable-runtime-dependency-installation --host 0.0.0.0 --port <port>"
    )
    print("  (--enable-supernode-auth admits only registered site keys; --database keeps them across restarts)")
    print("Sites connect with:")
    # An IPv6 address needs brackets in host:port.
    address = f"[{hosts[0]}]" if ":" in hosts[0] else hosts[0]
    print(
        f"  flower-supernode --superlink {address}:<port> "
        f"--root-certificates {paths.ca_cert.name} ..."
    )
    return 0
