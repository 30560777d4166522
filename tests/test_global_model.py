"""The coordinator's model: initial adapter, centralized evaluation, PEFT-format saving."""

from __future__ import annotations

import json

import torch
from peft import PeftModel

from fedlora.model import load_base_model
from server.global_model import GlobalModel
from tests.conftest import LABELS, settings_of


def test_initial_adapter_is_seeded_and_contains_only_adapter_tensors(tiny_run_config):
    first, second = GlobalModel.load(settings_of(tiny_run_config)).arrays(), GlobalModel.load(settings_of(tiny_run_config)).arrays()
    assert list(first.keys()) == list(second.keys())
    assert all(torch.equal(torch.tensor(first[k].numpy()), torch.tensor(second[k].numpy())) for k in first)
    assert all("lora_" in k or "classifier" in k for k in first)


def test_central_evaluation_on_a_server_side_file(tiny_run_config, classification_csv):
    global_model = GlobalModel.load(settings_of(tiny_run_config))
    result = global_model.central_evaluator(str(classification_csv))(global_model.arrays())
    assert result["num-examples"] == 90
    assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0


def test_saved_adapter_loads_with_peft_from_pretrained(tiny_run_config, tiny_bert, tmp_path):
    global_model = GlobalModel.load(settings_of(tiny_run_config))
    path = global_model.save(tmp_path / "adapter")
    assert json.loads((path / "fedlora.json").read_text())["label_names"] == LABELS
    loaded = PeftModel.from_pretrained(load_base_model(tiny_bert, "classification", LABELS), str(path))
    saved = global_model.arrays()
    reloaded = {k: v for k, v in loaded.state_dict().items()}
    lora_a = next(k for k in saved if "lora_A" in k)
    match = next(v for k, v in reloaded.items() if k.replace(".default", "") == lora_a)
    assert torch.equal(match, torch.tensor(saved[lora_a].numpy()))


def test_resume_with_other_adapter_settings_is_refused(tiny_run_config, tmp_path):
    import pytest

    from fedlora.run_config import ConfigError
    from server.checkpoints import Checkpoint, check_resumable
    from server.history import write_json

    checkpoint = Checkpoint(round=1, path=tmp_path / "checkpoints" / "round-1", history=[])
    checkpoint.path.mkdir(parents=True)
    labels = list(settings_of(tiny_run_config).data.label_names)
    write_json(tmp_path / "config.json", tiny_run_config | {"lora-target-modules": "query, value"})
    modules = tiny_run_config | {"lora-target-modules": "query,value"}  # the same list, written differently
    check_resumable(tmp_path, checkpoint, settings_of(modules), labels)
    with pytest.raises(ConfigError, match="lora-rank: 8 -> 16") as refused:
        check_resumable(tmp_path, checkpoint, settings_of({**modules, "lora-rank": 16}), labels)
    assert refused.value.setting == "lora-rank"


def test_an_older_run_that_read_its_labels_from_the_data_resumes(tiny_run_config, tmp_path):
    """Its config.json says label-names = "" (read from the data), and its checkpoint's adapter
    the labels it was made with; a simulation now names them in the run config."""
    from server.checkpoints import Checkpoint, check_resumable
    from server.history import write_json

    checkpoint = Checkpoint(round=1, path=tmp_path / "checkpoints" / "round-1", history=[])
    checkpoint.path.mkdir(parents=True)
    write_json(checkpoint.path / "fedlora.json", {"label_names": ["cardio", "pulmo", "gastro"]})
    write_json(tmp_path / "config.json", tiny_run_config | {"label-names": ""})
    check_resumable(tmp_path, checkpoint, settings_of(tiny_run_config), ["cardio", "pulmo", "gastro"])
