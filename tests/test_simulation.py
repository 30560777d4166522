"""A real multi-site Flower simulation (Ray backend) through ``fedlora simulate``, then
``fedlora evaluate`` on its adapter and ``--resume`` to one more round."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from fedlora.cli import main
from fedlora.model import load_base_model
from privacy.ledger import PrivacyLedger
from tests.conftest import LABELS


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert):
    from tests.conftest import make_classification_rows
    import pandas as pd

    root = tmp_path_factory.mktemp("sim")
    data = root / "notes.csv"
    pd.DataFrame(make_classification_rows(120, seed=3)).to_csv(data, index=False)
    out = root / "out"
    # site-2's own budget fits this run's 2 planned rounds (target epsilon 8; it allows a run all
    # of it) but not a third.
    sites = root / "sites.toml"
    sites.write_text("[site-2]\nmax-epsilon = 8.001\nmax-epsilon-per-run = 8.001\n")
    argv = [
        "simulate", "--num-clients", "3", "--rounds", "2", "--data", str(data), "--model", tiny_bert,
        "--output", str(out), "--partition", "dirichlet:1.0",
        "--set", "batch-size=8", "--set", "max-seq-length=32", "--set", "learning-rate=0.01",
        "--set", f"label-names={','.join(LABELS)}", "--node-config", "max-epsilon=20 delta=1e-5",
        "--site-config", str(sites), "--set", "secure-aggregation=true",  # the server sees only each round's sum
    ]
    # As a person runs it, in a process of its own: the console output is part of the result.
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    (root / "console.txt").write_text(done.stdout)
    return out, data


def test_the_console_gives_one_line_per_event_and_a_summary(finished_run):
    """Issue 13's bar: at most 40 lines for 2 rounds, no message twice in a row, none of
    Flower's progress chatter or expected warnings, and a summary with accuracy and epsilon."""
    out, _ = finished_run
    lines = (out.parent / "console.txt").read_text().splitlines()
    assert 10 <= len(lines) <= 40, "\n".join(lines)
    messages = [line.split(":", 1)[-1].strip() for line in lines]
    assert all(a != b for a, b in zip(messages, messages[1:])), "\n".join(lines)
    text = "\n".join(lines)
    for chatter in ("configure_train", "aggregate_train", "DEPRECATED", "Manually terminating", "Traceback"):
        assert chatter not in text, chatter
    assert "round 2: site-0 aggregated" in text and "round 2: eval accuracy" in text
    assert lines[-3].startswith("after round 2: eval accuracy") and lines[-2].startswith("epsilon spent: site-0")
    assert lines[-1] == f"results: {out} (report.md, history.json, adapter/, plots/)"


def test_simulation_writes_every_result_file(finished_run):
    out, _ = finished_run
    for name in ("config.json", "history.json", "report.md", "plots/loss.png", "plots/accuracy.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "checkpoints/round-1/adapter_model.safetensors", "checkpoints/round-2/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["num-server-rounds"] == 2 and config["dp"] is True
    sites = json.loads((out / "simulation.json").read_text())
    assert sites["num-clients"] == 3 and sites["node-config"] == {"max-epsilon": 20, "delta": 1e-5}
    assert sites["site-config"] == {"2": {"max-epsilon": 8.001, "max-epsilon-per-run": 8.001}}


def test_history_has_rounds_and_per_client_entries(finished_run):
    out, _ = finished_run
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        for key in ("train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "seconds"):
            assert record[key] is not None, key
        assert len(record["clients"]) == 3
        assert {c["client"] for c in record["clients"]} == {"site-0", "site-1", "site-2"}
        for client in record["clients"]:
            assert client["outcome"] == "aggregated"
            assert client["num_examples"] > 0 and client["bytes_up"] > 0 and client["epsilon"] > 0
        assert record["bytes_up"] == sum(c["bytes_up"] for c in record["clients"])
        assert record["secure_aggregation"] == {"sites": 3, "summed": 3, "dropped": 0, "shares": 3, "threshold": 2,
                                                "clipping_range": 1.0}
    assert "secure aggregation: ON" in (out / "report.md").read_text()
    # Cumulative epsilon grows from round to round at every site.
    eps = {c["client"]: c["epsilon"] for c in history[0]["clients"]}
    assert all(c["epsilon"] > eps[c["client"]] for c in history[1]["clients"])


def test_saved_adapter_loads_with_peft_and_evaluates_from_a_copy_elsewhere(finished_run, tiny_bert, tmp_path, capsys):
    """The adapter names its local base model by folder name only; on another machine
    ``--base-model`` says where it is, and without it the error says so."""
    out, data = finished_run
    copy = shutil.copytree(out / "adapter", tmp_path / "elsewhere" / "adapter")
    for path in copy.iterdir():
        text = path.read_bytes().decode(errors="replace")
        assert str(out) not in text and tiny_bert not in text, f"{path.name} holds a path of the coordinator"
    assert json.loads((copy / "adapter_config.json").read_text())["base_model_name_or_path"] == Path(tiny_bert).name
    base = load_base_model(tiny_bert, "classification", LABELS)
    model = PeftModel.from_pretrained(base, str(copy))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    capsys.readouterr()
    evaluate = ["evaluate", "--adapter", str(copy), "--data", str(data), "--json"]
    assert main(evaluate) == 2
    error = capsys.readouterr().err
    assert f"base model {Path(tiny_bert).name!r}" in error and "--base-model DIR" in error
    assert main([*evaluate, "--base-model", tiny_bert]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 120 and 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0
    assert main(["evaluate", "--adapter", str(out / "adapter"), "--data", str(data), "--json", "--base-model", tiny_bert]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == result["accuracy"]


def test_privacy_plan_predicted_what_every_site_spent(finished_run, capsys):
    """``fedlora privacy plan`` on the run's own settings (``--resume OUT`` reads them back)
    gives each site the sigma it trained with and its epsilon after every round."""
    out, _ = finished_run
    capsys.readouterr()
    assert main(["privacy", "plan", "--resume", str(out), "--json"]) == 0
    plans = {p["site"]: p for p in json.loads(capsys.readouterr().out)}
    history = json.loads((out / "history.json").read_text())
    for site in ("site-0", "site-1", "site-2"):
        with PrivacyLedger(out / "privacy" / f"{site}.db", read_only=True) as ledger:
            sigmas = {e.noise_multiplier for e in ledger.spends() if e.mechanism == "dp-sgd"}
        assert sigmas == {plans[site]["noise_multiplier"]}
        spent = [next(e["epsilon"] for e in r["evaluations"] if e["client"] == site) for r in history]
        assert spent == pytest.approx(plans[site]["epsilon_after_round"], rel=1e-9)


def test_resume_continues_and_an_exhausted_site_is_refused_while_others_train(finished_run):
    out, _ = finished_run
    assert main(["simulate", "--resume", str(out), "--rounds", "3"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3]
    assert (out / "checkpoints/round-3/adapter_model.safetensors").is_file()
    outcomes = {c["client"]: c for c in history[2]["clients"]}
    assert outcomes["site-2"]["outcome"] == "refused"
    assert outcomes["site-2"]["reason"].startswith("budget-exhausted")
    assert outcomes["site-0"]["outcome"] == outcomes["site-1"]["outcome"] == "aggregated"
    # under SecAgg+ the refusing site still sent its masks (a zero update at weight 0)
    assert history[2]["secure_aggregation"]["summed"] == 3 and history[2]["failure"] is None
    # The ledgers continue across the restart: one DP-SGD spend per training actually run, each
    # with its train-loss release, every spend confirmed.
    # site-2's refusals of round 3 (training and evaluation) are rows that spend nothing.
    for site, trainings, refused in ((0, 3, 0), (1, 3, 0), (2, 2, 2)):
        with PrivacyLedger(out / "privacy" / f"site-{site}.db", read_only=True) as ledger:
            spends, entries, refusals = ledger.spends(), ledger.entries(), ledger.refusals()
        mechanisms = [spend.mechanism for spend in spends]
        # Round 1 is the probe phase (the head on cached features), later rounds fine-tune.
        assert [m for m in mechanisms if m.startswith("dp-sgd")] == ["dp-sgd:probe"] + ["dp-sgd"] * (trainings - 1)
        assert mechanisms.count("release:train-loss") == trainings
        assert len(refusals) == refused and all(r.round == 3 and "budget-exhausted" in r.reason for r in refusals)
        assert len(entries) == 2 * len(spends) + refused
    report = json.loads((out / "privacy_report.json").read_text())
    assert "site-2" in json.dumps(report) and "budget-exhausted" in json.dumps(report)
    assert (out / "plots" / "epsilon.png").is_file()
    ledgers = [str(p) for p in sorted((out / "privacy").glob("*.db"))]
    assert main(["privacy", "audit", "--history", str(out / "history.json"), *ledgers]) == 0


def test_a_run_in_which_every_site_refuses_fails_and_writes_no_adapter(tiny_bert, tmp_path, capsys):
    from tests.conftest import make_classification_rows
    import pandas as pd

    data = tmp_path / "notes.csv"
    pd.DataFrame(make_classification_rows(60, seed=4)).to_csv(data, index=False)
    out = tmp_path / "out"
    argv = ["simulate", "--num-clients", "2", "--rounds", "1", "--data", str(data), "--model", tiny_bert,
            "--output", str(out), "--set", f"label-names={','.join(LABELS)}", "--set", "max-seq-length=32",
            "--set", "max-epsilon=5", "--node-config", "max-epsilon=2"]  # the server asks for more than the sites allow
    capsys.readouterr()
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "run failed: no round aggregated an update (1 round(s) ran)" in error
    assert not (out / "adapter").exists()
    history = json.loads((out / "history.json").read_text())
    assert [c["outcome"] for c in history[0]["clients"]] == ["refused", "refused"]
    report = (out / "report.md").read_text()
    assert "status: **FAILED**" in report and "`adapter/`" not in report
    assert report.count("refused: policy-refused (setting max-epsilon)") == 2  # each site's reason, once


def test_two_runs_on_kept_ledgers_both_aggregate_under_a_lifetime_budget_of_8(tiny_bert, tmp_path):
    """The smoke-test trap: sites keep their ledgers across runs with max-epsilon = 8, and the
    default target-epsilon is 8. The first run may spend only 80% of 8, so the second still
    trains (80% of what is left), and the lifetime budget holds over both."""
    from tests.conftest import make_classification_rows
    import pandas as pd

    data = tmp_path / "notes.csv"
    pd.DataFrame(make_classification_rows(80, seed=5)).to_csv(data, index=False)
    sites = tmp_path / "sites.toml"
    sites.write_text("".join(f'[site-{i}]\nledger-path = "{tmp_path / f"ledger-{i}.db"}"\n' for i in range(2)))
    epsilons = []
    for run in ("first", "second"):
        argv = ["simulate", "--num-clients", "2", "--rounds", "1", "--data", str(data), "--model", tiny_bert,
                "--output", str(tmp_path / run), "--set", f"label-names={','.join(LABELS)}", "--set", "max-seq-length=32",
                "--set", "batch-size=8", "--set", "local-steps=2", "--node-config", "max-epsilon=8",
                "--site-config", str(sites)]
        assert main(argv) == 0
        history = json.loads((tmp_path / run / "history.json").read_text())
        assert all(c["outcome"] == "aggregated" for r in history for c in r["clients"]), run
        epsilons.append(max(c["epsilon"] for c in history[-1]["clients"]))
    assert 6.0 < epsilons[0] <= 6.4 + 1e-6  # 80% of 8
    for i in range(2):
        with PrivacyLedger(tmp_path / f"ledger-{i}.db", read_only=True) as ledger:
            runs = [e.run_id for e in ledger.spends()]
            second = ledger.spent(runs[-1], 1e-5, "rdp")
        assert len(set(runs)) == 2 and second.this_run <= 0.8 * (8 - second.other_runs) + 1e-6
        assert epsilons[0] < second.total <= 8
