"""Per-round checkpoints: ``checkpoints/round-<r>/`` holds the global adapter in PEFT format
(so any round loads with ``PeftModel.from_pretrained``), ``state.json`` with the history so
far, and ``server_optimizer.safetensors`` with FedAdam's or FedYogi's moments when the strategy
keeps them (``strategies.server_state``); ``--resume`` continues from the newest complete one."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from fedlora.adapters import METADATA_FILE, load_adapter_state, save_adapter
from fedlora.run_config import ConfigError, RunSettings
from server.history import RoundRecord, history_json, read_history, write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SERVER_OPTIMIZER = "server_optimizer.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    path: Path
    history: list[RoundRecord]

    def adapter(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / ADAPTER_WEIGHTS))

    def server_optimizer(self) -> dict[str, np.ndarray]:
        path = self.path / SERVER_OPTIMIZER
        return load_numpy(str(path)) if path.is_file() else {}


def save_checkpoint(
    out_dir: Path,
    server_round: int,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    metadata: dict[str, Any],
    history: list[RoundRecord],
    server_optimizer: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the round's checkpoint completely, then move it into place (atomic on one disk)."""
    final = out_dir / CHECKPOINTS / f"round-{server_round}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, tokenizer, {**metadata, "round": server_round})
    if server_optimizer:
        save_numpy(server_optimizer, str(tmp / SERVER_OPTIMIZER))
    write_json(tmp / STATE_FILE, {"round": server_round, "history": history_json(history)})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint (a ``.tmp`` left by a crash is ignored)."""
    found = []
    for path in (out_dir / CHECKPOINTS).glob("round-*"):
        suffix = path.name.removeprefix("round-")
        if suffix.isdigit() and (path / STATE_FILE).is_file() and (path / ADAPTER_WEIGHTS).is_file():
            found.append((int(suffix), path))
    if not found:
        return None
    server_round, path = max(found)
    state = json.loads((path / STATE_FILE).read_text())
    return Checkpoint(round=server_round, path=path, history=read_history(state["history"]))


def restore(model: PeftModel, checkpoint: Checkpoint) -> None:
    load_adapter_state(model, checkpoint.adapter())


def check_resumable(out_dir: Path, checkpoint: Checkpoint, settings: RunSettings, label_names: list[str]) -> None:
    """Refuse (``ConfigError``) to resume ``out_dir`` with settings that do not match, as typed
    values, its saved ``config.json``. Label names are compared as resolved: those the run
    config gave, else those the checkpoint's adapter was made with (``label_names`` now)."""
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        return
    try:
        saved = RunSettings.parse(json.loads(saved_path.read_text()))
    except (ValueError, OSError) as err:  # ConfigError included
        raise ConfigError("resume", f"cannot resume {out_dir}: its config.json cannot be read ({err})") from err
    labels_then = list(saved.data.label_names) or json.loads((checkpoint.path / METADATA_FILE).read_text())["label_names"]
    pairs = {
        "model": (saved.model.model, settings.model.model),
        "task": (saved.data.task, settings.data.task),
        "label-names": (labels_then, label_names),
        "lora-rank": (saved.model.lora_rank, settings.model.lora_rank),
        "lora-target-modules": (saved.model.lora_target_modules, settings.model.lora_target_modules),
        "strategy": (saved.strategy.strategy, settings.strategy.strategy),
    }
    changed = [f"{key}: {then!r} -> {now!r}" for key, (then, now) in pairs.items() if then != now]
    if changed:
        raise ConfigError(changed[0].partition(":")[0], f"cannot resume {out_dir} with different settings "
                          f"({'; '.join(changed)}); use a new output-dir")
