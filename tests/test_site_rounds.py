"""A site's train and evaluate handlers end to end on tiny models: both tasks, DP on."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.outgoing_guard import ALLOWED_METRICS
from fedlora.run_config import apply_overrides
from privacy.ledger import PrivacyLedger
from server.global_model import GlobalModel
from tests.conftest import settings_of


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are stamped with the sender's identity; here the test plays the server."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1


def site_context(run_config: dict, node_config: dict, node_id: int = 7) -> Context:
    return Context(run_id=1234, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config)


def train_message(arrays: ArrayRecord, server_round: int = 1) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=7, message_type="train")


def test_classification_round_sends_only_adapter_and_whitelisted_metrics(tiny_run_config, classification_csv, tmp_path):
    global_model = GlobalModel.load(settings_of(tiny_run_config))
    sent = global_model.arrays()
    ctx = site_context(tiny_run_config, {"data-path": str(classification_csv), "ledger-path": str(tmp_path / "l.db"), "num-examples": 90})
    reply = client_app.app(train_message(sent), ctx)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics", "site", "ledger"}
    arrays = reply.content["arrays"]
    assert set(arrays.keys()) == set(sent.keys())
    assert all(".lora_A." in k or ".lora_B." in k or ".classifier." in k for k in arrays)
    assert not any(k.startswith("base_model.model.bert.embeddings") for k in arrays)
    assert arrays.count_bytes() == sent.count_bytes()
    # LoRA tensors only: 2 layers x (query, value) x (A, B) + classifier weight and bias.
    assert len(arrays) == 2 * 2 * 2 + 2
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) <= ALLOWED_METRICS
    assert metrics["dp"] == 1 and 0 < metrics["epsilon"] <= 8.0
    changed = [k for k in sent if not torch.equal(torch.tensor(sent[k].numpy()), torch.tensor(arrays[k].numpy()))]
    assert len(changed) == len(sent), "DP training must change every trainable adapter tensor"


def test_causal_lm_round_on_tiny_llama(tiny_llama, instruction_jsonl, tiny_run_config, tmp_path):
    config = apply_overrides(tiny_run_config, {"model": tiny_llama, "task": "causal-lm", "data": str(instruction_jsonl), "label-names": ""})
    global_model = GlobalModel.load(settings_of(config))
    sent = global_model.arrays()
    assert all(("q_proj" in k or "v_proj" in k) and "lora_" in k for k in sent)
    ctx = site_context(config, {"data-path": str(instruction_jsonl), "ledger-path": str(tmp_path / "l.db"), "num-examples": 60})
    reply = client_app.app(train_message(sent), ctx)
    assert not reply.has_error(), reply.error
    assert set(reply.content["arrays"].keys()) == set(sent.keys())
    evaluation = client_app.app(Message(content=RecordDict({"arrays": reply.content["arrays"], "config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="evaluate"), ctx)
    # Noised releases: unbiased, so not clamped to [0, 1] or to >= 0 (privacy.release).
    assert isinstance(evaluation.content["metrics"]["eval-accuracy"], float)
    assert isinstance(evaluation.content["metrics"]["eval-loss"], float)


def _secure(message: Message) -> Message:
    """The collect-stage message of a SecAgg+ round (what ``train_site`` sees inside the mod)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    message.content[RECORD_KEY_CONFIGS] = ConfigRecord({"ctxts": [b"c"], "srcs": [2]})
    return message


def test_a_secure_round_hands_the_mod_the_update_and_never_the_adapter(tiny_run_config, classification_csv, tmp_path):
    config = apply_overrides(tiny_run_config, {"secure-aggregation": True})
    sent = GlobalModel.load(settings_of(config)).arrays()
    ctx = site_context(config, {"data-path": str(classification_csv), "ledger-path": str(tmp_path / "l.db"), "num-examples": 90})
    reply = client_app.train_site(_secure(train_message(sent)), ctx, config)
    assert "arrays" not in reply.content.array_records and "status" not in reply.content.config_records
    update = reply.content["fitres.parameters"]
    assert list(update.keys()) == list(sent.keys())  # the order the server unmasks in
    assert all(torch.any(torch.tensor(update[k].numpy()) != 0) for k in sent)
    assert reply.content["fitres.num_examples"]["num_examples"] == reply.content["metrics"]["num-examples"] > 0


def test_a_site_over_the_secure_max_weight_refuses_by_that_key_and_still_sends_its_masks(tiny_run_config, classification_csv, tmp_path):
    config = apply_overrides(tiny_run_config, {"secure-aggregation": True, "secagg-max-weight": 10.0})
    sent = GlobalModel.load(settings_of(config)).arrays()
    ctx = site_context(config, {"data-path": str(classification_csv), "ledger-path": str(tmp_path / "l.db"), "num-examples": 90})
    reply = client_app.train_site(_secure(train_message(sent)), ctx, config)
    assert dict(reply.content["status"]) == {"status": "config-error", "setting": "secagg-max-weight"}
    assert reply.content["fitres.num_examples"]["num_examples"] == 0.0
    assert all(not update.numpy().any() for update in reply.content["fitres.parameters"].values())
    with PrivacyLedger(tmp_path / "l.db", read_only=True) as ledger:
        assert ledger.spends() == []  # refused before it trained: nothing spent on a zero update


def test_a_site_of_another_rank_refuses_a_secure_round_before_it_trains(tiny_run_config, classification_csv, tmp_path):
    config = apply_overrides(tiny_run_config, {"secure-aggregation": True})
    sent = GlobalModel.load(settings_of(config)).arrays()
    rank = settings_of(config).model.lora_rank // 2
    ctx = site_context(config, {"data-path": str(classification_csv), "ledger-path": str(tmp_path / "l.db"),
                                "num-examples": 90, "lora-rank": rank})
    reply = client_app.train_site(_secure(train_message(sent)), ctx, config)
    assert dict(reply.content["status"]) == {"status": "model-error", "setting": "lora-rank"}
    with PrivacyLedger(tmp_path / "l.db", read_only=True) as ledger:
        assert ledger.spends() == []


def test_under_ffa_lora_a_secure_round_masks_a_zero_change_of_the_frozen_a(tiny_run_config, classification_csv, tmp_path):
    config = apply_overrides(tiny_run_config, {"secure-aggregation": True, "strategy": "ffa-lora"})
    sent = GlobalModel.load(settings_of(config)).arrays()
    ctx = site_context(config, {"data-path": str(classification_csv), "ledger-path": str(tmp_path / "l.db"), "num-examples": 90})
    update = client_app.train_site(_secure(train_message(sent)), ctx, config).content["fitres.parameters"]
    assert list(update.keys()) == list(sent.keys())
    for name, value in update.items():
        assert value.numpy().any() != (".lora_A." in name), name  # A unchanged, B and the head trained
