"""The classification head reads the encoder the way the base model was trained to be read
(``fedlora.pooling``), and a saved adapter loads back with the same reading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

from fedlora.model import EMBEDDED_MODEL, ModelError, load_base_model, load_tokenizer, resolve_model_path
from fedlora.pooling import MaskedPooler, PoolingError, resolve_pooling
from fedlora.run_config import apply_overrides
from fedlora.adapters import read_metadata
from fedlora.saved_adapter import load_adapter
from fedlora.tasks import collate, forward_logits
from server.global_model import GlobalModel
from tests.conftest import LABELS, settings_of


@pytest.fixture(scope="module")
def mean_pooled_bert(tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT shipped the sentence-transformers way, with a mean-pooling config."""
    path = tmp_path_factory.mktemp("st-bert") / "model"
    shutil.copytree(tiny_bert, path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
    return str(path)


def test_auto_reads_the_sentence_transformers_config(tiny_bert, mean_pooled_bert):
    assert resolve_pooling(resolve_model_path(EMBEDDED_MODEL), "auto") == "mean"  # all-MiniLM-L6-v2
    assert resolve_pooling(mean_pooled_bert, "auto") == "mean"
    assert resolve_pooling(tiny_bert, "auto") == "pooler"  # no sentence-transformers config
    assert resolve_pooling(tiny_bert, "cls") == "cls"
    with pytest.raises(PoolingError, match="unknown pooling 'max'"):
        resolve_pooling(tiny_bert, "max")


def test_mean_pooling_averages_the_unpadded_tokens(mean_pooled_bert):
    model = load_base_model(mean_pooled_bert, "classification", LABELS).eval()
    assert model.config.fedlora_pooling == "mean" and isinstance(model.bert.pooler, MaskedPooler)
    tokenizer = load_tokenizer(mean_pooled_bert)
    short, long = (tokenizer(text)["input_ids"] for text in ("chest pain", "cough with sputum and wheeze since monday"))
    batch = collate([{"input_ids": short, "labels": [0]}, {"input_ids": long, "labels": [1]}], tokenizer.pad_token_id, "classification")
    with torch.no_grad():
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = forward_logits(model, batch)
        alone = forward_logits(model, collate([{"input_ids": short, "labels": [0]}], tokenizer.pad_token_id, "classification"))
    expected = model.classifier(hidden[0, : len(short)].mean(dim=0))
    torch.testing.assert_close(logits[0], expected)
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-4, atol=1e-5)  # padding does not count


def test_pooling_that_does_not_fit_the_model_is_a_clear_error(tiny_llama):
    with pytest.raises(ModelError, match="pooling 'mean' needs an encoder with a pooler"):
        load_base_model(tiny_llama, "classification", LABELS, "mean")


def test_a_saved_adapter_loads_back_with_its_pooling_and_scores_the_same(tiny_run_config, mean_pooled_bert, tmp_path):
    """Evaluate/load parity: the server's model, ``fedlora evaluate``'s loader and the
    documented snippet (fedlora's base model + ``PeftModel.from_pretrained``) agree."""
    config = apply_overrides(tiny_run_config, {"model": mean_pooled_bert})
    server = GlobalModel.load(settings_of(config))
    with torch.no_grad():
        for param in server.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)  # a trained-looking adapter
    saved = server.save(tmp_path / "adapter")
    assert json.loads((saved / "fedlora.json").read_text())["pooling"] == "mean"

    tokenizer = load_tokenizer(mean_pooled_bert)
    examples = [{"input_ids": tokenizer(t)["input_ids"], "labels": [0]} for t in ("chest pain", "dry cough at night")]
    batch = collate(examples, tokenizer.pad_token_id, "classification")
    loaded, _ = load_adapter(saved, base_model=mean_pooled_bert)
    meta = read_metadata(saved)
    snippet = PeftModel.from_pretrained(load_base_model(mean_pooled_bert, "classification", meta["label_names"], meta["pooling"]), str(saved))
    with torch.no_grad():
        expected = forward_logits(server.model.eval(), batch)
        for model in (loaded, snippet):
            torch.testing.assert_close(forward_logits(model.eval(), batch), expected)
