"""The CUDA path: device choice, DP-SGD under bf16 autocast, physical batches. Skipped without a
CUDA GPU; run it wherever one is present (issue 16)."""

from __future__ import annotations

import datasets
import pytest
import torch

from client.training import DPSettings, TrainSettings, train
from fedlora.adapters import adapter_state, attach_adapter, lora_config
from fedlora.model import load_base_model, load_tokenizer, select_device
from fedlora.tasks import encode
from tests.conftest import LABELS, make_classification_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model_and_examples(model_dir: str):
    tokenizer = load_tokenizer(model_dir)
    rows = make_classification_rows(48)
    dataset = datasets.Dataset.from_list([{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows])
    model = attach_adapter(load_base_model(model_dir, "classification", LABELS), lora_config("classification", 4, 8, 0.0))
    return model, encode(dataset, tokenizer, "classification", 16), tokenizer.pad_token_id


def test_auto_picks_the_gpu():
    assert select_device("auto").type == "cuda"


@pytest.mark.parametrize("physical_batch_size", [0, 4])
def test_dp_sgd_trains_on_the_gpu_under_autocast(tiny_bert, physical_batch_size):
    """Opacus' per-example gradients, clipping and noise on CUDA with bf16 autocast, whole or in
    physical passes: every trainable tensor moves, stays finite and float32, and no step is lost."""
    model, examples, pad = _model_and_examples(tiny_bert)
    before = {name: value.clone() for name, value in adapter_state(model).items()}
    settings = TrainSettings(learning_rate=0.01, batch_size=12, steps=3, physical_batch_size=physical_batch_size,
                             device=torch.device("cuda"), seed=5)
    result = train(model, examples, "classification", pad, settings, DPSettings(noise_multiplier=1.0, max_grad_norm=0.5))
    after = adapter_state(model)
    assert result.steps == 3 and result.zeroed_gradients == 0
    for name, value in after.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        assert not torch.equal(value.cpu(), before[name].cpu()), name
