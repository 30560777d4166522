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
from tests.conftest import settings_of

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
            "noise-multiplier": SIGMA, "probe-rounds": 0,
        },
    )


def train_round(run_config: dict, node_config: dict, server_round: int, arrays: ArrayRecord | None = None,
                run_id: int = 1234) -> Message:
    """One train message through the site's ClientApp (outgoing guard included), the test
    playing the server. The restart test also runs it in a fresh process, so it uses no fixtures."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 1
    arrays = arrays if arrays is not None else GlobalModel.load(settings_of(run_config)).arrays()
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    message = Message(content=content, dst_node_id=7, message_type="train")
    context = Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    return client_app.app(message, context)


def evaluate_round(run_config: dict, node_config: dict, server_round: int, arrays: ArrayRecord) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    message = Message(content=content, dst_node_id=7, message_type="evaluate")
    context = Context(run_id=1234, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    return client_app.app(message, context)


def reply_text(reply: Message) -> str:
    """Everything a reply carries, as text (what a curious server could read)."""
    return repr({name: dict(record) for name, record in reply.content.items() if name != "arrays"})


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
    return GlobalModel.load(settings_of(run_config)).arrays()


@pytest.fixture(scope="module")
def two_rounds(run_config, global_arrays, site_files) -> dict:
    """Round 1 in a fresh Python process, round 2 in this one, on the same ledger file."""
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(site_files / "ledger.db")}
    done = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_ROUND, str(REPO), json.dumps(run_config), json.dumps(node), "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads(done.stdout.strip().splitlines()[-1])
    second = train_round(run_config, node, 2, global_arrays)
    assert not second.has_error(), second.error
    with PrivacyLedger(node["ledger-path"], read_only=True) as ledger:
        train_rows = round(8 / ledger.spends()[0].sample_rate)
    return {"ledger": Path(node["ledger-path"]), "first": first, "second": dict(second.content["metrics"]),
            "anchor": dict(second.content["ledger"]), "train_rows": train_rows}


def test_cumulative_epsilon_continues_across_a_process_restart(two_rounds):
    eps1, eps2 = two_rounds["first"]["epsilon"], two_rounds["second"]["epsilon"]
    with PrivacyLedger(two_rounds["ledger"], read_only=True) as ledger:
        entries, history, problems = ledger.entries(), ledger.history(), ledger.verify_chain()
    # Each round: the DP-SGD steps and the noised train-loss release, charged, then confirmed.
    assert [e.kind for e in entries] == ["spend", "spend", "confirm", "confirm"] * 2
    assert [e.mechanism for e in entries if e.kind == "spend"] == ["dp-sgd", "release:train-loss"] * 2
    assert [e.round for e in entries] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert problems == []
    q = 8 / two_rounds["train_rows"]
    assert history[0] == history[2] == (SIGMA, q, 2)
    assert history[1] == history[3] == (10.0, q, 1)  # metric-noise-multiplier's default
    assert 0 < eps1 < eps2
    assert eps1 == pytest.approx(epsilon_for(history[:2], 1e-5), rel=1e-12)
    # Round 2 reports the spend of both rounds, not a fresh accountant's single round.
    assert eps2 == pytest.approx(epsilon_for(history, 1e-5), rel=1e-12)


def test_site_refuses_a_round_past_its_budget(run_config, global_arrays, site_files):
    """An earlier run spent epsilon ~0.2 of this site's budget of 1.0; one more round (~4.5)
    would exceed it, so the site refuses before charging anything; the refusal is a ledger row
    that spends nothing, and the anchor the server gets covers it."""
    path = site_files / "spent.db"
    with PrivacyLedger(path) as ledger:
        earlier = ledger.begin_spend(
            run_id="earlier-run", round=1, noise_multiplier=2.0, sample_rate=0.01, steps=10,
            max_grad_norm=1.0, delta=1e-5, accountant="rdp", max_epsilon=1.0, rng_mode="torch-mt19937",
        )
        ledger.confirm(earlier.id)
        head = ledger.head_hash()
    assert earlier.epsilon < 1.0

    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(path), "max-epsilon": 1.0}
    reply = train_round(run_config, node, 1, global_arrays)

    assert not reply.has_error(), reply.error
    assert "arrays" not in reply.content
    assert dict(reply.content["status"]) == {"status": "budget-exhausted", "setting": "max-epsilon"}
    with PrivacyLedger(path, read_only=True) as ledger:
        assert len(ledger.spends()) == 1 and ledger.entries()[1].hash == head
        (refusal,) = ledger.refusals()
        assert refusal.reason == "training: budget-exhausted (max-epsilon)" and refusal.epsilon == earlier.epsilon
        assert dict(reply.content["ledger"]) == {"rows": 3, "head": ledger.head_hash()} and ledger.verify_chain() == []


def test_a_run_spends_at_most_its_allowance_and_the_next_run_gets_its_own(run_config, global_arrays, site_files, caplog):
    """max-epsilon-per-run = 5: round 1 (~4.5) fits, round 2 would take this run past 5 and is
    refused, naming that setting; a later run starts a fresh allowance on the same ledger."""
    path = site_files / "per-run.db"
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(path),
            "max-epsilon": 20.0, "max-epsilon-per-run": 5.0}
    first = train_round(run_config, node, 1, global_arrays)
    assert 4 < first.content["metrics"]["epsilon"] < 5
    with caplog.at_level("INFO", logger="flwr"):
        refused = train_round(run_config, node, 2, global_arrays)
    assert dict(refused.content["status"]) == {"status": "budget-exhausted", "setting": "max-epsilon-per-run"}
    assert "this run's epsilon" in caplog.text and "> max-epsilon-per-run 5.0000" in caplog.text
    later = train_round(run_config, node, 1, global_arrays, run_id=5678)
    assert "arrays" in later.content and later.content["metrics"]["epsilon"] > first.content["metrics"]["epsilon"]
    with PrivacyLedger(path, read_only=True) as ledger:
        spent = ledger.spent("5678", 1e-5, "rdp")
    assert spent.this_run < 5 and spent.other_runs == pytest.approx(first.content["metrics"]["epsilon"])
    assert spent.total == pytest.approx(later.content["metrics"]["epsilon"])


def test_the_default_allowance_is_a_share_of_what_is_left(run_config, global_arrays, site_files):
    """max-epsilon 6 and no per-run cap: a run may spend 80% of 6 = 4.8, so the round (~4.5 at
    sigma 1) trains; after it, 80% of the ~1.5 left is not enough for another, so a new run is
    refused, and the ledger keeps the remainder."""
    path = site_files / "share.db"
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(path), "max-epsilon": 6.0}
    assert "arrays" in train_round(run_config, node, 1, global_arrays).content
    refused = train_round(run_config, node, 1, global_arrays, run_id=5678)
    assert dict(refused.content["status"]) == {"status": "budget-exhausted", "setting": "max-epsilon-per-run"}


def test_an_allowance_too_small_for_the_plan_is_the_sites_budget_not_the_run_config(run_config, global_arrays, site_files):
    """The target is capped to an allowance that the metric releases alone exceed: the site's
    budget is at fault (budget-exhausted, max-epsilon-per-run), not the server's target."""
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(site_files / "tiny.db"),
            "max-epsilon-per-run": 0.01}
    config = apply_overrides(run_config, {"noise-multiplier": 0.0, "target-epsilon": 8.0})
    reply = train_round(config, node, 1, global_arrays)
    assert dict(reply.content["status"]) == {"status": "budget-exhausted", "setting": "max-epsilon-per-run"}


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
        "data-path": run_config["data"], "ledger-path": str(ledger), "num-examples": 30,
        "delta": 1e-5, "min-noise-multiplier": 1.0, "max-epsilon": 5.0, "dp": True,
    }
    # The policy check comes first: no adapter needed, nothing loaded.
    reply = train_round(apply_overrides(run_config, request_), node, 1, ArrayRecord())
    assert not reply.has_error(), reply.error
    assert "arrays" not in reply.content
    assert dict(reply.content["status"]) == {"status": "policy-refused", "setting": setting}
    with PrivacyLedger(ledger, read_only=True) as kept:
        assert kept.spends() == [], "a refused request spends nothing"
        assert [r.reason for r in kept.refusals()] == [f"training: policy-refused ({setting})"]


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"lora-rank": "8 (patient Jane Doe)"}, "lora-rank"),  # a value of the wrong type
        ({"eval-fraction": 1.0}, "eval-fraction"),  # out of range
        ({"jane-doe-was-here": 1}, ""),  # a key the site does not know is the server's own
    ],
)
def test_a_run_config_the_site_cannot_read_is_refused_by_setting_name_only(run_config, site_files, change, setting):
    """The run config is typed at the site's edge: a bad one is a ``config-error`` naming a key
    this site's code knows (never one the server made up), recorded in its ledger, nothing spent."""
    ledger = site_files / f"config-{setting or 'unknown'}.db"
    node = {"data-path": run_config["data"], "ledger-path": str(ledger), "num-examples": 30}
    reply = train_round({**run_config, **change}, node, 1, ArrayRecord())
    assert not reply.has_error(), reply.error
    assert dict(reply.content["status"]) == {"status": "config-error", "setting": setting}
    assert "jane" not in reply_text(reply).lower()
    with PrivacyLedger(ledger, read_only=True) as kept:
        assert kept.spends() == [] and [r.reason for r in kept.refusals()] == [
            f"training: config-error ({setting or 'no setting'})"]


@pytest.mark.parametrize(
    ("content", "setting", "problem"),
    [
        (b"text,diagnosis\nchest pain,cardio\ncough,pulmo\n", "label-column", "missing column 'label'"),
        (b"text,label\nchest pain,cardio\ncough \xff\xfe wheeze,pulmo\n", "data-path", "not valid UTF-8"),
        (b"text,Jane Doe\nchest pain,cardio\ncough,pulmo\n", "label-column", "available columns: text, Jane Doe"),
    ],
    ids=["missing-label-column", "undecodable-bytes", "a-column-named-after-a-patient"],
)
def test_malformed_site_data_is_a_code_and_a_setting_and_its_text_stays_local(run_config, tmp_path, caplog, content, setting, problem):
    """Errors about the whole file (its format, its columns) are a code and the setting at
    fault; the text, which names paths and columns, stays in the site's log."""
    bad = tmp_path / "site.csv"
    bad.write_bytes(content)
    node = {"data-path": str(bad), "num-examples": 2, "ledger-path": str(tmp_path / "l.db"), "dp": False}
    run_config = apply_overrides(run_config, {"dp": False})  # without DP a data problem is a refusal
    reply = train_round(run_config, node, 1, ArrayRecord())
    assert not reply.has_error(), reply.error
    assert dict(reply.content["status"]) == {"status": "data-error", "setting": setting}
    assert "Jane" not in reply_text(reply) and str(tmp_path) not in reply_text(reply)
    assert problem in caplog.text and str(bad) in caplog.text  # the operator still sees why


def test_a_label_that_is_a_name_is_dropped_locally_not_quoted(run_config, global_arrays, tmp_path, caplog):
    """The attack: the server picks ``label-names``; a file whose label cell holds a patient's
    name came back quoted in the refusal (``unknown label 'Jane Doe'``)."""
    data = _write_notes(tmp_path / "site.csv")
    with data.open("a") as f:
        f.write("patient chest pain follow up,Jane Doe\n")
    node = {"data-path": str(data), "num-examples": 31, "ledger-path": str(tmp_path / "l.db")}
    reply = train_round(run_config, node, 1, global_arrays)
    assert "arrays" in reply.content and "status" not in reply.content
    assert "Jane" not in reply_text(reply)
    assert "1 of 31 rows dropped" in caplog.text


def test_a_site_with_no_usable_rows_answers_like_any_other_under_dp(run_config, global_arrays, tmp_path):
    """The probe: ``label-names`` set to one label only. If the site refused when no row had
    it, the refusal would tell the server whether any record carries that label."""
    probe = apply_overrides(run_config, {"label-names": "hiv-positive"})
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(tmp_path / "l.db")}
    reply = train_round(probe, node, 1, GlobalModel.load(settings_of(probe)).arrays())
    assert set(reply.content) == {"arrays", "metrics", "site", "ledger"}
    assert reply.content["metrics"]["num-examples"] == 24  # the declared share, not the 0 usable rows


def _reply(**records) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1
    return Message(content=RecordDict(records), dst_node_id=7, message_type="train")


ADAPTER_KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
BASE_KEY = "base_model.model.bert.embeddings.word_embeddings.weight"


RECEIVED = ArrayRecord({ADAPTER_KEY: torch.zeros(4, 6)})


@pytest.mark.parametrize(
    ("records", "named"),
    [
        ({"arrays": ArrayRecord({ADAPTER_KEY: torch.zeros(4, 6), BASE_KEY: torch.zeros(4, 2)})}, BASE_KEY),
        ({"arrays": ArrayRecord({ADAPTER_KEY: torch.zeros(4, 7)})}, "shape (4, 7) differs"),
        ({"arrays": ArrayRecord({ADAPTER_KEY: torch.zeros(4, 6, dtype=torch.float64)})}, "dtype float64 is neither the received"),
        ({"metrics": MetricRecord({"num-examples": 3, "mean-age": 54.2})}, "mean-age"),
        ({"metrics": MetricRecord({"num-examples": 3, "eval-loss": float("nan")})}, "not finite: eval-loss"),
        ({"metrics": ConfigRecord({"num-examples": 3, "note": "patient 12: chest pain"})}, "'metrics' (ConfigRecord)"),
        ({"status": ConfigRecord({"status": "data-error", "setting": "label-names", "row": "chest pain"})}, "row"),
        ({"status": ConfigRecord({"status": "data-error", "setting": "Jane Doe"})}, "is not a known code and setting"),
        ({"status": ConfigRecord({"status": "unknown label Jane Doe", "setting": ""})}, "is not a known code and setting"),
        ({"ledger": ConfigRecord({"rows": 3, "head": "Jane Doe"})}, "sha256 hex digest"),
        ({"examples": ConfigRecord({"text": "chest pain"})}, "'examples'"),
    ],
    ids=["base-model-tensor", "other-shape", "other-dtype", "metric-not-whitelisted", "not-finite-metric", "string-in-metrics",
         "extra-status-field", "free-text-setting", "free-text-status", "free-text-ledger-head", "extra-record"],
)
def test_outgoing_guard_blocks_anything_but_the_received_adapter_and_public_records(records, named):
    with pytest.raises(DisclosureError, match=re.escape(named)):
        check_outgoing(_reply(**records), RECEIVED)


def test_outgoing_guard_passes_a_legitimate_reply_and_a_lower_rank():
    check_outgoing(_reply(
        arrays=ArrayRecord({ADAPTER_KEY: torch.zeros(2, 6)}),  # lora_A at rank 2 of 4 (HetLoRA)
        metrics=MetricRecord({"num-examples": 3, "epsilon": 1.5, "dp": 1}),
        site=ConfigRecord({"name": "site-a"}),
        ledger=ConfigRecord({"rows": 4, "head": "ab" * 32}),
    ), RECEIVED)


def _guarded_app(handler) -> ClientApp:
    app = ClientApp(mods=[outgoing_guard])
    app.train()(handler)
    return app


def _call(app: ClientApp, run_config: dict) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1
    message = Message(content=RecordDict({"arrays": RECEIVED, "config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1234, node_id=7, node_config={}, state=RecordDict(), run_config=run_config)
    return app(message, context)


def test_a_leaking_handler_sends_only_a_code(run_config, caplog):
    """The guard runs on the handler's reply inside the ClientApp: the leaking reply becomes a
    ``disclosure-blocked`` status, with nothing of it in the reply."""
    def leak(msg: Message, context: Context) -> Message:
        content = RecordDict({"arrays": ArrayRecord({BASE_KEY: torch.ones(4, 2)}), "metrics": MetricRecord({"num-examples": 3})})
        return Message(content=content, reply_to=msg)

    reply = _call(_guarded_app(leak), run_config)
    assert not reply.has_error()
    assert set(reply.content) == {"status"}
    assert dict(reply.content["status"]) == {"status": "disclosure-blocked", "setting": ""}
    assert BASE_KEY in caplog.text


def test_an_exception_at_the_site_never_sends_its_text(run_config, caplog):
    """The attack: Flower turns an exception in a ClientApp into an error reply whose reason is
    the exception's text, so any error message that quotes data reached the server."""
    def crash(msg: Message, context: Context) -> Message:
        raise RuntimeError("row 17: patient Jane Doe, 54, chest pain")

    reply = _call(_guarded_app(crash), run_config)
    assert not reply.has_error()
    assert dict(reply.content["status"]) == {"status": "internal-error", "setting": ""}
    assert "Jane" not in reply_text(reply)
    assert "Jane Doe" in caplog.text


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


# --- the side-channel attacks (issue: nothing un-noised leaves a site) ---------------------------


def _full_batch_config(run_config: dict) -> dict:
    """The attack's run config: one step on a batch holding every record (q = 1), so the
    loss a site used to report was the exact mean loss of all its records at a chosen model."""
    return apply_overrides(run_config, {"batch-size": 1000, "local-steps": 1, "seed": 7})


class _PinnedSecrets:
    """Stands in for ``secrets`` in ``client.site``: DP-SGD's sampling seed and the release's
    sample become fixed, so that only the release's own noise can tell two rounds apart."""

    @staticmethod
    def randbits(bits: int) -> int:
        return 1234


def _two_identical_rounds(config, node, global_arrays, monkeypatch) -> tuple[float, float]:
    from client import site as site_module

    monkeypatch.setattr(site_module, "secrets", _PinnedSecrets)
    train_round(config, node, 0, global_arrays)  # loads and caches the model: no RNG use below
    losses = []
    for server_round in (1, 2):
        torch.manual_seed(0)  # Opacus' DP-SGD noise: the same draws both rounds
        losses.append(train_round(config, node, server_round, global_arrays).content["metrics"]["train-loss"])
    return losses[0], losses[1]


def test_reported_train_loss_is_a_noised_release_not_the_exact_mean(run_config, global_arrays, site_files, monkeypatch):
    """The attack: one step on a batch of every record (q = 1) at a model the server chose. A
    site used to report the exact mean loss; two rounds on data that differ by one record then
    give that record's loss. Here two rounds on the *same* data with every other source of
    randomness pinned: without the release's noise they report the same value (so the
    difference attack would work), with it they do not."""
    from privacy import release

    config = _full_batch_config(run_config)
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(site_files / "attack.db"),
            "max-epsilon": 100.0}  # seven rounds at q = 1
    with monkeypatch.context() as patch:
        patch.setattr(release, "_gaussian", lambda count, std, secure: [0.0] * count)
        exact = _two_identical_rounds(config, node, global_arrays, patch)
    assert exact[0] == exact[1]
    noised = _two_identical_rounds(config, node, global_arrays, monkeypatch)
    assert noised[0] != noised[1]
    # sigma L / (q n) = 10 x 5 / 24: the noise swamps any one record's loss (at most L / 24).
    with PrivacyLedger(node["ledger-path"], read_only=True) as ledger:
        releases = [e for e in ledger.spends() if e.mechanism == "release:train-loss"]
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in releases] == [(10.0, 1.0, 1)] * 6
    metrics = train_round(config, node, 3, global_arrays).content["metrics"]
    assert metrics["num-examples"] == 24  # the declared share, not a count
    assert "seconds" not in metrics and "examples-per-second" not in metrics


def test_evaluation_is_a_charged_noised_release(run_config, global_arrays, site_files):
    # 600 rows (about 120 held out, declared): accuracy noise sigma sqrt(2) / 120 ~ 0.12.
    data = _write_notes(site_files / "eval.csv", rows=600)
    node = {"data-path": str(data), "ledger-path": str(site_files / "eval.db"), "num-examples": 600}
    replies = [evaluate_round(run_config, node, 1, global_arrays) for _ in range(2)]
    accuracies = [r.content["metrics"]["eval-accuracy"] for r in replies]
    assert accuracies[0] != accuracies[1] and all(-1 < a < 2 for a in accuracies)
    assert all(r.content["metrics"]["num-examples"] == 120 for r in replies)  # public: 0.2 x 600
    with PrivacyLedger(node["ledger-path"], read_only=True) as ledger:
        spends = ledger.spends()
        anchor = ledger.anchor()
    assert [(e.mechanism, e.sample_rate, e.max_grad_norm) for e in spends] == [("release:eval", 1.0, 2 ** 0.5)] * 2
    assert replies[1].content["metrics"]["epsilon"] == pytest.approx(epsilon_for(ledger_history(spends), 1e-5))
    assert dict(replies[1].content["ledger"]) == {"rows": anchor.rows, "head": anchor.head}


def ledger_history(spends) -> list:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in spends]


def test_report_metrics_none_releases_nothing(run_config, global_arrays, site_files):
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(site_files / "silent.db"), "report-metrics": "none"}
    trained = train_round(run_config, node, 1, global_arrays)
    assert "train-loss" not in trained.content["metrics"]
    evaluated = evaluate_round(run_config, node, 1, global_arrays)
    assert dict(evaluated.content["status"]) == {"status": "metrics-withheld", "setting": "report-metrics"}
    with PrivacyLedger(node["ledger-path"], read_only=True) as ledger:
        assert [e.mechanism for e in ledger.spends()] == ["dp-sgd"]


def test_declared_size_sets_the_weight_and_the_sampling_rate(run_config, global_arrays, site_files):
    node = {"data-path": run_config["data"], "num-examples": 400, "ledger-path": str(site_files / "declared.db")}
    metrics = train_round(run_config, node, 1, global_arrays).content["metrics"]
    # 400 declared rows, eval-fraction 0.2: 320 public training rows.
    assert metrics["num-examples"] == 320 and metrics["sample-rate"] == pytest.approx(8 / 320)


def test_noise_floor_holds_when_sigma_is_calibrated(run_config, global_arrays, site_files):
    """The attack: a server asks for target-epsilon 1000, and calibration gave sigma 0.43 at a
    site whose node config says min-noise-multiplier 0.8."""
    config = apply_overrides(run_config, {"noise-multiplier": 0.0, "target-epsilon": 1000.0})
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(site_files / "floor.db"),
            "min-noise-multiplier": 0.8, "max-epsilon": 1000.0}
    reply = train_round(config, node, 1, global_arrays)
    assert reply.content["metrics"]["noise-multiplier"] >= 0.8
    with PrivacyLedger(node["ledger-path"], read_only=True) as ledger:
        assert all(e.noise_multiplier >= 0.8 for e in ledger.spends())


def test_a_dp_site_without_a_ledger_path_refuses(run_config, global_arrays):
    """A default ledger keyed by node id gave every new node id a fresh budget."""
    reply = train_round(run_config, {"data-path": run_config["data"], "num-examples": 30}, 1, global_arrays)
    assert dict(reply.content["status"]) == {"status": "policy-refused", "setting": "ledger-path"}


def test_what_a_site_reports_does_not_count_the_rows_a_server_filter_leaves(run_config, global_arrays, site_files):
    """The probe: the server sets ``label-names`` to a label set and reads how many rows are
    left from the sampling rate (b / usable rows), the steps and epsilon. With ``label-names =
    "<a patient's name>,cardio"`` that tells whether the patient is in the data. A DP site
    must therefore declare its size, and everything it reports comes from that."""
    node = {"data-path": run_config["data"], "ledger-path": str(site_files / "probe.db")}
    refused = train_round(run_config, node, 1, global_arrays)
    assert dict(refused.content["status"]) == {"status": "policy-refused", "setting": "num-examples"}

    node["num-examples"] = 30
    public = ("num-examples", "sample-rate", "steps", "noise-multiplier")
    reports = []
    for labels in ("cardio", "gastro,cardio", "cardio,pulmo,gastro"):
        probe = apply_overrides(run_config, {"label-names": labels})
        reply = train_round(probe, node, 1, GlobalModel.load(settings_of(probe)).arrays())
        reports.append(tuple(reply.content["metrics"][key] for key in public))
    assert reports[0] == reports[1] == reports[2]


def test_delta_not_below_one_over_n_is_refused(run_config, global_arrays, site_files):
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(site_files / "delta.db"), "delta": 0.05}
    config = apply_overrides(run_config, {"delta": 0.0})  # the server asks for no delta: the site's
    reply = train_round(config, node, 1, global_arrays)  # about 25 training rows: 1/n ~ 0.04
    assert dict(reply.content["status"]) == {"status": "policy-refused", "setting": "delta"}
    with PrivacyLedger(site_files / "delta.db", read_only=True) as kept:
        assert kept.spends() == [] and len(kept.refusals()) == 1


def test_a_tampered_ledger_is_refused_before_training(run_config, global_arrays, two_rounds, tmp_path):
    ledger = shutil.copy(two_rounds["ledger"], tmp_path / "site.db")
    with sqlite3.connect(ledger) as db:
        db.execute("DROP TRIGGER ledger_no_update")
        db.execute("UPDATE ledger SET epsilon = 0.1 WHERE id = 1")
    reply = train_round(run_config, {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(ledger)}, 3, global_arrays)
    assert dict(reply.content["status"]) == {"status": "ledger-error", "setting": "ledger-path"}


def test_user_level_dp_samples_users_and_the_ledger_says_so(run_config, global_arrays, site_files):
    """privacy-unit-column: 60 rows of 12 patients (5 each). The sampling rate is over patients,
    a patient's rows stay on one side of the held-out split, and every ledger row and the audit
    name the unit."""
    rows = [{"text": f"patient {i // 5} {['heart', 'cough', 'liver'][i % 3]} note {i}",
             "label": LABELS[i % 3], "patient": f"p{i // 5}"} for i in range(60)]
    data = site_files / "patients.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    config = apply_overrides(run_config, {"batch-size": 4})
    node = {"data-path": str(data), "ledger-path": str(site_files / "users.db"),
            "privacy-unit-column": "patient", "num-examples": 12, "delta": 1e-3}
    reply = train_round(apply_overrides(config, {"delta": 0.0}), node, 1, global_arrays)
    assert reply.content["metrics"]["sample-rate"] == pytest.approx(4 / 10)  # 0.8 x 12 patients
    assert reply.content["metrics"]["user-level"] == 1  # so the server's privacy report says "user"
    with PrivacyLedger(node["ledger-path"], read_only=True) as ledger:
        assert {e.privacy_unit for e in ledger.entries()} == {"user:patient"}
    assert cli.main(["privacy", "audit", "--json", node["ledger-path"]]) == 0


def test_a_data_problem_under_dp_is_told_to_the_site_not_the_server(run_config, global_arrays, site_files, caplog):
    """Whether a column exists can hang on one record (a JSON file's columns are the union of
    its records' keys), so under DP a data problem changes nothing in the reply: the site
    takes part with noise only and its operator reads why in the site's log."""
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(site_files / "nouser.db"),
            "privacy-unit-column": "patient"}
    reply = train_round(run_config, node, 1, global_arrays)
    assert set(reply.content) == {"arrays", "metrics", "site", "ledger"}
    assert "missing column 'patient'" in caplog.text
    without_dp = train_round(apply_overrides(run_config, {"dp": False}), {**node, "dp": False}, 1, global_arrays)
    assert dict(without_dp.content["status"]) == {"status": "data-error", "setting": "privacy-unit-column"}


def test_a_row_that_fails_to_encode_is_dropped_locally(run_config, global_arrays, site_files, monkeypatch, caplog):
    """A tokenizer failure on one row must not fail the round or travel in a reply."""
    from client import encoding as site_module

    real_encode = site_module.encode

    def fragile_encode(split, tokenizer, task, max_length):
        if any(text.endswith("note 4") for text in split["text"]):
            raise ValueError("tokenizer choked on 'patient heart note 4'")
        return real_encode(split, tokenizer, task, max_length)

    monkeypatch.setattr(site_module, "encode", fragile_encode)
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(site_files / "encode.db")}
    reply = train_round(run_config, node, 1, global_arrays)
    assert "arrays" in reply.content and "choked" not in reply_text(reply)
    assert "could not be encoded (ValueError); dropped" in caplog.text


def test_a_deployed_site_never_reads_a_path_the_server_chose(run_config, global_arrays, tmp_path):
    """Without ``label-names`` the labels came from the run's ``data``: a server-chosen path on
    the site's machine, whose readability the refusal code then revealed."""
    probe = apply_overrides(run_config, {"label-names": "", "data": "/etc/hospital/secret-register.csv"})
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(tmp_path / "l.db")}
    reply = train_round(probe, node, 1, global_arrays)
    assert dict(reply.content["status"]) == {"status": "policy-refused", "setting": "label-names"}
