"""Tests for the SuperLink CA and TLS certificate generator."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from server.certificates import CertificatePaths, certs_main, create_certificates

HOSTS = ("localhost", "127.0.0.1", "superlink.example.org", "::1")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificatePaths:
    """One certificate set shared by the read-only tests (RSA keygen is slow)."""
    return create_certificates(tmp_path_factory.mktemp("certs"), HOSTS)


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> CertificatePaths:
    """An unrelated CA, which must not be able to vouch for `certs`' server."""
    return create_certificates(tmp_path_factory.mktemp("other"))


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _tls_handshake(server: CertificatePaths, cafile: Path, hostname: str) -> bytes:
    """Serve `server`'s certificate on 127.0.0.1; connect trusting only `cafile`."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.server_cert, server.server_key)
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass  # The client refused the certificate; it reports why.

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            port = listener.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                    return tls.recv(2)
        finally:
            thread.join(10)


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_tls_handshake_with_client_trusting_only_the_ca(
    certs: CertificatePaths, hostname: str
) -> None:
    assert _tls_handshake(certs, certs.ca_cert, hostname) == b"ok"


def test_tls_handshake_fails_when_client_trusts_a_different_ca(
    certs: CertificatePaths, other_certs: CertificatePaths
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="local issuer"):
        _tls_handshake(certs, other_certs.ca_cert, "127.0.0.1")


def test_tls_handshake_fails_for_a_host_not_in_the_certificate(
    certs: CertificatePaths,
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _tls_handshake(certs, certs.ca_cert, "elsewhere.example.org")


def test_grpc_call_over_tls(certs: CertificatePaths) -> None:
    """The SuperLink's Fleet API is gRPC, whose TLS stack must accept the keys too."""
    handler = grpc.method_handlers_generic_handler(
        "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        trust = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", trust) as channel:
            assert channel.unary_unary("/t.Echo/Echo")(b"ping", timeout=10) == b"ping"
    finally:
        server.stop(None)


def test_server_certificate_is_issued_by_the_ca(
    certs: CertificatePaths, other_certs: CertificatePaths
) -> None:
    server_cert = _load(certs.server_cert)
    server_cert.verify_directly_issued_by(_load(certs.ca_cert))
    # Same issuer name (every fedlora CA is "fedlora CA"), so the signature decides.
    with pytest.raises(InvalidSignature):
        server_cert.verify_directly_issued_by(_load(other_certs.ca_cert))
    ca_constraints = _load(certs.ca_cert).extensions.get_extension_for_class(
        x509.BasicConstraints
    )
    assert ca_constraints.value.ca
    assert not server_cert.extensions.get_extension_for_class(
        x509.BasicConstraints
    ).value.ca


def test_san_lists_every_host_with_ips_as_ip_entries(certs: CertificatePaths) -> None:
    san = (
        _load(certs.server_cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    dns_names = san.get_values_for_type(x509.DNSName)
    assert dns_names == ["localhost", "superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_single_host_string_is_one_host(tmp_path: Path) -> None:
    paths = create_certificates(tmp_path, "superlink.example.org")
    san = (
        _load(paths.server_cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert list(san.get_values_for_type(x509.DNSName)) == ["superlink.example.org"]


def test_private_keys_are_owner_only(certs: CertificatePaths) -> None:
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for cert in (certs.ca_cert, certs.server_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    existing = tmp_path / "server.key"
    existing.write_text("keep me")
    with pytest.raises(FileExistsError, match=r"server\.key already exists"):
        create_certificates(tmp_path)
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]


def test_overwrite_replaces_files_and_tightens_key_permissions(tmp_path: Path) -> None:
    first = create_certificates(tmp_path)
    first.server_key.chmod(0o644)
    old_ca = first.ca_cert.read_bytes()
    second = create_certificates(tmp_path, overwrite=True)
    assert second.ca_cert.read_bytes() != old_ca
    assert stat.S_IMODE(second.server_key.stat().st_mode) == 0o600
    _load(second.server_cert).verify_directly_issued_by(_load(second.ca_cert))


@pytest.mark.parametrize(
    ("hosts", "days", "message"),
    [([], 365, "at least one host"), ([" localhost"], 365, "invalid host"),
     (["localhost"], 0, "days")],
)
def test_rejects_bad_arguments(
    tmp_path: Path, hosts: list[str], days: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        create_certificates(tmp_path, hosts, days)
    assert not any(tmp_path.iterdir())


def test_cli_prints_superlink_flags_and_refuses_a_second_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert certs_main(["--out", str(out), "--host", "10.0.0.5", "--days", "30"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"fedlora superlink --site-keys {out.parent / 'site-keys'} --ssl-ca-certfile {out / 'ca.crt'} "
        f"--ssl-certfile {out / 'server.pem'} --ssl-keyfile {out / 'server.key'} --enable-supernode-auth "
        f"--database {out.parent / 'superlink.db'}"
    ) in printed
    san = (
        _load(out / "server.pem")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert san.get_values_for_type(x509.DNSName) == []

    assert certs_main(["--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "already exists" in captured.err
    assert "Traceback" not in captured.err
