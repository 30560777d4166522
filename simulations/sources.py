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


def load_source(run_config: Mapping[str, Any], unit_column: str | None = None) -> datasets.Dataset:
    """The whole labelled dataset (``text``/``label`` or ``prompt``/``response``), plus the
    column that ``partition = "column:NAME"`` splits sites by and the privacy-unit column of
    user-level DP, when given."""
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
        unit_column or "",
    )


def load_file(
    path: str,
    run_config: Mapping[str, Any],
    label_names: list[str] | None,
    drop_bad_rows: bool = False,
    extra_columns: tuple[str, ...] = (),
) -> datasets.Dataset:
    """One site's (or the server's test) file, read with the run's column settings; a site
    drops bad rows rather than refusing (``fedlora.data.load_classification``)."""
    if run_config["task"] == "classification":
        dataset, _ = load_classification(
            path, str(run_config["text-column"]), str(run_config["label-column"]), label_names,
            drop_bad_rows, extra_columns,
        )
        return dataset
    return load_causal_lm(
        path, str(run_config["prompt-column"]), str(run_config["response-column"]), drop_bad_rows, extra_columns
    )


@lru_cache(maxsize=4)
def _load_cached(source, task, text_col, label_col, prompt_col, response_col, labels, seed, site_col, unit_col):
    if source == EMBEDDED_DATA:
        if task != "classification":
            raise DataError(f"{EMBEDDED_DATA} is a classification corpus; give --data for causal-lm", setting="data")
        from simulations.corpus import generate_clinical_corpus

        corpus = generate_clinical_corpus(seed=seed)
        missing = [c for c in (site_col, unit_col) if c and c not in corpus.column_names]
        if missing:
            raise DataError(f"{EMBEDDED_DATA} has no column {missing[0]!r}; columns: {', '.join(corpus.column_names)}",
                            setting="partition" if missing[0] == site_col else "privacy-unit-column")
        unknown = sorted(set(corpus["label"]) - set(labels))
        if unknown:
            raise DataError(f"{EMBEDDED_DATA} has labels {', '.join(unknown)} that label-names ({', '.join(labels)}) "
                            "does not list", setting="label-names")
        return corpus.map(lambda row: {"label": labels.index(row["label"])})
    config = {
        "task": task, "text-column": text_col, "label-column": label_col,
        "prompt-column": prompt_col, "response-column": response_col,
    }
    dataset = load_file(source, config, list(labels) or None)
    for column, setting in ((site_col, "partition"), (unit_col, "privacy-unit-column")):
        if column and column not in dataset.column_names:
            raw = load_table(source)
            if column not in raw.column_names:
                raise DataError(f"{source}: no column {column!r} ({setting}); columns: {', '.join(raw.column_names)}", setting=setting)
            dataset = dataset.add_column(column, [str(v) for v in raw[column]])
    return dataset
