"""LoRA tensors by name and rank: which tensor is an ``A`` (down-projection, [r, in]) or a ``B``
(up-projection, [out, r]), the rank an adapter has, and the same adapter at another rank.

A rank-r adapter's weight update ``ΔW = B A`` is a sum of r rank-one components, component k
being ``B[:, k] ⊗ A[k, :]``:

    B A = Σ_{k<r} B[:, k] A[k, :]

so an adapter can be cut to its first r' < r components (:func:`truncate_to_rank`, what a
site of rank r' trains from) or padded with zero components (:func:`pad_to_rank`, which leaves
``B A`` unchanged). Sites (their rank, their share of the global adapter), FFA-LoRA (which
tensors are frozen) and the server (validation, HetLoRA) read adapters through this module.
"""


from collections.abc import Mapping

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
