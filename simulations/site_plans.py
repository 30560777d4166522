"""``fedlora privacy plan``: what DP will cost each simulated site, round by round, before it
trains. Each site's plan is computed from exactly what the site will use: its node config
(declared size, limits), the run config and :func:`privacy.plan.plan_run`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from client.training import TrainSettings
from privacy.budget import BudgetExhausted, PolicyViolation, dp_request, resolve, site_policy
from privacy.plan import plan_run, public_population
from simulations.simulate import site_node_configs


def simulated_site_plans(run_config: Mapping[str, Any], sites: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per simulated site: its plan, or why it would not train (``refused``)."""
    nodes = site_node_configs(
        Path("OUT"), int(sites["num-clients"]), sites["node-config"],
        {int(k): v for k, v in sites["site-config"].items()}, run_config,
    )
    settings = TrainSettings(
        learning_rate=float(run_config["learning-rate"]), batch_size=int(run_config["batch-size"]),
        epochs=int(run_config["local-epochs"]), steps=int(run_config["local-steps"]),
    )
    plans = []
    for node in nodes.values():
        entry: dict[str, Any] = {"site": node["site-name"], "num-examples": node.get("num-examples")}
        try:
            policy = site_policy(node)
            dp = resolve(policy, dp_request(run_config))
            if not dp.enabled:
                plans.append(entry | {"dp": False})
                continue
            population = public_population(policy.declared_examples, float(run_config["eval-fraction"]))
            q, steps = settings.sample_rate(population), settings.planned_steps(population)
            release_sigma = policy.metric_noise_multiplier if policy.report_metrics == "noised" else None
            plan = plan_run(dp, q, steps, int(run_config["num-server-rounds"]), release_sigma)
        except (PolicyViolation, BudgetExhausted) as err:
            plans.append(entry | {"refused": str(err)})
            continue
        plans.append(entry | {
            "dp": True, "sample_rate": plan.sample_rate, "steps_per_round": plan.steps_per_round,
            "noise_multiplier": plan.noise_multiplier, "metric_noise_multiplier": plan.release_noise_multiplier,
            "delta": dp.delta, "max_epsilon": dp.max_epsilon, "epsilon_after_round": list(plan.epsilon_after_round),
        })
    return plans


def print_plans(plans: list[dict[str, Any]], rounds: int) -> None:
    table = Table(title="DP plan per site (epsilon is cumulative, this run only)", title_justify="left")
    for header in ("site", "declared", "q", "steps/round", "sigma", "metric sigma", *(f"eps r{r}" for r in range(1, rounds + 1))):
        table.add_column(header, justify="left" if header == "site" else "right")
    for plan in plans:
        if "refused" in plan:
            table.add_row(plan["site"], str(plan["num-examples"]), f"refused: {plan['refused']}")
        elif not plan["dp"]:
            table.add_row(plan["site"], str(plan["num-examples"]), "no DP")
        else:
            table.add_row(
                plan["site"], str(plan["num-examples"]), f"{plan['sample_rate']:.4g}", str(plan["steps_per_round"]),
                f"{plan['noise_multiplier']:.4g}", _fmt(plan["metric_noise_multiplier"]),
                *(f"{e:.3f}" for e in plan["epsilon_after_round"]),
            )
    Console(width=200).print(table)


def _fmt(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"
