"""How a classification head reads the encoder: ``mean``, ``cls`` or ``pooler``.

Hugging Face's ``*ForSequenceClassification`` encoders feed the head the **pooler** output,
``tanh(W h_[CLS] + b)``, a layer trained by BERT's next-sentence objective. A
sentence-transformers model such as all-MiniLM-L6-v2 was trained for **mean pooling**,

    mean(h, m) = sum_t m_t h_t / sum_t m_t        (m: the attention mask, padding excluded)

and its pooler was never trained. A linear probe on its frozen features (FPB, 64 tokens) scores
0.785 with mean pooling, 0.748 on the [CLS] state and 0.718 on the pooler output (issue 10).
``cls`` takes ``h_[CLS]`` itself.

``auto`` reads the sentence-transformers pooling config shipped with the model
(``1_Pooling/config.json``): mean or cls when it says so, else the architecture's own pooler.

The choice replaces the encoder's ``pooler`` module by a parameter-free :class:`MaskedPooler`,
so the head's input changes and nothing else: the adapter stays in PEFT format, and a model
loaded with the same pooling (:func:`fedlora.model.load_base_model`) gives the same outputs.
The pooler needs the attention mask, which Hugging Face does not pass it: a forward pre-hook on
the encoder hands it over for each forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

POOLINGS = ("auto", "mean", "cls", "pooler")


class PoolingError(ValueError):
    """The requested pooling does not fit the model."""


class MaskedPooler(nn.Module):
    """Mean over the unmasked tokens, or the first token's state; no parameters."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden_states[:, 0]
        mask = self.attention_mask
        if mask is None:
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def resolve_pooling(model_dir: str, requested: str) -> str:
    """``requested`` itself, or for ``auto`` what the model's sentence-transformers config
    says (mean, cls), else ``pooler``."""
    if requested not in POOLINGS:
        raise PoolingError(f"unknown pooling {requested!r}; choose one of {', '.join(POOLINGS)}")
    if requested != "auto":
        return requested
    config = Path(model_dir) / "1_Pooling" / "config.json"
    if config.is_file():
        modes = json.loads(config.read_text())
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
        if modes.get("pooling_mode_cls_token"):
            return "cls"
    return "pooler"


def apply_pooling(model: nn.Module, mode: str) -> None:
    """Make ``model``'s classification head read ``mode`` pooling (``pooler``: unchanged)."""
    if mode == "pooler":
        return
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or not hasattr(encoder, "pooler"):
        raise PoolingError(
            f"pooling {mode!r} needs an encoder with a pooler (BERT-like); "
            f"{type(model).__name__} has none: use pooling = auto"
        )
    pooler = MaskedPooler(mode)
    encoder.pooler = pooler

    def hand_over_the_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pooler.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(hand_over_the_mask, with_kwargs=True)
