"""``fedlora site status``: a site's budget from its own ledger and node config."""

from __future__ import annotations

import json

import pytest

from fedlora.cli import main
from privacy.accountant import epsilon_for
from privacy.ledger import PrivacyLedger

DELTA = 1e-5
RUN_1 = [(1.0, 0.05, 100), (1.0, 0.05, 100)]
RUN_2 = [(1.5, 0.05, 50)]


@pytest.fixture
def ledger(tmp_path):
    path = tmp_path / "site.db"
    with PrivacyLedger(path) as kept:
        for run, rows in (("run-1", RUN_1), ("run-2", RUN_2)):
            for round_, (sigma, q, steps) in enumerate(rows, start=1):
                entry = kept.begin_spend(run_id=run, round=round_, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                         max_grad_norm=1.0, delta=DELTA, accountant="rdp", max_epsilon=8.0, rng_mode="mt19937")
                kept.confirm(entry.id)
        kept.record_refusal(run_id="run-2", round=2, reason="training: budget-exhausted (max-epsilon-per-run)")
    return path


def test_status_shows_spent_left_each_run_the_refusals_and_the_next_allowance(ledger, capsys):
    assert main(["site", "status", "--ledger", str(ledger), "--node-config", "max-epsilon=8", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    spent = epsilon_for(RUN_1 + RUN_2, DELTA)
    assert status["spent"] == pytest.approx(spent) and status["left"] == pytest.approx(8 - spent)
    assert status["next_run_allowance"] == pytest.approx(0.8 * (8 - spent))
    assert [(r["run_id"], r["rounds"]) for r in status["runs"]] == [("run-1", 2), ("run-2", 1)]
    assert status["runs"][0]["epsilon"] == pytest.approx(epsilon_for(RUN_1, DELTA))
    assert [r["reason"] for r in status["refusals"]] == ["training: budget-exhausted (max-epsilon-per-run)"]

    node_config = ledger.with_name("node-config.toml")  # as the SuperNode reads it
    node_config.write_text("max-epsilon = 8.0\nmax-epsilon-per-run = 0.5\ndata-path = '/srv/data.csv'\n")
    assert main(["site", "status", "--ledger", str(ledger), "--node-config", str(node_config)]) == 0
    out = capsys.readouterr().out
    assert "next run   may spend up to 0.5000 (max-epsilon-per-run 0.5)" in out
    assert "refused: run run-2 round 2" in out


def test_a_new_site_has_spent_nothing_and_a_bad_policy_is_one_line(ledger, tmp_path, capsys):
    assert main(["site", "status", "--ledger", str(tmp_path / "none.db"), "--node-config", "max-epsilon=8", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["spent"] == 0 and status["next_run_allowance"] == pytest.approx(6.4) and not status["ledger_exists"]
    (tmp_path / "bad.db").write_text("not a database")
    assert main(["site", "status", "--ledger", str(tmp_path / "bad.db")]) == 2
    assert "is not a privacy ledger" in capsys.readouterr().err
    assert main(["site", "status", "--ledger", str(ledger), "--node-config", "max-epsilon=8 max-epsilon-per-run=9"]) == 2
    assert "max-epsilon-per-run must be in (0, max-epsilon 8]" in capsys.readouterr().err
