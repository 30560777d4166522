"""One site's side of a round: its settings (node config first), its data, its model and its
privacy ledger.

Everything privacy-relevant is read from the site's **node config**, which only the site
controls (``privacy.budget.site_policy``); the server's run config may only tighten it
(``privacy.budget.resolve``). Under DP, what a reply carries is public configuration or a DP
release charged to the ledger *before* it is computed (see ``docs/privacy.md``):

- the adapter (DP-SGD) and, with ``report-metrics = noised``, the noised train loss and
  evaluation metrics (``privacy.release``);
- the FedAvg weight ``num-examples``: the site's declared public size, or 1 (equal weights);
- the DP parameters, the cumulative epsilon and the ledger's anchor (row count, head hash);
- on a refusal, a status code and a setting name (``client.refusals``).

Timings, the true row count and the training loss stay in the site's log.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import datasets
import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log

from client.encoding import Encoded, encode_split
from client.local_data import SiteData, load_site_data
from client.probe import FeatureCache, FeatureHead, ProbeError, classification_head, stack_features
from client.refusals import RefusedRound
from client.self_audit import SelfAudit, requested_audit
from client.site_model import at_rank, warm_model
from client.training import MAX_ROWS_PER_UNIT, DPSettings, TrainSettings, train
from fedlora.adapters import adapter_state, load_adapter_state
from fedlora.data import DataError
from fedlora.evaluation import per_example_scores
from fedlora.model import ModelError, select_device
from fedlora.run_config import RunSettings
from privacy.budget import (
    BudgetExhausted, EffectiveDP, PolicyViolation, SitePolicy, check_delta, resolve, site_policy,
)
from privacy.dp_sgd import poisson_batches, rng_mode
from privacy.ledger import Anchor, Charge, LedgerError, PrivacyLedger, Spent, spent_in_other_runs
from privacy.plan import ACCOUNTANT, PROBE, Phase, choose_schedule, phase_of, plan_run, public_population
from privacy.release import eval_charge, noised_evaluation, noised_train_loss, per_unit_means, train_loss_charge

@dataclass(frozen=True)
class TrainOutcome:
    adapter: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    anchor: Anchor | None
    grid: dict[str, Any] | None = None  # distributed DP: the integer vector for SecAgg+ (client.distributed_site)


@dataclass(frozen=True)
class EvalOutcome:
    metrics: dict[str, float | int]
    anchor: Anchor | None


class Site:
    def __init__(self, context: Context, settings: RunSettings) -> None:
        self.node: Mapping[str, Any] = context.node_config
        self.run = settings
        self.run_id = str(context.run_id)
        self.name = site_name(context)

    @property
    def lora_rank(self) -> int:
        return int(self.node.get("lora-rank", self.run.model.lora_rank))

    @property
    def device(self) -> torch.device:
        return select_device(str(self.node.get("device", "auto")))

    def train(self, global_adapter: ArrayRecord, server_round: int, proximal_mu: float = 0.0) -> TrainOutcome:
        """``proximal_mu`` > 0 (FedProx, sent by the server) adds (mu/2)||w - w_global||^2."""
        policy, dp = self._privacy()
        data = self._data(policy, dp)
        model, tokenizer = self._model(global_adapter)
        task = self.run.data.task
        audit = requested_audit(self.node, self.run_id, self.run.data, self.name)
        rows = audit.training_rows(data.train, len(self.run.data.label_names), self.name) if audit else data.train
        encoded = self._encode(rows, data.units(rows), tokenizer, "training")
        if not encoded.examples:
            if not dp.enabled:
                raise RefusedRound("data-error", "data-path", f"{data.source}: no training rows after the held-out split")
            log(WARNING, "%s: no usable training rows in %s; this round's steps add noise only", self.name, data.source)
        population = self._population(policy, dp, encoded.num_units)
        phases, noise = self._plan(policy, dp, population)
        phase = phase_of(phases, server_round)
        settings = TrainSettings(
            learning_rate=phase.learning_rate,
            batch_size=phase.batch_size,
            steps=phase.steps_per_round,
            physical_batch_size=int(self.node.get("physical-batch-size", 0)),
            device=self.device,
            # DP: sampling and noise must be secret from the server, so never seed them from
            # the run config. Without DP, the run's seed makes local training reproducible.
            seed=secrets.randbits(63) if dp.enabled else self.run.seed + server_round,
        )
        q, steps = phase.sample_rate, phase.steps_per_round
        unit = f"user:{policy.privacy_unit_column}" if policy.privacy_unit_column else "row"
        releases_loss = dp.enabled and policy.report_metrics == "noised"
        probing = phase.name == PROBE
        features = self._features(model, tokenizer, encoded) if probing else None
        charges = [Charge("dp-sgd:probe" if probing else "dp-sgd", noise, q, steps, dp.max_grad_norm, unit)]
        if releases_loss:
            charges.append(train_loss_charge(policy.metric_noise_multiplier, q, unit))
        if not dp.enabled:
            torch.manual_seed(settings.seed)
        with self._ledger(policy) as ledger:
            before = self._spent(ledger, dp)
            spends = self._charge(ledger, charges, server_round, dp, rng_mode(settings.device, dp.secure_noise))
            private = DPSettings(noise, dp.max_grad_norm, dp.secure_noise) if dp.enabled else None
            if probing:  # the head alone, on the cached features (client.probe)
                result = train(
                    FeatureHead(classification_head(model)),
                    [{"features": x, "labels": e["labels"]} for x, e in zip(features, encoded.examples)],
                    task, tokenizer.pad_token_id, settings, private, proximal_mu=proximal_mu,
                    units=encoded.units, population=population, collate_batch=stack_features,
                )
            else:
                result = train(
                    model, encoded.examples, task, tokenizer.pad_token_id, settings, private,
                    proximal_mu=proximal_mu, units=encoded.units, population=population,
                )
            released = {}
            if releases_loss:
                released["train-loss"] = self._released_train_loss(model, tokenizer, encoded, population, spends[1], dp)
            if ledger is not None:
                for spend in spends:
                    ledger.confirm(spend.id)
            anchor = ledger.anchor() if ledger is not None else None
            after = self._spent(ledger, dp)
            budget = budget_line(before, after, dp)
        if audit is not None:  # its own release, before any averaging hides part of it
            audit.report_safely(model, tokenizer, self.run, server_round, after.this_run if after else None,
                                dp.delta if dp.enabled else policy.delta, self.name, self.device, own_update=True)
        log(INFO, "%s round %s: trained (%s), %s; %s steps on %s rows (%s units), q %.4g, sigma %.4g, "
            "local train loss %.4f, %.1f s, %s non-finite gradients zeroed",
            self.name, server_round, phase.name, budget, result.steps, result.num_examples, encoded.num_units, q, noise,
            result.loss, result.seconds, result.zeroed_gradients)
        metrics: dict[str, float | int] = {
            "num-examples": _fedavg_weight(dp, encoded.num_units, population),
            "steps": steps,
            "sample-rate": q,
            "noise-multiplier": noise,
            "max-grad-norm": dp.max_grad_norm,
            "delta": dp.delta,
            "max-epsilon": dp.max_epsilon,
            "dp": int(dp.enabled),
            "user-level": int(policy.privacy_unit_column is not None),
            "lora-rank": self.lora_rank,
        }
        if dp.enabled:
            metrics |= {"epsilon": spends[-1].epsilon, **released}
        else:  # nothing is private here, and every report says so
            metrics |= {"train-loss": result.loss, "seconds": result.seconds,
                        "examples-per-second": result.examples_per_second}
        adapter = adapter_state(model, trainable_only=self.run.strategy.freezes_lora_a)
        return TrainOutcome(adapter=adapter, metrics=metrics, anchor=anchor)

    def evaluate(self, global_adapter: ArrayRecord, server_round: int) -> EvalOutcome:
        """Under DP: the noised evaluation release, charged first (or ``metrics-withheld``).
        A site auditing itself first scores its canaries under the adapter (``client.self_audit``)."""
        policy, dp = self._privacy()
        audit = requested_audit(self.node, self.run_id, self.run.data, self.name)
        if audit is not None:
            self._self_audit(audit, global_adapter, server_round, policy, dp)
        if dp.enabled and policy.report_metrics == "none":
            raise RefusedRound("metrics-withheld", "report-metrics", "node config report-metrics = none")
        data = self._data(policy, dp)
        model, tokenizer = self._model(global_adapter)
        encoded = self._encode(data.eval, data.units(data.eval), tokenizer, "evaluation")
        losses, correct, counted = per_example_scores(
            model, encoded.examples, self.run.data.task, tokenizer.pad_token_id, device=self.device
        )
        accuracies = correct / counted.clamp(min=1)
        if not dp.enabled:
            if not encoded.examples:
                return EvalOutcome({"num-examples": 0}, None)
            return EvalOutcome({
                "num-examples": len(encoded.examples), "eval-loss": float(losses.mean()),
                "eval-accuracy": float(correct.sum() / counted.sum().clamp(min=1)),
            }, None)
        population = self._population(policy, dp, encoded.num_units, held_out=True)
        unit = f"user:{policy.privacy_unit_column}" if policy.privacy_unit_column else "row"
        with self._ledger(policy) as ledger:
            before = self._spent(ledger, dp)
            (spend,) = self._charge(ledger, [eval_charge(policy.metric_noise_multiplier, unit)], server_round, dp,
                                    rng_mode(self.device, dp.secure_noise))
            metrics = noised_evaluation(
                per_unit_means(losses, encoded.units), per_unit_means(accuracies, encoded.units),
                population, spend.charge, dp.secure_noise,
            )
            ledger.confirm(spend.id)
            anchor = ledger.anchor()
            budget = budget_line(before, self._spent(ledger, dp), dp)
        log(INFO, "%s round %s: evaluated (noised release), %s; %s held-out rows", self.name, server_round, budget, len(encoded.examples))
        weight = _fedavg_weight(dp, encoded.num_units, population)
        return EvalOutcome({"num-examples": weight, **metrics, "epsilon": spend.epsilon, "dp": 1}, anchor)

    # -- privacy ------------------------------------------------------------------------------

    def _self_audit(self, audit: SelfAudit, global_adapter: ArrayRecord, server_round: int, policy: SitePolicy,
                    dp: EffectiveDP) -> None:
        """Score the canaries under the adapter against this run's spend so far (``client.self_audit``).
        Whatever fails here stays in the site's log: the evaluation goes on as without the audit."""
        try:
            model, tokenizer = self._model(global_adapter)
            with self._ledger(policy) as ledger:
                spent = self._spent(ledger, dp)
        except Exception as err:  # noqa: BLE001 - the audit never changes the reply
            log(ERROR, "%s: self-audit: %s", self.name, err)
            return
        audit.report_safely(model, tokenizer, self.run, server_round, spent.this_run if spent else None,
                            dp.delta if dp.enabled else policy.delta, self.name, self.device)

    def _privacy(self) -> tuple[SitePolicy, EffectiveDP]:
        """The site's policy and the DP settings it trains with: the server's request resolved
        against the policy, then this run's allowance applied (``privacy.budget``): the
        per-run cap it trains under, and a target epsilon no larger."""
        try:
            policy = site_policy(self.node)
            dp = resolve(policy, self.run.dp)
            if dp.enabled:
                check_delta(dp.delta, policy.declared_examples)
        except PolicyViolation as err:
            raise RefusedRound("policy-refused", err.setting, str(err)) from err
        if not dp.enabled:
            return policy, dp
        try:
            return policy, dp.for_run(spent_in_other_runs(policy.ledger_path, self.run_id, dp.delta, ACCOUNTANT))
        except LedgerError as err:
            raise RefusedRound("ledger-error", "ledger-path", str(err)) from err
        except BudgetExhausted as err:
            raise RefusedRound("budget-exhausted", err.setting, str(err)) from err

    def _spent(self, ledger: PrivacyLedger | None, dp: EffectiveDP) -> Spent | None:
        return ledger.spent(self.run_id, dp.delta, ACCOUNTANT) if ledger is not None and dp.enabled else None

    def _population(self, policy: SitePolicy, dp: EffectiveDP, present: int, held_out: bool = False) -> int:
        """Under DP, the public number of units that sampling rates and released means divide
        by: the declared ``num-examples`` times the training or held-out share
        (``eval-fraction``), never the units usable under the run's settings (a count the server
        could probe by choosing them). Without DP, the units present."""
        if not dp.enabled:
            return max(1, present)
        return public_population(policy.declared_examples, self.run.data.eval_fraction, held_out)

    def _plan(self, policy: SitePolicy, dp: EffectiveDP, population: int) -> tuple[tuple[Phase, ...], float]:
        """The run's phases (``privacy.plan.choose_schedule``) and its one sigma: given or
        calibrated so that all rounds, metric releases included, stay within the target
        epsilon, never below the site's ``min-noise-multiplier`` (0 without DP)."""
        phases = choose_schedule(self.run, population, dp.enabled)
        if not dp.enabled:
            return phases, 0.0
        release_sigma = policy.metric_noise_multiplier if policy.report_metrics == "noised" else None
        try:
            return phases, plan_run(dp, phases, release_sigma).noise_multiplier
        except BudgetExhausted as err:
            if dp.target_epsilon == dp.run_allowance:  # the site's budget bound the target, not the run config
                raise RefusedRound("budget-exhausted", "max-epsilon-per-run", str(err)) from err
            raise RefusedRound("policy-refused", "target-epsilon", str(err)) from err

    def _features(self, model, tokenizer, encoded: Encoded) -> torch.Tensor:
        """The head's input for each training example, computed once per encoder state."""
        identity = (self.run_id, self.name, self.run.model.model, self.run.model.pooling)
        try:
            return _FEATURES.get(model, encoded.examples, tokenizer.pad_token_id, self.device, identity)
        except ProbeError as err:
            raise RefusedRound("model-error", "probe-rounds", str(err)) from err

    def _ledger(self, policy: SitePolicy):
        """The site's ledger (None for a non-private round at a site that keeps none)."""
        if policy.ledger_path is None:
            return nullcontext()  # a non-private site without a ledger-path: nothing to charge
        try:
            return PrivacyLedger(policy.ledger_path)
        except LedgerError as err:
            raise RefusedRound("ledger-error", "ledger-path", str(err)) from err

    def _charge(self, ledger, charges: list[Charge], server_round: int, dp: EffectiveDP, rng: str):
        """Charge every mechanism of this message before it runs: a crash from here on can only
        over-count the spend. Budget check and append are one transaction."""
        if ledger is None:
            return []
        try:
            return ledger.charge(
                charges, run_id=self.run_id, round=server_round, delta=dp.delta, accountant=ACCOUNTANT,
                max_epsilon=dp.max_epsilon, rng_mode=rng, enforce_budget=dp.enabled, max_run_epsilon=dp.run_allowance,
            )
        except BudgetExhausted as err:
            raise RefusedRound("budget-exhausted", err.setting, str(err)) from err

    def _released_train_loss(self, model, tokenizer, encoded: Encoded, population: int, spend, dp: EffectiveDP) -> float:
        """The train-loss release: a fresh Poisson sample of units at the charged rate."""
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        members: dict[int, list[int]] = {}
        for index, unit in enumerate(encoded.units):
            members.setdefault(unit, []).append(index)
        groups = list(members.values())
        (sampled,) = poisson_batches(len(groups), spend.sample_rate, 1, generator) if groups else ([],)
        rows = [i for u in sampled for i in groups[u][:MAX_ROWS_PER_UNIT]]
        losses, _, _ = per_example_scores(
            model, [encoded.examples[i] for i in rows], self.run.data.task, tokenizer.pad_token_id, device=self.device
        )
        unit_losses = per_unit_means(losses, [encoded.units[i] for i in rows]) if rows else torch.zeros(0)
        return noised_train_loss(unit_losses, population, spend.charge, dp.secure_noise)

    # -- data and model -----------------------------------------------------------------------

    def _data(self, policy: SitePolicy, dp: EffectiveDP) -> SiteData:
        """The site's data. Under DP a data problem is not a refusal: whether a file parses, has
        a column or a usable row can hang on one record (a JSON key, a malformed line), so the
        site logs the problem here and answers like any other site, its steps adding noise only.
        Without DP it refuses with a code and the setting at fault."""
        try:
            return self._load_data(policy)
        except RefusedRound as refusal:
            if not dp.enabled or refusal.code != "data-error":
                raise
            log(ERROR, "%s: its data cannot be used (%s); under DP it takes part with noise only, "
                "the server is told nothing. Fix the data or the node config.", self.name, refusal)
            empty = datasets.Dataset.from_dict({})
            return SiteData(train=empty, eval=empty, source=str(self.node.get("data-path", "")))

    def _load_data(self, policy: SitePolicy) -> SiteData:
        if self.run.data.task == "classification" and not self.run.data.label_names:
            # Else the labels would be read from the run's ``data``: a path on this machine
            # that the server chose, and whether it can be read would be the answer to a probe.
            raise RefusedRound("policy-refused", "label-names", "the run config gives no label-names; a site never "
                               "reads the server's 'data' to find them")
        try:
            return load_site_data(self.node, self.run.data, self.run.seed, policy.privacy_unit_column)
        except DataError as err:
            raise RefusedRound("data-error", err.setting, str(err)) from err
        except ValueError as err:
            raise RefusedRound("data-error", "", str(err)) from err

    def _encode(self, split, units: list[int], tokenizer, what: str) -> Encoded:
        return encode_split(split, units, tokenizer, self.run.data.task, self.run.data.max_seq_length,
                            f"{self.name}: {what}")

    def _model(self, global_adapter: ArrayRecord):
        task = self.run.data.task
        try:
            at_site_rank = replace(self.run.model, lora_rank=self.lora_rank)
            model, tokenizer = warm_model(at_site_rank, task, self.run.data.label_names, self.run.strategy.freezes_lora_a)
            load_adapter_state(model, at_rank(global_adapter, self.lora_rank))
        except (ModelError, ValueError) as err:
            raise RefusedRound("model-error", "model", str(err)) from err
        return model, tokenizer


def budget_line(before: Spent | None, after: Spent | None, dp: EffectiveDP) -> str:
    """What a message cost the site and what it has left, for the site's own log."""
    if before is None or after is None:
        return "no DP"
    return (f"epsilon +{after.total - before.total:.4f} this message, {after.total:.4f} in total, "
            f"{max(0.0, dp.max_epsilon - after.total):.4f} left of max-epsilon {dp.max_epsilon:g} "
            f"(this run {after.this_run:.4f} of its {dp.run_allowance:.4f})")


def _fedavg_weight(dp: EffectiveDP, present: int, population: int) -> int:
    """Under DP the public population (from the declared size), never a count the server could
    probe; without DP the count itself."""
    return population if dp.enabled else present


_FEATURES = FeatureCache()


def site_name(context: Context) -> str:
    """The site's chosen display name (node config ``site-name``), else its Flower node id."""
    return str(context.node_config.get("site-name", f"node-{context.node_id}"))


def record_refusal(context: Context, refusal: RefusedRound, server_round: int, event: str) -> None:
    """A refusal, seen by the site: one line with the full reason in its log, and its code and setting
    as a ledger row that spends nothing (``privacy.ledger``); not for an unwritable ledger or report-metrics = none."""
    name = site_name(context)
    refusal.log_locally(name, f"round {server_round} {event}")
    path = context.node_config.get("ledger-path")
    if not path or refusal.code in ("ledger-error", "metrics-withheld"):
        return
    try:
        with PrivacyLedger(Path(str(path)).expanduser()) as ledger:
            ledger.record_refusal(run_id=str(context.run_id), round=server_round,
                                  reason=f"{event}: {refusal.code} ({refusal.setting or 'no setting'})")
    except (LedgerError, OSError, sqlite3.Error) as err:
        log(WARNING, "%s: the refusal could not be recorded in the ledger: %s", name, err)
