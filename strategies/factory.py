"""The ``strategy`` run-config key -> a screened Flower strategy.

| strategy | when to use it |
|---|---|
| ``fedavg`` (default) | IID-ish sites, no DP or light DP: the standard weighted mean of adapters. |
| ``ffa-lora`` | DP and/or non-IID sites: only B trains, aggregation is exact, uploads halve. |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.fedavg import FfaLoraFedAvg, ffa_upload
from strategies.screening import ScreenedStrategy

STRATEGIES = ("fedavg", "ffa-lora")


def build_strategy(run_config: Mapping[str, Any]) -> ScreenedStrategy:
    name = str(run_config["strategy"])
    common = dict(
        fraction_train=float(run_config["fraction-train"]),
        fraction_evaluate=float(run_config["fraction-evaluate"]),
        min_train_nodes=int(run_config["min-train-nodes"]),
        min_evaluate_nodes=int(run_config["min-evaluate-nodes"]),
        min_available_nodes=int(run_config["min-train-nodes"]),
    )
    inner: Strategy
    if name == "fedavg":
        inner, upload = FedAvg(**common), (lambda arrays: arrays)
    elif name == "ffa-lora":
        inner, upload = FfaLoraFedAvg(**common), ffa_upload
    else:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    max_norm = float(run_config.get("max-update-norm", 0.0)) or None
    return ScreenedStrategy(
        inner,
        min_valid=int(run_config.get("min-valid-updates", 1)),
        max_update_norm=max_norm,
        expected_upload=upload,
    )
