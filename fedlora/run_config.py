"""Typed view of the Flower run config (``[tool.flwr.app.config]`` in pyproject.toml).

pyproject.toml holds the one list of keys and defaults; ``flwr run . -c key=value`` and
``fedlora simulate --set key=value`` override the same keys.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.adapters import lora_config
from peft import LoraConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def default_run_config() -> dict[str, Any]:
    """The defaults from the project's pyproject.toml (the Flower app config)."""
    if not PYPROJECT.is_file():
        raise FileNotFoundError(
            f"{PYPROJECT} not found: install fedlora from its source tree with 'pip install -e .'"
        )
    return dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Override known keys only: a typo is an error, not a silently ignored setting."""
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise KeyError(f"unknown run-config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(config))}")
    merged = dict(config)
    for key, value in overrides.items():
        default = config[key]
        if isinstance(default, bool) and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            value = str(value)
        merged[key] = value
    return merged


def freezes_lora_a(run_config: Mapping[str, Any]) -> bool:
    """FFA-LoRA (``strategy`` ``ffa-lora`` or ``ffa-lora+<aggregator>``): A frozen, only B sent."""
    return str(run_config["strategy"]).partition("+")[0] == "ffa-lora"


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    freeze_a: bool

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], rank: int | None = None) -> "LoraSettings":
        modules = tuple(m.strip() for m in str(run_config["lora-target-modules"]).split(",") if m.strip())
        return cls(
            rank=int(rank if rank is not None else run_config["lora-rank"]),
            alpha=float(run_config["lora-alpha"]),
            dropout=float(run_config["lora-dropout"]),
            target_modules=modules,
            freeze_a=freezes_lora_a(run_config),
        )

    def peft_config(self, task: str) -> LoraConfig:
        return lora_config(task, self.rank, self.alpha, self.dropout, self.target_modules or None)
