"""What a curious server can read, end to end: the real ServerApp (``server.app``) drives real
site handlers (``client.app``) in-process, and the test reads only what the server wrote:
``history.json``, ``report.md`` and ``privacy_report.*``. No Ray, no SuperLink: a
:class:`FakeGrid` delivers each message to the site's ClientApp."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
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
        name: {"data-path": str(files / f"{data}.csv"), "ledger-path": str(files / run / f"{name}.db"), **node}
        for name, data in (("site-a", "a"), ("site-b", "b"), ("site-jane", "jane"))
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
    })


@pytest.fixture(scope="module")
def two_runs(attack_config, files) -> tuple[Path, Path]:
    return tuple(
        run_federation(attack_config, sites(files, run), files / f"out-{run}") for run in ("first", "second")
    )


def _site_values(out: Path) -> dict[str, tuple]:
    (record,) = json.loads((out / "history.json").read_text())
    values = {c["client"]: ("train", c["train_loss"]) for c in record["clients"]}
    for e in record["evaluations"]:
        values[e["client"]] = (*values.get(e["client"], ()), "eval", e["eval_accuracy"])
    return values


def test_the_same_round_twice_reports_different_or_no_metrics(two_runs):
    first, second = (_site_values(out) for out in two_runs)
    for site in ("site-a", "site-b"):
        train1, train2 = first[site][1], second[site][1]
        assert train1 is None or train1 != train2, site
        eval1, eval2 = first[site][3], second[site][3]
        assert eval1 is None or eval1 != eval2, site


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
        assert client["num_examples"] == 1  # no declared size: equal weights, not the row count
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
