"""The secure noise source (``privacy.secure_noise``): right distribution, not reproducible
from torch's seed, and in Opacus' DP-SGD step exactly where Opacus would put its own noise.

The DP-SGD tests use a linear model and the loss mean_i sum_j (W x_i + b)_j. Its per-example
gradient (dW = 1 x_i^T, db = 1) does not depend on the weights, so every step has the same
clipped mean gradient g. With SGD at lr 1 an update is -(g + noise), so the noise of each step
can be read off exactly. Each statistical check fails by chance in at most 1 run in 10^4
(mean and std at 4.5 standard errors, Kolmogorov-Smirnov at p = 1e-4). scipy comes with Opacus.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from scipy import stats

from privacy.secure_noise import attach_secure_noise, secure_gaussian

SIGMA, CLIP, BATCH = 1.1, 0.5, 8
NOISE_STD = SIGMA * CLIP / BATCH  # std of the noise on the averaged gradient
MIN_P = 1e-4

# Opacus' hooks on a module whose input needs no gradient: harmless, but torch warns.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _normal_fit(samples: torch.Tensor, std: float) -> None:
    """Mean, std and Kolmogorov-Smirnov test of ``samples`` against N(0, std^2)."""
    x = samples.double().flatten().numpy()
    n = x.size
    assert abs(x.mean()) < 4.5 * std / math.sqrt(n)
    assert abs(x.std() / std - 1) < 4.5 / math.sqrt(2 * n)
    assert stats.kstest(x / std, "norm").pvalue > MIN_P


def test_secure_gaussian_is_normal_with_the_requested_std():
    _normal_fit(secure_gaussian((200_001,), 2.5), 2.5)  # odd size: one Box-Muller output unused


def test_both_box_muller_outputs_are_used_and_uncorrelated():
    x = secure_gaussian((2, 50_000), 1.0, dtype=torch.float64).numpy()
    cos_half, sin_half = x.reshape(2, -1)  # z1 = r cos, z2 = r sin of the same pairs
    for a, b in ((cos_half, sin_half), (cos_half**2, sin_half**2)):
        assert abs(stats.pearsonr(a, b).statistic) < 4.5 / math.sqrt(a.size)
    assert np.unique(x).size == x.size


def test_shape_dtype_and_device_are_honoured():
    x = secure_gaussian(torch.Size([3, 5, 7]), 1.0, dtype=torch.bfloat16, device="cpu")
    assert (x.shape, x.dtype, x.device.type) == ((3, 5, 7), torch.bfloat16, "cpu")
    assert secure_gaussian((0, 4), 1.0).shape == (0, 4)
    assert torch.count_nonzero(secure_gaussian((9,), 0.0)) == 0
    with pytest.raises(ValueError, match="std"):
        secure_gaussian((3,), -1.0)


def test_torch_seed_reproduces_torch_noise_but_not_secure_noise():
    torch.manual_seed(7)
    first = torch.randn(1000)
    torch.manual_seed(7)
    assert torch.equal(first, torch.randn(1000))  # torch's generator: the seed gives the noise back

    torch.manual_seed(7)
    first = secure_gaussian((1000,), 1.0)
    torch.manual_seed(7)
    assert not torch.equal(first, secure_gaussian((1000,), 1.0))


def _private_sgd(opacus_noise_multiplier: float) -> tuple[torch.nn.Linear, GradSampleModule, DPOptimizer]:
    model = torch.nn.Linear(4, 3).double()
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=opacus_noise_multiplier,
        max_grad_norm=CLIP,
        expected_batch_size=BATCH,
    )
    return model, GradSampleModule(model), optimizer


_INPUTS = torch.linspace(-1.0, 2.0, BATCH * 4, dtype=torch.float64).reshape(BATCH, 4)


def _backward(private_model: GradSampleModule) -> None:
    private_model(_INPUTS).sum(dim=1).mean().backward()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _update(model, private_model, optimizer, skipped: int = 0, stacked: int = 1) -> torch.Tensor:
    """One DP-SGD step; returns the parameter update. ``skipped`` passes go first, each closed
    by a skipped step (Opacus' gradient accumulation, as in its BatchMemoryManager); then
    ``stacked`` backward passes, whose per-example gradients Opacus stacks, precede the step."""
    before = _flat(model)
    for _ in range(skipped):
        _backward(private_model)
        optimizer.signal_skip_step(do_skip=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(stacked):
        _backward(private_model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _flat(model) - before


def _clipped_mean_gradient() -> torch.Tensor:
    """g: the update of the same step without noise, negated (SGD, lr 1)."""
    return -_update(*_private_sgd(0.0))


def _secure_sgd():
    model, private_model, optimizer = _private_sgd(0.0)
    handle = attach_secure_noise(optimizer, SIGMA, CLIP, BATCH)
    return model, private_model, optimizer, handle


def test_opacus_without_noise_gives_the_clipped_mean():
    """The premise: DPOptimizer(noise_multiplier=0) clips, sums, divides by B and adds nothing."""
    grads = torch.cat([_INPUTS.repeat(1, 3), torch.ones(BATCH, 3, dtype=torch.float64)], dim=1)
    norms = grads.norm(dim=1, keepdim=True)
    assert (norms > CLIP).all()
    expected = (grads * (CLIP / (norms + 1e-6))).sum(dim=0) / BATCH  # Opacus' clip factor
    assert torch.allclose(_clipped_mean_gradient(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("skipped", "stacked", "mean_scale", "std_scale"),
    [
        (0, 1, 1.0, 1.0),
        # a skipped pass: the clipped sum covers 2B examples, still divided by B
        (1, 1, 2.0, 1.0),
        # 2 stacked passes: Opacus divides sum and noise by 2B (accumulated_iterations = 2)
        (0, 2, 1.0, 0.5),
    ],
    ids=["one-pass", "skipped-pass", "stacked-passes"],
)
def test_secure_noise_has_opacus_std_on_top_of_the_clipped_mean(skipped, stacked, mean_scale, std_scale):
    g = _clipped_mean_gradient()
    model, private_model, optimizer, _ = _secure_sgd()
    noise = torch.stack(
        [-_update(model, private_model, optimizer, skipped, stacked) - mean_scale * g for _ in range(400)]
    )
    _normal_fit(noise, std_scale * NOISE_STD)


def test_skipped_step_adds_no_noise_and_no_update():
    model, private_model, optimizer, _ = _secure_sgd()
    before = _flat(model)
    _backward(private_model)
    optimizer.signal_skip_step(do_skip=True)
    optimizer.step()
    assert torch.equal(_flat(model), before)


def test_empty_batch_step_still_adds_noise():
    model, _, optimizer, _ = _secure_sgd()
    updates = []
    for _ in range(400):
        before = _flat(model)
        for p in optimizer.params:  # what an empty Poisson batch leaves for Opacus
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updates.append(_flat(model) - before)
    _normal_fit(torch.stack(updates), NOISE_STD)


def test_opacus_default_noise_is_removed_by_anyone_who_knows_the_seed():
    """The attack this module closes: with torch's generator, the seed gives the noise, and the
    noisy update minus that noise is the clipped gradient, i.e. no privacy at all."""
    g = _clipped_mean_gradient()
    model, private_model, optimizer = _private_sgd(SIGMA)
    torch.manual_seed(1234)
    noisy_gradient = -_update(model, private_model, optimizer)
    torch.manual_seed(1234)
    replayed = torch.cat(
        [torch.normal(0.0, SIGMA * CLIP, size=p.shape, dtype=p.dtype).flatten() / BATCH for p in model.parameters()]
    )
    assert torch.allclose(noisy_gradient - replayed, g, atol=1e-12)

    model, private_model, optimizer, _ = _secure_sgd()
    torch.manual_seed(1234)
    recovered = -_update(model, private_model, optimizer) - replayed
    assert (recovered - g).norm() > NOISE_STD  # typically sqrt(2 * 15) * NOISE_STD: replay fails


def test_secure_update_is_not_reproducible_under_the_torch_seed():
    updates = []
    for _ in range(2):
        model, private_model, optimizer, _ = _secure_sgd()
        torch.manual_seed(1234)
        updates.append(_update(model, private_model, optimizer))
    assert not torch.equal(*updates)


def test_removed_hook_adds_nothing():
    g = _clipped_mean_gradient()
    model, private_model, optimizer, handle = _secure_sgd()
    handle.remove()
    assert torch.allclose(-_update(model, private_model, optimizer), g, rtol=1e-12, atol=1e-15)


def test_refuses_an_optimizer_that_adds_its_own_noise_or_a_different_scale():
    _, _, noisy = _private_sgd(SIGMA)
    with pytest.raises(ValueError, match="noise_multiplier=0.0"):
        attach_secure_noise(noisy, SIGMA, CLIP, BATCH)
    _, _, silent = _private_sgd(0.0)
    with pytest.raises(ValueError, match="clips at"):
        attach_secure_noise(silent, SIGMA, CLIP, 2 * BATCH)
    with pytest.raises(ValueError, match="positive"):
        attach_secure_noise(silent, 0.0, CLIP, BATCH)
