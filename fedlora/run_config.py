"""The run config, typed: parsed once at the edges (the ServerApp, the ClientApp, the CLI) into
:class:`RunSettings`, and passed inward.

pyproject.toml (``[tool.flwr.app.config]``) holds the one list of keys and defaults;
``flwr run . -c key=value`` and ``fedlora simulate --set key=value`` override the same keys.
Each key belongs to one section: its field, named like the key with ``_`` for ``-``. Parsing
checks every value's type and range and fails on the first bad key, naming it
(:class:`ConfigError`); a key that no section knows is an error too, never silently ignored.

| section | keys |
|---|---|
| :class:`RunSettings` | rounds, seed, round timeout, output, resume, central evaluation data |
| :class:`DataSettings` | the data source, task, columns, label names, partition, held-out share, sequence length |
| :class:`ModelSettings` | the base model, pooling and the LoRA adapter's shape |
| :class:`ScheduleSettings` | each site's training schedule (``privacy.plan``; 0 = chosen from its size) |
| :class:`DPRequest` | what the server asks of each site's DP (a request: ``privacy.budget``) |
| :class:`StrategySettings` | aggregation, central DP, sampling and the screening of updates |
| :class:`SecureAggregationSettings` | SecAgg+: whether the server may see only the round's sum, and its parameters |
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.lora_ranks import is_lora_a, is_lora_b

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TASKS = ("classification", "causal-lm")
UPLOAD_DTYPES = ("fp32", "fp16", "bf16", "int8")  # fedlora.upload_codec
DP_MODES = ("local", "distributed")  # where the noise is added: each site alone, or shared through SecAgg+
POOLINGS = ("auto", "mean", "cls", "pooler")


class ConfigError(ValueError):
    """A run-config value that cannot be used; ``setting`` is its key."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class DataSettings:
    data: str
    task: str
    text_column: str
    label_column: str
    prompt_column: str
    response_column: str
    label_names: tuple[str, ...]  # "a,b,c" in the config; () = read from the data
    partition: str
    eval_fraction: float
    max_seq_length: int

    def check(self) -> None:
        _one_of("task", self.task, TASKS)
        _within("eval-fraction", self.eval_fraction, 0.0 <= self.eval_fraction < 1.0, "in [0, 1)")
        _within("max-seq-length", self.max_seq_length, self.max_seq_length >= 2, ">= 2")


@dataclass(frozen=True)
class ModelSettings:
    model: str
    pooling: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: tuple[str, ...]  # () = peft's defaults for the architecture

    def check(self) -> None:
        _one_of("pooling", self.pooling, POOLINGS)
        _within("lora-rank", self.lora_rank, self.lora_rank >= 1, ">= 1")
        _within("lora-alpha", self.lora_alpha, self.lora_alpha > 0, "> 0")
        _within("lora-dropout", self.lora_dropout, 0.0 <= self.lora_dropout < 1.0, "in [0, 1)")


@dataclass(frozen=True)
class ScheduleSettings:
    probe_rounds: int
    probe_steps: int
    probe_batch_size: int
    probe_learning_rate: float
    local_epochs: int
    local_steps: int
    learning_rate: float
    batch_size: int

    def check(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _within(_key(field.name), value, value >= 0, ">= 0 (0 = chosen from the site's size)")


@dataclass(frozen=True)
class DPRequest:
    """What the server's run config asks of each site's DP; 0 means "not given" for the
    optional numbers. A request only: each site resolves it against its own policy."""

    dp: bool
    noise_multiplier: float
    target_epsilon: float
    delta: float
    max_grad_norm: float
    max_epsilon: float
    secure_noise: bool
    # ``distributed``: each site adds a share of the noise to its full-batch clipped gradient sum
    # and SecAgg+ sums them (``client.distributed_site``); the server takes a gradient step of
    # distributed-probe-learning-rate in the probe rounds (the head alone), of
    # distributed-learning-rate after. A site takes part only if its node config states how many
    # sites may collude with the server (distributed-dp-colluders); the run's value is a floor.
    dp_mode: str
    distributed_dp_colluders: int
    distributed_probe_learning_rate: float
    distributed_learning_rate: float

    @property
    def distributed(self) -> bool:
        return self.dp and self.dp_mode == "distributed"

    def check(self) -> None:
        for key in ("noise-multiplier", "target-epsilon", "max-epsilon"):
            value = getattr(self, key.replace("-", "_"))
            _within(key, value, value >= 0, ">= 0 (0 = not given)")
        _one_of("dp-mode", self.dp_mode, DP_MODES)
        _within("distributed-dp-colluders", self.distributed_dp_colluders, self.distributed_dp_colluders >= 0, ">= 0")
        for key in ("distributed-probe-learning-rate", "distributed-learning-rate"):
            value = getattr(self, key.replace("-", "_"))
            _within(key, value, value > 0, "> 0")
        _within("delta", self.delta, 0 <= self.delta < 1, "in [0, 1) (0 = not given)")
        _within("max-grad-norm", self.max_grad_norm, self.max_grad_norm > 0, "> 0")


@dataclass(frozen=True)
class StrategySettings:
    strategy: str
    proximal_mu: float
    server_learning_rate: float
    server_tau: float
    trim_beta: float
    krum_byzantine: int
    krum_select: int
    central_dp: bool
    central_dp_noise_multiplier: float
    central_dp_clipping_norm: float
    central_dp_delta: float
    num_sampled_clients: int
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_valid_updates: int
    update_norm_ratio: float
    max_update_norm: float
    flag_after_rejections: int
    upload_dtype: str

    @property
    def freezes_lora_a(self) -> bool:
        """FFA-LoRA (``ffa-lora`` or ``ffa-lora+<aggregator>``): A frozen, only B sent."""
        return self.strategy.partition("+")[0] == "ffa-lora"

    def check(self) -> None:
        for key in ("fraction-train", "fraction-evaluate"):
            value = getattr(self, key.replace("-", "_"))
            _within(key, value, 0.0 <= value <= 1.0, "in [0, 1]")
        for key in ("min-train-nodes", "min-evaluate-nodes", "min-valid-updates"):
            value = getattr(self, key.replace("-", "_"))
            _within(key, value, value >= 0, ">= 0")
        _one_of("upload-dtype", self.upload_dtype, UPLOAD_DTYPES)


@dataclass(frozen=True)
class SecureAggregationSettings:
    """SecAgg+ (``server.secure_aggregation``): the server learns only the weighted sum of a
    round's updates. Shares and threshold are fractions: of the round's sites that each site
    shares its keys with (1.0: all), and of those shares needed to unmask (the dropouts tolerated
    are the rest; fewer than that many colluding sites learn nothing). Each site's weighted
    update is clipped to [-clipping-range, clipping-range] per value before it is quantized, and
    its weight (``num-examples``) must not exceed max-weight."""

    secure_aggregation: bool
    secagg_shares: float
    secagg_threshold: float
    secagg_clipping_range: float
    secagg_max_weight: float

    def check(self) -> None:
        for key in ("secagg-shares", "secagg-threshold"):
            value = getattr(self, key.replace("-", "_"))
            _within(key, value, 0.0 < value <= 1.0, "in (0, 1]")
        for key in ("secagg-clipping-range", "secagg-max-weight"):
            value = getattr(self, key.replace("-", "_"))
            _within(key, value, value > 0, "> 0")


@dataclass(frozen=True)
class RunSettings:
    num_server_rounds: int
    seed: int
    round_timeout: float
    output_dir: str
    resume: bool
    central_eval_data: str
    data: DataSettings
    model: ModelSettings
    schedule: ScheduleSettings
    dp: DPRequest
    strategy: StrategySettings
    secure: SecureAggregationSettings

    @property
    def probe_rounds(self) -> int:
        """Rounds 1..P train the head alone (``privacy.plan``); only a classifier has a head."""
        return min(self.schedule.probe_rounds, self.num_server_rounds) if self.data.task == "classification" else 0

    def distributed_step(self, server_round: int, tensor: str) -> float:
        """The server's step size for ``tensor`` in a distributed-DP round: the probe rate for the
        head in the probe rounds (which train nothing else: the LoRA tensors' sums then hold
        noise alone, and stay unapplied), the other rate after."""
        if server_round <= self.probe_rounds:
            return 0.0 if is_lora_a(tensor) or is_lora_b(tensor) else self.dp.distributed_probe_learning_rate
        return self.dp.distributed_learning_rate

    @property
    def secure_sum_minimum(self) -> int:
        """The fewest updates a SecAgg+ sum is unmasked with: ``min-valid-updates``, never fewer
        than two. Distributed DP's sites read it too: a sum holds at least that many noise shares."""
        return max(2, self.strategy.min_valid_updates)

    def check(self) -> None:
        _within("num-server-rounds", self.num_server_rounds, self.num_server_rounds >= 1, ">= 1")
        _within("round-timeout", self.round_timeout, self.round_timeout > 0, "> 0")

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> "RunSettings":
        """Every key known, present and of its type (ints where an int is due, numbers where a
        float is, true/false, text), and every value in range; else :class:`ConfigError`."""
        known = all_keys()
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown run-config key(s): {', '.join(unknown)}")
        missing = [key for key in known if key not in config]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ConfigError(missing[0], f"the run config has no {', '.join(missing[:5])}{more}")
        settings = _build(cls, config)
        for section in (settings, settings.data, settings.model, settings.schedule, settings.dp, settings.strategy,
                        settings.secure):
            section.check()
        return settings

    def as_dict(self) -> dict[str, Any]:
        """The flat run config again (``config.json``): ``parse(as_dict())`` is this object."""
        flat: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if dataclasses.is_dataclass(value):
                flat |= {_key(f.name): _flat(getattr(value, f.name)) for f in dataclasses.fields(value)}
            else:
                flat[_key(field.name)] = value
        return flat


def all_keys() -> list[str]:
    """Every run-config key, in section order."""
    keys = []
    for field in dataclasses.fields(RunSettings):
        section = _section_type(RunSettings, field.name)
        keys += [_key(f.name) for f in dataclasses.fields(section)] if section else [_key(field.name)]
    return keys


def default_run_config() -> dict[str, Any]:
    """The defaults from the project's pyproject.toml (the Flower app config)."""
    if not PYPROJECT.is_file():
        raise FileNotFoundError(
            f"{PYPROJECT} not found: install fedlora from its source tree with 'pip install -e .'"
        )
    return dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Override known keys only: a typo is an error, not a silently ignored setting. Values
    given as text on a command line take the type of the key's default."""
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


# -- parsing ------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return name.replace("_", "-")


def _section_type(cls: type, name: str) -> type | None:
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _build(cls: type, config: Mapping[str, Any]):
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            values[field.name] = _build(hint, config)
        else:
            values[field.name] = _typed(_key(field.name), config[_key(field.name)], hint)
    return cls(**values)


def _typed(key: str, value: Any, hint: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"run config {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value != int(value):
            raise ConfigError(key, f"run config {key} must be a whole number, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(key, f"run config {key} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"run config {key} must be text, got {value!r}")
    if hint == tuple[str, ...]:
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _flat(value: Any) -> Any:
    return ",".join(value) if isinstance(value, tuple) else value


def _within(key: str, value: Any, ok: bool, bound: str) -> None:
    if not ok:
        raise ConfigError(key, f"run config {key} must be {bound}, got {value!r}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"run config {key} must be one of {', '.join(choices)}, got {value!r}")
