"""The Skellam mechanism: integer noise that survives secure aggregation, for distributed DP.

Under ``dp-mode = distributed`` each site adds only a *share* of the noise, and SecAgg+ hands the
server the sum of the sites' vectors alone (``server.secure_aggregation``). For the sum to carry
the noise that central DP needs, the noise must add up exactly, and it must live on SecAgg's
integer grid (masks and sums are integers mod 2^32). The symmetric Skellam distribution does both
(Agarwal, Kairouz and Liu, NeurIPS 2021, arXiv:2110.04995)::

    Sk(mu) = Poisson(mu / 2) - Poisson(mu / 2),   integer-valued, mean 0, variance mu,
    Sk(mu_1) + Sk(mu_2) = Sk(mu_1 + mu_2)          (independent draws)

so k sites adding Sk(mu / k) per coordinate put exactly Sk(mu) into the sum.

**Privacy of the sum.** Let f map a site's data to an integer vector, and let one privacy unit
move f by a vector v with ||v||_2 <= D2 and ||v||_1 <= D1. Then f + Sk(mu)^d is (alpha, eps)-RDP
for every integer alpha > 1 with (Agarwal et al., Thm. 3.5 / Cor. 3.6)::

    eps(alpha) <= alpha D2^2 / (2 mu)  +  min( ((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2),  3 D1 / (2 mu) )

The first term is the Gaussian mechanism's RDP at variance mu; the second is Skellam's price for
being discrete, vanishing as mu grows. fedlora never stores D1: an integer vector has
|v_i| <= v_i^2 coordinate-wise, so D1 <= D2^2, and the bound becomes a function of the noise
multiplier z = sqrt(mu) / D2 and D2 alone (:func:`rdp`)::

    eps(alpha) <= alpha / (2 z^2)  +  min( (2 alpha + 5) / (4 z^4 D2^2),  3 / (2 z^2) )

The theorem is stated for integer orders only, so a history with a Skellam row is converted to
(epsilon, delta) over the integer orders of Opacus' grid (:data:`INTEGER_ORDERS`), never its
fractional ones (``privacy.accountant``).

**A dominating Gaussian**, for the independent cross-check with dp-accounting (which has no
Skellam event): with 1 / z_g^2 = 1 / z^2 + 9 / (4 z^4 D2^2), the Gaussian of multiplier z_g has
RDP alpha / (2 z_g^2) >= the bound above at every alpha >= 2, since
(2 alpha + 5) / (2 alpha) <= 9 / 4 there (:func:`dominating_gaussian`).

**Sampling.** numpy's Poisson sampler, on a PCG64 generator seeded with 128 bits from
``os.urandom`` for each call: nothing the server knows seeds it. It is not a CSPRNG (unlike
``privacy.secure_noise`` for the Gaussian), which ``docs/privacy.md`` states as an assumption:
the server only ever sees a sum over several sites' draws, never one generator's outputs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from opacus.accountants import RDPAccountant

MECHANISM = "distributed:skellam"
"""The ledger's ``mechanism`` for a distributed-DP round: the row says its mode."""

INTEGER_ORDERS: tuple[int, ...] = tuple(int(a) for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer())
"""The integer RDP orders of Opacus' grid (2 .. 63): where the Skellam bound holds."""


def rdp(noise_multiplier: float, sensitivity: float, orders: Sequence[int] = INTEGER_ORDERS) -> np.ndarray:
    """The Skellam bound above at each integer order, for z = ``noise_multiplier`` (std of the
    summed noise over ``sensitivity``) and D2 = ``sensitivity`` (in grid units, >= 1 for an
    integer vector that moves at all), with D1 <= D2^2."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"a Skellam noise multiplier must be positive and finite, got {noise_multiplier!r}")
    if not sensitivity >= 1:
        raise ValueError(f"a Skellam sensitivity is an integer vector's L2 norm bound, >= 1; got {sensitivity!r}")
    alpha = np.asarray(orders, dtype=np.float64)
    if np.any(alpha < 2) or np.any(alpha != np.floor(alpha)):
        raise ValueError("the Skellam bound holds at integer orders >= 2 only")
    z2 = noise_multiplier**2
    discrete = np.minimum((2 * alpha + 5) / (4 * z2**2 * sensitivity**2), 3 / (2 * z2))
    return alpha / (2 * z2) + discrete


def dominating_gaussian(noise_multiplier: float, sensitivity: float) -> float:
    """The multiplier z_g of a Gaussian whose RDP is at least the Skellam bound at every order >= 2."""
    z2 = noise_multiplier**2
    return 1.0 / math.sqrt(1.0 / z2 + 9.0 / (4.0 * z2**2 * sensitivity**2))


def skellam_noise(size: int, variance: float) -> np.ndarray:
    """``size`` independent draws of Sk(``variance``) as int64."""
    if not variance > 0:
        raise ValueError(f"Skellam variance must be positive, got {variance!r}")
    generator = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
    return generator.poisson(variance / 2, size) - generator.poisson(variance / 2, size)


class SkellamRow(NamedTuple):
    """A history row of ``steps`` Skellam releases at multiplier z = ``noise_multiplier`` and
    L2 sensitivity ``sensitivity`` (grid units), on all of a site's units (rate 1). Four
    fields, so that code reading Gaussian rows as (sigma, q, steps) fails loudly on it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    sensitivity: float
