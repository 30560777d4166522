"""Heterogeneous LoRA ranks: HetLoRA-style zero padding with rank-aware weighting.

Sites may train adapters of different ranks r_i (say 4, 8, 16). The server keeps one
global adapter at the maximum rank R. For a LoRA module with weight update
``ΔW = B A`` (``A`` of shape [r, in], ``B`` of shape [out, r]) the rank-r adapter is a
sum of r rank-one components, component k being ``B[:, k] ⊗ A[k, :]``:

    B A = Σ_{k<r} B[:, k] A[k, :]

A site of rank r_i receives the first r_i components of the global adapter
(:func:`truncate_to_rank`); its reply is zero-padded back to R (:func:`pad_to_rank`) and
each component k is averaged only over the sites that actually trained it
(:func:`aggregate_hetero`).

Why zero padding (HetLoRA, Cho et al. 2024) rather than stacking (FLoRA, Wang et al.
2024): stacking concatenates the clients' A's and B's, which makes the aggregate of
``Σ_i B_i A_i`` exact but grows the global rank with the number of clients (Σ_i r_i).
That stacked adapter cannot be sent back to a site as the same-shape rank-r_i adapter it
trains (FLoRA has to merge it into the base weights and re-initialise the adapter each
round), nor stay a fixed-shape PEFT adapter for checkpoints. Zero padding keeps every
round's global adapter a plain rank-R PEFT adapter.
"""

from collections.abc import Mapping, Sequence

import numpy as np

# Path components PEFT uses for the "down" (rank-rows) and "up" (rank-columns) factors;
# embedding layers use the lora_embedding_* names with the same orientation.
_LORA_A_PARTS = frozenset({"lora_A", "lora_embedding_A"})
_LORA_B_PARTS = frozenset({"lora_B", "lora_embedding_B"})


def is_lora_a(name: str) -> bool:
    """True for a LoRA down-projection key (``...lora_A.weight``): shape [r, in]."""
    return not _LORA_A_PARTS.isdisjoint(name.split("."))


def is_lora_b(name: str) -> bool:
    """True for a LoRA up-projection key (``...lora_B.weight``): shape [out, r]."""
    return not _LORA_B_PARTS.isdisjoint(name.split("."))


def rank_axis(name: str) -> int | None:
    """Axis holding the LoRA rank: 0 for lora_A, 1 for lora_B, None for other tensors."""
    if is_lora_a(name):
        return 0
    if is_lora_b(name):
        return 1
    return None


def lora_rank_of(arrays: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank r of an adapter: the size of every LoRA tensor's rank axis.

    Raises ValueError when there is no LoRA tensor or the tensors disagree (a mixed-rank
    adapter cannot be padded or aggregated component-wise).
    """
    ranks = {
        name: np.shape(value)[axis]
        for name, value in arrays.items()
        if (axis := rank_axis(name)) is not None
    }
    if not ranks:
        raise ValueError("no LoRA tensors (lora_A / lora_B keys) found")
    distinct = sorted(set(ranks.values()))
    if len(distinct) > 1:
        raise ValueError(f"inconsistent LoRA ranks {distinct} across tensors")
    return int(distinct[0])


def pad_to_rank(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Zero-pad lora_A rows and lora_B columns up to ``rank``; other tensors unchanged.

    The padded components are zero in both factors, so ``B A`` (the adapter's function)
    is unchanged.
    """
    current = lora_rank_of(arrays)
    if rank < current:
        raise ValueError(f"cannot pad rank {current} down to {rank}; use truncate_to_rank")
    padded: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        axis = rank_axis(name)
        if axis is None:
            padded[name] = value
            continue
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, rank - current)
        padded[name] = np.pad(value, widths)
    return padded


def truncate_to_rank(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Keep the first ``rank`` rows of lora_A and columns of lora_B: what a rank-r site receives.

    Why the first r components (the HetLoRA choice): component k is trained by every site
    with rank > k, so the leading components are the ones all sites share and are
    averaged over the most data; handing each site a prefix keeps those components
    aligned across sites without any per-round decomposition.

    What it loses: the site's starting point is ``B[:, :r] A[:r, :]``, which drops
    ``Σ_{k>=r} B[:, k] A[k, :]`` from the global update. Components are not ordered by
    singular value, so this prefix is not the best rank-r approximation of ``B A``
    (an SVD truncation would be, by Eckart-Young, at the cost of rotating the basis
    every round and breaking the component alignment between sites).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    current = lora_rank_of(arrays)
    if rank > current:
        raise ValueError(f"cannot truncate rank {current} up to {rank}; use pad_to_rank")
    truncated: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        axis = rank_axis(name)
        # Copy so a site's adapter never aliases the server's global arrays.
        truncated[name] = value.copy() if axis is None else value.take(range(rank), axis)
    return truncated


def aggregate_hetero(
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    max_rank: int,
    global_arrays: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Rank-aware weighted mean of adapters of different ranks, at rank ``max_rank``.

    With client i of rank r_i and weight w_i (its number of examples), after padding
    every adapter to R = ``max_rank``, component k of each LoRA tensor is

        A[k, :] = Σ_{i: r_i > k} w_i A_i[k, :] / Σ_{i: r_i > k} w_i
        B[:, k] = Σ_{i: r_i > k} w_i B_i[:, k] / Σ_{i: r_i > k} w_i

    A client of rank r_i <= k never had component k: its padded zeros are absent values,
    not a vote for zero. A plain weighted mean over all clients would shrink component k
    by the factor Σ_{r_i>k} w_i / Σ_i w_i. Non-LoRA tensors (modules_to_save, e.g. the
    classifier head) are shared by all clients: plain weighted mean Σ_i w_i X_i / Σ_i w_i.

    As in FedAvg on LoRA, A and B are averaged separately, so the aggregate of the
    products B_i A_i is approximate (see ``strategies.ffa_lora``).

    Components no client trained this round (k >= max_i r_i, or zero total weight) keep
    their value in ``global_arrays`` when given, else they are zero. Pass the current
    global adapter: zero rows of A together with zero columns of B have zero gradient,
    so a zeroed component could never be trained again.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    weights = np.array([weight for _, weight in updates], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0, not all zero; got {weights.tolist()}")
    keys = list(updates[0][0].keys())
    for arrays, _ in updates:
        if set(arrays.keys()) != set(keys):
            raise ValueError("updates have different tensor names")

    ranks = np.array([lora_rank_of(arrays) for arrays, _ in updates])
    if np.any(ranks > max_rank):
        raise ValueError(f"client ranks {ranks.tolist()} exceed max_rank {max_rank}")
    padded = [pad_to_rank(arrays, max_rank) for arrays, _ in updates]

    # trained_weight[i, k] = w_i if client i has component k, else 0.
    trained_weight = weights[:, None] * (np.arange(max_rank)[None, :] < ranks[:, None])

    aggregated: dict[str, np.ndarray] = {}
    for name in keys:
        stacked = np.stack([arrays[name] for arrays in padded]).astype(np.float64)
        axis = rank_axis(name)
        if axis is None:
            mean = np.tensordot(weights, stacked, axes=1) / weights.sum()
        else:
            # Shape the per-component weights to broadcast along this tensor's rank axis.
            shape = [1] * stacked.ndim
            shape[0], shape[1 + axis] = len(updates), max_rank
            component_weight = trained_weight.reshape(shape)
            total = component_weight.sum(axis=0)
            mean = (component_weight * stacked).sum(axis=0) / np.where(total > 0, total, 1.0)
            if global_arrays is not None:
                mean = np.where(total > 0, mean, global_arrays[name])
        aggregated[name] = mean.astype(updates[0][0][name].dtype)
    return aggregated
