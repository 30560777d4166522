"""Reject malformed adapter updates before they reach aggregation.

One bad reply (a wrong shape, a NaN) would otherwise crash the aggregation or silently poison
the global adapter for every site. Checks run in this order and the first failing one gives
the reason:

1. tensor names: unexpected keys, then missing keys;
2. shapes (with ``rank_flexible``, a LoRA rank in [1, spec rank], the same in every tensor);
3. dtypes;
4. finiteness (NaN / Inf counts).

The size of a well-formed update, :func:`update_norm`, is judged against the round's other
updates by ``strategies.norm_screen``.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from fedlora.lora_ranks import rank_axis

_MAX_NAMED = 5


@dataclass(frozen=True)
class UpdateSpec:
    """What a valid update looks like.

    ``rank_flexible`` lets LoRA tensors have another rank r than the spec's R: the rank
    axis (dim 0 of lora_A, dim 1 of lora_B) may hold any 1 <= r <= R, the other dims
    must match. The upper bound exists because the server keeps its global adapter at
    the maximum rank R (build the spec from it): a larger rank could not be aggregated.
    """

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    rank_flexible: bool = False


class TooFewUpdates(RuntimeError):
    """Fewer valid updates than the round needs (``min-valid-updates``, or central DP's fixed
    sample size): the round cannot be aggregated."""


def spec_from_arrays(arrays: ArrayRecord, rank_flexible: bool = False) -> UpdateSpec:
    """The spec an update must match: the names, shapes and dtypes of ``arrays``."""
    decoded = {name: array.numpy() for name, array in arrays.items()}
    return UpdateSpec(
        shapes={name: tuple(value.shape) for name, value in decoded.items()},
        dtypes={name: str(value.dtype) for name, value in decoded.items()},
        rank_flexible=rank_flexible,
    )


def _name_some(names: Iterable[str]) -> str:
    """At most five names, then "and N more", so a reason stays one readable line."""
    names = sorted(names)
    shown = ", ".join(repr(name) for name in names[:_MAX_NAMED])
    hidden = len(names) - _MAX_NAMED
    return shown if hidden <= 0 else f"{shown} and {hidden} more"


def _shape_error(name: str, got: tuple[int, ...], spec: UpdateSpec) -> str | None:
    """Why ``got`` is not a valid shape for ``name``, or None when it is."""
    expected = spec.shapes[name]
    axis = rank_axis(name) if spec.rank_flexible else None
    if axis is None or len(got) != len(expected):
        if got == expected:
            return None
        return f"wrong shape for {name!r}: expected {expected}, got {got}"
    if any(g != e for i, (g, e) in enumerate(zip(got, expected)) if i != axis):
        return (
            f"wrong shape for {name!r}: expected {expected} (any rank on dim {axis}), got {got}"
        )
    if not 1 <= got[axis] <= expected[axis]:
        return f"invalid LoRA rank {got[axis]} for {name!r}: must be in [1, {expected[axis]}]"
    return None


def _reference_for(
    name: str, value: np.ndarray, reference: dict[str, np.ndarray]
) -> np.ndarray | None:
    """The tensor the site started from, or None if unknown.

    A rank-r site received the first r components of the global adapter
    (``fedlora.lora_ranks.truncate_to_rank``), so a lower-rank reply is compared with that
    prefix of the reference rather than skipped: skipping would let a low-rank site send
    an unbounded update.
    """
    ref = reference.get(name)
    if ref is None or ref.ndim != value.ndim:
        return None
    axis = rank_axis(name)
    if axis is not None and value.shape[axis] < ref.shape[axis]:
        ref = ref.take(range(value.shape[axis]), axis=axis)
    return ref if ref.shape == value.shape else None


def update_norm(arrays: ArrayRecord, reference: ArrayRecord | None) -> float:
    """‖reply − reference‖₂ over all tensors of a well-formed ``arrays`` (float64); a tensor
    without a matching reference counts in full (its reference is taken as zero)."""
    ref_arrays = {} if reference is None else {n: a.numpy() for n, a in reference.items()}
    squared = 0.0
    for name, array in arrays.items():
        value = array.numpy()
        delta = value.astype(np.float64)
        ref = _reference_for(name, value, ref_arrays)
        if ref is not None:
            delta -= ref.astype(np.float64)
        squared += float(np.sum(delta * delta))
    return squared**0.5


def validate_update(arrays: ArrayRecord, spec: UpdateSpec) -> str | None:
    """None when ``arrays`` is a well-formed update under ``spec``, else the reason it is not."""
    unexpected = set(arrays.keys()) - set(spec.shapes)
    if unexpected:
        return f"unexpected keys: {_name_some(unexpected)}"
    missing = set(spec.shapes) - set(arrays.keys())
    if missing:
        return f"missing keys: {_name_some(missing)}"

    # Decode once and check the decoded arrays: an Array's shape/dtype metadata is
    # whatever the sender wrote and need not match its payload.
    decoded: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        try:
            decoded[name] = array.numpy()
        except Exception as error:  # noqa: BLE001 - an untrusted payload may fail in any way
            return f"cannot decode {name!r}: {error}"

    for name, value in decoded.items():
        if (error := _shape_error(name, tuple(value.shape), spec)) is not None:
            return error
    if spec.rank_flexible:
        # lora_A and lora_B must share one rank, else B A is undefined for the module.
        ranks = {
            value.shape[axis]
            for name, value in decoded.items()
            if (axis := rank_axis(name)) is not None
        }
        if len(ranks) > 1:
            return f"inconsistent LoRA ranks across tensors: {sorted(ranks)}"

    for name, value in decoded.items():
        if str(value.dtype) != spec.dtypes[name]:
            return f"wrong dtype for {name!r}: expected {spec.dtypes[name]}, got {value.dtype}"

    for name, value in decoded.items():
        if not np.issubdtype(value.dtype, np.inexact):
            continue
        nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        if nan or inf:
            return f"non-finite values in {name!r}: {nan} NaN, {inf} Inf"
    return None
