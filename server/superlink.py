"""``fedlora superlink``: Flower's SuperLink, with the keys of joining sites named.

Flower's SuperLink logs a refused site's key as raw PEM bytes, which no one can match against
a site. This runs the same SuperLink (``flower-superlink``, with every option it takes) and
rewrites each key in its log into its SHA-256 fingerprint (``fedlora.key_fingerprint``), the
form ``fedlora site key`` printed at the site, and names the site whose key it is from the
coordinator's folder of site keys, or says no key there matches:

    fedlora superlink --site-keys "$COORD/site-keys" [flower-superlink options]
"""

from __future__ import annotations

import argparse
import ast
import logging
import re
import sys
from pathlib import Path

from fedlora.key_fingerprint import fingerprint, known_fingerprints

# Flower logs a key as the repr of its bytes: b'-----BEGIN PUBLIC KEY-----\n...'
_KEY_REPR = re.compile(r"public key: (b'[^']*'|b\"[^\"]*\")")


class KeyFingerprints(logging.Filter):
    """Rewrites ``public key: b'<PEM>'`` in a log record into the key's fingerprint and the
    site it belongs to (the ``*.pub`` files of ``site_keys``, read at each record, so a key
    saved there later is known)."""

    def __init__(self, site_keys: Path | None) -> None:
        super().__init__()
        self.site_keys = site_keys

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "public key: b" in message:
            record.msg, record.args = _KEY_REPR.sub(self._named, message), None
        return True

    def _named(self, match: re.Match) -> str:
        try:
            key = fingerprint(ast.literal_eval(match.group(1)))
        except (ValueError, SyntaxError):
            return match.group(0)
        site = known_fingerprints(self.site_keys).get(key)
        where = f"site {site} ({self.site_keys / (site + '.pub')})" if site else (
            f"no key in {self.site_keys} has it" if self.site_keys else "pass --site-keys to name its site")
        return f"public key {key} [{where}]"


def superlink_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora superlink", description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--site-keys", type=Path, help="the folder of the sites' public keys (NAME.pub); created if missing")
    args, flower_args = parser.parse_known_args(argv)
    if args.site_keys:
        args.site_keys.mkdir(parents=True, exist_ok=True)  # where the coordinator saves the sites' keys
    logging.getLogger("flwr").addFilter(KeyFingerprints(args.site_keys))
    from flwr.superlink.cli import flower_superlink  # the `flower-superlink` command itself

    sys.argv = ["flower-superlink", *flower_args]
    return flower_superlink() or 0
