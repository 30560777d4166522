"""Gaussian noise for DP-SGD from the operating system's CSPRNG instead of torch's generator.

Why: Opacus draws its noise from torch's default generator (Mersenne Twister on CPU). That
generator is not cryptographically secure: ``torch.manual_seed`` reproduces it, and its state
can be recovered from enough of its outputs. Whoever knows the state can subtract the noise and
read the clipped gradient sum, which then has no privacy at all. Opacus' own ``secure_mode``
needs torchcsprng, which has no build for current torch.

Sampling. The bytes come from ``os.urandom`` (the kernel CSPRNG, ``getrandom(2)`` on Linux).
Each 64-bit word w gives one uniform number from its top 53 bits, k = w >> 11:

    u = (k + 1) / 2^53,   u in {1, 2, ..., 2^53} / 2^53,  so u in (0, 1]

Why 53 bits: a float64 significand holds 53 bits. Every integer k + 1 <= 2^53 is exactly
representable, and dividing it by 2^53 only changes the exponent, so u is exactly uniform on
the grid. The usual shortcuts go wrong in three ways. Dividing a full 64-bit word by 2^64
rounds: nearby words collapse onto one float unevenly, and the top ones round to 1.0. A
float32 uniform has only 24 bits, so it is coarse. And u = 0 is possible, which makes
log(u) infinite. The grid above avoids all three. It also sets the tail: |z| <= sqrt(2 * 53 * ln 2)
~= 8.6 standard deviations (24 bits would stop at ~5.8).

Box-Muller turns each pair (u1, u2) into two independent standard normals, and both are used:

    r = sqrt(-2 ln u1),   z1 = r cos(2 pi u2),   z2 = r sin(2 pi u2)

Why float64: log, sqrt, cos and sin are evaluated in float64 and rounded once to the target
dtype at the end; in float32 each of them would add its own rounding error on top of the
coarse 24-bit uniforms.

What this does not fix. Floating-point attacks are a separate problem. Mironov (CCS 2012) showed
that a textbook Laplace sampler in double precision leaves gaps in the set of floats it can
output, and that these gaps can reveal the unnoised value. Gaussian samplers in floating point
have related issues (Jin et al., arXiv:2112.05307, demonstrate them against Opacus' sampler; the
mitigation Opacus' ``secure_mode`` adopts is Holohan and Braghin, arXiv:2107.10138). This module
makes no claim about floating-point attacks: it removes only the predictable-generator
weakness.

Integration with Opacus, public APIs only. Build Opacus' ``DPOptimizer`` with
``noise_multiplier=0.0``. It still clips per-example gradients, sums them and divides by the
expected batch size, and its ``_generate_noise`` returns zeros for std 0. Then
:func:`attach_secure_noise` adds the noise in a step pre-hook of the wrapped (inner) torch
optimizer. ``DPOptimizer.step`` runs ``pre_step`` (clip, add noise, scale) and then
``original_optimizer.step()``, so the hook sees the scaled clipped mean
(1/B) sum_i clip_C(g_i) and adds N(0, (sigma C / B)^2 I). That equals Opacus' (sum + N(0,
sigma^2 C^2 I)) / B. A step skipped for gradient accumulation (``signal_skip_step``) never
reaches the inner step, so it gets no noise, as in Opacus. An empty Poisson batch does reach
it, so it gets noise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch.utils.hooks import RemovableHandle


def secure_gaussian(
    shape: Sequence[int],
    std: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Samples of N(0, std^2) with the given shape from ``os.urandom``, via 53-bit uniforms
    and Box-Muller in float64 (see the module docstring). They are drawn on the CPU, then cast
    to ``dtype`` and copied to ``device``."""
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")
    size = math.prod(shape)
    pairs = (size + 1) // 2
    words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1, u2 = ((words >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1)) * std
    angle = 2.0 * math.pi * u2
    samples = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))[:size]
    return torch.from_numpy(samples).reshape(tuple(shape)).to(device=device, dtype=dtype)


def attach_secure_noise(
    dp_optimizer: DPOptimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
) -> RemovableHandle:
    """Make every update of ``dp_optimizer`` add secure N(0, (sigma C / (B k))^2) noise to each
    parameter's gradient: sigma = ``noise_multiplier``, C = ``max_grad_norm``,
    B = ``expected_batch_size``.

    ``dp_optimizer`` must have been built with ``noise_multiplier=0.0``, the same C and B, and
    ``loss_reduction="mean"``. k is ``dp_optimizer.accumulated_iterations``, the number of
    backward passes stacked in ``grad_sample``; it is 1 unless several backward passes run
    between two steps. Opacus divides by B k, so the hook does too. Returns the hook's handle;
    ``handle.remove()`` detaches it.
    """
    if dp_optimizer.noise_multiplier != 0:
        raise ValueError("build the DPOptimizer with noise_multiplier=0.0, or the noise is added twice")
    if dp_optimizer.loss_reduction != "mean":
        raise ValueError(f"expected loss_reduction='mean', got {dp_optimizer.loss_reduction!r}")
    if (dp_optimizer.max_grad_norm, dp_optimizer.expected_batch_size) != (max_grad_norm, expected_batch_size):
        raise ValueError(
            f"the DPOptimizer clips at {dp_optimizer.max_grad_norm} and averages over "
            f"{dp_optimizer.expected_batch_size}; the noise was asked for {max_grad_norm} and {expected_batch_size}"
        )
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier}")
    params = dp_optimizer.params
    std = noise_multiplier * max_grad_norm / expected_batch_size

    def add_secure_noise(*_: object) -> None:
        step_std = std / dp_optimizer.accumulated_iterations
        with torch.no_grad():
            for p in params:
                p.grad.add_(secure_gaussian(p.grad.shape, step_std, dtype=p.grad.dtype, device=p.grad.device))

    return dp_optimizer.original_optimizer.register_step_pre_hook(add_secure_noise)
