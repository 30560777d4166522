"""``fedlora simulate`` under distributed DP, as a person runs it: three sites, a probe round and a
fine-tuning round, each one noisy gradient step summed by SecAgg+; then the plan, the report and
the audit agree with what the sites' ledgers hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedlora.cli import main
from privacy.audit import audit_ledger
from privacy.ledger import PrivacyLedger
from privacy.skellam import MECHANISM
from tests.conftest import LABELS


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory, tiny_bert):
    import pandas as pd

    from tests.conftest import make_classification_rows

    root = tmp_path_factory.mktemp("distributed")
    data = root / "notes.csv"
    pd.DataFrame(make_classification_rows(120, seed=5)).to_csv(data, index=False)
    out = root / "out"
    argv = [
        "simulate", "--num-clients", "3", "--rounds", "2", "--data", str(data), "--model", tiny_bert,
        "--output", str(out), "--set", "max-seq-length=32", "--set", f"label-names={','.join(LABELS)}",
        "--set", "secure-aggregation=true", "--set", "dp-mode=distributed", "--set", "min-valid-updates=3",
        "--set", "probe-rounds=1", "--node-config", "max-epsilon=20 delta=1e-5 distributed-dp-colluders=0",
    ]
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    return out


def test_every_round_is_a_secure_sum_of_noisy_gradients_and_the_report_says_so(distributed_run):
    history = json.loads((distributed_run / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2] and all(r["failure"] is None for r in history)
    for record in history:
        assert record["secure_aggregation"]["summed"] == 3
        assert sorted(c["outcome"] for c in record["clients"]) == ["aggregated"] * 3
    report = (distributed_run / "report.md").read_text()
    assert "differential privacy: ON, distributed:" in report and "secure aggregation: ON" in report
    assert (distributed_run / "adapter" / "adapter_config.json").is_file()


def test_the_ledgers_hold_skellam_rows_the_audit_recomputes_and_the_plan_predicted(distributed_run, capsys):
    capsys.readouterr()
    assert main(["privacy", "plan", "--resume", str(distributed_run), "--json"]) == 0
    plans = {p["site"]: p for p in json.loads(capsys.readouterr().out)}
    # each round one full-batch step at the server's step size for the phase
    assert [(p["name"], p["steps_per_round"], p["learning_rate"]) for p in plans["site-0"]["phases"]] \
        == [("probe", 1, 10.0), ("fine-tune", 1, 1.0)]
    for site in ("site-0", "site-1", "site-2"):
        path = distributed_run / "privacy" / f"{site}.db"
        with PrivacyLedger(path, read_only=True) as ledger:
            rows = [e for e in ledger.spends() if e.mechanism == MECHANISM]
            spent = [max(e.epsilon for e in ledger.spends() if e.round <= r) for r in (1, 2)]
        assert [e.round for e in rows] == [1, 2]
        assert rows[0].max_grad_norm == rows[1].max_grad_norm  # the whole adapter's D2, probing or not
        assert {e.noise_multiplier for e in rows} == {plans[site]["noise_multiplier"]}
        assert spent == pytest.approx(plans[site]["epsilon_after_round"], rel=1e-9)
        audit = audit_ledger(path)
        assert not audit.epsilon_mismatches and not audit.chain_problems and not audit.budget_exceeded
