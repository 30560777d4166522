"""Loading a saved fedlora adapter the Hugging Face way and scoring it on a labelled file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel

from fedlora.adapters import read_metadata
from fedlora.data import load_causal_lm, load_classification
from fedlora.evaluation import evaluate
from fedlora.model import load_base_model, load_tokenizer, select_device
from fedlora.tasks import encode


def load_saved_adapter(adapter_dir: str | Path) -> tuple[PeftModel, Any, dict[str, Any]]:
    """Base model from the metadata (with the pooling the adapter was trained with), then
    ``PeftModel.from_pretrained(base, adapter_dir)``."""
    meta = read_metadata(adapter_dir)
    # Adapters saved before pooling was a setting read the encoder's own pooler.
    base = load_base_model(meta["base_model"], meta["task"], meta["label_names"] or None, meta.get("pooling") or "pooler")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model, load_tokenizer(str(adapter_dir)), meta


def evaluate_saved_adapter(
    adapter_dir: str | Path, data: str, text_column: str = "text", label_column: str = "label", batch_size: int = 64
) -> dict[str, Any]:
    model, tokenizer, meta = load_saved_adapter(adapter_dir)
    if meta["task"] == "classification":
        dataset, _ = load_classification(data, text_column, label_column, meta["label_names"])
    else:
        dataset = load_causal_lm(data)
    examples = encode(dataset, tokenizer, meta["task"], int(meta["max_seq_length"]))
    result = evaluate(model, examples, meta["task"], tokenizer.pad_token_id, batch_size, select_device())
    return {
        "adapter": str(adapter_dir),
        "data": data,
        "task": meta["task"],
        "num_examples": result["num-examples"],
        "loss": result["loss"],
        "accuracy": result["accuracy"],
    }
