"""The federation's data source named in the run config (``data``), as the server and simulated
sites see it: ``embedded:clinical-notes`` (the generated default corpus), a local file or
``save_to_disk`` folder, or a hub dataset name."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import datasets

from fedlora.data import DataError, label_names_of, load_causal_lm, load_classification, load_table

EMBEDDED_DATA = "embedded:clinical-notes"


def parse_label_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def resolve_label_names(run_config: Mapping[str, Any]) -> list[str]:
    """``label-names`` from the run config, else the labels of the embedded corpus or of the
    data file; one order for every site, so that label i means the same class everywhere."""
    names = parse_label_names(str(run_config.get("label-names", "")))
    if names:
        return names
    source = str(run_config["data"])
    if source == EMBEDDED_DATA:
        from simulations.corpus import CLINICAL_LABELS

        return list(CLINICAL_LABELS)
    return label_names_of(source, str(run_config["label-column"]))


def load_source(run_config: Mapping[str, Any]) -> datasets.Dataset:
    """The whole labelled dataset (``text``/``label`` or ``prompt``/``response``), plus the
    column that ``partition = "column:NAME"`` splits sites by."""
    return _load_cached(
        str(run_config["data"]),
        str(run_config["task"]),
        str(run_config["text-column"]),
        str(run_config["label-column"]),
        str(run_config["prompt-column"]),
        str(run_config["response-column"]),
        tuple(resolve_label_names(run_config)) if run_config["task"] == "classification" else (),
        int(run_config["seed"]),
        str(run_config["partition"]).removeprefix("column:") if str(run_config["partition"]).startswith("column:") else "",
    )


def load_file(path: str, run_config: Mapping[str, Any], label_names: list[str] | None) -> datasets.Dataset:
    """One site's (or the server's test) file, read with the run's column settings."""
    if run_config["task"] == "classification":
        dataset, _ = load_classification(
            path, str(run_config["text-column"]), str(run_config["label-column"]), label_names
        )
        return dataset
    return load_causal_lm(path, str(run_config["prompt-column"]), str(run_config["response-column"]))


@lru_cache(maxsize=4)
def _load_cached(source, task, text_col, label_col, prompt_col, response_col, labels, seed, site_col):
    if source == EMBEDDED_DATA:
        if task != "classification":
            raise ValueError(f"{EMBEDDED_DATA} is a classification corpus; give --data for causal-lm")
        from simulations.corpus import generate_clinical_corpus

        corpus = generate_clinical_corpus(seed=seed)
        return corpus.map(lambda row: {"label": labels.index(row["label"])})
    config = {
        "task": task, "text-column": text_col, "label-column": label_col,
        "prompt-column": prompt_col, "response-column": response_col,
    }
    dataset = load_file(source, config, list(labels) or None)
    if site_col:
        raw = load_table(source)
        if site_col not in raw.column_names:
            raise DataError(f"{source}: no column {site_col!r} to partition by; columns: {', '.join(raw.column_names)}")
        dataset = dataset.add_column(site_col, [str(v) for v in raw[site_col]])
    return dataset
