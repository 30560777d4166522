"""``fedlora site check``: before a site starts its SuperNode, can it join, and if not, why?

Three checks, each answered in plain words, in the order a connection makes them:

1. **reachable**: a TCP connection to the SuperLink's address (else: the address, a firewall
   or the coordinator's allow-list);
2. **TLS**: the SuperLink's certificate is signed by the site's ``ca.crt`` and names the host
   (else: the wrong CA file, or a host name the certificate does not cover);
3. **key accepted**: Flower's own SuperNode signs in with the site's key, exactly as it will
   when started, and signs out again (else: the key is not registered, with its fingerprint to
   send the coordinator).

    fedlora site check --superlink HOST:PORT --root-certificates ca.crt --auth-supernode-private-key KEY

Run it before starting the SuperNode, not beside it: it signs in with the same key. Exit code 0
when every check passes, 1 when one fails (the later ones are then skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedlora.key_fingerprint import fingerprint

SIGN_IN_SECONDS = 60


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def check_reachable(host: str, port: int) -> Check:
    try:
        with socket.create_connection((host, port), timeout=10):
            return Check("reachable", True, f"{host}:{port} accepts connections")
    except OSError as err:
        return Check("reachable", False, f"cannot connect to {host}:{port} ({err.strerror or err}); check the "
                     "address and port the coordinator gave you, and that its firewall lets this machine in")


def check_tls(host: str, port: int, ca_file: Path) -> Check:
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as err:
        return Check("TLS", False, f"cannot read {ca_file} as a CA certificate ({err})")
    try:
        with socket.create_connection((host, port), timeout=10) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
            return Check("TLS", True, f"the SuperLink's certificate ({subject.get('commonName', '?')}) is signed by {ca_file} "
                         f"and covers {host}")
    except ssl.SSLCertVerificationError as err:
        hint = (f"the certificate does not cover the name {host}: use the host name the coordinator's certificate "
                "was made for" if "match" in str(err.verify_message) else
                f"the SuperLink's certificate is not signed by {ca_file}: get ca.crt from the coordinator again")
        return Check("TLS", False, f"{err.verify_message}; {hint}")
    except (OSError, ssl.SSLError) as err:
        return Check("TLS", False, f"no TLS handshake with {host}:{port} ({err}); is it the SuperLink's port, with TLS on?")


def check_key(superlink: str, ca_file: Path, private_key: Path, timeout: float = SIGN_IN_SECONDS) -> Check:
    """Start ``flower-supernode`` with the key, wait until it is signed in or refused, stop it."""
    public = private_key.with_name(private_key.name + ".pub")
    try:
        key = fingerprint(public.read_bytes())
    except (OSError, ValueError) as err:
        return Check("key accepted", False, f"cannot read the public key {public} ({err})")
    with tempfile.TemporaryDirectory(prefix="fedlora-check-") as home:
        command = [
            str(Path(sys.executable).with_name("flower-supernode")), "--superlink", superlink,
            "--root-certificates", str(ca_file), "--auth-supernode-private-key", str(private_key),
            "--port", str(_free_port()), "--max-retries", "0",
        ]
        env = os.environ | {"FLWR_HOME": home, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        log = Path(home) / "supernode.log"
        with log.open("wb") as out:
            # Its own process group: the SuperNode starts helper processes, which go with it.
            node = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and node.poll() is None and "SuperNode ID:" not in log.read_text(errors="replace"):
                time.sleep(0.5)
            _stop_group(node)
        output = log.read_text(errors="replace")
    if "SuperNode ID:" in output:
        node_id = output.split("SuperNode ID:")[1].split()[0]
        return Check("key accepted", True, f"the key {key} is registered (node ID {node_id})")
    if "Failed to activate SuperNode" in output:
        return Check("key accepted", False, f"the coordinator has not registered this key ({key}); send it {public} "
                     "and read it the fingerprint, so that it runs `flwr supernode register` with it")
    return Check("key accepted", False, f"the SuperNode neither signed in nor was refused within {timeout:.0f} s; "
                 f"its last words: {output.strip().splitlines()[-1] if output.strip() else '(none)'}")


def run_checks(superlink: str, ca_file: Path, private_key: Path) -> list[Check]:
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        return [Check("address", False, f"--superlink {superlink!r} is not HOST:PORT")]
    checks = []
    for check in (lambda: check_reachable(host, int(port)), lambda: check_tls(host, int(port), ca_file),
                  lambda: check_key(superlink, ca_file, private_key)):
        checks.append(check())
        if not checks[-1].passed:
            break
    return checks


def check_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora site check", description=__doc__.splitlines()[0])
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator's SuperLink")
    parser.add_argument("--root-certificates", required=True, type=Path, help="the coordinator's ca.crt")
    parser.add_argument("--auth-supernode-private-key", required=True, type=Path, help="this site's private key")
    args = parser.parse_args(argv)
    checks = run_checks(args.superlink, args.root_certificates, args.auth_supernode_private_key)
    for check in checks:
        print(f"{'ok ' if check.passed else 'FAILED'}  {check.name}: {check.detail}")
    return 0 if all(c.passed for c in checks) and len(checks) == 3 else 1


def _stop_group(node: subprocess.Popen) -> None:
    """SIGTERM to the group (the SuperNode signs out), a grace period, then SIGKILL to whatever
    is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
