"""Loss and accuracy of a model on encoded examples: used by sites (federated evaluation),
the server (centralized evaluation) and ``fedlora evaluate``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlora.tasks import collate, correct_and_count, forward_logits, per_example_loss


@torch.no_grad()
def per_example_scores(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    task: str,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: loss, correct predictions and predictions counted (1 per example for
    classification, response tokens for causal-lm); each of shape ``[len(examples)]``."""
    model.eval()
    model.to(device)
    losses, correct, counted = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id, task)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = forward_logits(model, batch)
        losses.append(per_example_loss(logits, batch["labels"], task).cpu())
        c, n = correct_and_count(logits, batch["labels"], task)
        correct.append(c.cpu())
        counted.append(n.cpu())
    if not losses:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    return torch.cat(losses), torch.cat(correct).float(), torch.cat(counted).float()


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
    losses, correct, counted = per_example_scores(model, examples, task, pad_token_id, batch_size, device)
    return {
        "loss": float(losses.sum()) / len(examples),
        "accuracy": float(correct.sum() / counted.sum()) if counted.sum() else math.nan,
        "num-examples": len(examples),
    }
