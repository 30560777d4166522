"""Writing key and certificate files safely (shared by ``fedlora certs`` and ``fedlora site key``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def refuse_existing(paths: Sequence[Path]) -> None:
    """Raise FileExistsError for the first path that exists; checking all before writing any
    means a refusal never leaves a mixed set of old and new files."""
    for path in paths:
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; refusing to overwrite it "
                "(pass overwrite=True, or --overwrite on the command line)"
            )


def write_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with permissions ``mode`` set before any byte lands."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as handle:
        # os.open's mode is masked by the umask and ignored for an existing
        # file, so set it explicitly: an overwritten key must not stay readable.
        os.fchmod(handle.fileno(), mode)
        handle.write(data)
