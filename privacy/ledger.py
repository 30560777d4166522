"""A site's privacy ledger: an append-only, hash-chained SQLite table of every round it trained in.

Each round adds a **spend** row *before* training starts and a **confirm** row after it
finished. A crash in between leaves a pending spend, which still counts: the ledger can
over-count a site's spend, never under-count it. A spend row records the cumulative epsilon of
the site after that round, over all spend rows so far, so epsilon continues across runs and
restarts instead of starting from zero with each fresh Opacus PrivacyEngine.

Each row names its **mechanism**: ``dp-sgd`` (a round's noisy steps) or ``release:<what>`` (a
noised metric, :mod:`privacy.release`), and its **privacy unit**: ``row`` or
``user:<column>`` (user-level DP, one user = all rows sharing that column's value). Every
mechanism is a (subsampled) Gaussian, so all rows compose in one accountant.

Tamper evidence: each row's hash covers the previous one (:mod:`privacy.ledger_rows`), so
editing, deleting or inserting a row breaks the chain from there on. Triggers also abort UPDATE
and DELETE, against accidents; a determined editor can drop them, which is what the chain is for. The chain is verified whenever a ledger
is opened for writing: a site never trains on top of a broken record. The hash has no key, so
a forger who rewrites every later row's hash, or truncates the tail, leaves a consistent chain:
that is why each site reports its ledger's :meth:`PrivacyLedger.anchor` (row count and head
hash) to the server every round, and ``fedlora privacy audit --history`` checks the ledger
still extends every anchor the server recorded.

A **refusal** row records a message the site refused (``client.refusals``): its run, round,
status code and setting (``reason``; the full text stays in the site's log, since it may quote
the data). It spends nothing: sigma, rate and steps are 0, its epsilon repeats the site's
cumulative epsilon, and no accountant reads it; but it is in the chain, so the record of what a
site declined cannot be dropped silently either.

Ledgers written before the mechanism, unit and reason columns existed are upgraded in place:
the table is rebuilt with the current schema under the write lock, every row copied as it was;
their old rows keep NULL in the new columns, and a NULL extension column is left out of the
hash, so their chain still verifies.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from privacy.accountant import History, epsilon_for
from privacy.budget import check_budget
from privacy.ledger_rows import (
    COLUMNS, EXTENSION_COLUMNS, GENESIS_HASH, TABLE, TRIGGERS, Anchor, Charge, LedgerEntry, LedgerError, Spent,
    entry_of, package_versions, row_hash,
)


class PrivacyLedger:
    """The ledger in one SQLite file. ``read_only=True`` opens an existing ledger without
    creating or changing anything (what an auditor wants); otherwise missing parent folders
    and the schema are created."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"privacy ledger not found: {self.path}")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly, one per append.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            if not read_only:
                for statement in (TABLE, *TRIGGERS):
                    self._db.execute(statement)
            columns = tuple(r[1] for r in self._db.execute("PRAGMA table_info(ledger)"))
            # Any version's columns: the first release's, then the extensions, in order.
            if columns != COLUMNS[: len(columns)] or len(columns) < len(COLUMNS) - len(EXTENSION_COLUMNS):
                self._db.close()
                raise LedgerError(f"{self.path} is not a privacy ledger (no table 'ledger' with the expected columns)")
            if not read_only and not self._current():
                self._upgrade()
                columns = COLUMNS
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise LedgerError(f"{self.path} is not a privacy ledger: {err}") from err
        self._columns = columns
        if not read_only and (problems := self.verify_chain()):
            self._db.close()
            raise LedgerError(
                f"{self.path}: the hash chain is broken ({problems[0]}); this site will not "
                "train on top of a tampered record. Run 'fedlora privacy audit' on it."
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------

    def begin_spend(
        self,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        delta: float,
        accountant: str,
        max_epsilon: float,
        rng_mode: str,
        mechanism: str = "dp-sgd",
        privacy_unit: str = "row",
    ) -> LedgerEntry:
        """Record one spend row without a budget check (what happened, e.g. a non-private
        round, whose epsilon is infinite); a site charges with :meth:`charge` instead."""
        charge = Charge(mechanism, noise_multiplier, sample_rate, steps, max_grad_norm, privacy_unit)
        return self.charge(
            [charge], run_id=run_id, round=round, delta=delta, accountant=accountant,
            max_epsilon=max_epsilon, rng_mode=rng_mode, enforce_budget=False,
        )[0]

    def charge(
        self,
        charges: list[Charge],
        *,
        run_id: str,
        round: int,
        delta: float,
        accountant: str,
        max_epsilon: float,
        rng_mode: str,
        enforce_budget: bool = True,
        max_run_epsilon: float | None = None,
    ) -> list[LedgerEntry]:
        """Append one spend row per charge, each with the site's cumulative epsilon after it
        (all earlier spend rows, pending ones included, at this delta and accountant).

        With ``enforce_budget`` the budget check and the append are one ``BEGIN IMMEDIATE``
        transaction: two processes charging one ledger at once serialise, and the second sees
        the first's rows, so together they can never pass ``max_epsilon``, nor the epsilon of
        run ``run_id``'s own rows, composed alone, pass ``max_run_epsilon`` when it is given.
        Raises :class:`~privacy.budget.BudgetExhausted` having written nothing.
        """
        for charge in charges:
            if not charge.sensitivity > 0:
                raise ValueError(f"{charge.mechanism}: max_grad_norm must be > 0 (the sensitivity), got {charge.sensitivity!r}")
        if not max_epsilon > 0:
            raise ValueError(f"max_epsilon must be > 0, got {max_epsilon!r}")
        with self._transaction():
            history = self.history()
            if enforce_budget:
                coming = [c.row for c in charges]
                check_budget(epsilon_for(history + coming, delta, accountant), max_epsilon)
                if max_run_epsilon is not None:
                    this_run = [e.charge.row for e in self.spends() if e.run_id == str(run_id)]
                    check_budget(epsilon_for(this_run + coming, delta, accountant), max_run_epsilon, "max-epsilon-per-run")
            entries = []
            for charge in charges:
                history.append(charge.row)
                entries.append(self._append(
                    kind="spend", run_id=str(run_id), round=int(round),
                    noise_multiplier=float(charge.noise_multiplier),
                    sample_rate=float(charge.sample_rate), steps=int(charge.steps),
                    max_grad_norm=float(charge.sensitivity), delta=float(delta),
                    accountant=accountant, epsilon=epsilon_for(history, delta, accountant),
                    max_epsilon=float(max_epsilon), rng_mode=str(rng_mode), refers_to=None,
                    mechanism=charge.mechanism, privacy_unit=charge.privacy_unit,
                ))
            return entries

    def confirm(self, spend_id: int) -> LedgerEntry:
        """Append the confirm row of spend row ``spend_id``: its training finished."""
        with self._transaction():
            entries = self.entries()
            spend = next((e for e in entries if e.id == spend_id and e.kind == "spend"), None)
            if spend is None:
                raise LedgerError(f"cannot confirm row {spend_id}: no spend row with that id")
            earlier = next((e for e in entries if e.refers_to == spend_id), None)
            if earlier is not None:
                raise LedgerError(f"spend row {spend_id} is already confirmed by row {earlier.id}")
            return self._append(
                kind="confirm", run_id=spend.run_id, round=spend.round,
                noise_multiplier=spend.noise_multiplier, sample_rate=spend.sample_rate,
                steps=spend.steps, max_grad_norm=spend.max_grad_norm, delta=spend.delta,
                accountant=spend.accountant, epsilon=spend.epsilon, max_epsilon=spend.max_epsilon,
                rng_mode=spend.rng_mode, refers_to=spend.id, mechanism=spend.mechanism,
                privacy_unit=spend.privacy_unit,
            )

    def record_refusal(self, *, run_id: str, round: int, reason: str) -> LedgerEntry:
        """Append a refusal row (see the module doc): ``reason`` is the refusal's code and
        setting, never its full text."""
        with self._transaction():
            spends = self.spends()
            last = spends[-1] if spends else None
            epsilon = epsilon_for(self.history(), last.delta, last.accountant) if last else 0.0
            return self._append(
                kind="refusal", run_id=str(run_id), round=int(round), noise_multiplier=0.0, sample_rate=0.0,
                steps=0, max_grad_norm=0.0, delta=last.delta if last else 0.0,
                accountant=last.accountant if last else "rdp", epsilon=epsilon,
                max_epsilon=last.max_epsilon if last else 0.0, rng_mode="none", refers_to=None,
                mechanism=None, privacy_unit=None, reason=reason,
            )

    # -- reading ------------------------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """All rows, oldest first."""
        return [entry_of(row) for row in self._raw_rows()]

    def spends(self) -> list[LedgerEntry]:
        return [e for e in self.entries() if e.kind == "spend"]

    def refusals(self) -> list[LedgerEntry]:
        return [e for e in self.entries() if e.kind == "refusal"]

    def history(self) -> History:
        """The accountant's row of every spend row, confirmed or pending (``Charge.row``)."""
        return [e.charge.row for e in self.spends()]

    def cumulative_epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        """Epsilon of the whole history, recomputed (not read from the rows). ``delta`` and
        ``accountant`` default to the last spend row's; an empty ledger has spent 0.0."""
        spends = self.spends()
        if not spends:
            return 0.0
        last = spends[-1]
        return epsilon_for(
            self.history(),
            last.delta if delta is None else delta,
            last.accountant if accountant is None else accountant,
        )

    def spent(self, run_id: str, delta: float, accountant: str) -> Spent:
        """Epsilon composed over run ``run_id``'s spend rows, over every other run's (the base of
        a run's allowance, ``privacy.budget``), and over all of them."""
        spends = self.spends()
        rows = [e.charge.row for e in spends]
        in_run = [row for row, e in zip(rows, spends) if e.run_id == str(run_id)]
        others = [row for row, e in zip(rows, spends) if e.run_id != str(run_id)]
        return Spent(*(epsilon_for(h, delta, accountant) for h in (in_run, others, rows)))

    def head_hash(self) -> str:
        """Hash of the last row (the genesis hash when empty)."""
        return self.anchor().head

    def anchor(self) -> Anchor:
        """Row count and head hash: sent to the server, which keeps it in ``history.json``."""
        row = self._db.execute("SELECT id, hash FROM ledger ORDER BY id DESC LIMIT 1").fetchone()
        return Anchor(0, GENESIS_HASH) if row is None else Anchor(int(row[0]), str(row[1]))

    def extends(self, anchor: Anchor) -> bool:
        """Whether this ledger still holds ``anchor``'s row with ``anchor``'s hash (it may have
        grown since); False once that row was removed or rewritten."""
        if anchor.rows == 0:
            return anchor.head == GENESIS_HASH
        row = self._db.execute("SELECT hash FROM ledger WHERE id = ?", (anchor.rows,)).fetchone()
        return row is not None and row[0] == anchor.head

    def verify_chain(self) -> list[str]:
        """Problems with the chain, each naming the row id; empty when intact."""
        problems: list[str] = []
        prev_hash = GENESIS_HASH
        kinds: dict[int, str] = {}
        for row in self._raw_rows():
            rid = row["id"]
            if row["prev_hash"] != prev_hash:
                problems.append(
                    f"row {rid}: broken link: prev_hash {row['prev_hash'][:12]}... does not "
                    f"match the previous row's hash {prev_hash[:12]}... "
                    "(a row was removed, inserted or edited)"
                )
            if row_hash(row["prev_hash"], row) != row["hash"]:
                problems.append(
                    f"row {rid}: bad hash: the row's contents were changed after it was written"
                )
            if row["kind"] == "confirm" and kinds.get(row["refers_to"]) != "spend":
                problems.append(
                    f"row {rid}: confirm row refers to row {row['refers_to']}, "
                    "which is not an earlier spend row"
                )
            kinds[rid] = row["kind"]
            prev_hash = row["hash"]
        return problems

    # -- internals ----------------------------------------------------------------------------

    def _current(self) -> bool:
        """Whether the table has today's schema: every column, and refusal rows allowed."""
        (sql,) = self._db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger'").fetchone()
        columns = tuple(r[1] for r in self._db.execute("PRAGMA table_info(ledger)"))
        return columns == COLUMNS and "'refusal'" in sql

    def _upgrade(self) -> None:
        """Rebuild an older ledger's table with today's schema, every row copied unchanged
        (so every hash still holds); under the write lock, so two processes opening it
        together do not both try. DROP TABLE fires no DELETE trigger."""
        with self._transaction():
            if self._current():
                return
            present = [r[1] for r in self._db.execute("PRAGMA table_info(ledger)")]
            self._db.execute("ALTER TABLE ledger RENAME TO ledger_before_upgrade")
            self._db.execute("DROP TRIGGER IF EXISTS ledger_no_update")
            self._db.execute("DROP TRIGGER IF EXISTS ledger_no_delete")
            for statement in (TABLE, *TRIGGERS):
                self._db.execute(statement)
            kept = ", ".join(c for c in COLUMNS if c in present)
            self._db.execute(f"INSERT INTO ledger ({kept}) SELECT {kept} FROM ledger_before_upgrade ORDER BY id")
            self._db.execute("DROP TABLE ledger_before_upgrade")

    def _raw_rows(self) -> list[dict[str, Any]]:
        """Every row with every column of :data:`COLUMNS`; a legacy ledger opened read-only
        (not upgraded) reads NULL for the extension columns."""
        selected = [c if c in self._columns else f"NULL AS {c}" for c in COLUMNS]
        cursor = self._db.execute(f"SELECT {', '.join(selected)} FROM ledger ORDER BY id")
        return [dict(zip(COLUMNS, values)) for values in cursor]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` takes the write lock before the tail is read, so two processes
        appending to one file serialise; any error rolls the whole append back."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _append(self, **values: Any) -> LedgerEntry:
        """Insert one chained row; runs inside the caller's write transaction, so the tail it
        links to cannot change underneath it."""
        last = self._db.execute("SELECT id, hash FROM ledger ORDER BY id DESC LIMIT 1").fetchone()
        # The id is hashed, so it is chosen here rather than left to SQLite.
        row: dict[str, Any] = {
            "id": last[0] + 1 if last else 1,
            "recorded_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "versions": json.dumps(package_versions(), sort_keys=True),
            **dict.fromkeys(EXTENSION_COLUMNS),  # NULL unless given: then not hashed
            **values,
            "prev_hash": last[1] if last else GENESIS_HASH,
        }
        row["hash"] = row_hash(row["prev_hash"], row)
        self._db.execute(
            f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [row[c] for c in COLUMNS],
        )
        return entry_of(row)


def spent_in_other_runs(path: Path | None, run_id: str, delta: float, accountant: str) -> float:
    """What the ledger at ``path`` records for every run but ``run_id`` (0.0 when there is
    no ledger yet), read without changing anything."""
    if path is None or not path.is_file():
        return 0.0
    with PrivacyLedger(path, read_only=True) as ledger:
        return ledger.spent(run_id, delta, accountant).other_runs


def ledger_anchor(path: str | Path | None) -> Anchor | None:
    """The anchor of the ledger at ``path``, read-only; None when there is none to read."""
    if not path or not Path(str(path)).expanduser().is_file():
        return None
    try:
        with PrivacyLedger(Path(str(path)).expanduser(), read_only=True) as ledger:
            return ledger.anchor()
    except (LedgerError, sqlite3.Error):
        return None
