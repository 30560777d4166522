"""Tests for the SuperNode authentication key pair, loaded the way Flower loads it."""

from __future__ import annotations

import argparse
import importlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    public_key_to_bytes,
    sign_message,
    verify_signature,
)

from client.site_key import create_site_key, site_main

# The modules behind `flower-supernode --auth-supernode-private-key` and
# `flwr supernode register`, whose loaders the tests call. Imported by path:
# each package re-exports a function of the module's name, shadowing it.
flower_supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")
register = importlib.import_module("flwr.cli.supernode.register")


class FlowerRejectedKey(Exception):
    """Raised instead of Flower's exit when its loader rejects a key file."""


@pytest.fixture(autouse=True)
def _fail_instead_of_exiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn flwr_exit into an exception: it would end pytest (os._exit after 5 s)."""

    def reject(code: int, message: str | None = None, *args: object, **kwargs: object):
        raise FlowerRejectedKey(f"exit code {code}: {message}")

    monkeypatch.setattr(flower_supernode, "flwr_exit", reject)
    monkeypatch.setattr(register, "flwr_exit", reject)


def _supernode_load(private_path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the private key as flower-supernode's argument handling does."""
    args = argparse.Namespace(
        auth_supernode_private_key=str(private_path), auth_supernode_public_key=None
    )
    keys = flower_supernode._try_setup_client_authentication(args)
    assert keys is not None
    return keys[0]


def test_files_are_openssh_ecdsa_p384(tmp_path: Path) -> None:
    private_path, public_path = create_site_key(tmp_path, "hospital-a")
    assert (private_path, public_path) == (
        tmp_path / "hospital-a",
        tmp_path / "hospital-a.pub",
    )
    assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert public_path.read_text().endswith(" hospital-a\n")


def test_flower_supernode_loads_the_private_key(tmp_path: Path) -> None:
    private_path, _ = create_site_key(tmp_path)
    key = _supernode_load(private_path)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP384R1)


def test_flower_supernode_rejects_a_pem_key(tmp_path: Path) -> None:
    """Guards the harness above: the format matters, and a wrong one fails here."""
    pem_path = tmp_path / "pem-key"
    pem_path.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(FlowerRejectedKey, match="Unable to parse the private key"):
        _supernode_load(pem_path)


def test_registered_public_key_matches_the_private_key(tmp_path: Path) -> None:
    private_path, public_path = create_site_key(tmp_path)
    key = _supernode_load(private_path)
    registered = register.try_load_public_key(public_path)
    assert registered == public_key_to_bytes(key.public_key())
    # What the SuperLink checks: a signature by the node verifies against the
    # registered key, and one by another site's key does not.
    message = b"node authentication"
    signature = sign_message(key, message)
    assert verify_signature(bytes_to_public_key(registered), message, signature)
    other_private, _ = create_site_key(tmp_path, "other")
    forged = sign_message(_supernode_load(other_private), message)
    assert not verify_signature(bytes_to_public_key(registered), message, forged)


def test_private_key_is_owner_only_even_when_overwritten(tmp_path: Path) -> None:
    private_path, public_path = create_site_key(tmp_path)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    private_path.chmod(0o644)
    old_public = public_path.read_bytes()
    create_site_key(tmp_path, overwrite=True)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert public_path.read_bytes() != old_public


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "site.pub").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"site\.pub already exists"):
        create_site_key(tmp_path)
    assert (tmp_path / "site.pub").read_text() == "keep me"
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("name", ["", "..", "../escape", "sub/site"])
def test_rejects_names_that_are_not_plain_file_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        create_site_key(tmp_path / "keys", name)
    assert not tmp_path.joinpath("keys").exists()


def test_cli_prints_next_commands_and_refuses_a_second_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert site_main(["--out", str(out), "--name", "clinic"]) == 0
    printed = capsys.readouterr().out
    assert "flwr supernode register clinic.pub <connection>" in printed
    assert f"--auth-supernode-private-key {out / 'clinic'}" in printed
    _supernode_load(out / "clinic")

    assert site_main(["--out", str(out), "--name", "clinic"]) == 1
    captured = capsys.readouterr()
    assert "already exists" in captured.err
    assert "Traceback" not in captured.err


def test_the_fingerprint_is_the_same_in_every_form_and_the_superlink_log_names_the_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the site prints, what ``ssh-keygen -lf`` prints (SHA256 of the OpenSSH key blob),
    and what the coordinator's SuperLink logs for the PEM bytes Flower sends, are one string."""
    import base64
    import hashlib
    import logging

    from cryptography.hazmat.primitives import serialization

    from fedlora.key_fingerprint import fingerprint
    from server.superlink import KeyFingerprints

    assert site_main(["--out", str(tmp_path / "site"), "--name", "clinic"]) == 0
    printed = capsys.readouterr().out.split("Fingerprint: ")[1].split()[0]
    line = (tmp_path / "site" / "clinic.pub").read_bytes()
    blob = base64.b64decode(line.split()[1])
    assert printed == "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    key = serialization.load_ssh_public_key(line)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert fingerprint(pem) == fingerprint(line) == printed

    keys = tmp_path / "site-keys"
    keys.mkdir()
    record = logging.LogRecord("flwr", logging.ERROR, __file__, 1, "%s",
                               (f"[/fleet][ApiError:1] Attempted to register SuperNode with public key: {pem!r}, "
                                "exception: No SuperNode found with the given public key.",), None)
    assert KeyFingerprints(keys).filter(record)
    assert record.getMessage().startswith(f"[/fleet][ApiError:1] Attempted to register SuperNode with public key {printed} "
                                          f"[no key in {keys} has it], exception")
    (keys / "clinic.pub").write_bytes(line)  # the coordinator saves the site's key
    record.msg, record.args = f"public key: {pem!r}", None
    KeyFingerprints(keys).filter(record)
    assert record.getMessage() == f"public key {printed} [site clinic ({keys / 'clinic.pub'})]"
