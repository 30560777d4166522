"""Local fine-tuning of the adapter at a site, with or without DP-SGD."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fedlora.tasks import collate, forward_logits, per_example_loss
from privacy.dp_sgd import make_private, noise_only_step, poisson_batches


@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float
    batch_size: int
    epochs: int = 1
    steps: int = 0  # when > 0, overrides epochs
    physical_batch_size: int = 0  # split larger batches to bound memory; 0 = no split
    device: torch.device = torch.device("cpu")
    seed: int = 0

    def sample_rate(self, num_examples: int) -> float:
        return min(1.0, self.batch_size / num_examples)

    def planned_steps(self, num_examples: int) -> int:
        if self.steps > 0:
            return self.steps
        return self.epochs * math.ceil(num_examples / self.batch_size)


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    sample_rate: float
    seconds: float

    @property
    def examples_per_second(self) -> float:
        return self.steps * self.sample_rate * self.num_examples / max(self.seconds, 1e-9)


def train(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    task: str,
    pad_token_id: int,
    settings: TrainSettings,
    dp: DPSettings | None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Run ``settings.planned_steps`` optimizer steps on ``examples``; returns the mean loss.

    With DP, batches are Poisson-sampled (rate q = batch_size / N) as the accounting assumes;
    without DP, batches are shuffled mini-batches. Either way the number of steps is the planned
    one, so the ledger records exactly what ran.

    ``proximal_mu`` = mu > 0 is FedProx: the local objective becomes
    loss(w) + (mu/2) ||w - w_global||^2 over the trainable (adapter) parameters, w_global being
    their values on entry, i.e. the global adapter the site just loaded (see
    :func:`_add_proximal_gradient`).
    """
    n = len(examples)
    if n == 0:
        raise ValueError("no training examples at this site")
    q, steps = settings.sample_rate(n), settings.planned_steps(n)
    device = settings.device
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    if proximal_mu > 0:
        _add_proximal_gradient(optimizer, params, proximal_mu)
    runner = model
    if dp is not None:
        runner, optimizer = make_private(model, optimizer, dp.noise_multiplier, dp.max_grad_norm, settings.batch_size)
        batches = poisson_batches(n, q, steps, generator)
    else:
        batches = _shuffled_batches(n, settings.batch_size, steps, generator)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    chunk = settings.physical_batch_size or settings.batch_size

    start, loss_sum, loss_count = time.perf_counter(), 0.0, 0
    try:
        for indices in tqdm(batches, total=steps, desc="local training", leave=False, disable=None):
            if not indices:  # only possible with Poisson sampling
                noise_only_step(optimizer)
                continue
            chunks = [indices[lo : lo + chunk] for lo in range(0, len(indices), chunk)]
            for number, part_indices in enumerate(chunks, start=1):
                part = [examples[i] for i in part_indices]
                batch = {k: v.to(device) for k, v in collate(part, pad_token_id, task).items()}
                with autocast:
                    losses = per_example_loss(forward_logits(runner, batch), batch["labels"], task)
                loss_sum, loss_count = loss_sum + float(losses.detach().sum()), loss_count + len(part)
                if dp is None:  # weight each pass so that the gradients add up to the batch mean
                    (losses.mean() * len(part) / len(indices)).backward()
                    continue
                losses.mean().backward()  # Opacus wants each pass's mean (it rescales per example)
                if number < len(chunks):
                    # Opacus' own gradient accumulation (as in its BatchMemoryManager): clip and
                    # add this pass's examples, no noise and no update until the last pass.
                    optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        if dp is not None:
            runner.to_standard_module()  # remove Opacus hooks, even after a failure: the model is reused
    return TrainResult(
        loss=loss_sum / loss_count if loss_count else math.nan,
        num_examples=n,
        steps=steps,
        sample_rate=q,
        seconds=time.perf_counter() - start,
    )


def _add_proximal_gradient(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], mu: float) -> None:
    """Make every step of ``optimizer`` descend (mu/2) ||w - w0||^2 too, w0 = ``params`` now.

    The term's gradient mu (w - w0) is added to each parameter's gradient just before the
    update (an optimizer step pre-hook): identical to adding the term to the loss. It must not
    go through the loss under DP-SGD: Opacus replaces the gradient with the clipped, noised sum
    of *per-example* gradients, and a term with no per-example part would be silently dropped.
    Added after Opacus, it costs no privacy: it involves no data, only the weights and the
    global adapter (post-processing).
    """
    anchors = [p.detach().clone() for p in params]

    def add_proximal_gradient(*_: object) -> None:
        with torch.no_grad():
            for p, anchor in zip(params, anchors, strict=True):
                pull = mu * (p - anchor)
                if p.grad is None:
                    p.grad = pull
                else:
                    p.grad.add_(pull)

    # On the plain optimizer: a DPOptimizer wrapping it calls its step after adding the noise.
    optimizer.register_step_pre_hook(add_proximal_gradient)


def _shuffled_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator).tolist()
        for lo in range(0, n, batch_size):
            if done == steps:
                return
            yield order[lo : lo + batch_size]
            done += 1
