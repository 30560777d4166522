"""The coordinator's copy of the model: base weights + the global adapter, used to create the
initial adapter, to evaluate centrally and to save the adapter in PEFT format. The base
weights never travel; only adapter tensors do."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.adapters import adapter_state, attach_adapter, load_adapter_state, save_adapter
from fedlora.evaluation import evaluate
from fedlora.model import load_base_model, load_tokenizer, portable_model_name
from fedlora.run_config import LoraSettings
from fedlora.tasks import encode
from simulations.sources import load_file, resolve_label_names


@dataclass
class GlobalModel:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    run_config: Mapping[str, Any]
    label_names: list[str]

    @classmethod
    def load(cls, run_config: Mapping[str, Any]) -> "GlobalModel":
        task = str(run_config["task"])
        labels = resolve_label_names(run_config) if task == "classification" else []
        # The seed fixes the initial adapter (and FFA-LoRA's frozen A) for the whole run.
        torch.manual_seed(int(run_config["seed"]))
        base = load_base_model(str(run_config["model"]), task, labels or None, str(run_config["pooling"]))
        lora = LoraSettings.from_run_config(run_config)
        model = attach_adapter(base, lora.peft_config(task), freeze_lora_a=lora.freeze_a)
        return cls(model, load_tokenizer(str(run_config["model"])), run_config, labels)

    def arrays(self) -> ArrayRecord:
        return ArrayRecord(adapter_state(self.model))

    def set_arrays(self, arrays: ArrayRecord) -> None:
        load_adapter_state(self.model, arrays.to_torch_state_dict())

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "base_model": portable_model_name(str(self.run_config["model"])),
            "task": str(self.run_config["task"]),
            "label_names": self.label_names,
            "max_seq_length": int(self.run_config["max-seq-length"]),
            # The head's input (fedlora.pooling), resolved: the adapter is only right with it.
            "pooling": getattr(self.model.get_base_model().config, "fedlora_pooling", None),
        }

    def save(self, out_dir: Path) -> Path:
        return save_adapter(self.model, out_dir, self.tokenizer, self.metadata)

    def central_evaluator(self, path: str):
        """Evaluate the global adapter on a server-side labelled file after each round."""
        task = str(self.run_config["task"])
        data = load_file(path, self.run_config, self.label_names or None)
        examples = encode(data, self.tokenizer, task, int(self.run_config["max-seq-length"]))

        def central_eval(arrays: ArrayRecord) -> dict[str, float]:
            self.set_arrays(arrays)
            return evaluate(self.model, examples, task, self.tokenizer.pad_token_id)

        return central_eval
