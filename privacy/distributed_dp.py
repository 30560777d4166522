"""Distributed DP's arithmetic: clipped gradients on SecAgg's integer grid, and each site's share
of the Skellam noise (the round that uses it: ``client.distributed_site``).

**The grid.** A site's adapter has d values (all its tensors that travel, whatever the round
trains: fixed by the site's own model, never by the server's message). Each privacy unit u's
gradient g_u (zero outside the round's trained tensors) is clipped to L2 norm C and scaled by
gamma = GRID sqrt(d) / C, then every coordinate is rounded down or up at random, up with
probability its fractional part (so the rounding is unbiased)::

    r_u = round_random(gamma clip_C(g_u)),    ||r_u||_2 <= gamma C + sqrt(d) = (GRID + 1) sqrt(d) = D2

because rounding moves each coordinate by less than 1. :func:`rounded_units` enforces the bound
rather than trusting float arithmetic: a unit whose vector would exceed D2 adds zero. GRID = 64
keeps the rounding's share of the sensitivity at 1/65 (1.5 %) whatever d is. A unit's value in
one coordinate can reach gamma C = 64 sqrt(d) grid units (all its norm there) but is near 64 when
spread; a sum wraps past 2^21 (``fedlora.secagg_grid``: a wrong value, never a privacy loss) only
when thousands of units align on one coordinate, or the summed noise, z 65 sqrt(d), nears 2^21
(z of several hundred rounds on a model with a million adapter values).

**The sum.** A site sends k = sum_u r_u + Sk(mu_share)^d. Adding or removing one unit changes the
sum over all sites by r_u: an integer vector of L2 norm <= D2 whatever the rounding drew (the
output is a mixture over the draws, and a mixture is no less private than its worst component),
so the securely aggregated sum is the Skellam mechanism with sensitivity D2 (``privacy.skellam``).

**The shares.** SecAgg+ unmasks no sum of fewer than n updates (``RunSettings.secure_sum_minimum``)
and up to t of their sites may collude with the server, whose shares it then knows and subtracts.
Sites differ (budgets, floors, deltas, releases, their own t), so no site may count on another
adding what it adds itself. The run fixes a public multiplier z_run (``privacy.plan.
public_noise_multiplier``: from the run config alone) and with it a public share
P = (z_run D2)^2 / (n - t_run) that every site adds at least, to every one of the d values. A
site counts its own share O >= P and P from each of n - t - 1 others (t >= t_run its own bound):
its ledger row (``distributed:skellam``, rate 1, one step, D2) records z = sqrt(O + (n - t - 1) P) / D2,
whichever tensors each site was told to train. O exceeds P where the site's own target or its
``min-noise-multiplier`` (which holds for its share alone: n is the server's) asks for more
(``privacy.plan.plan_distributed``). A site with a refusal adds no share, and SecAgg+ does not
count it among the n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from privacy.budget import PolicyViolation

GRID = 64


def grid_scale(dimensions: int, max_grad_norm: float) -> float:
    """gamma: grid units per gradient unit, for d = ``dimensions`` and C = ``max_grad_norm``."""
    return GRID * math.sqrt(dimensions) / max_grad_norm


def grid_sensitivity(dimensions: int) -> float:
    """D2: the L2 bound of one unit's rounded vector, in grid units."""
    return (GRID + 1) * math.sqrt(dimensions)


@dataclass(frozen=True)
class Shares:
    """The noise shares one site counts on: every site adds at least the public share
    P = (z_run D2)^2 / (n - t_run) (z_run, n and t_run are the run's, the same at every site), and
    of the others in a sum this site counts only ``counted_others`` = n - t - 1 honest ones, t
    the larger of its node config's bound and the run's."""

    sensitivity: float
    public_variance: float
    counted_others: int

    def noise_multiplier(self, own_variance: float) -> float:
        """The multiplier of the noise the site can count on: its own share and the others'."""
        return math.sqrt(own_variance + self.counted_others * self.public_variance) / self.sensitivity


def site_shares(sensitivity: float, public_multiplier: float, secure_sum_minimum: int, site_colluders: int | None,
                run_colluders: int) -> Shares:
    """The site's :class:`Shares`; PolicyViolation unless the site opted in (its node config
    names its t) and it counts at least its own share."""
    if site_colluders is None:
        raise PolicyViolation("distributed-dp-colluders", "this site's node config names no distributed-dp-colluders, "
                              "so it takes no part in distributed DP")
    colluders = max(site_colluders, run_colluders)
    if secure_sum_minimum - colluders < 1:
        raise PolicyViolation("distributed-dp-colluders", f"a secure sum holds at least {secure_sum_minimum} updates, "
                              f"no more than the {colluders} colluding sites assumed")
    public = (public_multiplier * sensitivity) ** 2 / (secure_sum_minimum - run_colluders)
    return Shares(sensitivity, public, secure_sum_minimum - colluders - 1)


def rounded_units(unit_gradients: torch.Tensor, max_grad_norm: float, dimensions: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """The sum over units (rows of ``unit_gradients``, shape [units, k]: the k <= d trained
    values) of r_u, as int64, on the grid of a d-value adapter, and how many units were zeroed
    (a non-finite gradient, or a rounded vector over D2)."""
    grads = unit_gradients.detach().to("cpu", torch.float64)
    finite = torch.isfinite(grads.sum(dim=1))
    grads = torch.where(finite.unsqueeze(1), grads, torch.zeros_like(grads))
    norms = grads.norm(dim=1)
    factor = (max_grad_norm / norms.clamp(min=1e-12)).clamp(max=1.0)
    scaled = grads * (factor * grid_scale(dimensions, max_grad_norm)).unsqueeze(1)
    low = torch.floor(scaled)
    rounded = low + (torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < scaled - low)
    within = rounded.norm(dim=1) <= grid_sensitivity(dimensions)
    kept = finite & within
    total = rounded[kept].sum(dim=0).round().to(torch.int64)
    return total, int((~kept).sum())
