"""A site's model: the base model with its adapter, kept warm across rounds in one process, and
the adapter the server sent, at this site's LoRA rank."""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord

from client.refusals import RefusedRound
from fedlora.adapters import attach_adapter, lora_config
from fedlora.lora_ranks import lora_rank_of, truncate_to_rank
from fedlora.model import load_base_model, load_tokenizer
from fedlora.run_config import ModelSettings


@lru_cache(maxsize=2)
def warm_model(model: ModelSettings, task: str, labels: tuple[str, ...], freeze_a: bool):
    """Base model + an adapter of ``model.lora_rank`` (the site's; FFA-LoRA: ``freeze_a``), kept
    across rounds in one process; each round overwrites the adapter tensors with the global
    ones, so no state leaks from round to round."""
    base = load_base_model(model.model, task, list(labels) or None, model.pooling)
    lora = lora_config(task, model.lora_rank, model.lora_alpha, model.lora_dropout, model.lora_target_modules)
    return attach_adapter(base, lora, freeze_lora_a=freeze_a), load_tokenizer(model.model)


def at_rank(adapter: ArrayRecord, rank: int) -> dict[str, torch.Tensor]:
    """The received adapter at this site's LoRA rank: its first ``rank`` components when it is
    larger (a HetLoRA server sends the full rank until it has seen this site's rank)."""
    arrays = {name: array.numpy() for name, array in adapter.items()}
    received = lora_rank_of(arrays)
    if received < rank:
        raise RefusedRound("model-error", "lora-rank", f"the server sent a rank-{received} adapter; this site trains rank {rank} (node config lora-rank)")
    if received > rank:
        arrays = truncate_to_rank(arrays, rank)
    return {name: torch.from_numpy(value) for name, value in arrays.items()}
