"""A public key's SHA-256 fingerprint, as ``ssh-keygen -lf key.pub`` prints it.

One form everywhere a site's key is shown: ``fedlora site key`` when it creates the key,
``fedlora site check`` at the site, and the coordinator's SuperLink log (``fedlora superlink``)
when a key tries to join. ``SHA256:`` + base64 (no padding) of the SHA-256 of the key's OpenSSH
wire encoding, whatever the encoding the key arrives in (OpenSSH line, PEM, DER).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


def fingerprint(public_key: bytes) -> str:
    """The fingerprint of an OpenSSH, PEM or DER public key; ValueError if it is none of them."""
    key = None
    text = public_key.strip()  # only the text forms: a DER key may end in whitespace bytes
    for load, data in ((serialization.load_ssh_public_key, text), (serialization.load_pem_public_key, text),
                       (serialization.load_der_public_key, public_key)):
        try:
            key = load(data)
            break
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    if key is None:
        raise ValueError("not a public key in OpenSSH, PEM or DER form")
    wire = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(wire)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_fingerprints(folder: Path | None) -> dict[str, str]:
    """fingerprint -> site name (the file's stem) for every ``*.pub`` key in ``folder``."""
    known = {}
    for path in sorted(folder.glob("*.pub")) if folder and folder.is_dir() else ():
        try:
            known[fingerprint(path.read_bytes())] = path.stem
        except (OSError, ValueError):
            continue
    return known
