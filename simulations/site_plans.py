"""``fedlora privacy plan``: what DP will cost each simulated site, round by round, before it
trains. Each site's plan is computed from exactly what the site will use: its node config
(declared size, limits), the run config and :func:`privacy.plan.plan_run`."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedlora.run_config import RunSettings
from privacy.budget import RUN_SHARE, BudgetExhausted, PolicyViolation, resolve, site_policy
from privacy.distributed_dp import site_shares
from privacy.ledger import LedgerError, spent_in_other_runs
from privacy.plan import (
    ACCOUNTANT, PROBE, Phase, choose_schedule, plan_distributed, plan_run, public_noise_multiplier, public_population,
)
from simulations.simulate import site_node_configs
from simulations.site_files import assign_site_files


def simulated_site_plans(settings: RunSettings, sites: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per simulated site: its plan, or why it would not train (``refused``)."""
    out = Path("OUT")
    nodes = site_node_configs(out, int(sites["num-clients"]), sites["node-config"],
                              {int(k): v for k, v in sites["site-config"].items()})
    assign_site_files(nodes, settings, out, write=False)
    plans = []
    for node in nodes.values():
        entry: dict[str, Any] = {"site": node["site-name"], "num-examples": node.get("num-examples")}
        try:
            policy = site_policy(node)
            dp = resolve(policy, settings.dp)
            if dp.enabled:  # a site that kept its ledger from earlier runs has less to spend
                dp = dp.for_run(spent_in_other_runs(policy.ledger_path, "", dp.delta, ACCOUNTANT))
            population = public_population(policy.declared_examples, settings.data.eval_fraction)
            phases = choose_schedule(settings, population, dp.enabled)
            entry["phases"] = [asdict(_as_run(phase, settings, population)) for phase in phases]
            if not dp.enabled:
                plans.append(entry | {"dp": False})
                continue
            release_sigma = policy.metric_noise_multiplier if policy.report_metrics == "noised" else None
            if settings.dp.distributed:
                sensitivity = _distributed_sensitivity(settings)
                shares = site_shares(sensitivity, public_noise_multiplier(settings, sensitivity), settings.secure_sum_minimum,
                                     policy.distributed_dp_colluders, settings.dp.distributed_dp_colluders)
                plan, _ = plan_distributed(dp, phases, release_sigma, shares)
            else:
                plan = plan_run(dp, phases, release_sigma)
        except (PolicyViolation, BudgetExhausted, LedgerError) as err:
            plans.append(entry | {"refused": str(err)})
            continue
        plans.append(entry | {
            "dp": True, "noise_multiplier": plan.noise_multiplier, "metric_noise_multiplier": plan.release_noise_multiplier,
            "delta": dp.delta, "max_epsilon": dp.max_epsilon, "run_allowance": dp.run_allowance,
            "target_epsilon": dp.target_epsilon, "epsilon_after_round": list(plan.epsilon_after_round),
        })
    return plans


def _as_run(phase: Phase, settings: RunSettings, population: int) -> Phase:
    """The phase as its rounds run: under distributed DP one full-batch step per round, taken by
    the server at its step size for the phase (the rate stays the train-loss release's)."""
    if not settings.dp.distributed:
        return phase
    step = settings.dp.distributed_probe_learning_rate if phase.name == PROBE else settings.dp.distributed_learning_rate
    return replace(phase, batch_size=population, steps_per_round=1, learning_rate=step)


def _distributed_sensitivity(settings: RunSettings) -> float:
    """D2 as a site computes it, from the model the site would load (``client.distributed_site``)."""
    from client.distributed_site import adapter_sensitivity
    from client.site_model import warm_model

    model, _ = warm_model(settings.model, settings.data.task, settings.data.label_names, settings.strategy.freezes_lora_a)
    return adapter_sensitivity(model)


def print_plans(plans: list[dict[str, Any]], rounds: int) -> None:
    table = Table(title="Training plan per site (epsilon is cumulative, this run only; a run may spend its "
                  f"allowance: max-epsilon-per-run, or {RUN_SHARE:.0%} of what the site's ledger has left)", title_justify="left")
    headers = ("site", "declared", "phase", "rounds", "batch", "q", "steps/round", "lr", "sigma", "metric sigma",
               "run allowance", *(f"eps r{r}" for r in range(1, rounds + 1)))
    for header in headers:
        table.add_column(header, justify="left" if header in ("site", "phase") else "right")
    for plan in plans:
        site = (plan["site"], str(plan["num-examples"]))
        if "refused" in plan:
            table.add_row(*site, f"refused: {plan['refused']}")
            continue
        for index, phase in enumerate(plan["phases"]):
            span = f"{phase['first_round']}" if phase["first_round"] == phase["last_round"] else f"{phase['first_round']}-{phase['last_round']}"
            privacy = ("no DP",) if not plan["dp"] else (
                f"{plan['noise_multiplier']:.4g}", _fmt(plan["metric_noise_multiplier"]), f"{plan['run_allowance']:.3f}",
                *(f"{e:.3f}" for e in plan["epsilon_after_round"]),
            )
            table.add_row(
                *(site if index == 0 else ("", "")), phase["name"], span, str(phase["batch_size"]),
                f"{phase['sample_rate']:.4g}", str(phase["steps_per_round"]), f"{phase['learning_rate']:g}",
                *(privacy if index == 0 else ()),
            )
    Console(width=240).print(table)


def _fmt(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"
