import json
import shutil
import sqlite3

import pytest

from privacy.accountant import epsilon_for
from privacy.audit import audit_ledger, audit_main
from privacy.ledger import PrivacyLedger

DELTA = 1e-5
ROWS = [(1.0, 0.01, 40), (1.0, 0.01, 40), (1.2, 0.02, 30)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Three rounds, the last one still pending; built once, copied per test."""
    path = tmp_path_factory.mktemp("ledgers") / "site-a.db"
    with PrivacyLedger(path) as ledger:
        for round, (noise, q, steps) in enumerate(ROWS, start=1):
            entry = ledger.begin_spend(
                run_id="run-1", round=round, noise_multiplier=noise, sample_rate=q, steps=steps,
                max_grad_norm=1.0, delta=DELTA, accountant="rdp", max_epsilon=5.0, rng_mode="mt19937",
            )
            if round < 3:
                ledger.confirm(entry.id)
    return path


@pytest.fixture
def ledger_path(pristine, tmp_path):
    return shutil.copy(pristine, tmp_path / "site-a.db")


def _tamper(path, statement):
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER ledger_no_update")
    db.execute(statement)
    db.commit()
    db.close()


def test_intact_ledger_passes(ledger_path):
    audit = audit_ledger(ledger_path)
    assert audit.ok and audit.site == "site-a"
    assert [row.id for row in audit.rows] == [1, 3, 5]
    assert [row.confirmed for row in audit.rows] == [True, True, False]
    for i, row in enumerate(audit.rows):
        expected = epsilon_for(ROWS[: i + 1], DELTA)
        assert row.recorded_epsilon == row.opacus_epsilon == expected
        assert row.dp_accounting_epsilon == pytest.approx(expected, rel=1e-5)
        assert row.prv_epsilon == pytest.approx(epsilon_for(ROWS[: i + 1], DELTA, "prv"))
        assert row.prv_epsilon < row.opacus_epsilon
        assert row.budget_left == pytest.approx(5.0 - expected)


def test_table_output(ledger_path, capsys):
    assert audit_main([str(ledger_path)]) == 0
    out = capsys.readouterr().out
    assert "site site-a" in out and "pending" in out and "confirmed" in out
    assert out.rstrip().endswith("OK")


def test_refusals_are_listed_and_the_table_fits_120_columns(ledger_path, capsys):
    with PrivacyLedger(ledger_path) as ledger:
        ledger.record_refusal(run_id="run-2", round=1, reason="training: budget-exhausted (max-epsilon-per-run)")
    assert audit_main([str(ledger_path)]) == 0
    out = capsys.readouterr().out
    assert "refused (spent nothing): row 6, run run-2, round 1: training: budget-exhausted (max-epsilon-per-run)" in out
    assert max(len(line) for line in out.splitlines()) <= 120
    assert audit_main([str(ledger_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    (refusal,) = document["ledgers"][0]["refusals"]
    assert refusal["run_id"] == "run-2" and refusal["reason"].endswith("(max-epsilon-per-run)")
    assert len(document["ledgers"][0]["rows"]) == 3


def test_json_output_structure(ledger_path, capsys):
    assert audit_main([str(ledger_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True
    (ledger,) = document["ledgers"]
    assert ledger["site"] == "site-a" and ledger["ok"] is True
    assert len(ledger["head_hash"]) == 64
    assert ledger["problems"] == {"chain": [], "epsilon_mismatch": [], "budget_exceeded": [], "history_anchor": []}
    assert [row["round"] for row in ledger["rows"]] == [1, 2, 3]
    assert set(ledger["rows"][0]) == {
        "id", "run_id", "round", "recorded_at", "noise_multiplier", "sample_rate", "steps",
        "max_grad_norm", "delta", "accountant", "mechanism", "privacy_unit", "recorded_epsilon", "opacus_epsilon",
        "dp_accounting_epsilon", "prv_epsilon", "confirmed", "max_epsilon", "budget_left",
    }
    assert ledger["rows"][2]["recorded_epsilon"] == epsilon_for(ROWS, DELTA)


def test_edited_epsilon_fails_audit(ledger_path, capsys):
    _tamper(ledger_path, "UPDATE ledger SET epsilon = 0.5 WHERE id = 3")
    assert audit_main([str(ledger_path), "--json"]) == 1
    ledger = json.loads(capsys.readouterr().out)["ledgers"][0]
    assert ledger["ok"] is False
    assert ledger["problems"]["chain"] == ["row 3: bad hash: the row's contents were changed after it was written"]
    mismatches = ledger["problems"]["epsilon_mismatch"]
    assert mismatches[0].startswith("row 3 (run run-1, round 2): recorded epsilon 0.500000 != ")
    assert any("dp-accounting" in m for m in mismatches)


def test_edited_noise_multiplier_fails_audit(ledger_path, capsys):
    _tamper(ledger_path, "UPDATE ledger SET noise_multiplier = 3.0 WHERE id = 1")
    assert audit_main([str(ledger_path)]) == 1
    out = capsys.readouterr().out
    assert "hash chain: row 1: bad hash" in out and out.rstrip().endswith("FAILED")
    # Every cumulative epsilon from the edited row on disagrees with its recomputation.
    for label in ("row 1 (run run-1, round 1)", "row 3 (run run-1, round 2)", "row 5 (run run-1, round 3)"):
        assert f"epsilon mismatch: {label}: recorded epsilon" in out


def test_budget_exceeded_detected(tmp_path, capsys):
    path = tmp_path / "site-b.db"
    with PrivacyLedger(path) as ledger:
        for round in (1, 2):
            ledger.begin_spend(
                run_id="r", round=round, noise_multiplier=1.0, sample_rate=0.01, steps=300,
                max_grad_norm=1.0, delta=DELTA, accountant="rdp", max_epsilon=1.6, rng_mode="secure",
            )
    audit = audit_ledger(path)
    eps2 = epsilon_for([(1.0, 0.01, 300)] * 2, DELTA)
    assert eps2 > 1.6 > epsilon_for([(1.0, 0.01, 300)], DELTA)
    assert audit.budget_exceeded == [f"row 2 (run r, round 2): epsilon {eps2:.4f} > max-epsilon 1.6000"]
    assert audit.rows[1].budget_left < 0 < audit.rows[0].budget_left
    assert not audit.chain_problems and not audit.epsilon_mismatches
    assert audit_main([str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ledgers"][0]["problems"]["budget_exceeded"]


def test_non_private_round_exceeds_budget_and_serialises(tmp_path, capsys):
    path = tmp_path / "site-c.db"
    with PrivacyLedger(path) as ledger:
        ledger.begin_spend(
            run_id="r", round=1, noise_multiplier=0.0, sample_rate=0.01, steps=10,
            max_grad_norm=1.0, delta=DELTA, accountant="rdp", max_epsilon=10.0, rng_mode="mt19937",
        )
    assert audit_main([str(path), "--json"]) == 1
    ledger = json.loads(capsys.readouterr().out)["ledgers"][0]
    assert ledger["rows"][0]["recorded_epsilon"] == "inf"
    assert ledger["rows"][0]["budget_left"] == "-inf"
    assert ledger["problems"]["epsilon_mismatch"] == []
    assert "(non-private training)" in ledger["problems"]["budget_exceeded"][0]


def test_prv_rows_are_checked_against_opacus_prv(tmp_path):
    path = tmp_path / "site-d.db"
    with PrivacyLedger(path) as ledger:
        ledger.begin_spend(
            run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.01, steps=100,
            max_grad_norm=1.0, delta=DELTA, accountant="prv", max_epsilon=10.0, rng_mode="mt19937",
        )
    audit = audit_ledger(path)
    assert audit.ok
    (row,) = audit.rows
    assert row.recorded_epsilon == row.opacus_epsilon == row.prv_epsilon
    assert row.dp_accounting_epsilon > row.prv_epsilon  # RDP, shown but not compared


def test_missing_or_unreadable_file_exits_2(ledger_path, tmp_path, capsys):
    missing = tmp_path / "nope.db"
    assert audit_main([str(ledger_path), str(missing)]) == 2
    captured = capsys.readouterr()
    assert f"privacy ledger not found: {missing}" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not missing.exists()

    junk = tmp_path / "junk.db"
    junk.write_text("hello")
    assert audit_main([str(junk), "--json"]) == 2
    assert "is not a privacy ledger" in capsys.readouterr().err


def test_all_ledgers_must_pass(tmp_path, capsys):
    paths = []
    for site in ("site-x", "site-y"):
        paths.append(tmp_path / f"{site}.db")
        with PrivacyLedger(paths[-1]) as ledger:
            ledger.begin_spend(
                run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.01, steps=20,
                max_grad_norm=1.0, delta=DELTA, accountant="rdp", max_epsilon=10.0, rng_mode="mt19937",
            )
    _tamper(paths[1], "UPDATE ledger SET steps = 10 WHERE id = 1")
    assert audit_main([str(p) for p in paths] + ["--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert [(entry["site"], entry["ok"]) for entry in document["ledgers"]] == [("site-x", True), ("site-y", False)]
    assert document["ok"] is False
    assert document["ledgers"][1]["rows"][0]["opacus_epsilon"] == epsilon_for([(1.0, 0.01, 10)], DELTA)


def test_text_written_into_numeric_column_is_reported(ledger_path):
    _tamper(ledger_path, "UPDATE ledger SET epsilon = 'tiny' WHERE id = 3")
    audit = audit_ledger(ledger_path)
    assert "row 3 (run run-1, round 2): epsilon holds 'tiny', not a number" in audit.epsilon_mismatches
    assert audit.chain_problems == ["row 3: bad hash: the row's contents were changed after it was written"]
    assert [row.id for row in audit.rows] == [1, 5]


def _history_with_anchors(path, site: str) -> list[dict]:
    """What a server records: the site's anchor after each of its messages."""
    with PrivacyLedger(path, read_only=True) as ledger:
        rows = ledger.entries()
    anchors = [{"rows": r.id, "head": r.hash} for r in rows if r.kind == "confirm"]
    return [{"round": i, "clients": [{"client": site, "node_id": 7, "outcome": "aggregated", "ledger": a}], "evaluations": []}
            for i, a in enumerate(anchors, 1)]


def test_a_history_file_that_is_not_one_is_a_one_line_error(ledger_path, tmp_path, capsys):
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"round": 1, "clients": [{"client": "a", "colour": "red"}]}]))
    assert audit_main([str(ledger_path), "--history", str(history)]) == 2
    err = capsys.readouterr().err
    assert "not a history.json round entry" in err and "Traceback" not in err


def test_history_anchors_catch_a_truncated_tail_the_chain_cannot(ledger_path, tmp_path, capsys):
    """The attack: delete the newest rows. The rest of the chain is intact, so the plain audit
    passes; only the anchors the site sent to the server each round show the loss."""
    history = tmp_path / "history.json"
    history.write_text(json.dumps(_history_with_anchors(ledger_path, "site-a")))
    assert audit_main([str(ledger_path), "--history", str(history)]) == 0
    with sqlite3.connect(ledger_path) as db:
        db.execute("DROP TRIGGER ledger_no_delete")
        db.execute("DELETE FROM ledger WHERE id >= (SELECT MAX(id) - 1 FROM ledger)")
    assert audit_main([str(ledger_path)]) == 0  # the chain alone cannot tell
    capsys.readouterr()
    assert audit_main([str(ledger_path), "--history", str(history), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["ledgers"][0]["problems"]["history_anchor"]
    assert len(problems) == 1 and problems[0].startswith("round 2: site site-a reported 4 ledger rows")


def test_history_check_matches_a_ledger_by_its_anchors_or_fails(ledger_path, tmp_path, capsys):
    renamed = shutil.copy(ledger_path, tmp_path / "privacy-ledger.db")
    history = tmp_path / "history.json"
    history.write_text(json.dumps(_history_with_anchors(ledger_path, "hospital-a")))
    assert audit_main([str(renamed), "--history", str(history)]) == 0  # found by its anchors
    assert "site hospital-a  (" in capsys.readouterr().out  # named after its site-name, not its file
    history.write_text(json.dumps([{"round": 1, "clients": [
        {"client": "other", "node_id": 8, "outcome": "aggregated", "ledger": {"rows": 1, "head": "0" * 64}}]}]))
    assert audit_main([str(renamed), "--history", str(history)]) == 1
    assert "no site in the history matches this ledger" in capsys.readouterr().out
