"""Integer vectors through Flower's SecAgg+ quantization, exactly: what distributed DP sends.

Flower's client mod (``secaggplus_mod``) takes float values x, multiplies them by the weight
ratio w = num-examples / max-weight, and quantizes each over [-c, c] (c = ``secagg-clipping-range``)
to one of ``LEVELS`` levels with stochastic rounding::

    q(x) = round_stochastic( (clip(w x, -c, c) + c) * LEVELS / (2 c) )

Distributed DP needs the *integer* vector k it computed (clipped gradients on an integer grid
plus Skellam noise, ``privacy.skellam``) to reach the sum unchanged: rounding or clipping one
site's noisy vector is not a function of the sum, so no privacy argument about the sum would
cover it. :func:`quantizer_input` gives the mod the float x for which q(x) = j + LEVELS / 2
exactly, j being k wrapped into [-LEVELS/2, LEVELS/2): with w = 1 and c a power of two every
factor is a power of two, so x and the products are exact in float32 (|j| < 2^21 < 2^24), the
value is already an integer (nothing to round) and never outside [-c, c] (nothing to clip).

The wrap is modular arithmetic: LEVELS divides the modulus 2^32 of SecAgg's masks, so the
unmasked sum mod LEVELS is (sum of the k_i) mod LEVELS, a function of the integer sum alone,
whatever the wraps. :func:`integer_sum` reads it back as the representative in
[-LEVELS/2, LEVELS/2): exact while the true sum stays in that range (2^21 grid units per value,
far above what ``client.distributed_site`` puts there), and only wrong, never less private, past it.
"""

from __future__ import annotations

import math

import numpy as np

LEVELS = 2**22  # quantization levels per value (Flower's default quantization range)
MODULUS = 2**32  # masks and sums live mod this: with 2^22 levels a sum of up to 1023 sites cannot wrap
HALF = LEVELS // 2


def is_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(value)
    return value > 0 and mantissa == 0.5


def wrapped(k: np.ndarray) -> np.ndarray:
    """k mod LEVELS as the representative in [-LEVELS/2, LEVELS/2)."""
    return (np.asarray(k, dtype=np.int64) + HALF) % LEVELS - HALF


def quantizer_input(k: np.ndarray, clipping_range: float) -> np.ndarray:
    """The float32 values that Flower's quantization at weight ratio 1 maps to
    ``wrapped(k) + LEVELS / 2`` exactly (``clipping_range`` a power of two)."""
    if not is_power_of_two(clipping_range):
        raise ValueError(f"the grid needs a power-of-two clipping range, got {clipping_range!r}")
    return (wrapped(k) * (clipping_range / HALF)).astype(np.float32)


def integer_sum(quantized_sum: np.ndarray, summed: int) -> np.ndarray:
    """The sum of the sites' integer vectors (mod LEVELS, read in [-LEVELS/2, LEVELS/2)) from
    the unmasked sum of their quantized values, ``summed`` vectors each shifted by LEVELS/2."""
    return wrapped(np.asarray(quantized_sum, dtype=np.int64) - summed * HALF)
