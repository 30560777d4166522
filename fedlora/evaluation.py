"""Loss and accuracy of a model on encoded examples: used by sites (federated evaluation),
the server (centralized evaluation) and ``fedlora evaluate``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlora.tasks import collate, correct_and_count, forward_logits, per_example_loss


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    task: str,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean per-example loss, accuracy (token accuracy for causal-lm) and the example count."""
    if not examples:
        return {"loss": math.nan, "accuracy": math.nan, "num-examples": 0}
    model.eval()
    model.to(device)
    total_loss, correct, counted = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id, task)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = forward_logits(model, batch)
        total_loss += float(per_example_loss(logits, batch["labels"], task).sum())
        c, n = correct_and_count(logits, batch["labels"], task)
        correct, counted = correct + c, counted + n
    return {
        "loss": total_loss / len(examples),
        "accuracy": correct / counted if counted else math.nan,
        "num-examples": len(examples),
    }
