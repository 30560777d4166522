"""Local training: physical batch splitting changes memory use, never the result."""

from __future__ import annotations

import pytest
import torch

from client.training import DPSettings, TrainSettings, train
from fedlora.adapters import adapter_state, attach_adapter, lora_config
from fedlora.model import load_base_model, load_tokenizer
from fedlora.tasks import encode
from tests.conftest import LABELS, make_classification_rows

import datasets


def _train_once(model_dir: str, physical_batch_size: int, dp: DPSettings | None) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(model_dir)
    rows = make_classification_rows(40)
    dataset = datasets.Dataset.from_list([{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows])
    # Every note is truncated to 8 tokens, so chunks pad exactly like the whole batch and only
    # the splitting differs (Adam would amplify float noise from other padding lengths).
    examples = encode(dataset, tokenizer, "classification", 8)
    assert {len(e["input_ids"]) for e in examples} == {8}
    torch.manual_seed(0)
    model = attach_adapter(load_base_model(model_dir, "classification", LABELS), lora_config("classification", 4, 8, 0.0))
    for module in model.modules():  # dropout would draw different masks per chunk
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    settings = TrainSettings(learning_rate=0.01, batch_size=12, steps=3, physical_batch_size=physical_batch_size, seed=5)
    torch.manual_seed(1)  # the DP noise comes from torch's global generator
    train(model, examples, "classification", tokenizer.pad_token_id, settings, dp)
    return adapter_state(model)


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, max_grad_norm=0.5)], ids=["no-dp", "dp"])
def test_physical_batches_give_the_same_update(tiny_bert, dp):
    whole = _train_once(tiny_bert, 0, dp)
    split = _train_once(tiny_bert, 4, dp)
    start = _train_once(tiny_bert, 0, dp) if dp is None else None
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-6)
    if start is not None:  # training is deterministic without DP: the comparison is meaningful
        torch.testing.assert_close(start[next(iter(start))], whole[next(iter(whole))])


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, max_grad_norm=0.5)], ids=["no-dp", "dp"])
def test_dropout_is_off_under_dp_only(tiny_bert, dp, monkeypatch):
    """DP-SGD's noise already regularises; dropout would only add variance (Li et al. 2021).
    Attention dropout too: BERT hands its dropout's ``p`` to the attention kernel whenever the
    layer trains, so switching the dropout modules to eval mode missed it (and kept the kernel
    off its fast path)."""
    tokenizer = load_tokenizer(tiny_bert)
    rows = make_classification_rows(16)
    dataset = datasets.Dataset.from_list([{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows])
    examples = encode(dataset, tokenizer, "classification", 8)
    model = attach_adapter(load_base_model(tiny_bert, "classification", LABELS), lora_config("classification", 4, 8, 0.1))
    seen: set[float] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_pre_hook(lambda module, _: seen.add(module.p if module.training else 0.0))
    attention = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, dropout_p=0.0, **kwargs):
        seen.add(dropout_p)
        return attention(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    settings = TrainSettings(learning_rate=0.01, batch_size=8, steps=2, seed=5)
    train(model, examples, "classification", tokenizer.pad_token_id, settings, dp)
    assert (seen == {0.0}) if dp else (max(seen) > 0)
    assert all(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # restored for later use
