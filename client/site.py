"""One site's side of a round: its settings (node config first), its data, its model and its
privacy ledger.

Everything privacy-relevant is read from the site's **node config**, which only the site
controls: ``data-path``, ``ledger-path``, ``max-epsilon``, ``delta``, ``min-noise-multiplier``,
``dp``, ``lora-rank``, ``device``. The server's run config may only tighten those
(``privacy.budget.resolve``).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context

from client.local_data import SiteData, load_site_data
from client.training import DPSettings, TrainSettings, train
from fedlora.adapters import adapter_state, attach_adapter, load_adapter_state
from fedlora.data import DataError
from fedlora.evaluation import evaluate
from fedlora.model import ModelError, load_base_model, load_tokenizer, select_device
from fedlora.run_config import LoraSettings, freezes_lora_a
from fedlora.tasks import encode
from privacy.accountant import calibrate_noise, epsilon_for
from privacy.budget import BudgetExhausted, PolicyViolation, check_budget, dp_request, resolve, site_policy
from privacy.dp_sgd import rng_mode
from privacy.ledger import PrivacyLedger
from simulations.sources import resolve_label_names
from strategies.hetero_rank import lora_rank_of, truncate_to_rank

ACCOUNTANT = "rdp"


class RefusedRound(Exception):
    """The site does not take part in this round; ``status`` is one of ``budget-exhausted``,
    ``policy-refused``, ``data-error``, ``model-error``."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class TrainOutcome:
    adapter: dict[str, torch.Tensor]
    metrics: dict[str, float | int]


class Site:
    def __init__(self, context: Context) -> None:
        self.node: Mapping[str, Any] = context.node_config
        self.run: Mapping[str, Any] = context.run_config
        self.run_id = str(context.run_id)
        self.name = _site_name(self.node, context.node_id)

    @property
    def ledger_path(self) -> Path:
        """``ledger-path`` from the node config; else a per-site file under ``~/.fedlora``.
        Never from the run config: a server must not be able to hand a site a fresh ledger."""
        if "ledger-path" in self.node:
            return Path(str(self.node["ledger-path"])).expanduser()
        return Path.home() / ".fedlora" / "privacy" / f"{self.name}.db"

    @property
    def lora_rank(self) -> int:
        return int(self.node.get("lora-rank", self.run["lora-rank"]))

    @property
    def device(self) -> torch.device:
        return select_device(str(self.node.get("device", "auto")))

    def train(self, global_adapter: ArrayRecord, server_round: int, proximal_mu: float = 0.0) -> TrainOutcome:
        """``proximal_mu`` > 0 (FedProx, sent by the server) adds (mu/2)||w - w_global||^2."""
        try:
            dp = resolve(site_policy(self.node), dp_request(self.run))
        except PolicyViolation as err:
            raise RefusedRound("policy-refused", str(err)) from err
        data = self._data()
        model, tokenizer = self._model(global_adapter)
        task = str(self.run["task"])
        examples = encode(data.train, tokenizer, task, int(self.run["max-seq-length"]))
        settings = TrainSettings(
            learning_rate=float(self.run["learning-rate"]),
            batch_size=int(self.run["batch-size"]),
            epochs=int(self.run["local-epochs"]),
            steps=int(self.run["local-steps"]),
            physical_batch_size=int(self.node.get("physical-batch-size", 0)),
            device=self.device,
            # DP: sampling and noise must be secret from the server, so never seed them from
            # the run config. Without DP, the run's seed makes local training reproducible.
            seed=secrets.randbits(63) if dp.enabled else int(self.run["seed"]) + server_round,
        )
        q, steps = settings.sample_rate(len(examples)), settings.planned_steps(len(examples))
        noise = self._noise_multiplier(dp, q, steps) if dp.enabled else 0.0
        with PrivacyLedger(self.ledger_path) as ledger:
            if dp.enabled:
                projected = epsilon_for(ledger.history() + [(noise, q, steps)], dp.delta, ACCOUNTANT)
                try:
                    check_budget(projected, dp.max_epsilon)
                except BudgetExhausted as err:
                    raise RefusedRound("budget-exhausted", str(err)) from err
            # Charged before training: a crash from here on can only over-count the spend.
            spend = ledger.begin_spend(
                run_id=self.run_id, round=server_round, noise_multiplier=noise, sample_rate=q,
                steps=steps, max_grad_norm=dp.max_grad_norm, delta=dp.delta, accountant=ACCOUNTANT,
                max_epsilon=dp.max_epsilon, rng_mode=rng_mode(settings.device),
            )
            if not dp.enabled:
                torch.manual_seed(settings.seed)
            result = train(
                model, examples, task, tokenizer.pad_token_id, settings,
                DPSettings(noise, dp.max_grad_norm) if dp.enabled else None,
                proximal_mu=proximal_mu,
            )
            ledger.confirm(spend.id)
        metrics = {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "steps": result.steps,
            "sample-rate": result.sample_rate,
            "noise-multiplier": noise,
            "max-grad-norm": dp.max_grad_norm,
            "epsilon": spend.epsilon if math.isfinite(spend.epsilon) else -1.0,
            "delta": dp.delta,
            "max-epsilon": dp.max_epsilon,
            "dp": int(dp.enabled),
            "seconds": result.seconds,
            "examples-per-second": result.examples_per_second,
            "lora-rank": self.lora_rank,
        }
        adapter = adapter_state(model, trainable_only=freezes_lora_a(self.run))
        return TrainOutcome(adapter=adapter, metrics=metrics)

    def evaluate(self, global_adapter: ArrayRecord) -> dict[str, float | int]:
        data = self._data()
        model, tokenizer = self._model(global_adapter)
        task = str(self.run["task"])
        examples = encode(data.eval, tokenizer, task, int(self.run["max-seq-length"]))
        result = evaluate(model, examples, task, tokenizer.pad_token_id, device=self.device)
        metrics: dict[str, float | int] = {"num-examples": result["num-examples"]}
        if result["num-examples"]:
            metrics |= {"eval-loss": result["loss"], "eval-accuracy": result["accuracy"]}
        return metrics

    def _noise_multiplier(self, dp, sample_rate: float, steps: int) -> float:
        """The run's fixed sigma: given, or calibrated so that the planned steps of *all* rounds
        of this run (``num-server-rounds`` x local steps) stay within the target epsilon."""
        if dp.noise_multiplier is not None:
            return dp.noise_multiplier
        planned = int(self.run["num-server-rounds"]) * steps
        return calibrate_noise(dp.target_epsilon, dp.delta, sample_rate, planned, ACCOUNTANT)

    def _data(self) -> SiteData:
        try:
            data = load_site_data(self.node, self.run)
        except (DataError, ValueError) as err:
            raise RefusedRound("data-error", str(err)) from err
        if len(data.train) == 0:
            raise RefusedRound("data-error", f"{data.source}: no training rows after the held-out split")
        return data

    def _model(self, global_adapter: ArrayRecord):
        task = str(self.run["task"])
        labels = tuple(resolve_label_names(self.run)) if task == "classification" else ()
        lora = LoraSettings.from_run_config(self.run, rank=self.lora_rank)
        try:
            model, tokenizer = _cached_model(str(self.run["model"]), task, labels, lora)
            load_adapter_state(model, _at_rank(global_adapter, self.lora_rank))
        except (ModelError, ValueError) as err:
            raise RefusedRound("model-error", str(err)) from err
        return model, tokenizer


@lru_cache(maxsize=2)
def _cached_model(model_name: str, task: str, labels: tuple[str, ...], lora: LoraSettings):
    """Base model + adapter kept across rounds in one process; each round overwrites the
    adapter tensors with the global ones, so no state leaks from round to round."""
    base = load_base_model(model_name, task, list(labels) or None)
    return attach_adapter(base, lora.peft_config(task), freeze_lora_a=lora.freeze_a), load_tokenizer(model_name)


def _at_rank(adapter: ArrayRecord, rank: int) -> dict[str, torch.Tensor]:
    """The received adapter at this site's LoRA rank: its first ``rank`` components when it is
    larger (a HetLoRA server sends the full rank until it has seen this site's rank)."""
    arrays = {name: array.numpy() for name, array in adapter.items()}
    received = lora_rank_of(arrays)
    if received < rank:
        raise ValueError(f"the server sent a rank-{received} adapter; this site trains rank {rank} (node config lora-rank)")
    if received > rank:
        arrays = truncate_to_rank(arrays, rank)
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def _site_name(node_config: Mapping[str, Any], node_id: int) -> str:
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"site-{node_config['partition-id']}"
    return f"node-{node_id}"
