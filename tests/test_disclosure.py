"""What a curious server can read, end to end: the real ServerApp (``server.app``) drives real
site handlers (``client.app``) in-process, and the test reads only what the server wrote:
``history.json``, ``report.md`` and ``privacy_report.*``. No Ray, no SuperLink: a
:class:`FakeGrid` delivers each message to the site's ClientApp."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from fedlora.cli import main as cli
from fedlora.run_config import apply_overrides, default_run_config
from privacy.ledger import PrivacyLedger
from server import app as server_app
from tests.conftest import LABELS, make_classification_rows
from tests.fake_grid import FakeGrid


def run_federation(run_config: dict, sites: dict[str, dict], out: Path) -> Path:
    """The ServerApp's ``main`` over sites named -> node config; returns the output folder."""
    config = {**run_config, "output-dir": str(out)}
    node_ids = {name: 100 + i for i, name in enumerate(sites)}

    def deliver(name: str):
        def handle(message: Message) -> Message:
            TaskIdentity.node_id = node_ids[name]  # the site's own identity while it runs
            context = Context(run_id=77, node_id=node_ids[name], node_config={"site-name": name, **sites[name]},
                              state=RecordDict(), run_config=config)
            try:
                return client_app.app(message, context)
            finally:
                TaskIdentity.node_id = 0
        return handle

    grid = FakeGrid({node_ids[name]: deliver(name) for name in sites})
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 77, 0
    server_app.main(grid, Context(run_id=77, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return out


def site_file(path: Path, seed: int, extra_rows: list[dict] = ()) -> str:
    pd.DataFrame(make_classification_rows(60, seed=seed) + list(extra_rows)).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("disclosure")
    site_file(root / "a.csv", 1)
    site_file(root / "b.csv", 2)
    site_file(root / "jane.csv", 3, [{"text": "chest pain follow up", "label": "Jane Doe"}])
    return root


def sites(files: Path, run: str, **node) -> dict[str, dict]:
    return {
        name: {"data-path": str(files / f"{data}.csv"), "ledger-path": str(files / run / f"{name}.db"),
               "num-examples": rows, **node}
        for name, data, rows in (("site-a", "a", 60), ("site-b", "b", 60), ("site-jane", "jane", 61))
    }


@pytest.fixture(scope="module")
def attack_config(tiny_bert, files) -> dict:
    """The server's loss-recovery attack: one step on a batch larger than any site (q = 1), so a
    site's exact reported loss was the mean loss of all its records, and two runs that differ by
    one record give that record's loss. Same seed both runs."""
    return apply_overrides(default_run_config(), {
        "model": tiny_bert, "data": str(files / "a.csv"), "label-names": ",".join(LABELS),
        "max-seq-length": 32, "min-train-nodes": 2, "min-evaluate-nodes": 2,
        "num-server-rounds": 1, "batch-size": 1000, "local-steps": 1, "seed": 5, "noise-multiplier": 5.0,
        "probe-rounds": 0,
    })


class _PinnedSecrets:
    """``secrets`` for ``client.site``: DP-SGD's sampling seeds fixed, so that two runs differ
    only where the metric releases add their own noise."""

    @staticmethod
    def randbits(bits: int) -> int:
        return 99


def pinned_run(config: dict, files: Path, run: str, monkeypatch) -> Path:
    from client import site as site_module
    from client.site_model import warm_model

    monkeypatch.setattr(site_module, "secrets", _PinnedSecrets)
    warm_model.cache_clear()  # each run loads the model, using the same draws
    torch.manual_seed(0)  # the server's fresh head and Opacus' noise: the same both runs
    random.seed(0)  # Flower's sampling of nodes, hence the order the sites draw noise in
    return run_federation(config, sites(files, run), files / f"out-{run}")


@pytest.fixture(scope="module")
def two_runs(attack_config, files) -> tuple[Path, Path]:
    with pytest.MonkeyPatch.context() as patch:
        return tuple(pinned_run(attack_config, files, run, patch) for run in ("first", "second"))


def _site_values(out: Path) -> dict[str, tuple[float, float, float]]:
    (record,) = json.loads((out / "history.json").read_text())
    evaluations = {e["client"]: e for e in record["evaluations"]}
    return {
        c["client"]: (c["train_loss"], evaluations[c["client"]]["eval_accuracy"], evaluations[c["client"]]["eval_loss"])
        for c in record["clients"]
    }


def test_the_same_round_twice_reports_different_metrics(two_runs):
    """The must-show: same seed, same data, DP on, batch >= n, one local step. Every per-site
    train loss and evaluation metric in history.json differs between the runs."""
    first, second = (_site_values(out) for out in two_runs)
    for site in ("site-a", "site-b", "site-jane"):
        assert all(v is not None for v in first[site] + second[site]), site
        assert all(a != b for a, b in zip(first[site], second[site], strict=True)), site


def test_without_the_release_noise_the_same_round_twice_reports_the_same_metrics(attack_config, files, monkeypatch):
    """The control that gives the test above its teeth: with everything else pinned, exact
    metrics repeat, so two runs differing by one record would give that record away."""
    from privacy import release

    monkeypatch.setattr(release, "_gaussian", lambda count, std, secure: [0.0] * count)
    first, second = (_site_values(pinned_run(attack_config, files, run, monkeypatch)) for run in ("exact-1", "exact-2"))
    assert first == second


def test_an_unknown_label_that_is_a_name_leaves_no_trace_at_the_server(two_runs):
    out = two_runs[0]
    written = [out / "history.json", out / "report.md", out / "privacy_report.json", out / "privacy_report.md"]
    for path in written:
        text = path.read_text()
        assert "Jane" not in text and "chest pain follow up" not in text, path.name
    (record,) = json.loads((out / "history.json").read_text())
    jane = next(c for c in record["clients"] if c["client"] == "site-jane")
    assert jane["outcome"] == "aggregated"  # the bad row was dropped at the site, locally noted


def test_sites_report_public_weights_and_the_server_keeps_their_ledger_anchors(two_runs, files):
    out = two_runs[0]
    (record,) = json.loads((out / "history.json").read_text())
    for client in record["clients"]:
        declared = 61 if client["client"] == "site-jane" else 60
        assert client["num_examples"] == round(0.8 * declared)  # the declared training share, not a count
        with PrivacyLedger(files / "first" / f"{client['client']}.db", read_only=True) as ledger:
            evaluation = next(e for e in record["evaluations"] if e["client"] == client["client"])
            assert evaluation["ledger"] == {"rows": ledger.anchor().rows, "head": ledger.anchor().head}
            assert client["ledger"]["rows"] < evaluation["ledger"]["rows"]  # the eval release came after


def test_deleting_a_ledgers_last_row_fails_the_audit_against_the_history(two_runs, files, capsys):
    out = two_runs[0]
    ledgers = [str(files / "first" / f"{site}.db") for site in ("site-a", "site-b")]
    assert cli(["privacy", "audit", "--history", str(out / "history.json"), *ledgers]) == 0
    with sqlite3.connect(ledgers[0]) as db:
        db.execute("DROP TRIGGER ledger_no_delete")
        db.execute("DELETE FROM ledger WHERE id = (SELECT MAX(id) FROM ledger)")
    assert cli(["privacy", "audit", *ledgers]) == 0  # the remaining chain is consistent...
    capsys.readouterr()
    assert cli(["privacy", "audit", "--history", str(out / "history.json"), *ledgers]) == 1
    assert "no longer holds that row" in capsys.readouterr().out


def test_the_noise_floor_holds_against_a_target_of_1000(attack_config, files):
    config = apply_overrides(attack_config, {"noise-multiplier": 0.0, "target-epsilon": 1000.0, "batch-size": 8})
    out = run_federation(
        config, sites(files, "floor", **{"min-noise-multiplier": 0.8, "max-epsilon": 1000.0}), files / "out-floor"
    )
    (record,) = json.loads((out / "history.json").read_text())
    assert {c["client"] for c in record["clients"] if c["outcome"] == "aggregated"} == {"site-a", "site-b", "site-jane"}
    for site in ("site-a", "site-b", "site-jane"):
        with PrivacyLedger(files / "floor" / f"{site}.db", read_only=True) as ledger:
            sigmas = [e.noise_multiplier for e in ledger.spends()]
        assert sigmas and min(sigmas) >= 0.8, sigmas
