"""A site's round under distributed DP (``dp-mode = distributed``): at the global adapter it
received, the full-batch sum of its units' clipped gradients on SecAgg's integer grid, plus its
share of the Skellam noise (``privacy.distributed_dp``), for SecAgg+ to sum with the other sites'.

The site takes part only inside a SecAgg+ round (a server that asks for distributed DP without
it would see one site's vector, whose share is too little noise alone), and only if its node
config names ``distributed-dp-colluders``: how many sites it assumes may collude with the server.
The run config's value is a floor. The site adds at least the run's public share and more where
its own target asks for it, and records the z it can count on: its own share and the others'
public ones (``privacy.distributed_dp.Shares``, ``privacy.plan.plan_distributed``); the charge
goes to the ledger before the gradient is computed, as ``distributed:skellam``. A site's own
``audit-canaries`` are not used in distributed rounds (no adapter of its own to audit).

The phases are the run's (``privacy.plan``): the head alone on the encoder's cached features in
the probe rounds, LoRA and the head after; each round is one gradient step, taken by the server.
"""

from __future__ import annotations

import math
import secrets
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from opacus import GradSampleModule
from tqdm.auto import tqdm

from client.probe import FeatureHead, ProbeError, classification_head, stack_features
from client.refusals import RefusedRound
from client.site import Site, TrainOutcome, budget_line
from client.training import rows_of_unit, unit_members, without_dropout
from fedlora.adapters import adapter_state, state_key
from fedlora.tasks import collate, forward_logits, per_example_loss
from privacy.budget import BudgetExhausted, EffectiveDP, PolicyViolation, SitePolicy
from privacy.distributed_dp import Shares, grid_scale, grid_sensitivity, rounded_units, site_shares
from privacy.dp_sgd import rng_mode
from privacy.ledger import Charge
from privacy.plan import PROBE, choose_schedule, phase_of, plan_distributed, public_noise_multiplier
from privacy.release import train_loss_charge
from privacy.skellam import MECHANISM, skellam_noise

ROWS_PER_PASS = 64  # rows whose per-example gradients are held at once


SAMPLER = "skellam:numpy-pcg64"  # the ledger's rng_mode (privacy.skellam), beside the releases' Gaussian one


def trained_parameters(model: torch.nn.Module, phase: str) -> list[torch.nn.Parameter]:
    """What a round of ``phase`` computes the gradient of: the head alone when probing, else
    every trainable tensor (LoRA and the head; FFA-LoRA's frozen A is not trainable)."""
    if phase == PROBE:
        return list(classification_head(model).parameters())
    return [p for p in model.parameters() if p.requires_grad]


def adapter_layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the site's own adapter, in order: the vector a round sends
    covers all of them (d values), whatever the round trains and whatever the server sent."""
    return {name: tuple(tensor.shape) for name, tensor in adapter_state(model).items()}


def adapter_sensitivity(model: torch.nn.Module) -> float:
    """D2 for the site's adapter (``privacy.distributed_dp``), the same every round."""
    return grid_sensitivity(sum(math.prod(shape) for shape in adapter_layout(model).values()))


class DistributedSite(Site):
    def train(self, global_adapter: ArrayRecord, server_round: int, proximal_mu: float = 0.0) -> TrainOutcome:
        """One round's integer vector (``TrainOutcome.grid``); ``proximal_mu`` has no meaning here."""
        policy, dp = self._privacy()
        if not dp.enabled:
            raise RefusedRound("policy-refused", "dp-mode", "dp-mode = distributed is a DP mode, and DP is off")
        if dp.secure_noise:
            raise RefusedRound("policy-refused", "secure-noise", "secure-noise asks for CSPRNG noise; distributed DP's "
                               "Skellam sampler is numpy's PCG64 (privacy.skellam), so this site takes no part")
        data = self._data(policy, dp)
        model, tokenizer = self._model(global_adapter)
        encoded = self._encode(data.train, data.units(data.train), tokenizer, "training")
        population = self._population(policy, dp, encoded.num_units)
        phases = choose_schedule(self.run, population, True)
        phase = phase_of(phases, server_round)
        params = self._trained(model, phase.name)
        layout = adapter_layout(model)
        dimensions = sum(math.prod(shape) for shape in layout.values())
        shares = self._shares(policy, grid_sensitivity(dimensions))
        release_sigma = policy.metric_noise_multiplier if policy.report_metrics == "noised" else None
        z, own_variance = self._plan_shares(dp, phases, release_sigma, shares)
        unit = f"user:{policy.privacy_unit_column}" if policy.privacy_unit_column else "row"
        charges = [Charge(MECHANISM, z, 1.0, 1, shares.sensitivity, unit)]
        if release_sigma is not None:
            charges.append(train_loss_charge(release_sigma, phase.sample_rate, unit))
        if phase.name == PROBE:  # before the charge: a model the probe cannot read is refused for free
            features = self._features(model, tokenizer, encoded)
            runner = FeatureHead(classification_head(model))
            examples = [{"features": x, "labels": e["labels"]} for x, e in zip(features, encoded.examples)]
            batches = stack_features
        else:
            runner, examples = model, encoded.examples
            batches = lambda part: collate(part, tokenizer.pad_token_id, self.run.data.task)  # noqa: E731
        with self._ledger(policy) as ledger:
            before = self._spent(ledger, dp)
            spends = self._charge(ledger, charges, server_round, dp, f"{SAMPLER},release:{rng_mode(self.device, False)}")
            total, zeroed = self._gradient_sum(runner, params, examples, encoded.units, batches, dp.max_grad_norm, dimensions)
            vector = skellam_noise(dimensions, own_variance)
            names = {id(p): state_key(n) for n, p in model.named_parameters()}
            offsets, start = {}, 0
            for name, shape in layout.items():
                offsets[name], start = start, start + math.prod(shape)
            at = 0
            for p in params:  # the trained values' places in the adapter's vector
                vector[offsets[names[id(p)]]:offsets[names[id(p)]] + p.numel()] += total[at:at + p.numel()].numpy()
                at += p.numel()
            released = {}
            if release_sigma is not None:
                released["train-loss"] = self._released_train_loss(model, tokenizer, encoded, population, spends[1], dp)
            for spend in spends:
                ledger.confirm(spend.id)
            anchor = ledger.anchor()
            after = self._spent(ledger, dp)
        log(INFO, "%s round %s: distributed DP gradient (%s), %s; %s rows (%s units), z %.4g (own share and %s "
            "others'), %s units zeroed", self.name, server_round, phase.name, budget_line(before, after, dp),
            len(encoded.examples), encoded.num_units, z, shares.counted_others, zeroed)
        grid = {name: vector[offsets[name]:offsets[name] + math.prod(shape)].reshape(shape) for name, shape in layout.items()}
        metrics: dict[str, float | int] = {
            "num-examples": population, "steps": 1, "sample-rate": 1.0, "noise-multiplier": z,
            "max-grad-norm": dp.max_grad_norm, "delta": dp.delta, "max-epsilon": dp.max_epsilon, "dp": 1,
            "user-level": int(policy.privacy_unit_column is not None), "lora-rank": self.lora_rank,
            "grid-scale": grid_scale(dimensions, dp.max_grad_norm), "epsilon": spends[-1].epsilon, **released,
        }
        return TrainOutcome(adapter={}, metrics=metrics, anchor=anchor, grid=grid)

    def _shares(self, policy: SitePolicy, sensitivity: float) -> Shares:
        """The shares this site counts on (``privacy.distributed_dp.Shares``), from the run's public
        multiplier; refused unless the site opted in and counts at least its own share."""
        run = self.run.dp
        if not run.noise_multiplier and not (run.target_epsilon > 0 and run.delta > 0):
            raise RefusedRound("policy-refused", "target-epsilon", "dp-mode = distributed needs the run's public "
                               "multiplier: noise-multiplier, or target-epsilon and delta")
        try:
            public = public_noise_multiplier(self.run, sensitivity)
            return site_shares(sensitivity, public, self.run.secure_sum_minimum, policy.distributed_dp_colluders,
                               run.distributed_dp_colluders)
        except PolicyViolation as err:
            raise RefusedRound("policy-refused", err.setting, str(err)) from err

    def _plan_shares(self, dp: EffectiveDP, phases, release_sigma: float | None, shares: Shares) -> tuple[float, float]:
        """The z this site can count on and its own share's variance (``privacy.plan.plan_distributed``)."""
        try:
            plan, own_variance = plan_distributed(dp, phases, release_sigma, shares)
        except BudgetExhausted as err:
            if dp.target_epsilon == dp.run_allowance:  # the site's budget bound the target, not the run config
                raise RefusedRound("budget-exhausted", "max-epsilon-per-run", str(err)) from err
            raise RefusedRound("policy-refused", "target-epsilon", str(err)) from err
        return plan.noise_multiplier, own_variance

    def _trained(self, model: torch.nn.Module, phase: str) -> list[torch.nn.Parameter]:
        try:
            return trained_parameters(model, phase)
        except ProbeError as err:
            raise RefusedRound("model-error", "probe-rounds", str(err)) from err

    def _gradient_sum(self, runner: torch.nn.Module, params: list[torch.nn.Parameter], examples: list[dict[str, Any]],
                      units: list[int], batches, max_grad_norm: float, dimensions: int) -> tuple[torch.Tensor, int]:
        """Sum over units of r_u (``privacy.distributed_dp.rounded_units``): each unit's gradient is
        the mean of its rows' (at most MAX_ROWS_PER_UNIT, drawn at random), units whole in a pass."""
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        groups = [rows_of_unit(rows, generator) for rows in unit_members(units)]
        passes, current = [], []
        for group in groups:
            if current and sum(map(len, current)) + len(group) > ROWS_PER_PASS:
                passes.append(current)
                current = []
            current.append(group)
        passes += [current] if current else []
        total, zeroed = torch.zeros(sum(p.numel() for p in params), dtype=torch.int64), 0
        sampler = GradSampleModule(runner, batch_first=True, loss_reduction="sum")
        try:
            with without_dropout(runner):
                runner.to(self.device).train()
                for pass_groups in tqdm(passes, desc="distributed DP gradient", leave=False, disable=None):
                    rows = [i for group in pass_groups for i in group]
                    batch = {k: v.to(self.device) for k, v in batches([examples[i] for i in rows]).items()}
                    per_example_loss(forward_logits(sampler, batch), batch["labels"], self.run.data.task).sum().backward()
                    flat = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
                    owner = torch.tensor([u for u, group in enumerate(pass_groups) for _ in group])
                    sizes = torch.bincount(owner).to(flat.dtype).unsqueeze(1)
                    unit_means = torch.zeros(len(pass_groups), flat.shape[1], dtype=flat.dtype).index_add_(0, owner, flat.cpu()) / sizes
                    part, dropped = rounded_units(unit_means, max_grad_norm, dimensions, generator)
                    total += part
                    zeroed += dropped
                    for p in params:
                        p.grad_sample = None
                        p.grad = None
        finally:
            sampler.to_standard_module()  # remove Opacus' hooks, even after a failure
        return total, zeroed
