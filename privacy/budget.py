"""Who decides the privacy settings: the site. The server may only tighten them.

A site states its policy in its Flower **node config**, which only the site controls:

    max-epsilon           lifetime budget of the site's ledger              (default 10.0)
    delta                 the delta every epsilon is stated at              (default 1e-5)
    min-noise-multiplier  smallest sigma the site accepts                   (default 0.3)
    dp                    false only to *allow* non-private training        (default true)

The server's **run config** (``dp``, ``noise-multiplier``, ``target-epsilon``, ``delta``,
``max-grad-norm``, ``max-epsilon``) is a request. :func:`resolve` applies it when it is at
least as strict as the policy and refuses it otherwise; it never silently loosens anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class BudgetExhausted(Exception):
    """Training would take the site's cumulative epsilon past its budget."""


class PolicyViolation(Exception):
    """A setting breaks the site's privacy policy, or cannot be read as one."""


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon: float
    delta: float
    min_noise_multiplier: float
    require_dp: bool


@dataclass(frozen=True)
class DPRequest:
    """What the server's run config asks for; 0 means "not given" for the optional numbers."""

    dp: bool
    noise_multiplier: float
    target_epsilon: float
    delta: float
    max_grad_norm: float
    max_epsilon: float


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


def site_policy(node_config: Mapping[str, Any]) -> SitePolicy:
    """The site's policy from its node config (defaults above); PolicyViolation names any bad
    key and value."""
    max_epsilon = _number(node_config, "max-epsilon", 10.0, "node config")
    delta = _number(node_config, "delta", 1e-5, "node config")
    min_noise = _number(node_config, "min-noise-multiplier", 0.3, "node config")
    require_dp = _flag(node_config, "dp", True, "node config")
    if not max_epsilon > 0:
        raise PolicyViolation(f"node config max-epsilon must be > 0, got {max_epsilon!r}")
    if not 0 < delta < 1:
        raise PolicyViolation(f"node config delta must be in (0, 1), got {delta!r}")
    if not min_noise >= 0:
        raise PolicyViolation(f"node config min-noise-multiplier must be >= 0, got {min_noise!r}")
    return SitePolicy(max_epsilon, delta, min_noise, require_dp)


def dp_request(run_config: Mapping[str, Any]) -> DPRequest:
    """The server's DP request from its run config; PolicyViolation names any bad key."""
    request = DPRequest(
        dp=_flag(run_config, "dp", True, "run config"),
        noise_multiplier=_number(run_config, "noise-multiplier", 0.0, "run config"),
        target_epsilon=_number(run_config, "target-epsilon", 0.0, "run config"),
        delta=_number(run_config, "delta", 0.0, "run config"),
        max_grad_norm=_number(run_config, "max-grad-norm", 1.0, "run config"),
        max_epsilon=_number(run_config, "max-epsilon", 0.0, "run config"),
    )
    for key, value in (
        ("noise-multiplier", request.noise_multiplier),
        ("target-epsilon", request.target_epsilon),
        ("max-epsilon", request.max_epsilon),
    ):
        if value < 0:
            raise PolicyViolation(f"run config {key} must be >= 0 (0 = not given), got {value!r}")
    if not 0 <= request.delta < 1:
        raise PolicyViolation(
            f"run config delta must be in [0, 1) (0 = not given), got {request.delta!r}"
        )
    if not request.max_grad_norm > 0:
        raise PolicyViolation(f"run config max-grad-norm must be > 0, got {request.max_grad_norm!r}")
    return request


def resolve(policy: SitePolicy, request: DPRequest) -> EffectiveDP:
    """Apply the server's request where it is at least as strict as the site's policy.

    Refused (PolicyViolation naming the setting, the server's value and the site's limit):
    ``dp=false`` at a site that requires DP; ``delta`` above the site's; ``max-epsilon``
    above the site's; an explicit ``noise-multiplier`` below the site's minimum. A smaller
    delta or max-epsilon is applied. An explicit noise multiplier wins over ``target-epsilon``;
    with neither, the target is the site's max-epsilon, and a target above the effective
    max-epsilon is capped to it (the site never plans past its own budget).
    """
    if not request.dp:
        if policy.require_dp:
            raise PolicyViolation(
                "dp: the server requests dp=false (non-private training), but this site "
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
    if request.delta > policy.delta:
        raise PolicyViolation(
            f"delta: the server requests {request.delta:g}, above this site's delta "
            f"{policy.delta:g}"
        )
    if request.max_epsilon > policy.max_epsilon:
        raise PolicyViolation(
            f"max-epsilon: the server requests {request.max_epsilon:g}, above this site's "
            f"max-epsilon {policy.max_epsilon:g}"
        )
    if 0 < request.noise_multiplier < policy.min_noise_multiplier:
        raise PolicyViolation(
            f"noise-multiplier: the server requests {request.noise_multiplier:g}, below this "
            f"site's min-noise-multiplier {policy.min_noise_multiplier:g}"
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
    )


def check_budget(projected_epsilon: float, max_epsilon: float) -> None:
    """Raise BudgetExhausted if ``projected_epsilon`` (the site's cumulative epsilon after the
    coming round) exceeds ``max_epsilon``."""
    if projected_epsilon > max_epsilon:
        raise BudgetExhausted(
            f"budget exhausted: this round would bring epsilon to {projected_epsilon:.4f} "
            f"> max-epsilon {max_epsilon:.4f}"
        )


def _number(config: Mapping[str, Any], key: str, default: float, source: str) -> float:
    value = config.get(key, default)
    # bool is an int subclass, but dp=true where a number belongs is a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyViolation(f"{source} {key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise PolicyViolation(f"{source} {key} must be finite, got {value!r}")
    return float(value)


def _flag(config: Mapping[str, Any], key: str, default: bool, source: str) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise PolicyViolation(f"{source} {key} must be true or false, got {value!r}")
    return value
