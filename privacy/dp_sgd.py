"""DP-SGD on the adapter parameters, built from Opacus' own parts.

One DP-SGD step on a Poisson-sampled batch B (each example included independently with
probability q) is

    g = (1 / E[|B|]) * ( sum_{i in B} clip_C(grad_i) + N(0, sigma^2 C^2 I) ),
    clip_C(v) = v * min(1, C / ||v||_2)

with per-example gradients ``grad_i`` computed by Opacus' ``GradSampleModule`` hooks,
clipping norm C (``max-grad-norm``) and noise multiplier sigma. The privacy accounting
(``privacy.accountant``) assumes exactly this: Poisson sampling with rate q, a fixed number of
steps, and noise added on *every* step, including steps whose batch happens to be empty.

Only parameters with ``requires_grad`` (the LoRA matrices and the task head) get per-example
gradients; the frozen base model is never touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

# Opacus' hooks fire on every frozen block whose inputs need no gradient; harmless, but torch
# warns on each backward pass.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
) -> tuple[GradSampleModule, DPOptimizer]:
    """Wrap ``model`` for per-example gradients and ``optimizer`` for clipping + noise.

    The loss given to ``backward`` must be the *mean* over the examples of that forward pass
    (Opacus rescales per-example gradients by the pass's size); the optimizer divides the
    noisy sum by ``expected_batch_size`` = q * N, which keeps the update unbiased under
    Poisson sampling.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"DP-SGD needs a positive noise multiplier, got {noise_multiplier}")
    if max_grad_norm <= 0:
        raise ValueError(f"max-grad-norm must be positive, got {max_grad_norm}")
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    return private_model, private_optimizer


def noise_only_step(optimizer: DPOptimizer) -> None:
    """Take the step of an empty Poisson batch: no example contributes, the noise still does.

    Skipping the step instead would reveal that the batch was empty, which the accounting does
    not cover.
    """
    for param in optimizer.params:
        param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def poisson_batches(
    num_examples: int, sample_rate: float, steps: int, generator: torch.Generator | None = None
) -> Iterator[list[int]]:
    """``steps`` batches of example indices, each index included independently with
    probability ``sample_rate`` (batches may be empty or uneven)."""
    sampler = UniformWithReplacementSampler(
        num_samples=num_examples, sample_rate=sample_rate, generator=generator, steps=steps
    )
    for indices in sampler:
        yield [int(i) for i in indices]


def rng_mode(device: torch.device) -> str:
    """The noise source, recorded in the ledger: Opacus draws from torch's default generator
    (Mersenne Twister on CPU, Philox on CUDA), not a cryptographically secure one."""
    return "torch-philox" if device.type == "cuda" else "torch-mt19937"
