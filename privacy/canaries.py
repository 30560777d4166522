"""Canaries for a record-level empirical privacy audit (``privacy.one_run_audit``): records no
real data resembles, each put into one site's training rows with probability 1/2.

A canary is a string of random letter-words with a random label: nothing in the corpus predicts
its label, so only having trained on it can. All of them, and which are included, follow from a
**secret** that stays with the site that audits itself (``client.self_audit``): only a site's
own node config turns canaries on, never the server. Included canaries are training rows like
any other, so the site's DP-SGD samples them and its ledger covers them; they never enter the
held-out split.

After training, each canary is scored by the final model: minus its loss (an included canary is
expected to have a lower loss).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from fedlora.evaluation import per_example_scores
from fedlora.tasks import encode

WORDS_PER_CANARY = 8


@dataclass(frozen=True)
class Canaries:
    rows: datasets.Dataset  # ``text`` and ``label`` (an index into the run's label names)
    included: np.ndarray  # one secret bit per canary

    @property
    def included_rows(self) -> datasets.Dataset:
        return self.rows.select(np.flatnonzero(self.included).tolist())


def make_canaries(count: int, num_labels: int, rng: np.random.Generator) -> Canaries:
    if count < 2:
        raise ValueError(f"canaries: at least 2, got {count}")
    letters = np.array(list(string.ascii_lowercase))
    texts = [" ".join("".join(rng.choice(letters, size=rng.integers(4, 9))) for _ in range(WORDS_PER_CANARY))
             for _ in range(count)]
    labels = rng.integers(0, num_labels, size=count).tolist()
    return Canaries(datasets.Dataset.from_dict({"text": texts, "label": labels}), rng.random(count) < 0.5)


def canary_scores(model: torch.nn.Module, tokenizer, canaries: Canaries, max_seq_length: int, device: torch.device) -> np.ndarray:
    """Minus each canary's loss under ``model`` (a classifier with the run's labels)."""
    examples = encode(canaries.rows, tokenizer, "classification", max_seq_length)
    losses, _, _ = per_example_scores(model, examples, "classification", tokenizer.pad_token_id, device=device)
    return -losses.numpy()
