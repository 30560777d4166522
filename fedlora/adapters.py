"""LoRA adapters: configuration, attaching to a base model, and moving their tensors around.

Only the tensors returned by :func:`adapter_state` ever leave a site: the LoRA ``A``/``B``
matrices and, for classification, the task head that peft keeps in ``modules_to_save``.
Saved adapters use the PEFT format, so ``PeftModel.from_pretrained(base, path)`` loads them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedlora.lora_ranks import is_lora_a
from fedlora.model import ModelError, check_task

METADATA_FILE = "fedlora.json"
_TASK_TYPES = {"classification": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM}


def lora_config(
    task: str,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | None = None,
) -> LoraConfig:
    """A LoRA config for ``task``; no target modules means peft's per-architecture default
    (``query``/``value`` for BERT, ``q_proj``/``v_proj`` for Llama and Qwen)."""
    if rank < 1:
        raise ModelError(f"lora-rank must be >= 1, got {rank}")
    return LoraConfig(
        task_type=_TASK_TYPES[check_task(task)],
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules else None,
    )


def attach_adapter(base: PreTrainedModel, config: LoraConfig, freeze_lora_a: bool = False) -> PeftModel:
    """Wrap ``base`` with a fresh LoRA adapter; ``freeze_lora_a`` is FFA-LoRA (only B trains)."""
    try:
        model = get_peft_model(base, config)
    except ValueError as err:
        raise ModelError(
            f"cannot attach LoRA to {base.config.model_type!r}: {err}; "
            "set 'lora-target-modules' to the names of its linear layers"
        ) from err
    if freeze_lora_a:
        for name, param in model.named_parameters():
            if is_lora_a(name):
                param.requires_grad_(False)
    return model


def adapter_state(model: PeftModel, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors as contiguous float32 CPU copies, keyed by PEFT state-dict names.

    ``trainable_only`` drops tensors the site did not train (FFA-LoRA's frozen ``A``).
    """
    state = _peft_state(model)
    if trainable_only:
        trained = {state_key(n) for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def _peft_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's state dict. The vocabulary is never resized here, so the full embedding
    layers never belong in it, and peft need not look the base model up (on the hub, by its
    portable name) to find out."""
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def state_key(param_name: str) -> str:
    """Map a parameter name to its ``get_peft_model_state_dict`` key (adapter name removed)."""
    return param_name.replace(".default.", ".").replace(".modules_to_save.", ".")


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors into ``model``; a key mismatch is an error, not a partial load."""
    expected = set(_peft_state(model))
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"adapter has unexpected tensors: {', '.join(unexpected[:5])}")
    result = set_peft_model_state_dict(model, dict(state))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing and len(state) == len(expected):
        raise ValueError(f"adapter tensors were not loaded: {', '.join(missing[:5])}")


def save_adapter(
    model: PeftModel,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    metadata: Mapping[str, object],
) -> Path:
    """Save in PEFT format plus the tokenizer and ``fedlora.json`` (task, model, label names).

    Both ``adapter_config.json`` and peft's model card name the base model as
    ``metadata["base_model"]`` (a portable name, :func:`fedlora.model.portable_model_name`),
    never the path it was loaded from on this machine."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_name = str(metadata["base_model"])
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_name
    base = model.get_base_model()
    base.name_or_path = base.config.name_or_path = base_name  # what peft's model card reads
    model.save_pretrained(out, save_embedding_layers=False)  # as _peft_state
    tokenizer.save_pretrained(out)
    (out / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True))
    return out


def read_metadata(adapter_dir: str | Path) -> dict:
    """The ``fedlora.json`` written next to a saved adapter."""
    path = Path(adapter_dir) / METADATA_FILE
    if not path.is_file():
        raise ModelError(f"{adapter_dir} is not a fedlora adapter directory (no {METADATA_FILE})")
    return json.loads(path.read_text())
