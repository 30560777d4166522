"""Which rows go into each optimizer step, and in how many forward passes.

Every batch is padded to its own longest row (:func:`fedlora.tasks.collate`), so a batch of
mixed lengths pays for its longest row once per row: on Financial PhraseBank at 48 tokens a
random batch of 32 is padded to 48 although the median sentence has 28. Two remedies, one per
kind of step:

* **Without DP**, :func:`length_grouped_batches` forms the batches themselves from rows of
  similar length, like Hugging Face's ``group_by_length``: each epoch is a random order of all
  rows, cut into mega-batches of :data:`BATCHES_PER_GROUP` batches, each sorted by length and
  cut into batches; unlike it, the batches are then taken in random order, so that an epoch
  does not run from long rows to short ones within each mega-batch.
* **With DP**, the batch is Poisson-sampled (each unit in independently at rate q) and must stay
  that batch: the accountant assumes nothing else. :func:`length_passes` only chooses how the
  sampled batch is *computed*: its units sorted by length and cut into contiguous passes, each
  padded to its own longest row. Opacus accumulates the passes' clipped gradients into one
  noisy step, so the update is the same sum whatever the cut (tests/test_training.py).

The cut minimises the padded tokens plus a fixed price per pass,

    cost(P_1 .. P_k) = sum_j ( |P_j| * max_{r in P_j} len(r) + pass cost ),

over the cuts of the units sorted by length, by dynamic programming (O(n^2) for a batch of n
units: a few thousand operations for the batches a site runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

BATCHES_PER_GROUP = 50
"""Batches per mega-batch of :func:`length_grouped_batches` (Hugging Face's
``LengthGroupedSampler`` uses 50 too): enough rows to find similar lengths, few enough that a
batch is still drawn from a random slice of the data."""

PASS_COST_TOKENS = {"cpu": 90}
"""The fixed price of one forward-backward pass, in tokens, by device type: on 2 CPU cores
MiniLM-L6 with LoRA costs about 14 ms per pass plus 0.16 ms per token (with or without Opacus'
hooks), so an extra pass pays off when it saves more than about 90 padded tokens. Other devices
are not measured: a GPU's cost per token is far smaller against its cost per pass (kernel
launches, Opacus' hooks), so they get :data:`UNMEASURED_PASS_COST`, as few passes as
``physical-batch-size`` allows."""

UNMEASURED_PASS_COST = 10**9  # more than any padding a pass could save: fewest passes first


def length_grouped_batches(lengths: Sequence[int], batch_size: int, steps: int,
                           generator: torch.Generator) -> Iterator[list[int]]:
    """``steps`` batches of row indices; each epoch visits every row once, in batches of rows
    of similar length taken in random order."""
    n, done = len(lengths), 0
    if n == 0 and steps > 0:
        raise ValueError("no rows to draw batches from")
    group = batch_size * BATCHES_PER_GROUP
    while done < steps:
        order = torch.randperm(n, generator=generator).tolist()
        batches = []
        for lo in range(0, n, group):
            mega = sorted(order[lo : lo + group], key=lambda i: lengths[i], reverse=True)
            batches += [mega[b : b + batch_size] for b in range(0, len(mega), batch_size)]
        for index in torch.randperm(len(batches), generator=generator).tolist():
            if done == steps:
                return
            yield batches[index]
            done += 1


def length_passes(groups: list[list[int]], lengths: Sequence[int], max_rows: float,
                  pass_cost: int = PASS_COST_TOKENS["cpu"]) -> list[list[list[int]]]:
    """Cut a batch of units (each a list of row indices, never split: a unit's gradient is the
    mean over its rows, which must be in one pass) into passes of at most ``max_rows`` rows
    (``math.inf``: no bound) that minimise padded tokens + ``pass_cost`` per pass.

    A unit counts as its longest row and the units are cut in order of that length: the
    cheapest of all cuts when no bound applies or every unit is one row, else the cheapest cut
    of the sorted units (packing units of several rows under a bound is a knapsack problem). A
    unit larger than ``max_rows`` gets a pass of its own."""
    if max_rows == math.inf and len({lengths[i] for group in groups for i in group}) <= 1:
        return [groups]  # one length (cached features: none): nothing to save by cutting
    units = sorted(groups, key=lambda group: max(lengths[i] for i in group))
    longest = [max(lengths[i] for i in unit) for unit in units]
    rows = [len(unit) for unit in units]
    best = [0.0] + [math.inf] * len(units)  # best[j]: cheapest cut of units[:j]
    cut_at = [0] * (len(units) + 1)
    for j in range(1, len(units) + 1):
        in_pass = 0
        for i in range(j - 1, -1, -1):  # the last pass is units[i:j]
            in_pass += rows[i]
            if in_pass > max_rows and i < j - 1:
                break
            cost = best[i] + in_pass * longest[j - 1] + pass_cost
            if cost < best[j]:
                best[j], cut_at[j] = cost, i
    passes, j = [], len(units)
    while j > 0:
        passes.append(units[cut_at[j] : j])
        j = cut_at[j]
    return passes[::-1]
