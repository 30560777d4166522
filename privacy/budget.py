"""Who decides the privacy settings: the site. The server may only tighten them.

A site states its policy in its Flower **node config**, which only the site controls:

    max-epsilon              lifetime budget of the site's ledger           (default 10.0)
    max-epsilon-per-run      what one run may spend                         (default RUN_SHARE
                             = 80 % of what the site had left when the run began)
    delta                    the delta every epsilon is stated at           (default 1e-5)
    min-noise-multiplier     smallest sigma the site accepts, on every path (default 0.3)
    dp                       false only to *allow* non-private training     (default true)
    ledger-path              the site's ledger; required to train with DP   (no default)
    num-examples             the site's public size (rows, or users under user-level DP, in
                             its data); required for DP: sampling rate, steps, release
                             denominators and the FedAvg weight come from it, never from a
                             count of private rows
    report-metrics           ``noised`` (DP releases, charged) or ``none``  (default noised)
    metric-noise-multiplier  sigma of those releases, >= min-noise-multiplier (default 10.0)
    privacy-unit-column      user-level DP: one unit = all rows sharing this column's value
    secure-noise             true: DP noise from the OS CSPRNG              (default false)

The server's **run config** (``dp``, ``noise-multiplier``, ``target-epsilon``, ``delta``,
``max-grad-norm``, ``max-epsilon``, ``secure-noise``: ``fedlora.run_config.DPRequest``) is a request. :func:`resolve` applies it
when it is at least as strict as the policy and refuses it otherwise; it never silently loosens
anything.

**Budgets across runs.** ``max-epsilon`` is the site's lifetime budget over every run; a run's
own spend (its rows of the ledger, composed alone) is capped by its allowance
(:func:`run_allowance`): ``max-epsilon-per-run``, or by default ``RUN_SHARE`` of what the
ledger's other runs have left (``max-epsilon`` minus their epsilon), so that no single run, a
smoke test with the default target included, uses up a site's budget by accident. A run's
``target-epsilon`` is capped to the allowance (:meth:`EffectiveDP.for_run`). The allowance
guards against accidents, not against the server: run ids are the server's, and many runs each
take a share of what is left; only ``max-epsilon`` bounds what a server can obtain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora.run_config import DPRequest

REPORT_METRICS = ("noised", "none")
RUN_SHARE = 0.8
SITE_POLICY_KEYS = (
    "max-epsilon", "max-epsilon-per-run", "delta", "min-noise-multiplier", "dp", "ledger-path", "num-examples",
    "report-metrics", "metric-noise-multiplier", "privacy-unit-column", "secure-noise",
)


class BudgetExhausted(Exception):
    """Training would take the site's epsilon past a budget: its lifetime ``max-epsilon`` or,
    ``setting`` says, this run's ``max-epsilon-per-run``."""

    def __init__(self, message: str, setting: str = "max-epsilon") -> None:
        super().__init__(message)
        self.setting = setting


class PolicyViolation(Exception):
    """A setting breaks the site's privacy policy, or cannot be read as one. ``setting`` is the
    config key at fault: the only part of the refusal that leaves the site."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon: float
    delta: float
    min_noise_multiplier: float
    require_dp: bool
    ledger_path: Path | None = None
    declared_examples: int | None = None
    report_metrics: str = "noised"
    metric_noise_multiplier: float = 10.0
    privacy_unit_column: str | None = None
    secure_noise: bool = False
    max_epsilon_per_run: float | None = None  # None: RUN_SHARE of what is left when a run begins
    # Distributed DP: how many other sites this site assumes may collude with the server. None:
    # the site has not opted in, and refuses distributed rounds (its noise would rest on others').
    distributed_dp_colluders: int | None = None


@dataclass(frozen=True)
class EffectiveDP:
    """The settings a site trains with. Exactly one of ``noise_multiplier`` (fixed sigma) and
    ``target_epsilon`` (calibrate sigma to it) is set when ``enabled``; neither otherwise."""

    enabled: bool
    delta: float
    max_epsilon: float
    max_grad_norm: float
    noise_multiplier: float | None
    target_epsilon: float | None
    min_noise_multiplier: float = 0.0
    secure_noise: bool = False
    max_epsilon_per_run: float | None = None  # the site's cap on one run (None: RUN_SHARE)
    run_allowance: float | None = None  # what this run may spend, once known (:meth:`for_run`)

    def at_least_the_floor(self, sigma: float) -> float:
        """The site's noise floor applies to every sigma, calibrated ones included."""
        return max(sigma, self.min_noise_multiplier)

    def for_run(self, spent_in_other_runs: float) -> EffectiveDP:
        """These settings for one run, given what the site's other runs spent: ``run_allowance``
        set, ``target_epsilon`` capped to it. BudgetExhausted when nothing is left."""
        allowance = run_allowance(self.max_epsilon, self.max_epsilon_per_run, spent_in_other_runs)
        if not allowance > 0:
            raise BudgetExhausted(f"budget exhausted: earlier runs spent epsilon {spent_in_other_runs:.4f} "
                                  f"of max-epsilon {self.max_epsilon:.4f}")
        target = None if self.target_epsilon is None else min(self.target_epsilon, allowance)
        return replace(self, run_allowance=allowance, target_epsilon=target)


def run_allowance(max_epsilon: float, max_epsilon_per_run: float | None, spent_in_other_runs: float) -> float:
    """What a run may spend (its own rows, composed alone): ``max-epsilon-per-run``, or
    ``RUN_SHARE`` of what the other runs have left, never more than what they have left."""
    left = max(0.0, max_epsilon - spent_in_other_runs)
    return min(left, max_epsilon_per_run or RUN_SHARE * left)


def site_policy(node_config: Mapping[str, Any]) -> SitePolicy:
    """The site's policy from its node config (defaults above); PolicyViolation names any bad
    key and value."""
    max_epsilon = _number(node_config, "max-epsilon", 10.0, "node config")
    per_run = _number(node_config, "max-epsilon-per-run", 0.0, "node config") or None
    delta = _number(node_config, "delta", 1e-5, "node config")
    min_noise = _number(node_config, "min-noise-multiplier", 0.3, "node config")
    require_dp = _flag(node_config, "dp", True, "node config")
    metric_noise = _number(node_config, "metric-noise-multiplier", 10.0, "node config")
    report_metrics = str(node_config.get("report-metrics", "noised"))
    declared = node_config.get("num-examples")
    if not max_epsilon > 0:
        raise PolicyViolation("max-epsilon", f"node config max-epsilon must be > 0, got {max_epsilon!r}")
    if per_run is not None and not 0 < per_run <= max_epsilon:
        raise PolicyViolation("max-epsilon-per-run", f"node config max-epsilon-per-run must be in (0, max-epsilon "
                              f"{max_epsilon:g}], got {per_run!r}")
    if not 0 < delta < 1:
        raise PolicyViolation("delta", f"node config delta must be in (0, 1), got {delta!r}")
    if not min_noise >= 0:
        raise PolicyViolation("min-noise-multiplier", f"node config min-noise-multiplier must be >= 0, got {min_noise!r}")
    if report_metrics not in REPORT_METRICS:
        raise PolicyViolation("report-metrics", f"node config report-metrics must be one of {', '.join(REPORT_METRICS)}, got {report_metrics!r}")
    if not metric_noise >= min_noise or metric_noise <= 0:
        raise PolicyViolation(
            "metric-noise-multiplier",
            f"node config metric-noise-multiplier must be > 0 and >= min-noise-multiplier {min_noise:g}, got {metric_noise!r}",
        )
    colluders = node_config.get("distributed-dp-colluders")
    if colluders is not None and (isinstance(colluders, bool) or not isinstance(colluders, int) or colluders < 0):
        raise PolicyViolation("distributed-dp-colluders", f"node config distributed-dp-colluders must be a whole number "
                              f">= 0, got {colluders!r}")
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 1):
        raise PolicyViolation("num-examples", f"node config num-examples must be a positive integer, got {declared!r}")
    return SitePolicy(
        max_epsilon, delta, min_noise, require_dp,
        ledger_path=Path(str(node_config["ledger-path"])).expanduser() if "ledger-path" in node_config else None,
        declared_examples=declared,
        report_metrics=report_metrics,
        metric_noise_multiplier=metric_noise,
        privacy_unit_column=str(node_config["privacy-unit-column"]) if node_config.get("privacy-unit-column") else None,
        secure_noise=_flag(node_config, "secure-noise", False, "node config"),
        max_epsilon_per_run=per_run,
        distributed_dp_colluders=colluders,
    )


def resolve(policy: SitePolicy, request: DPRequest) -> EffectiveDP:
    """Apply the server's request where it is at least as strict as the site's policy.

    Refused (PolicyViolation naming the setting, the server's value and the site's limit):
    ``dp=false`` at a site that requires DP; ``delta`` above the site's; ``max-epsilon``
    above the site's; an explicit ``noise-multiplier`` below the site's minimum; DP without a
    ``ledger-path`` in the node config (a default path keyed by a node id the server sees
    would let a new node id start a fresh budget). A smaller delta or max-epsilon is applied.
    An explicit noise multiplier wins over ``target-epsilon``; with neither, the target is the
    site's max-epsilon, and a target above the effective max-epsilon is capped to it (the site
    never plans past its own budget). Secure noise is on when either side asks for it.
    """
    if not request.dp:
        if policy.require_dp:
            raise PolicyViolation(
                "dp", "the server requests dp=false (non-private training), but this site "
                "requires differential privacy (node config dp=true)"
            )
        return EffectiveDP(
            enabled=False,
            delta=policy.delta,
            max_epsilon=policy.max_epsilon,
            max_grad_norm=request.max_grad_norm,
            noise_multiplier=None,
            target_epsilon=None,
        )
    if policy.ledger_path is None:
        raise PolicyViolation(
            "ledger-path", "this site trains with DP but its node config names no ledger-path: "
            "set ledger-path to a file the site keeps for good (its lifetime privacy record)"
        )
    if policy.declared_examples is None:
        raise PolicyViolation(
            "num-examples", "this site trains with DP but its node config declares no num-examples: "
            "set it to the number of rows (users, with privacy-unit-column) in its data. Sampling "
            "rates and weights must come from it: the count of rows usable under a run's settings "
            "would answer the server's probes (which labels, which lengths)"
        )
    if request.delta > policy.delta:
        raise PolicyViolation(
            "delta", f"the server requests delta {request.delta:g}, above this site's delta {policy.delta:g}"
        )
    if request.max_epsilon > policy.max_epsilon:
        raise PolicyViolation(
            "max-epsilon", f"the server requests max-epsilon {request.max_epsilon:g}, above this "
            f"site's max-epsilon {policy.max_epsilon:g}"
        )
    if 0 < request.noise_multiplier < policy.min_noise_multiplier:
        raise PolicyViolation(
            "noise-multiplier", f"the server requests noise-multiplier {request.noise_multiplier:g}, "
            f"below this site's min-noise-multiplier {policy.min_noise_multiplier:g}"
        )
    max_epsilon = request.max_epsilon or policy.max_epsilon
    if request.noise_multiplier:
        noise_multiplier, target_epsilon = request.noise_multiplier, None
    else:
        noise_multiplier = None
        target_epsilon = min(request.target_epsilon or max_epsilon, max_epsilon)
    return EffectiveDP(
        enabled=True,
        delta=request.delta or policy.delta,
        max_epsilon=max_epsilon,
        max_grad_norm=request.max_grad_norm,
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        min_noise_multiplier=policy.min_noise_multiplier,
        secure_noise=policy.secure_noise or request.secure_noise,
        max_epsilon_per_run=min(policy.max_epsilon_per_run, max_epsilon) if policy.max_epsilon_per_run else None,
    )


def check_delta(delta: float, num_units: int) -> None:
    """Refuse delta >= 1/n: at that delta a mechanism that publishes one random record
    outright is (0, delta)-DP, so the guarantee would mean nothing."""
    if delta * num_units >= 1:
        raise PolicyViolation(
            "delta", f"delta {delta:g} is not below 1/n = 1/{num_units} for this site's "
            f"{num_units} privacy units; use a smaller delta"
        )


def check_budget(projected_epsilon: float, max_epsilon: float, setting: str = "max-epsilon") -> None:
    """Raise BudgetExhausted if ``projected_epsilon`` (after the coming round: the site's
    cumulative epsilon, or this run's for ``max-epsilon-per-run``) exceeds ``max_epsilon``."""
    if projected_epsilon > max_epsilon:
        scope = "this run's epsilon" if setting == "max-epsilon-per-run" else "epsilon"
        raise BudgetExhausted(
            f"budget exhausted: this round would bring {scope} to {projected_epsilon:.4f} "
            f"> {setting} {max_epsilon:.4f}", setting,
        )


def _number(config: Mapping[str, Any], key: str, default: float, source: str) -> float:
    value = config.get(key, default)
    # bool is an int subclass, but dp=true where a number belongs is a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyViolation(key, f"{source} {key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise PolicyViolation(key, f"{source} {key} must be finite, got {value!r}")
    return float(value)


def _flag(config: Mapping[str, Any], key: str, default: bool, source: str) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise PolicyViolation(key, f"{source} {key} must be true or false, got {value!r}")
    return value
