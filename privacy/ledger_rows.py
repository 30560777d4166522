"""A privacy ledger's rows: their columns, their meaning and how they chain (the file and its
transactions are :mod:`privacy.ledger`).

The chain: row n stores ``hash_n = sha256(hash_{n-1} + canonical_json(row_n))`` with
``hash_0 = "0" * 64``, where the canonical JSON covers every other column (``id`` included, so
rows cannot be reordered) with sorted keys (:func:`row_hash`). Editing, deleting or inserting a
row breaks the chain from there on.

Columns in table order; all but ``hash`` enter a row's hash. Columns added after the first
release (:data:`EXTENSION_COLUMNS`) are NULL in older rows, and a NULL one is not hashed, so an
old row's hash never changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from privacy.skellam import MECHANISM as SKELLAM
from privacy.skellam import SkellamRow

GENESIS_HASH = "0" * 64
VERSIONED_PACKAGES = ("torch", "opacus", "peft", "transformers", "flwr")

COLUMNS = (
    "id", "kind", "run_id", "round", "recorded_at", "noise_multiplier", "sample_rate", "steps",
    "max_grad_norm", "delta", "accountant", "epsilon", "max_epsilon", "versions", "rng_mode",
    "refers_to", "prev_hash", "hash", "mechanism", "privacy_unit", "reason",
)
# Added after the first release; NULL in older rows, and then not hashed (see the module doc).
EXTENSION_COLUMNS = ("mechanism", "privacy_unit", "reason")

TABLE = """CREATE TABLE IF NOT EXISTS ledger (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL CHECK (kind IN ('spend', 'confirm', 'refusal')),
    run_id           TEXT    NOT NULL,
    round            INTEGER NOT NULL,
    recorded_at      TEXT    NOT NULL,
    noise_multiplier REAL    NOT NULL,
    sample_rate      REAL    NOT NULL,
    steps            INTEGER NOT NULL,
    max_grad_norm    REAL    NOT NULL,
    delta            REAL    NOT NULL,
    accountant       TEXT    NOT NULL,
    epsilon          REAL    NOT NULL,
    max_epsilon      REAL    NOT NULL,
    versions         TEXT    NOT NULL,
    rng_mode         TEXT    NOT NULL,
    refers_to        INTEGER,
    prev_hash        TEXT    NOT NULL,
    hash             TEXT    NOT NULL,
    mechanism        TEXT,
    privacy_unit     TEXT,
    reason           TEXT
)"""
TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE refused'); END""",
)


class LedgerError(Exception):
    """The file is not a readable privacy ledger, or an append was refused."""


@dataclass(frozen=True)
class LedgerEntry:
    """One row. A confirm row repeats its spend row's parameters and epsilon and points at it
    with ``refers_to``; ``versions`` maps package name to version (None: not installed)."""

    id: int
    kind: str
    run_id: str
    round: int
    recorded_at: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float
    max_epsilon: float
    versions: dict[str, str | None]
    rng_mode: str
    refers_to: int | None
    prev_hash: str
    hash: str
    mechanism: str | None = None
    privacy_unit: str | None = None
    reason: str | None = None

    @property
    def charge(self) -> Charge:
        """What this row paid for (a release is computed from exactly that)."""
        return Charge(
            self.mechanism or "dp-sgd", self.noise_multiplier, self.sample_rate, self.steps,
            self.max_grad_norm, self.privacy_unit or "row",
        )


@dataclass(frozen=True)
class Charge:
    """One mechanism of a round, as the accountant sees it: ``steps`` applications of the
    Gaussian mechanism with ``noise_multiplier`` on a Poisson sample at ``sample_rate``,
    whose L2 sensitivity (stored in the ``max_grad_norm`` column) is ``sensitivity``; or, for
    mechanism ``distributed:skellam``, of the Skellam mechanism on SecAgg's integer grid
    (``privacy.skellam``: multiplier of the honest sites' summed noise, sensitivity in grid units)."""

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    sensitivity: float
    privacy_unit: str = "row"

    @property
    def row(self) -> tuple[float, float, int] | SkellamRow:
        """The accountant's history row: (sigma, q, steps) for a Gaussian mechanism, a
        :class:`~privacy.skellam.SkellamRow` for a distributed-DP round."""
        if self.mechanism == SKELLAM:
            return SkellamRow(self.noise_multiplier, self.sample_rate, self.steps, self.sensitivity)
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Spent:
    """A site's epsilon at one delta: this run's rows alone, every other run's, and all."""

    this_run: float
    other_runs: float
    total: float


@dataclass(frozen=True)
class Anchor:
    """What a site tells the server about its ledger each round: the number of rows and the
    hash of the last one. A later ledger must still have that row with that hash."""

    rows: int
    head: str


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256 hex of ``prev_hash`` + the canonical JSON of ``row``'s columns other than
    ``hash`` and ``prev_hash``; ``versions`` enters as its stored JSON text."""
    body = {
        k: v for k, v in row.items()
        if k not in ("hash", "prev_hash") and not (k in EXTENSION_COLUMNS and v is None)
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def entry_of(row: dict[str, Any]) -> LedgerEntry:
    try:
        versions = json.loads(row["versions"])
    except (TypeError, ValueError) as err:
        raise LedgerError(f"row {row['id']}: versions is not JSON: {row['versions']!r}") from err
    return LedgerEntry(**{**row, "versions": versions})


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
