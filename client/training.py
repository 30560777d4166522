"""Local fine-tuning of the adapter at a site, with or without DP-SGD."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from client.batching import PASS_COST_TOKENS, UNMEASURED_PASS_COST, length_grouped_batches, length_passes
from fedlora.tasks import collate, forward_logits, per_example_loss
from privacy.dp_sgd import group_by_unit, make_private, noise_only_step, poisson_batches, zero_non_finite


@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float
    batch_size: int  # expected batch: under DP the Poisson rate is batch_size / population
    steps: int
    physical_batch_size: int = 0  # split larger batches to bound memory; 0 = no split
    device: torch.device = torch.device("cpu")
    seed: int = 0

    def sample_rate(self, population: int) -> float:
        """q = b / N for a population of N privacy units (rows, or users)."""
        return min(1.0, self.batch_size / population)


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    secure_noise: bool = False


@dataclass(frozen=True)
class TrainResult:
    """For the site's own log: none of it leaves a DP site (the ledger and the noised releases
    say what the server may know)."""

    loss: float
    num_examples: int
    steps: int
    sample_rate: float
    seconds: float
    zeroed_gradients: int = 0  # non-finite per-unit gradients replaced by 0 (DP only)
    rows_trained: int = 0  # rows in all batches (under DP a sum of Poisson batch sizes: private)

    @property
    def examples_per_second(self) -> float:
        return self.rows_trained / max(self.seconds, 1e-9)


MAX_ROWS_PER_UNIT = 16
"""User-level DP: a sampled user contributes the mean gradient of at most this many of its rows
(drawn at random). The clip bounds the user's influence whatever the count; the cap bounds the
batch a prolific user would otherwise bring."""


def train(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    task: str,
    pad_token_id: int,
    settings: TrainSettings,
    dp: DPSettings | None,
    proximal_mu: float = 0.0,
    units: Sequence[int] | None = None,
    population: int | None = None,
    collate_batch: Callable[[Sequence[dict]], dict[str, torch.Tensor]] | None = None,
) -> TrainResult:
    """Run ``settings.steps`` optimizer steps on ``examples``; returns the mean loss.

    With DP, batches are Poisson-sampled (rate q = batch_size / population) as the accounting
    assumes, over privacy units: ``units[i]`` is example i's unit (default: each example its
    own), and ``population`` the public number of units the rate is computed from (default:
    the number of units present). Without DP, batches are shuffled mini-batches of examples.
    Either way the number of steps is the planned one, so the ledger records exactly what ran.
    Without DP the batches group rows of similar length; with DP each sampled batch is computed
    in passes of similar length (:mod:`client.batching`), which changes the padding, not the
    update.

    ``proximal_mu`` = mu > 0 is FedProx: the local objective becomes
    loss(w) + (mu/2) ||w - w_global||^2 over the trainable (adapter) parameters, w_global being
    their values on entry, i.e. the global adapter the site just loaded (see
    :func:`_add_proximal_gradient`).

    ``collate_batch`` turns a list of examples into the model's inputs (default: token ids
    padded by :func:`fedlora.tasks.collate`; the probe phase passes cached features).
    """
    n = len(examples)
    if n == 0 and dp is None:
        raise ValueError("no training examples at this site")
    # With DP and no usable row, every step is a noise-only step: the site answers like any
    # other, since whether it holds usable rows is itself private.
    collate_batch = collate_batch or (lambda part: collate(part, pad_token_id, task))
    members = unit_members(units if units is not None else range(n))
    lengths = [len(example.get("input_ids", ())) for example in examples]  # cached features: all 0
    population = population or len(members)
    q, steps = settings.sample_rate(population), settings.steps
    device = settings.device
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    optimizer.zero_grad(set_to_none=True)  # the model is kept warm across messages: no earlier gradient may leak in
    if proximal_mu > 0:
        _add_proximal_gradient(optimizer, params, proximal_mu)
    runner = model
    if dp is not None:
        runner, optimizer = make_private(
            model, optimizer, dp.noise_multiplier, dp.max_grad_norm, settings.batch_size, dp.secure_noise
        )
        batches = (
            [rows_of_unit(members[u], generator) for u in sampled]
            for sampled in (poisson_batches(len(members), q, steps, generator) if members else ([] for _ in range(steps)))
        )
    else:
        batches = ([[i] for i in batch] for batch in length_grouped_batches(lengths, settings.batch_size, steps, generator))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    # Passes are cut for padding (client.batching), and bounded only where physical-batch-size
    # asks: splitting every Poisson batch over its expected size in two doubled the passes for
    # memory the site did not ask to save.
    max_rows = settings.physical_batch_size or math.inf
    pass_cost = PASS_COST_TOKENS.get(device.type, UNMEASURED_PASS_COST)

    start, loss_sum, loss_count, zeroed, rows_trained = time.perf_counter(), 0.0, 0, 0, 0
    with without_dropout(model) if dp is not None else nullcontext():
        try:
            for groups in tqdm(batches, total=steps, desc="local training", leave=False, disable=None):
                if not groups:  # only possible with Poisson sampling
                    noise_only_step(optimizer)
                    continue
                passes = length_passes(groups, lengths, max_rows, pass_cost)
                rows_in_batch = sum(len(g) for g in groups)
                for number, pass_groups in enumerate(passes, start=1):
                    indices = [i for group in pass_groups for i in group]
                    part = [examples[i] for i in indices]
                    rows_trained += len(part)
                    batch = {k: v.to(device) for k, v in collate_batch(part).items()}
                    with autocast:
                        losses = per_example_loss(forward_logits(runner, batch), batch["labels"], task)
                    finite = torch.isfinite(losses.detach())
                    loss_sum += float(losses.detach()[finite].sum())
                    loss_count += int(finite.sum())
                    if dp is None:  # weight each pass so that the gradients add up to the batch mean
                        (losses.mean() * len(part) / rows_in_batch).backward()
                        continue
                    losses.mean().backward()  # Opacus wants each pass's mean (it rescales per example)
                    if any(len(group) > 1 for group in pass_groups):
                        group_by_unit(optimizer, [u for u, group in enumerate(pass_groups) for _ in group])
                    zeroed += zero_non_finite(optimizer)
                    if number < len(passes):
                        # Opacus' own gradient accumulation (as in its BatchMemoryManager): clip and
                        # add this pass's units, no noise and no update until the last pass.
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
        zeroed_gradients=zeroed,
        rows_trained=rows_trained,
    )


@contextmanager
def without_dropout(model: torch.nn.Module) -> Iterator[None]:
    """Every dropout probability 0 while inside, restored after (the model is reused).

    Under DP-SGD, dropout only adds variance to an update the Gaussian noise already
    regularises; Li et al. 2021 (arXiv 2110.05679) fine-tune without it. Setting ``p`` (not
    ``eval()`` on the modules) matters: BERT's attention hands its dropout module's ``p`` to
    ``scaled_dot_product_attention`` whenever the attention layer trains, and a non-zero one
    also pushes that kernel off its fast path. Dropout modules hold no parameters, so Opacus'
    per-sample hooks are unaffected."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    saved = [module.p for module in layers]
    for module in layers:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in zip(layers, saved, strict=True):
            module.p = p


def unit_members(units: Iterable[int]) -> list[list[int]]:
    """Example indices of each unit, units numbered in first-seen order."""
    members: dict[int, list[int]] = {}
    for index, unit in enumerate(units):
        members.setdefault(unit, []).append(index)
    return list(members.values())


def rows_of_unit(rows: list[int], generator: torch.Generator) -> list[int]:
    """A unit's rows, at most MAX_ROWS_PER_UNIT of them drawn at random (user-level DP)."""
    if len(rows) <= MAX_ROWS_PER_UNIT:
        return rows
    chosen = torch.randperm(len(rows), generator=generator)[:MAX_ROWS_PER_UNIT].tolist()
    return [rows[i] for i in sorted(chosen)]


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
