"""The probe phase of LP-FT (``client.probe``): the head trains alone on cached features, each of
its steps a real clipped and noised DP-SGD step, charged to the ledger as planned."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from client.probe import FeatureCache, FeatureHead, classification_head, head_inputs, stack_features
from fedlora.adapters import attach_adapter, lora_config
from fedlora.model import load_base_model, load_tokenizer
from fedlora.run_config import apply_overrides
from fedlora.tasks import encode, per_example_loss
from privacy.ledger import PrivacyLedger
from privacy.plan import choose_schedule, public_population
from server.global_model import GlobalModel
from tests.test_site_privacy import LABELS, _write_notes, privacy_run_config, train_round
from tests.conftest import settings_of


@pytest.fixture(scope="module")
def model_and_examples(tiny_bert, tmp_path_factory):
    import datasets

    torch.manual_seed(0)
    config = privacy_run_config(tiny_bert, tmp_path_factory.mktemp("probe") / "unused.csv")
    model = attach_adapter(load_base_model(tiny_bert, "classification", list(LABELS)),
                           lora_config("classification", int(config["lora-rank"]), float(config["lora-alpha"]), float(config["lora-dropout"])))
    tokenizer = load_tokenizer(tiny_bert)
    rows = datasets.Dataset.from_dict({"text": [f"patient note {i} " * (1 + i % 5) for i in range(20)],
                                       "label": [i % 3 for i in range(20)]})
    return model, tokenizer, encode(rows, tokenizer, "classification", 32)


def test_cached_features_are_what_the_head_reads(model_and_examples):
    """Padding by length order and restoring the order must give each example its own vector:
    the head on the cached features gives the model's own logits."""
    model, tokenizer, examples = model_and_examples
    features = head_inputs(model, examples, tokenizer.pad_token_id, torch.device("cpu"), batch_size=6)
    model.eval()
    with torch.no_grad():
        for i in (0, 7, 19):
            ids = torch.tensor([examples[i]["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            assert torch.allclose(classification_head(model)(features[i : i + 1]), logits, atol=1e-5)


def test_per_example_gradients_of_the_probe_match_autograd(model_and_examples):
    model, tokenizer, examples = model_and_examples
    features = head_inputs(model, examples, tokenizer.pad_token_id, torch.device("cpu"))
    batch = stack_features([{"features": x, "labels": e["labels"]} for x, e in zip(features[:5], examples)])
    head = FeatureHead(classification_head(model))
    head.train()  # Opacus records activations in train mode only
    private = GradSampleModule(head, batch_first=True, loss_reduction="mean")
    per_example_loss(private(features=batch["features"]).logits, batch["labels"], "classification").mean().backward()
    per_sample = [p.grad_sample.clone() for p in head.parameters()]
    private._close()  # no hooks on the autograd reference below
    for index in range(5):
        one = {k: v[index : index + 1] for k, v in batch.items()}
        loss = per_example_loss(head(features=one["features"]).logits, one["labels"], "classification").sum()
        for sample, grad in zip(per_sample, torch.autograd.grad(loss, list(head.parameters()))):
            assert torch.allclose(sample[index], grad, atol=1e-6)


def test_the_cache_is_recomputed_when_lora_changes(model_and_examples):
    model, tokenizer, examples = model_and_examples
    cache = FeatureCache()
    first = cache.get(model, examples, tokenizer.pad_token_id, torch.device("cpu"), ("run",))
    assert cache.get(model, examples, tokenizer.pad_token_id, torch.device("cpu"), ("run",)) is first
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.add_(0.5)
    try:
        again = cache.get(model, examples, tokenizer.pad_token_id, torch.device("cpu"), ("run",))
        assert again is not first and not torch.allclose(again, first)
    finally:
        with torch.no_grad():
            lora_b.sub_(0.5)


def test_a_probe_round_trains_the_head_alone_and_is_charged_as_planned(tiny_bert, tmp_path):
    """Round 1 of a run with probe-rounds = 1: the ledger holds one ``dp-sgd:probe`` spend at the
    plan's rate and steps, confirmed; the reply's LoRA matrices are the ones sent, its head is not."""
    data = _write_notes(tmp_path / "notes.csv", rows=60)
    config = apply_overrides(privacy_run_config(tiny_bert, data), {"probe-rounds": 1, "probe-steps": 40})
    node = {"data-path": str(data), "num-examples": 60, "ledger-path": str(tmp_path / "ledger.db"), "max-epsilon": 20.0}
    sent = GlobalModel.load(settings_of(config)).arrays()
    reply = train_round(config, node, 1, sent)
    assert not reply.has_error(), reply.error
    probe, _ = choose_schedule(settings_of(config), public_population(60, float(config["eval-fraction"])), private=True)
    with PrivacyLedger(node["ledger-path"], read_only=True) as ledger:
        spends, entries = ledger.spends(), ledger.entries()
    training = [s for s in spends if s.mechanism.startswith("dp-sgd")]
    assert [(s.mechanism, s.sample_rate, s.steps, s.noise_multiplier) for s in training] == [
        ("dp-sgd:probe", probe.sample_rate, 40, config["noise-multiplier"])]
    assert len(entries) == 2 * len(spends)  # every spend confirmed
    metrics = reply.content["metrics"]
    assert metrics["steps"] == 40 and metrics["sample-rate"] == probe.sample_rate
    before = {k: v.numpy() for k, v in sent.items()}
    after = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    head = [k for k in after if "classifier" in k]
    assert head and all((after[k] != before[k]).any() for k in head)
    assert all((after[k] == before[k]).all() for k in after if k not in head)



def test_a_warm_site_tokenises_its_rows_once_and_an_edited_file_afresh(tiny_bert, tmp_path, monkeypatch):
    import client.encoding

    calls = []
    monkeypatch.setattr(client.encoding, "encode", lambda split, *args: calls.append(split.num_rows) or encode(split, *args))
    data = _write_notes(tmp_path / "notes.csv", rows=60)
    config = apply_overrides(privacy_run_config(tiny_bert, data), {"probe-rounds": 1, "probe-steps": 5, "local-steps": 2})
    node = {"data-path": str(data), "num-examples": 60, "ledger-path": str(tmp_path / "ledger.db")}
    sent = GlobalModel.load(settings_of(config)).arrays()
    for server_round in (1, 2):
        assert not train_round(config, node, server_round, sent).has_error()
    assert len(calls) == 1  # the training split, tokenised in round 1 only
    # The same number of rows, only the last one's text edited: tokenised afresh.
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[:-1] + [rows[-1].replace("patient", "patient seen again")]) + "\n")
    assert not train_round(config, node, 3, sent).has_error()
    assert len(calls) == 2
