"""What each task feeds the model and how it is scored.

``classification``: ``text`` -> ``label`` (sequence classification, cross-entropy).
``causal-lm``: ``prompt`` + ``response`` -> next-token prediction on the response only.

The loss is computed **per example** (:func:`per_example_loss`) and only then averaged over the
batch. For DP-SGD this matters: Hugging Face's built-in causal-LM loss divides by the number of
tokens in the whole batch, which makes one example's gradient depend on the lengths of the
others, so its contribution would no longer be bounded by per-sample clipping alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def encode(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, task: str, max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenize once per round (no padding: batches are padded to their own longest example)."""
    if task == "classification":
        enc = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)
        return [
            {"input_ids": ids, "labels": [label]}
            for ids, label in zip(enc["input_ids"], dataset["label"])
        ]
    prompts = tokenizer(list(dataset["prompt"]), truncation=True, max_length=max_length)["input_ids"]
    responses = tokenizer(list(dataset["response"]), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for prompt, response in zip(prompts, responses):
        ids = (prompt + response + eos)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response + eos)[:max_length]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int, task: str) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (dynamic padding), right-aligned."""
    longest = max((len(e["input_ids"]) for e in examples), default=1)
    n = len(examples)
    input_ids = torch.full((n, longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    if task == "classification":
        labels = torch.tensor([e["labels"][0] for e in examples], dtype=torch.long)
    else:
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    for i, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[i, :length] = torch.tensor(example["input_ids"])
        attention_mask[i, :length] = 1
        if task != "classification":
            labels[i, :length] = torch.tensor(example["labels"])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if task != "classification":
        # Explicit per-example position ids: HF's default [1, seq] broadcast breaks Opacus'
        # per-sample gradients in decoder models.
        batch["position_ids"] = torch.arange(longest).unsqueeze(0).expand(n, -1).contiguous()
    return batch


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy per example: shape ``[batch]``."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    mask = (shifted_labels != IGNORE_INDEX).float()
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def correct_and_count(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, shape ``[batch]``: correct predictions and predictions made (classification:
    0/1 of 1; causal-lm: correctly predicted response tokens of all response tokens)."""
    if task == "classification":
        return (logits.argmax(-1) == labels).long(), torch.ones_like(labels)
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return ((predicted == target) & mask).sum(dim=1), mask.sum(dim=1)
