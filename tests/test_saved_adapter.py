"""A saved adapter on another machine: the README's loading snippet as written, in a fresh
process, from a moved copy of the folder; ``fedlora evaluate`` on every ``--data`` form that
``simulate`` takes; ``fedlora predict``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.model import EMBEDDED_MODEL, portable_model_name, resolve_model_path
from fedlora.run_config import default_run_config
from server.global_model import GlobalModel
from fedlora.corpus import CLINICAL_LABELS
from tests.conftest import settings_of

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def moved_adapter(tmp_path_factory) -> Path:
    """The main job's kind of adapter (embedded model and corpus), saved by the coordinator,
    then moved to another directory: the original is gone."""
    saved = GlobalModel.load(settings_of(default_run_config())).save(tmp_path_factory.mktemp("coordinator") / "adapter")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    return Path(shutil.move(saved, elsewhere / "outputs" / "latest" / "adapter"))


def readme_loading_snippets() -> list[str]:
    """The python blocks of README's section on loading an adapter."""
    section = README.read_text().split("## Using the trained adapter", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_adapter_names_its_base_model_portably(moved_adapter):
    assert json.loads((moved_adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_MODEL
    model_dir = str(resolve_model_path(EMBEDDED_MODEL))
    for path in moved_adapter.iterdir():
        assert model_dir not in path.read_bytes().decode(errors="replace"), f"{path.name} holds a local path"
    assert portable_model_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_model_name(model_dir) == Path(model_dir).name


@pytest.mark.parametrize("snippet", range(2))
def test_the_readme_snippet_runs_as_written_in_a_fresh_process(moved_adapter, snippet):
    snippets = readme_loading_snippets()
    assert len(snippets) == 2
    code = snippets[snippet] + "\nprint('LABEL', label)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=moved_adapter.parents[2], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MISSING" not in done.stderr and "Consider training" not in done.stderr and "Loading weights" not in done.stderr
    assert done.stdout.split("LABEL ")[1].strip() in CLINICAL_LABELS


def test_evaluate_takes_the_embedded_corpus_like_simulate(moved_adapter, capsys):
    assert main(["evaluate", "--adapter", str(moved_adapter), "--data", "embedded:clinical-notes", "--seed", "123", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 1500 and 0 <= result["accuracy"] <= 1


def test_predict_labels_each_text(moved_adapter, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("chest pain and palpitations\n\nrash on both arms\n")
    assert main(["predict", "--adapter", str(moved_adapter), "--file", str(texts), "--text", "a cough", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in results] == ["a cough", "chest pain and palpitations", "rash on both arms"]
    assert all(r["label"] in CLINICAL_LABELS and 0 < r["probability"] <= 1 for r in results)
    assert main(["predict", "--adapter", str(tmp_path), "--text", "x"]) == 2
    assert "not a saved adapter" in capsys.readouterr().err


def test_predict_continues_a_prompt_with_a_causal_lm_adapter(tiny_run_config, tiny_llama, tmp_path, capsys):
    from fedlora.run_config import apply_overrides

    config = apply_overrides(tiny_run_config, {"model": tiny_llama, "task": "causal-lm"})
    adapter = GlobalModel.load(settings_of(config)).save(tmp_path / "adapter")
    argv = ["predict", "--adapter", str(adapter), "--text", "Summarise: fever", "--max-new-tokens", "5", "--json"]
    assert main([*argv, "--base-model", tiny_llama]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["text"] == "Summarise: fever" and isinstance(result["generated"], str)
    assert main(["evaluate", "--adapter", str(adapter), "--data", "embedded:clinical-notes", "--base-model", tiny_llama]) == 2
    assert "embedded:clinical-notes is a classification corpus" in capsys.readouterr().err


def test_after_saving_the_server_never_looks_its_base_model_up(tiny_run_config, tmp_path):
    """The portable name is no path on this machine: reading the adapter's tensors afterwards
    (every round) must not make peft look it up on the hub."""
    import warnings

    server = GlobalModel.load(settings_of(tiny_run_config))
    server.save(tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server.arrays()
    assert not [w for w in caught if "config file" in str(w.message)], [str(w.message) for w in caught]
