"""Create a partner site's SuperNode authentication key pair (`fedlora site key`).

Flower 1.41 reads the key pair with `cryptography`'s OpenSSH loaders:
`flower-supernode --auth-supernode-private-key` calls `load_ssh_private_key`
(no password) and insists on an elliptic-curve key, and
`flwr supernode register` calls `load_ssh_public_key` and accepts only NIST
curves. OpenSSH's ECDSA formats exist for P-256, P-384 and P-521; we use
P-384, the curve Flower itself generates and documents.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.key_files import refuse_existing, write_file
from fedlora.key_fingerprint import fingerprint


def create_site_key(
    out_dir: str | Path, name: str = "site", overwrite: bool = False
) -> tuple[Path, Path]:
    """Write `<name>` (OpenSSH private key, mode 0600) and `<name>.pub` to `out_dir`.

    Returns (private key path, public key path). Raises FileExistsError naming
    the first file that already exists unless `overwrite` is true, and
    ValueError if `name` is not a plain file name.
    """
    if name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"invalid key name {name!r}: use a plain file name")
    out = Path(out_dir).expanduser()
    private_path, public_path = out / name, out / f"{name}.pub"
    if not overwrite:
        refuse_existing((private_path, public_path))

    key = ec.generate_private_key(ec.SECP384R1())
    # Unencrypted: flower-supernode loads the key with password=None.
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    # Like ssh-keygen, end the public line with a comment naming the key.
    public_line = public_bytes + b" " + name.encode() + b"\n"

    out.mkdir(parents=True, exist_ok=True)
    write_file(private_path, private_bytes, 0o600, overwrite)
    write_file(public_path, public_line, 0o644, overwrite)
    return private_path, public_path


def site_main(argv: list[str] | None = None) -> int:
    """Command line for `fedlora site key`: create this site's SuperNode key pair."""
    parser = argparse.ArgumentParser(
        prog="fedlora site key",
        description="Create the key pair a partner site's SuperNode "
        "authenticates with.",
    )
    parser.add_argument(
        "--out", default="keys", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--name", default="site", help="key file name (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing key pair"
    )
    args = parser.parse_args(argv)
    try:
        private_path, public_path = create_site_key(args.out, args.name, args.overwrite)
    except (OSError, ValueError) as err:
        print(f"fedlora site key: error: {err}", file=sys.stderr)
        return 1

    print(f"Private key: {private_path}  (keep it on this machine; never share it)")
    print(f"Public key:  {public_path}  (send this to the coordinator)")
    print(f"Fingerprint: {fingerprint(public_path.read_bytes())}  (read it to the coordinator by phone; "
          "`ssh-keygen -lf` prints the same)")
    print("\nThe coordinator registers the public key with:")
    print(f"  flwr supernode register {public_path.name} <connection>")
    print("Check that it is accepted (TLS, reachability, registration) with:")
    print(f"  fedlora site check --superlink <host>:<port> --root-certificates ca.crt --auth-supernode-private-key {private_path}")
    print("Then start this site's SuperNode with:")
    print(
        "  flower-supernode --superlink <host>:<port> --root-certificates ca.crt "
        f"--auth-supernode-private-key {private_path}"
    )
    return 0
