"""Shared fixtures: tiny randomly initialised BERT and Llama models saved to disk (so tests use
the same loading path as real sites), generated data, and a run config for them."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from fedlora.model import EMBEDDED_MODEL, resolve_model_path
from fedlora.run_config import RunSettings, apply_overrides, default_run_config

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on two workers (pyproject addopts); on two cores each gets one thread, in
    # its own process and in those it starts (simulated sites, SuperNodes), not two threads each.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

LABELS = ["cardio", "pulmo", "gastro"]
_WORDS = {
    "cardio": "heart chest palpitations ecg troponin murmur".split(),
    "pulmo": "cough wheeze sputum spirometry dyspnoea inhaler".split(),
    "gastro": "abdominal nausea liver bowel endoscopy reflux".split(),
}
_SHARED = "patient reports pain fever fatigue today review plan".split()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL)).save_pretrained(path)
    return path


def _save(model, tokenizer_dir: Path, path: Path) -> str:
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer_dir) -> str:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    return _save(BertModel(config), tokenizer_dir, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=102, bos_token_id=101,
    )
    return _save(LlamaForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


def make_classification_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = [rng.choice(_WORDS[label] + _SHARED) for _ in range(rng.randint(6, 14))]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def make_instruction_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {"prompt": f"Summarise: {' '.join(rng.choice(_SHARED) for _ in range(6))}",
         "response": " ".join(rng.choice(_WORDS[rng.choice(LABELS)]) for _ in range(4))}
        for _ in range(n)
    ]


@pytest.fixture
def classification_csv(tmp_path) -> Path:
    path = tmp_path / "notes.csv"
    pd.DataFrame(make_classification_rows(90)).to_csv(path, index=False)
    return path


@pytest.fixture
def instruction_jsonl(tmp_path) -> Path:
    path = tmp_path / "instructions.jsonl"
    pd.DataFrame(make_instruction_rows(60)).to_json(path, orient="records", lines=True)
    return path


def settings_of(config: dict) -> RunSettings:
    """A test's flat run config, typed as fedlora's edges type it."""
    return RunSettings.parse(config)


@pytest.fixture
def tiny_run_config(tiny_bert, classification_csv, tmp_path) -> dict:
    """A complete run config for a fast federation on the tiny BERT and generated notes."""
    return apply_overrides(
        default_run_config(),
        {
            "model": tiny_bert, "data": str(classification_csv), "label-names": ",".join(LABELS),
            "num-server-rounds": 2, "batch-size": 8, "max-seq-length": 32, "learning-rate": 0.01,
            "probe-rounds": 0, "output-dir": str(tmp_path / "out"), "min-train-nodes": 2, "min-evaluate-nodes": 2,
            "target-epsilon": 8.0,
        },
    )


def pytest_collection_modifyitems(items):
    """Real-process deployment tests race against heartbeats and process start-up on a loaded
    2-core machine; one rerun separates such timing flakes from real failures."""
    for item in items:
        if item.get_closest_marker("deployment"):
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=5))


@pytest.fixture(autouse=True)
def cold_site_process():
    """Every test starts as a fresh site process: no split tokenised by an earlier test."""
    from client import encoding

    encoding._ENCODED.clear()
