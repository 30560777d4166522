"""``fedlora privacy empirical``: a simulation with canaries in site-0's data, scored by the final
adapter, with a measured lower bound on epsilon beside the accountant's."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from fedlora.cli import main
from privacy.canaries import make_canaries
from tests.conftest import LABELS


def test_canaries_are_random_labelled_strings_each_included_with_probability_a_half():
    canaries = make_canaries(2000, 3, np.random.default_rng(1))
    assert canaries.rows.num_rows == 2000 and len(set(canaries.rows["text"])) == 2000
    assert set(canaries.rows["label"]) == {0, 1, 2}
    assert 900 < canaries.included.sum() < 1100
    assert canaries.included_rows.num_rows == canaries.included.sum()


def test_an_audit_run_writes_its_bounds_and_never_claims_more_than_the_accountant(tiny_bert, classification_csv, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["privacy", "empirical", "--num-clients", "2", "--rounds", "1", "--canaries", "40", "--canary-clients", "30",
            "--data", str(classification_csv), "--model", tiny_bert, "--output", str(out),
            "--set", "batch-size=8", "--set", "max-seq-length=32", "--set", f"label-names={','.join(LABELS)}",
            "--set", "central-dp=true", "--set", "num-sampled-clients=2", "--set", "central-dp-noise-multiplier=2"]
    assert main(argv) == 0
    result = json.loads((out / "empirical.json").read_text())
    assert result["canaries"] == 40 and result["confidence"] == 0.95 and result["method"] in result["bounds"]
    assert 0 <= result["epsilon_lower_bound"] <= result["epsilon_theory"] <= 8.0
    # Site-0 audits itself: its canaries come from its own secret, join its training rows only
    # (never its file or its held-out split), and it reports to itself after the round too.
    site0 = pd.read_parquet(out / "sites" / "site-0.parquet")
    site1 = pd.read_parquet(out / "sites" / "site-1.parquet")
    assert len(site0) + len(site1) == pd.read_csv(classification_csv).shape[0]
    (own,) = (out / "privacy" / "site-0.audit").glob("run-*")
    assert (own / "secret").is_file() and json.loads((own / "empirical.json").read_text())["round"] == 1
    assert not (out / "privacy" / "site-1.audit").exists()
    # ...and scores its own last update too: a bound against its ledger at that point.
    assert result["own_update"]["adapter"] == "site-0's own update of round 1"
    assert 0 <= result["own_update"]["epsilon_lower_bound"] <= result["own_update"]["epsilon_theory"]
    simulated = json.loads((out / "simulation.json").read_text())
    assert "canar" not in json.dumps(simulated) + (out / "config.json").read_text()  # the server never sees them
    assert (out / "plots" / "canary_scores.png").is_file()
    report = (out / "empirical.md").read_text()
    assert "lower bound" in report and f"{result['epsilon_theory']:.3f}" in report
    # Site level: 30 canary clients in the one round's mean, estimated against central DP's accountant.
    site = result["site_level"]
    assert site["canaries"] == 30 and site["rounds"] == 1 and site["canary_norm"] == "central-dp-clipping-norm"
    history = json.loads((out / "history.json").read_text())
    assert site["epsilon_theory"] == history[-1]["central_epsilon"] > 0
    assert site["epsilon_interval"][0] <= site["epsilon"] <= site["epsilon_interval"][1]
    assert site["dimension"] > 1000 and site["null_std"] == site["dimension"] ** -0.5
    assert "Site level" in report and (out / "plots" / "canary_cosines.png").is_file()
    printed = capsys.readouterr().out
    assert "epsilon: lower bound" in printed and "site level: epsilon estimate" in printed
