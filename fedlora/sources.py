"""The federation's data source named in the run config (``data``), as the coordinator reads it
(the server's labels, a simulation before it partitions, ``fedlora evaluate``); a site reads only
its own file (``client.local_data``). The source is ``embedded:clinical-notes`` (the generated
default corpus), a local file or ``save_to_disk`` folder, or a hub dataset name."""

from __future__ import annotations

from functools import lru_cache

import datasets

from fedlora.data import DataError, label_names_of, load_causal_lm, load_classification, load_table
from fedlora.run_config import DataSettings

EMBEDDED_DATA = "embedded:clinical-notes"
# The embedded corpus has 1,500 notes, 500 for each of the default 3 sites; a simulation of more
# sites gets 500 more notes per site, so that every site trains on as much as in the default run.
EMBEDDED_NOTES_PER_SITE, EMBEDDED_MIN_SITES = 500, 3


def resolve_label_names(data: DataSettings) -> list[str]:
    """``label-names`` from the run config, else the labels of the embedded corpus or of the
    data file; one order for every site, so that label i means the same class everywhere."""
    if data.label_names:
        return list(data.label_names)
    if data.data == EMBEDDED_DATA:
        from fedlora.corpus import CLINICAL_LABELS

        return list(CLINICAL_LABELS)
    return label_names_of(data.data, data.label_column)


def load_source(data: DataSettings, seed: int, extra_columns: tuple[str, ...] = (), sites: int = EMBEDDED_MIN_SITES) -> datasets.Dataset:
    """The whole labelled dataset (``text``/``label`` or ``prompt``/``response``), plus the
    column that ``partition = "column:NAME"`` splits sites by and ``extra_columns`` (the
    privacy-unit columns of user-level DP), as strings. ``seed`` generates the embedded corpus,
    500 notes per site of the ``sites`` it is split over (at least 3: the 1,500 of the default)."""
    labels = tuple(resolve_label_names(data)) if data.task == "classification" else ()
    site_column = data.partition.removeprefix("column:") if data.partition.startswith("column:") else ""
    columns = (data.text_column, data.label_column, data.prompt_column, data.response_column)
    notes = EMBEDDED_NOTES_PER_SITE * max(sites, EMBEDDED_MIN_SITES)
    return _load_cached(data.data, data.task, columns, labels, seed, site_column, tuple(extra_columns), notes)


def load_file(
    path: str,
    data: DataSettings,
    label_names: list[str] | None,
    drop_bad_rows: bool = False,
    extra_columns: tuple[str, ...] = (),
) -> datasets.Dataset:
    """One site's (or the server's test) file, read with the run's column settings; a site
    drops bad rows rather than refusing (``fedlora.data.load_classification``)."""
    if data.task == "classification":
        dataset, _ = load_classification(
            path, data.text_column, data.label_column, label_names, drop_bad_rows, extra_columns,
        )
        return dataset
    return load_causal_lm(path, data.prompt_column, data.response_column, drop_bad_rows, extra_columns)


@lru_cache(maxsize=4)
def _load_cached(source: str, task: str, names: tuple[str, str, str, str], labels: tuple[str, ...], seed: int,
                 site_col: str, unit_cols: tuple[str, ...], embedded_notes: int) -> datasets.Dataset:
    """Keyed on what decides the rows read: the source, its columns (``names``: text, label,
    prompt, response), the resolved labels, the extra columns and the embedded corpus's size."""
    columns = {column: "privacy-unit-column" for column in unit_cols} | ({site_col: "partition"} if site_col else {})
    if source == EMBEDDED_DATA:
        if task != "classification":
            raise DataError(f"{EMBEDDED_DATA} is a classification corpus; give --data for causal-lm", setting="data")
        from fedlora.corpus import generate_clinical_corpus

        corpus = generate_clinical_corpus(num_samples=embedded_notes, seed=seed)
        missing = [c for c in columns if c not in corpus.column_names]
        if missing:
            raise DataError(f"{EMBEDDED_DATA} has no column {missing[0]!r}; columns: {', '.join(corpus.column_names)}",
                            setting=columns[missing[0]])
        unknown = sorted(set(corpus["label"]) - set(labels))
        if unknown:
            raise DataError(f"{EMBEDDED_DATA} has labels {', '.join(unknown)} that label-names ({', '.join(labels)}) "
                            "does not list", setting="label-names")
        return corpus.map(lambda row: {"label": labels.index(row["label"])})
    text, label, prompt, response = names
    read = DataSettings(data=source, task=task, text_column=text, label_column=label, prompt_column=prompt,
                        response_column=response, label_names=labels, partition="", eval_fraction=0.0, max_seq_length=2)
    dataset = load_file(source, read, list(labels) or None)
    for column in columns:
        if column not in dataset.column_names:
            raw = load_table(source)
            if column not in raw.column_names:
                raise DataError(f"{source}: no column {column!r} ({columns[column]}); columns: {', '.join(raw.column_names)}",
                                setting=columns[column])
            dataset = dataset.add_column(column, [str(v) for v in raw[column]])
    return dataset
