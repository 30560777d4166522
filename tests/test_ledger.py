import json
import math
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from importlib import metadata

import pytest

from privacy.accountant import epsilon_for
from privacy.ledger import GENESIS_HASH, LedgerError, PrivacyLedger, row_hash

DELTA = 1e-5


def spend(ledger: PrivacyLedger, round: int = 1, noise: float = 1.0, steps: int = 100, **overrides):
    arguments = dict(
        run_id="run-1", round=round, noise_multiplier=noise, sample_rate=0.01, steps=steps,
        max_grad_norm=1.0, delta=DELTA, accountant="rdp", max_epsilon=10.0, rng_mode="mt19937",
    )
    return ledger.begin_spend(**(arguments | overrides))


@pytest.fixture
def path(tmp_path):
    return tmp_path / "privacy" / "nested" / "site-a.db"  # parent folders do not exist yet


def test_spend_and_confirm_rows(path):
    with PrivacyLedger(path) as ledger:
        entry = spend(ledger)
        assert (entry.id, entry.kind, entry.refers_to, entry.prev_hash) == (1, "spend", None, GENESIS_HASH)
        assert entry.epsilon == epsilon_for([(1.0, 0.01, 100)], DELTA)
        assert entry.versions["torch"] == metadata.version("torch")
        assert set(entry.versions) == {"torch", "opacus", "peft", "transformers", "flwr"}
        recorded = datetime.fromisoformat(entry.recorded_at)
        assert recorded.utcoffset() == timedelta(0)

        confirm = ledger.confirm(entry.id)
        assert (confirm.id, confirm.kind, confirm.refers_to) == (2, "confirm", 1)
        assert confirm.prev_hash == entry.hash
        assert (confirm.run_id, confirm.round, confirm.epsilon) == ("run-1", 1, entry.epsilon)

        assert [e.kind for e in ledger.entries()] == ["spend", "confirm"]
        assert ledger.entries()[0] == entry
        assert ledger.spends() == [entry]
        assert ledger.history() == [(1.0, 0.01, 100)]
        assert ledger.verify_chain() == []
        assert ledger.head_hash() == confirm.hash


def test_epsilon_is_cumulative_over_all_spends(path):
    with PrivacyLedger(path) as ledger:
        first = spend(ledger, round=1)
        ledger.confirm(first.id)
        second = spend(ledger, round=2, noise=1.5, steps=200, sample_rate=0.02)
        history = [(1.0, 0.01, 100), (1.5, 0.02, 200)]
        assert second.epsilon == epsilon_for(history, DELTA)
        assert second.epsilon > first.epsilon
        assert ledger.cumulative_epsilon() == second.epsilon
        assert ledger.cumulative_epsilon(delta=1e-3) == epsilon_for(history, 1e-3)
        assert ledger.cumulative_epsilon(accountant="prv") == epsilon_for(history, DELTA, "prv")


def test_empty_ledger(path):
    with PrivacyLedger(path) as ledger:
        assert ledger.entries() == []
        assert ledger.cumulative_epsilon() == 0.0
        assert ledger.head_hash() == GENESIS_HASH
        assert ledger.verify_chain() == []


def test_pending_spends_count(path):
    with PrivacyLedger(path) as ledger:
        spend(ledger, round=1)  # training crashed: never confirmed
        second = spend(ledger, round=2)
        assert second.epsilon == epsilon_for([(1.0, 0.01, 100)] * 2, DELTA)
        assert ledger.cumulative_epsilon() == second.epsilon


def test_epsilon_continues_across_processes(path):
    with PrivacyLedger(path) as ledger:
        ledger.confirm(spend(ledger, round=1).id)
    script = textwrap.dedent(
        f"""
        import json
        from privacy.ledger import PrivacyLedger
        with PrivacyLedger({str(path)!r}) as ledger:
            entry = ledger.begin_spend(
                run_id="run-2", round=1, noise_multiplier=0.9, sample_rate=0.02, steps=150,
                max_grad_norm=1.0, delta={DELTA!r}, accountant="rdp", max_epsilon=10.0,
                rng_mode="secure",
            )
            ledger.confirm(entry.id)
            print(json.dumps({{"id": entry.id, "epsilon": entry.epsilon}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    child = json.loads(result.stdout.strip().splitlines()[-1])
    history = [(1.0, 0.01, 100), (0.9, 0.02, 150)]
    assert child == {"id": 3, "epsilon": epsilon_for(history, DELTA)}

    with PrivacyLedger(path) as ledger:
        assert ledger.history() == history
        third = spend(ledger, round=2)
        assert third.epsilon == epsilon_for(history + [(1.0, 0.01, 100)], DELTA)
        assert [e.run_id for e in ledger.entries()] == ["run-1", "run-1", "run-2", "run-2", "run-1"]
        assert ledger.entries()[2].rng_mode == "secure"
        assert ledger.verify_chain() == []


def test_non_private_round_is_recorded_as_infinite(path):
    with PrivacyLedger(path) as ledger:
        spend(ledger, round=1)
        entry = spend(ledger, round=2, noise=0.0)
        assert entry.epsilon == math.inf
    with PrivacyLedger(path) as ledger:
        assert ledger.entries()[1].epsilon == math.inf
        assert ledger.cumulative_epsilon() == math.inf
        assert ledger.verify_chain() == []


def test_invalid_spend_writes_nothing(path):
    with PrivacyLedger(path) as ledger:
        with pytest.raises(ValueError, match="unknown accountant 'moments'"):
            spend(ledger, accountant="moments")
        with pytest.raises(ValueError, match="sample_rate must be in"):
            spend(ledger, sample_rate=2.0)
        with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
            spend(ledger, max_grad_norm=0.0)
        assert ledger.entries() == []


def test_confirm_errors(path):
    with PrivacyLedger(path) as ledger:
        entry = spend(ledger)
        with pytest.raises(LedgerError, match="no spend row with that id"):
            ledger.confirm(99)
        confirm = ledger.confirm(entry.id)
        with pytest.raises(LedgerError, match=f"already confirmed by row {confirm.id}"):
            ledger.confirm(entry.id)
        with pytest.raises(LedgerError, match="no spend row"):
            ledger.confirm(confirm.id)  # a confirm row cannot be confirmed
        assert len(ledger.entries()) == 2


def test_update_and_delete_refused_by_triggers(path):
    with PrivacyLedger(path) as ledger:
        spend(ledger)
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only: UPDATE refused"):
        db.execute("UPDATE ledger SET epsilon = 0.1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only: DELETE refused"):
        db.execute("DELETE FROM ledger")
    db.close()
    with PrivacyLedger(path) as ledger:
        assert len(ledger.entries()) == 1
        assert ledger.verify_chain() == []


def _tamper(path, *statements):
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER ledger_no_update")
    db.execute("DROP TRIGGER ledger_no_delete")
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "statement",
    ["UPDATE ledger SET epsilon = 0.5 WHERE id = 3", "UPDATE ledger SET noise_multiplier = 5.0 WHERE id = 3"],
)
def test_edited_row_breaks_chain(path, statement):
    with PrivacyLedger(path) as ledger:
        for round in (1, 2):
            ledger.confirm(spend(ledger, round=round).id)
    _tamper(path, statement)
    with PrivacyLedger(path, read_only=True) as ledger:
        assert ledger.verify_chain() == [
            "row 3: bad hash: the row's contents were changed after it was written"
        ]
    # A site never appends to (trains on top of) a tampered ledger.
    with pytest.raises(LedgerError, match="hash chain is broken .row 3: bad hash"):
        PrivacyLedger(path)


def test_deleted_row_breaks_link(path):
    with PrivacyLedger(path) as ledger:
        for round in (1, 2):
            ledger.confirm(spend(ledger, round=round).id)
    _tamper(path, "DELETE FROM ledger WHERE id = 2")
    with PrivacyLedger(path, read_only=True) as ledger:
        problems = ledger.verify_chain()
    assert len(problems) == 1 and problems[0].startswith("row 3: broken link")


def test_confirm_of_missing_spend_is_reported(path):
    with PrivacyLedger(path) as ledger:
        entry = spend(ledger)
    # A well-chained confirm row that points nowhere: only the reference is wrong.
    db = sqlite3.connect(path)
    columns = [r[1] for r in db.execute("PRAGMA table_info(ledger)")]
    row = dict(zip(columns, db.execute("SELECT * FROM ledger WHERE id = 1").fetchone()))
    row |= {"id": 2, "kind": "confirm", "refers_to": 7, "prev_hash": entry.hash}
    row["hash"] = row_hash(row["prev_hash"], row)
    db.execute(f"INSERT INTO ledger VALUES ({', '.join('?' * len(columns))})", [row[c] for c in columns])
    db.commit()
    db.close()
    with PrivacyLedger(path, read_only=True) as ledger:
        assert ledger.verify_chain() == [
            "row 2: confirm row refers to row 7, which is not an earlier spend row"
        ]


def test_read_only_open(tmp_path):
    missing = tmp_path / "absent" / "site.db"
    with pytest.raises(FileNotFoundError, match="privacy ledger not found"):
        PrivacyLedger(missing, read_only=True)
    assert not missing.parent.exists()
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all, just text " * 100)
    with pytest.raises(LedgerError, match="is not a privacy ledger"):
        PrivacyLedger(junk, read_only=True)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(LedgerError, match="expected columns"):
        PrivacyLedger(other, read_only=True)


def test_read_only_cannot_write(path):
    with PrivacyLedger(path) as ledger:
        spend(ledger)
    with PrivacyLedger(path, read_only=True) as ledger:
        assert len(ledger.entries()) == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            spend(ledger, round=2)


def test_concurrent_charges_cannot_overspend(path, monkeypatch):
    """The attack: two rounds on one ledger at once (two SuperNodes sharing a ledger file, or a
    retried message). Each alone fits the budget of 10, both do not. With the budget check
    outside the write transaction both passed it and the spend reached epsilon 11. The check
    is slowed down here to make the race certain."""
    import threading
    import time

    from privacy import ledger as ledger_module
    from privacy.budget import BudgetExhausted
    from privacy.ledger import Charge

    sigma = 1.0
    one_round = epsilon_for([(sigma, 0.05, 300)], DELTA)
    budget = one_round * 1.2  # room for one round, not two
    real_epsilon_for = ledger_module.epsilon_for

    def slow_epsilon_for(*args, **kwargs):
        time.sleep(0.3)
        return real_epsilon_for(*args, **kwargs)

    monkeypatch.setattr(ledger_module, "epsilon_for", slow_epsilon_for)
    PrivacyLedger(path).close()
    outcomes: list[str] = []

    def charge_one_round() -> None:
        with PrivacyLedger(path) as ledger:
            try:
                ledger.charge(
                    [Charge("dp-sgd", sigma, 0.05, 300, 1.0)], run_id="r", round=1, delta=DELTA,
                    accountant="rdp", max_epsilon=budget, rng_mode="mt19937",
                )
                outcomes.append("charged")
            except BudgetExhausted:
                outcomes.append("refused")

    threads = [threading.Thread(target=charge_one_round) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["charged", "refused"]
    with PrivacyLedger(path, read_only=True) as ledger:
        assert len(ledger.spends()) == 1
        assert ledger.cumulative_epsilon() <= budget


def test_charge_checks_the_whole_round_and_writes_nothing_when_over(path):
    from privacy.budget import BudgetExhausted
    from privacy.ledger import Charge

    charges = [Charge("dp-sgd", 1.0, 0.01, 100, 1.0), Charge("release:train-loss", 5.0, 0.01, 1, 4.0)]
    with PrivacyLedger(path) as ledger:
        rows = ledger.charge(charges, run_id="r", round=1, delta=DELTA, accountant="rdp", max_epsilon=10.0, rng_mode="mt19937")
        assert [r.mechanism for r in rows] == ["dp-sgd", "release:train-loss"]
        assert rows[1].max_grad_norm == 4.0 and rows[1].privacy_unit == "row"
        assert rows[1].epsilon == pytest.approx(epsilon_for([(1.0, 0.01, 100), (5.0, 0.01, 1)], DELTA))
        head = ledger.anchor()
        with pytest.raises(BudgetExhausted):
            ledger.charge(charges, run_id="r", round=2, delta=DELTA, accountant="rdp", max_epsilon=rows[1].epsilon * 1.01, rng_mode="mt19937")
        assert ledger.anchor() == head


def test_anchor_detects_a_truncated_or_rewritten_tail(path):
    with PrivacyLedger(path) as ledger:
        for round in (1, 2):
            ledger.confirm(spend(ledger, round=round).id)
        anchor = ledger.anchor()
        assert anchor.rows == 4 and ledger.extends(anchor)
        ledger.confirm(spend(ledger, round=3).id)
        assert ledger.extends(anchor)  # grown since: still extends what was seen
    _tamper(path, "DELETE FROM ledger WHERE id >= 4")
    with PrivacyLedger(path, read_only=True) as ledger:
        assert ledger.verify_chain() == []  # a clean truncation leaves a consistent chain...
        assert not ledger.extends(anchor)  # ...but not the anchor the server kept


@pytest.mark.parametrize("extensions", [0, 2], ids=["first-release", "before-refusals"])
def test_an_older_ledger_is_upgraded_in_place_and_still_verifies(path, extensions):
    """Old rows keep NULL in the newer columns, which stays out of their hash: the chain holds,
    the upgraded table takes refusal rows, and it is still append-only."""
    from privacy.ledger import COLUMNS, EXTENSION_COLUMNS

    LEGACY_COLUMNS = COLUMNS[: len(COLUMNS) - len(EXTENSION_COLUMNS) + extensions]
    with PrivacyLedger(path) as ledger:
        ledger.confirm(spend(ledger).id)
    db = sqlite3.connect(path)  # rebuild the table and its chain as the first release wrote them
    rows = [dict(zip(LEGACY_COLUMNS, values)) for values in
            db.execute(f"SELECT {', '.join(LEGACY_COLUMNS)} FROM ledger ORDER BY id")]
    prev_hash = GENESIS_HASH
    for row in rows:
        row["prev_hash"] = prev_hash
        row["hash"] = prev_hash = row_hash(prev_hash, row)
    db.executescript("DROP TABLE ledger;")
    db.execute(f"CREATE TABLE ledger ({', '.join(LEGACY_COLUMNS)}, CHECK (kind IN ('spend', 'confirm')))")
    db.executemany(f"INSERT INTO ledger VALUES ({', '.join('?' * len(LEGACY_COLUMNS))})",
                   [[row[c] for c in LEGACY_COLUMNS] for row in rows])
    db.commit()
    db.close()
    with PrivacyLedger(path, read_only=True) as ledger:
        assert ledger.verify_chain() == [] and ledger.entries()[0].reason is None
        assert (ledger.entries()[0].mechanism is None) == (extensions == 0)
    with PrivacyLedger(path) as ledger:
        third = spend(ledger, round=2)
        refusal = ledger.record_refusal(run_id="r2", round=3, reason="budget-exhausted (max-epsilon)")
        assert third.mechanism == "dp-sgd" and ledger.verify_chain() == []
        assert refusal.epsilon == ledger.cumulative_epsilon() and len(ledger.spends()) == 2
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM ledger WHERE id = 1")
    db.close()
