"""A site's privacy guarantees, driven through its ClientApp handlers as the Flower runtime
would: the spend carries over process restarts, the budget and the site's policy are enforced,
bad data is a clean refusal, nothing but adapters and whitelisted scalars can leave, and the
ledger the rounds wrote passes ``fedlora privacy audit`` until someone edits it."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.outgoing_guard import DisclosureError, check_outgoing, outgoing_guard
from fedlora import cli
from fedlora.run_config import apply_overrides, default_run_config
from privacy.accountant import epsilon_for
from privacy.ledger import PrivacyLedger
from server.global_model import GlobalModel

REPO = Path(__file__).resolve().parents[1]
LABELS = ("cardio", "pulmo", "gastro")
SIGMA = 1.0  # explicit noise multiplier: no calibration, which would cost seconds per round


def privacy_run_config(model: str, data: Path) -> dict:
    """Two local steps of batch 8 per round on 30 rows (24 train): q = 1/3, epsilon ~4.5 after one round."""
    return apply_overrides(
        default_run_config(),
        {
            "model": model, "data": str(data), "label-names": ",".join(LABELS),
            "num-server-rounds": 2, "batch-size": 8, "local-steps": 2, "max-seq-length": 32,
            "noise-multiplier": SIGMA,
        },
    )


def train_round(run_config: dict, node_config: dict, server_round: int, arrays: ArrayRecord | None = None) -> Message:
    """One train message through the site's ClientApp (outgoing guard included), the test
    playing the server. The restart test also runs it in a fresh process, so it uses no fixtures."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1
    arrays = arrays if arrays is not None else GlobalModel.load(run_config).arrays()
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    message = Message(content=content, dst_node_id=7, message_type="train")
    context = Context(run_id=1234, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    return client_app.app(message, context)


_SUBPROCESS_ROUND = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.test_site_privacy import train_round
reply = train_round(json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]))
print(json.dumps(dict(reply.content["metrics"])))
"""


def _write_notes(path: Path, rows: int = 30) -> Path:
    words = {"cardio": "heart chest ecg", "pulmo": "cough wheeze sputum", "gastro": "nausea liver bowel"}
    labels = [LABELS[i % 3] for i in range(rows)]
    pd.DataFrame({"text": [f"patient {words[label]} note {i}" for i, label in enumerate(labels)], "label": labels}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def site_files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("site")


@pytest.fixture(scope="module")
def run_config(tiny_bert, site_files) -> dict:
    return privacy_run_config(tiny_bert, _write_notes(site_files / "notes.csv"))


@pytest.fixture(scope="module")
def global_arrays(run_config) -> ArrayRecord:
    return GlobalModel.load(run_config).arrays()


@pytest.fixture(scope="module")
def two_rounds(run_config, global_arrays, site_files) -> dict:
    """Round 1 in a fresh Python process, round 2 in this one, on the same ledger file."""
    node = {"data-path": run_config["data"], "ledger-path": str(site_files / "ledger.db")}
    done = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_ROUND, str(REPO), json.dumps(run_config), json.dumps(node), "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads(done.stdout.strip().splitlines()[-1])
    second = train_round(run_config, node, 2, global_arrays)
    assert not second.has_error(), second.error
    return {"ledger": Path(node["ledger-path"]), "first": first, "second": dict(second.content["metrics"])}


def test_cumulative_epsilon_continues_across_a_process_restart(two_rounds):
    eps1, eps2 = two_rounds["first"]["epsilon"], two_rounds["second"]["epsilon"]
    with PrivacyLedger(two_rounds["ledger"], read_only=True) as ledger:
        entries, history, problems = ledger.entries(), ledger.history(), ledger.verify_chain()
    assert [e.kind for e in entries] == ["spend", "confirm", "spend", "confirm"]
    assert [e.round for e in entries] == [1, 1, 2, 2]
    assert problems == []
    assert history[0] == history[1] == (SIGMA, 1 / 3, 2)
    assert 0 < eps1 < eps2
    assert eps1 == pytest.approx(epsilon_for(history[:1], 1e-5), rel=1e-12)
    # Round 2 reports the spend of both rounds, not a fresh accountant's single round.
    assert eps2 == pytest.approx(epsilon_for(history, 1e-5), rel=1e-12)


def test_site_refuses_a_round_past_its_budget(run_config, global_arrays, site_files):
    """An earlier run spent epsilon ~0.2 of this site's budget of 1.0; one more round (~4.5)
    would exceed it, so the site refuses before charging anything."""
    path = site_files / "spent.db"
    with PrivacyLedger(path) as ledger:
        earlier = ledger.begin_spend(
            run_id="earlier-run", round=1, noise_multiplier=2.0, sample_rate=0.01, steps=10,
            max_grad_norm=1.0, delta=1e-5, accountant="rdp", max_epsilon=1.0, rng_mode="torch-mt19937",
        )
        ledger.confirm(earlier.id)
        head = ledger.head_hash()
    assert earlier.epsilon < 1.0

    node = {"data-path": run_config["data"], "ledger-path": str(path), "max-epsilon": 1.0}
    reply = train_round(run_config, node, 1, global_arrays)

    assert not reply.has_error(), reply.error
    assert "arrays" not in reply.content
    assert reply.content["status"]["status"] == "budget-exhausted"
    assert "max-epsilon 1.0000" in reply.content["status"]["reason"]
    with PrivacyLedger(path, read_only=True) as ledger:
        assert len(ledger.spends()) == 1
        assert ledger.head_hash() == head


@pytest.mark.parametrize(
    ("setting", "request_"),
    [
        ("delta", {"delta": 1e-4}),
        ("dp", {"dp": False}),
        ("noise-multiplier", {"noise-multiplier": 0.5}),
        ("max-epsilon", {"max-epsilon": 8.0}),
    ],
)
def test_server_cannot_loosen_the_site_policy(run_config, site_files, setting, request_):
    ledger = site_files / f"policy-{setting}.db"
    node = {
        "data-path": run_config["data"], "ledger-path": str(ledger),
        "delta": 1e-5, "min-noise-multiplier": 1.0, "max-epsilon": 5.0, "dp": True,
    }
    # The policy check comes first: no adapter needed, nothing loaded.
    reply = train_round(apply_overrides(run_config, request_), node, 1, ArrayRecord())
    assert not reply.has_error(), reply.error
    assert "arrays" not in reply.content
    assert reply.content["status"]["status"] == "policy-refused"
    assert reply.content["status"]["reason"].startswith(f"{setting}:")
    assert not ledger.exists(), "a refused request must not touch the ledger"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"text,diagnosis\nchest pain,cardio\ncough,pulmo\n", "missing column 'label'"),
        (b"text,label\nchest pain,cardio\ncough \xff\xfe wheeze,pulmo\n", "not valid UTF-8"),
    ],
    ids=["missing-label-column", "undecodable-bytes"],
)
def test_malformed_site_data_is_a_data_error_reply(run_config, tmp_path, content, problem):
    bad = tmp_path / "site.csv"
    bad.write_bytes(content)
    node = {"data-path": str(bad), "ledger-path": str(tmp_path / "l.db")}
    reply = train_round(run_config, node, 1, ArrayRecord())
    assert not reply.has_error(), reply.error
    status = reply.content["status"]
    assert status["status"] == "data-error"
    assert str(bad) in status["reason"] and problem in status["reason"]


def _reply(**records) -> Message:
    return Message(content=RecordDict(records), dst_node_id=7, message_type="train")


ADAPTER_KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
BASE_KEY = "base_model.model.bert.embeddings.word_embeddings.weight"


@pytest.mark.parametrize(
    ("records", "named"),
    [
        ({"arrays": ArrayRecord({ADAPTER_KEY: torch.zeros(2, 2), BASE_KEY: torch.zeros(4, 2)})}, BASE_KEY),
        ({"metrics": MetricRecord({"num-examples": 3, "mean-age": 54.2})}, "mean-age"),
        ({"metrics": ConfigRecord({"num-examples": 3, "note": "patient 12: chest pain"})}, "'metrics' (ConfigRecord)"),
        ({"status": ConfigRecord({"status": "data-error", "reason": "x", "row": "chest pain"})}, "row"),
        ({"examples": ConfigRecord({"text": "chest pain"})}, "'examples'"),
    ],
    ids=["base-model-tensor", "metric-not-whitelisted", "string-in-metrics", "extra-status-field", "extra-record"],
)
def test_outgoing_guard_blocks_anything_but_adapters_and_whitelisted_scalars(records, named):
    with pytest.raises(DisclosureError, match=re.escape(named)):
        check_outgoing(_reply(**records))


def test_outgoing_guard_passes_a_legitimate_reply():
    check_outgoing(_reply(
        arrays=ArrayRecord({ADAPTER_KEY: torch.zeros(2, 2)}),
        metrics=MetricRecord({"num-examples": 3, "epsilon": 1.5, "dp": 1}),
        site=ConfigRecord({"name": "site-a"}),
    ))


def test_client_app_turns_a_leaking_handler_into_an_error(run_config):
    """The guard runs on the handler's reply inside the ClientApp; the leaking reply is never
    returned. Flower's runtime turns the raised error into an error reply without content
    (``flwr.supernode.runtime.run_clientapp``), so the tensor never reaches the server."""
    leaky = ClientApp(mods=[outgoing_guard])

    @leaky.train()
    def leak(msg: Message, context: Context) -> Message:
        content = RecordDict({"arrays": ArrayRecord({BASE_KEY: torch.ones(4, 2)}), "metrics": MetricRecord({"num-examples": 3})})
        return Message(content=content, reply_to=msg)

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1
    message = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1234, node_id=7, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(DisclosureError, match="non-adapter tensor"):
        leaky(message, context)


def test_privacy_audit_passes_on_the_rounds_ledger_and_fails_after_tampering(two_rounds, tmp_path, capsys):
    ledger = shutil.copy(two_rounds["ledger"], tmp_path / "site.db")
    assert cli.main(["privacy", "audit", str(ledger)]) == 0
    assert "OK" in capsys.readouterr().out

    # Someone lowers round 1's recorded spend: more noise than was really used.
    with sqlite3.connect(ledger) as db:
        db.execute("DROP TRIGGER ledger_no_update")
        db.execute("UPDATE ledger SET noise_multiplier = 20.0 WHERE id = 1")
    assert cli.main(["privacy", "audit", str(ledger)]) == 1
    out = capsys.readouterr().out
    assert "row 1: bad hash" in out and "FAILED" in out
