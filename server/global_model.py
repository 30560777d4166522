"""The coordinator's copy of the model: base weights + the global adapter, used to create the
initial adapter, to evaluate centrally and to save the adapter in PEFT format. The base
weights never travel; only adapter tensors do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.adapters import adapter_state, attach_adapter, load_adapter_state, lora_config, save_adapter
from fedlora.evaluation import evaluate
from fedlora.model import load_base_model, load_tokenizer, portable_model_name
from fedlora.run_config import RunSettings
from fedlora.tasks import encode
from fedlora.sources import load_file, resolve_label_names


@dataclass
class GlobalModel:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    settings: RunSettings
    label_names: list[str]

    @classmethod
    def load(cls, settings: RunSettings) -> "GlobalModel":
        data, model = settings.data, settings.model
        labels = resolve_label_names(data) if data.task == "classification" else []
        # The seed fixes the initial adapter (and FFA-LoRA's frozen A) for the whole run.
        torch.manual_seed(settings.seed)
        base = load_base_model(model.model, data.task, labels or None, model.pooling)
        lora = lora_config(data.task, model.lora_rank, model.lora_alpha, model.lora_dropout, model.lora_target_modules)
        peft_model = attach_adapter(base, lora, freeze_lora_a=settings.strategy.freezes_lora_a)
        return cls(peft_model, load_tokenizer(model.model), settings, labels)

    def arrays(self) -> ArrayRecord:
        return ArrayRecord(adapter_state(self.model))

    def set_arrays(self, arrays: ArrayRecord) -> None:
        load_adapter_state(self.model, arrays.to_torch_state_dict())

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "base_model": portable_model_name(self.settings.model.model),
            "task": self.settings.data.task,
            "label_names": self.label_names,
            "max_seq_length": self.settings.data.max_seq_length,
            # The head's input (fedlora.pooling), resolved: the adapter is only right with it.
            "pooling": getattr(self.model.get_base_model().config, "fedlora_pooling", None),
        }

    def save(self, out_dir: Path) -> Path:
        return save_adapter(self.model, out_dir, self.tokenizer, self.metadata)

    def central_evaluator(self, path: str):
        """Evaluate the global adapter on a server-side labelled file after each round."""
        data = self.settings.data
        rows = load_file(path, data, self.label_names or None)
        examples = encode(rows, self.tokenizer, data.task, data.max_seq_length)

        def central_eval(arrays: ArrayRecord) -> dict[str, float]:
            self.set_arrays(arrays)
            return evaluate(self.model, examples, data.task, self.tokenizer.pad_token_id)

        return central_eval
