"""The probe phase of LP-FT: train the classification head alone on cached encoder features.

With the encoder frozen (LoRA included), the head's input for an example, its pooled feature
vector x_i, does not change while the head trains. So the site computes every x_i once, with
one forward pass over its data in eval mode (:func:`head_inputs`), and each DP-SGD step is then
a step of a linear model on those vectors: per-example gradients, clipping to C, Gaussian
noise sigma C and Poisson sampling at rate q are exactly those of :mod:`privacy.dp_sgd`
(Opacus on :class:`FeatureHead`, through :func:`client.training.train`), so the step is charged
like any other. What makes it cheap is that no step touches the encoder.

The features stay in this process (:class:`FeatureCache`), keyed by the received encoder
weights: they are recomputed whenever those change (a later round, central-DP noise on the
LoRA matrices). Nothing computed here leaves the site; only the trained head does, as part of
the adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from fedlora.tasks import collate


class ProbeError(ValueError):
    """The model's head cannot be probed on cached features."""


class FeatureHead(nn.Module):
    """The model's trainable head as a module of its cached input features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.head(features))


def classification_head(model: nn.Module) -> nn.Module:
    """The trainable copy of the head peft keeps in ``modules_to_save`` (the one that travels)."""
    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    if len(heads) != 1:
        raise ProbeError(f"the probe phase needs exactly one trainable head, found {len(heads)}; set probe-rounds = 0")
    wrapper = heads[0]
    return wrapper.modules_to_save[wrapper.active_adapters[0]]


@torch.no_grad()
def head_inputs(
    model: nn.Module, examples: Sequence[dict[str, list[int]]], pad_token_id: int,
    device: torch.device, batch_size: int = 64,
) -> torch.Tensor:
    """Each example's input to the head, shape ``[n, features]``, in eval mode (no dropout).

    Examples go through in order of length, so each batch pads to little more than itself.
    """
    head = classification_head(model)
    captured: list[torch.Tensor] = []

    def keep_input(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().float().cpu())

    hook = head.register_forward_pre_hook(keep_input)
    was_training = model.training
    model.eval().to(device)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    try:
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]], pad_token_id, "classification")
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    width = getattr(head, "in_features", None)
    if not captured:
        return torch.zeros(0, width or 0)
    features = torch.cat(captured)
    if features.dim() != 2:
        raise ProbeError(f"the head reads a {features.dim()}-d input, not a feature vector; set probe-rounds = 0")
    result = torch.empty_like(features)
    result[torch.tensor(order)] = features
    return result


def stack_features(part: Sequence[dict]) -> dict[str, torch.Tensor]:
    """A batch of cached examples for :class:`FeatureHead`."""
    return {
        "features": torch.stack([e["features"] for e in part]),
        "labels": torch.tensor([e["labels"][0] for e in part], dtype=torch.long),
    }


def encoder_fingerprint(model: nn.Module) -> str:
    """A digest of the LoRA weights, the part of the encoder a round can change (the frozen
    base is named by the cache key's identity)."""
    head_params = {id(p) for p in classification_head(model).parameters()}
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if id(param) not in head_params and "lora_" in name:
            digest.update(name.encode())
            digest.update(param.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FeatureCache:
    """One site's features for one set of examples and encoder weights (one entry: a site
    process serves one run at a time)."""

    key: tuple | None = None
    features: torch.Tensor | None = None

    def get(self, model: nn.Module, examples: Sequence[dict[str, list[int]]], pad_token_id: int,
            device: torch.device, identity: tuple) -> torch.Tensor:
        key = (identity, len(examples), encoder_fingerprint(model))
        if key != self.key or self.features is None:
            self.features, self.key = head_inputs(model, examples, pad_token_id, device), key
        return self.features
