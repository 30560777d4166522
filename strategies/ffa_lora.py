"""FFA-LoRA (Sun et al., ICLR 2024): freeze A, train and send only B.

Every site initialises the LoRA down-projections A from the same seed (or receives them
from the server once) and never trains them; only the up-projections B (and any
modules_to_save) are trained, sent and averaged.

Why averaging is then exact. The weight update of site i is ``ΔW_i = B_i A``; the
server wants the (weighted) mean of the updates, and by linearity

    Σ_i w_i (B_i A) / Σ_i w_i = (Σ_i w_i B_i / Σ_i w_i) A,

so averaging the B's and multiplying by the shared A gives exactly the mean update.
With both factors trained, FedAvg averages A and B separately and
``mean_i(B_i A_i) != mean_i(B_i) mean_i(A_i)``: for two equally weighted sites

    ½(B_1 A_1 + B_2 A_2) − ¼(B_1 + B_2)(A_1 + A_2) = ¼ (B_1 − B_2)(A_1 − A_2),

a cross term that is zero only when the sites agree on A or on B. Freezing A also
halves what is sent and, under DP-SGD, keeps the update linear in the clipped noisy
gradient of B instead of a product of two noisy factors.
"""

from collections.abc import Mapping
from typing import TypeVar

from strategies.hetero_rank import is_lora_a

X = TypeVar("X")


def is_frozen_key(name: str) -> bool:
    """True for the tensors FFA-LoRA freezes: the LoRA A matrices (``...lora_A.weight``)."""
    return is_lora_a(name)


def trainable_subset(arrays: Mapping[str, X]) -> dict[str, X]:
    """The tensors a site sends under FFA-LoRA: everything except the frozen A's."""
    return {name: value for name, value in arrays.items() if not is_frozen_key(name)}


def merge_frozen(global_arrays: Mapping[str, X], update: Mapping[str, X]) -> dict[str, X]:
    """A full adapter from an aggregated trainable-only ``update`` and the frozen A's.

    The result has the keys of ``global_arrays``, in its order (so it loads as a PEFT
    state dict): frozen tensors from ``global_arrays``, the rest from ``update``.
    Raises ValueError when ``update`` holds a frozen tensor (a site that trained A broke
    the exactness above) or its keys differ from the global trainable ones.
    """
    frozen_sent = [name for name in update if is_frozen_key(name)]
    if frozen_sent:
        raise ValueError(f"update contains frozen LoRA A tensors: {sorted(frozen_sent)[:5]}")
    expected = set(trainable_subset(global_arrays))
    if set(update) != expected:
        missing = sorted(expected - set(update))[:5]
        unexpected = sorted(set(update) - expected)[:5]
        raise ValueError(f"update keys differ: missing {missing}, unexpected {unexpected}")
    return {
        name: global_arrays[name] if is_frozen_key(name) else update[name]
        for name in global_arrays
    }
