"""Canaries for an empirical privacy audit (``privacy.one_run_audit``): records no real data
resembles, each put into one simulated site's data with probability 1/2.

A canary is a string of random letter-words with a random label: nothing in the corpus predicts
its label, so only having trained on it can. The inclusion bits stay with the simulation (the
auditor); the server never sees them, and only a simulation, never a server, adds canaries.
Included canaries are rows of the site's file like any other, so its DP-SGD and its ledger
cover them.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import datasets
import numpy as np

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
        raise ValueError(f"--canaries must be at least 2, got {count}")
    letters = np.array(list(string.ascii_lowercase))
    texts = [" ".join("".join(rng.choice(letters, size=rng.integers(4, 9))) for _ in range(WORDS_PER_CANARY))
             for _ in range(count)]
    labels = rng.integers(0, num_labels, size=count).tolist()
    return Canaries(datasets.Dataset.from_dict({"text": texts, "label": labels}), rng.random(count) < 0.5)
