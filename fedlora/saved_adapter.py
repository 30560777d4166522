"""A saved fedlora adapter on any machine: loaded the Hugging Face way, scored on labelled
data, or asked for predictions.

An adapter folder names its base model portably (a hub id, ``embedded:all-MiniLM-L6-v2``, or
a local model's folder name; ``fedlora.model.portable_model_name``) and carries in
``fedlora.json`` what rebuilding the base model needs besides: the task, the label names and
the pooling the head was trained with. So ``load_adapter(PATH)`` needs nothing else, and a
copy of the folder loads as well as the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.adapters import read_metadata
from fedlora.evaluation import evaluate
from fedlora.model import EMBEDDED_MODEL, ModelError, load_base_model, load_tokenizer, select_device
from fedlora.tasks import encode


def load_adapter(
    adapter_dir: str | Path, base_model: str | None = None, device: str = "auto"
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The adapter on its base model, in eval mode on ``device``, and its tokenizer.

    The base model is the one the adapter names unless ``base_model`` (a hub id or a local
    directory) says where it is on this machine: needed when it was a local directory on the
    coordinator. Built as ``PeftModel.from_pretrained(base, adapter_dir)``."""
    meta = read_metadata(adapter_dir)
    named = str(meta["base_model"])
    try:
        # Adapters saved before pooling was a setting read the encoder's own pooler.
        base = load_base_model(base_model or named, meta["task"], meta["label_names"] or None, meta.get("pooling") or "pooler")
    except ModelError as err:
        if base_model or named == EMBEDDED_MODEL:
            raise
        raise ModelError(f"{err}. The adapter names its base model {named!r}; if that is a local "
                         "directory, say where it is on this machine: base_model=DIR (--base-model DIR)") from err
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model.to(select_device(device)).eval(), load_tokenizer(str(adapter_dir))


def evaluate_saved_adapter(
    adapter_dir: str | Path,
    data: str,
    text_column: str = "text",
    label_column: str = "label",
    batch_size: int = 64,
    base_model: str | None = None,
    seed: int = 42,
) -> dict[str, Any]:
    """Loss and accuracy on ``data``: any form ``fedlora simulate --data`` takes (the embedded
    corpus is generated with ``seed``; another seed than the run's gives notes it never saw)."""
    from fedlora.run_config import DataSettings
    from fedlora.sources import load_source

    meta = read_metadata(adapter_dir)
    model, tokenizer = load_adapter(adapter_dir, base_model)
    source = DataSettings(
        data=data, task=meta["task"], text_column=text_column, label_column=label_column, prompt_column="prompt",
        response_column="response", label_names=tuple(meta["label_names"]), partition="iid", eval_fraction=0.0,
        max_seq_length=int(meta["max_seq_length"]),
    )
    examples = encode(load_source(source, seed), tokenizer, meta["task"], source.max_seq_length)
    result = evaluate(model, examples, meta["task"], tokenizer.pad_token_id, batch_size, model.device)
    return {
        "adapter": str(adapter_dir),
        "data": data,
        "task": meta["task"],
        "num_examples": result["num-examples"],
        "loss": result["loss"],
        "accuracy": result["accuracy"],
    }


@torch.no_grad()
def predict(
    adapter_dir: str | Path, texts: Sequence[str], base_model: str | None = None, max_new_tokens: int = 64
) -> list[dict[str, Any]]:
    """For a classification adapter, each text's label and its probability; for a causal-lm
    adapter, each prompt's continuation (greedy)."""
    meta = read_metadata(adapter_dir)
    model, tokenizer = load_adapter(adapter_dir, base_model)
    results = []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=int(meta["max_seq_length"]), return_tensors="pt")
        # What training feeds the model (fedlora.tasks), nothing more: no token_type_ids.
        inputs = {k: encoded[k].to(model.device) for k in ("input_ids", "attention_mask")}
        if meta["task"] == "classification":
            probabilities = model(**inputs).logits.softmax(-1)[0]
            best = int(probabilities.argmax())
            results.append({"text": text, "label": meta["label_names"][best], "probability": float(probabilities[best])})
        else:
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            continuation = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            results.append({"text": text, "generated": continuation})
    return results
