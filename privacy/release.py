"""Noised metrics: the only way a DP site says anything about its loss and accuracy.

Every value that leaves a DP site is public configuration or a DP release charged to the site's
ledger. The adapter is one release (DP-SGD, :mod:`privacy.dp_sgd`); the metrics are these.
Both are Gaussian mechanisms, so they compose in the one accountant the ledger already uses.

Scores are first reduced **per privacy unit** u (a row, or a user's rows under user-level DP):
``loss_u`` = the unit's mean per-example loss clipped to [0, L], ``acc_u`` = its share of
correct predictions, so one unit moves any sum below by at most L (loss) or 1 (accuracy).

**Train loss** (after training, on the site's training units). A fresh Poisson sample S at rate
q = min(1, b / n_pub) (b the run's batch size, n_pub the site's public size)::

    train_loss = ( sum_{u in S} loss_u  +  N(0, (sigma L)^2) ) / (q n_pub)

Adding or removing a unit changes the sum by at most L: the subsampled Gaussian mechanism with
multiplier sigma at rate q, one step, i.e. the ledger row ``(sigma, q, 1)``.

**Evaluation** (on the held-out units, all of them, q = 1). The pair
``v = sum_u (loss_u / L, acc_u)`` has L2 sensitivity sqrt(2)::

    v~ = v + N(0, 2 sigma^2 I),   eval_loss = L v~_1 / m_pub,   eval_accuracy = v~_2 / m_pub

the Gaussian mechanism with multiplier sigma: the ledger row ``(sigma, 1, 1)``. ``m_pub`` is
the public held-out size (``eval-fraction`` of n_pub).

Denominators are public, never the private count: dividing by the true count would make the
released value a function of it. The released numbers are **not** clamped to their ranges: an
unclamped release is an unbiased estimate, so the server's average over sites and rounds is
too, while clamping (free as post-processing) would bias it; a release of 1.07 or -0.02 is noise
around the true value. A site with ``report-metrics = none`` releases neither.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from privacy.ledger import Charge
from privacy.secure_noise import secure_gaussian

LOSS_BOUND = 5.0
"""L: per-unit losses are clipped to [0, L]. Cross-entropy of a uniform guess over K classes is
ln K (1.6 for 5 classes); L = 5 keeps a model that is wrong with confidence e^-5 in range."""


@dataclass(frozen=True)
class Release:
    """Noised values, and the charge they cost (to record before they leave)."""

    values: dict[str, float]
    charge: Charge


def train_loss_charge(noise_multiplier: float, sample_rate: float, unit: str) -> Charge:
    return Charge("release:train-loss", noise_multiplier, sample_rate, 1, LOSS_BOUND, unit)


def eval_charge(noise_multiplier: float, unit: str) -> Charge:
    return Charge("release:eval", noise_multiplier, 1.0, 1, math.sqrt(2.0), unit)


def per_unit_means(values: torch.Tensor, units: Sequence[int]) -> torch.Tensor:
    """Mean of ``values`` per unit id (``units[i]`` is row i's unit), one entry per unit."""
    ids = torch.as_tensor(list(units), dtype=torch.long)
    if len(ids) == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, inverse = torch.unique(ids, return_inverse=True)
    count = int(inverse.max()) + 1
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, inverse, values.double())
    sizes = torch.zeros(count, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values, dtype=torch.float64))
    return sums / sizes


def clip_losses(unit_losses: torch.Tensor) -> torch.Tensor:
    """Per-unit losses in [0, L]; a NaN or infinite loss counts as L. Clamping alone keeps a NaN,
    and one NaN would turn the whole release into NaN: an output decided by a single record."""
    return torch.nan_to_num(unit_losses.double(), nan=LOSS_BOUND, posinf=LOSS_BOUND, neginf=0.0).clamp(0, LOSS_BOUND)


def noised_train_loss(unit_losses: torch.Tensor, public_size: int, charge: Charge, secure: bool) -> float:
    """The train-loss release over ``unit_losses``: the per-unit losses of the units Poisson-
    sampled at ``charge.sample_rate`` (the caller samples; see the module doc)."""
    clipped_sum = float(clip_losses(unit_losses).sum())
    noise = _gaussian(1, charge.noise_multiplier * LOSS_BOUND, secure)[0]
    return (clipped_sum + noise) / (charge.sample_rate * public_size)


def noised_evaluation(
    unit_losses: torch.Tensor, unit_accuracies: torch.Tensor, public_size: int, charge: Charge, secure: bool
) -> dict[str, float]:
    """The evaluation release over every held-out unit (see the module doc)."""
    v_loss = float(clip_losses(unit_losses).sum()) / LOSS_BOUND
    v_acc = float(torch.nan_to_num(unit_accuracies.double(), nan=0.0).clamp(0, 1).sum())
    noise = _gaussian(2, charge.noise_multiplier * charge.sensitivity, secure)
    return {
        "eval-loss": LOSS_BOUND * (v_loss + noise[0]) / public_size,
        "eval-accuracy": (v_acc + noise[1]) / public_size,
    }


def _gaussian(count: int, std: float, secure: bool) -> list[float]:
    """Noise the server cannot predict: the OS CSPRNG, or a torch generator seeded from it
    (never the global generator, which a run's seed may have fixed)."""
    if secure:
        return secure_gaussian((count,), std, dtype=torch.float64).tolist()
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    return (torch.randn(count, generator=generator, dtype=torch.float64) * std).tolist()
