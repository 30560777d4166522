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

**User-level DP** (a privacy unit = all rows of one user): Poisson sampling picks *units* at
rate q, and each sampled unit u contributes one gradient, the mean of its rows' gradients
``g_u = mean_{i in u} grad_i`` (:func:`group_by_unit`), which is clipped to C like an example's.
Adding or removing a user then moves the noised sum by at most C, exactly the row-level
argument with "row" read as "user", so the same accountant applies with q = b / (number of
users).

**Non-finite gradients** (an fp16 overflow, a pathological row): one NaN per-example gradient
makes the clipped sum, and so the whole noised update, NaN, an output that depends on a single
record. :func:`zero_non_finite` replaces such a unit's gradient by 0 before clipping; 0 has norm
0 <= C, so the sensitivity argument is unchanged (the unit just contributes nothing).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from privacy.secure_noise import attach_secure_noise

# Opacus' hooks fire on every frozen block whose inputs need no gradient; harmless, but torch
# warns on each backward pass.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    secure_noise: bool = False,
) -> tuple[GradSampleModule, DPOptimizer]:
    """Wrap ``model`` for per-example gradients and ``optimizer`` for clipping + noise.

    The loss given to ``backward`` must be the *mean* over the examples of that forward pass
    (Opacus rescales per-example gradients by the pass's size); the optimizer divides the
    noisy sum by ``expected_batch_size`` = q * N, which keeps the update unbiased under
    Poisson sampling. ``secure_noise`` draws the same noise from the OS CSPRNG instead of
    torch's generator (:mod:`privacy.secure_noise`).
    """
    if noise_multiplier <= 0:
        raise ValueError(f"DP-SGD needs a positive noise multiplier, got {noise_multiplier}")
    if max_grad_norm <= 0:
        raise ValueError(f"max-grad-norm must be positive, got {max_grad_norm}")
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=0.0 if secure_noise else noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    if secure_noise:
        attach_secure_noise(private_optimizer, noise_multiplier, max_grad_norm, expected_batch_size)
    return private_model, private_optimizer


def group_by_unit(optimizer: DPOptimizer, units: Sequence[int]) -> None:
    """Replace every parameter's per-example gradients (one per row of the pass) by per-unit
    means, one per distinct id in ``units`` (``units[i]`` is row i's unit), in first-seen order.
    Opacus then clips and sums per unit."""
    ids = torch.as_tensor(list(units), dtype=torch.long)
    _, inverse = torch.unique(ids, sorted=False, return_inverse=True)
    count = int(inverse.max()) + 1
    for param in optimizer.params:
        grad_sample = param.grad_sample
        index = inverse.to(grad_sample.device)
        sums = torch.zeros((count, *grad_sample.shape[1:]), dtype=grad_sample.dtype, device=grad_sample.device)
        sums.index_add_(0, index, grad_sample)
        sizes = torch.zeros(count, dtype=grad_sample.dtype, device=grad_sample.device).index_add_(
            0, index, torch.ones_like(index, dtype=grad_sample.dtype)
        )
        param.grad_sample = sums / sizes.view(-1, *([1] * (grad_sample.dim() - 1)))


def zero_non_finite(optimizer: DPOptimizer) -> int:
    """Set to 0 every per-example (per-unit) gradient with a NaN or infinite entry in any
    parameter, before Opacus clips them; returns how many (for the site's own log only).

    The test is on each gradient's sum of entries, one pass over memory (``isfinite().all()``
    took six times as long, 1.3% of a DP step): a NaN or infinite entry makes the sum NaN or
    infinite. In fp32 and bf16 a sum of finite entries overflows only with entries whose
    squares overflow the norm too (torch does not rescale it), so Opacus would clip that
    gradient to 0 anyway (factor C / ||g|| = 0); in fp16 a large finite gradient can be zeroed
    instead of clipped. Either way, zeroing a unit's gradient depends on that unit alone, which
    is the whole privacy argument above."""
    params = [p for p in optimizer.params if getattr(p, "grad_sample", None) is not None]
    if not params:
        return 0
    finite = torch.ones(params[0].grad_sample.shape[0], dtype=torch.bool, device=params[0].grad_sample.device)
    for param in params:
        finite &= torch.isfinite(param.grad_sample.flatten(1).sum(dim=1))
    bad = int((~finite).sum())
    if bad:
        for param in params:
            param.grad_sample = torch.where(
                finite.view(-1, *([1] * (param.grad_sample.dim() - 1))), param.grad_sample, torch.zeros_like(param.grad_sample)
            )
    return bad


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


def rng_mode(device: torch.device, secure_noise: bool = False) -> str:
    """The noise source, recorded in the ledger: the OS CSPRNG with ``secure_noise``, else
    Opacus' draw from torch's default generator (Mersenne Twister on CPU, Philox on CUDA),
    which is not cryptographically secure."""
    if secure_noise:
        return "os-urandom"
    return "torch-philox" if device.type == "cuda" else "torch-mt19937"
