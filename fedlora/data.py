"""Reading one site's data: local files, saved datasets or Hub datasets.

Every loader either returns a clean in-memory ``datasets.Dataset`` or raises
:class:`DataError` with a message that names the source and the problem, so a
site operator never has to read a library stack trace to fix their file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from logging import WARNING

import datasets
import pyarrow.parquet as pq
from flwr.common.logger import log

# Reading a site's file is one step of a round, not a task worth a progress bar in its log.
datasets.disable_progress_bars()

SUPPORTED_EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet")

# Hub ids are `name` or `owner/name`; anything with more structure, or with a
# data-file extension, is treated as a (missing) local path instead.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class DataError(ValueError):
    """A site's data cannot be used; the message names the source and the problem (for the
    site's own log: it may quote a cell), ``setting`` the config key involved (public)."""

    def __init__(self, message: str, setting: str = "data-path") -> None:
        super().__init__(message)
        self.setting = setting


def load_table(source: str) -> datasets.Dataset:
    """Load ``source`` as a non-empty in-memory dataset.

    ``source`` is a ``.csv``, ``.json``/``.jsonl`` or ``.parquet`` file, a
    directory written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``
    (the ``train`` split of a dict), or a Hugging Face Hub dataset id.
    """
    path = Path(source)
    if path.is_dir():
        table = _load_saved(source)
    elif path.is_file():
        table = _load_file(path)
    elif _HUB_ID.match(source) and path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        table = _load_hub(source)
    else:
        raise DataError(f"{source}: no such file or directory")
    if table.num_rows == 0:
        raise DataError(f"{source}: contains no rows")
    return table


def load_classification(
    source: str,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    drop_bad_rows: bool = False,
    extra_columns: Sequence[str] = (),
) -> tuple[datasets.Dataset, list[str]]:
    """Load a text-classification set as columns ``text`` (str) and ``label`` (int).

    Labels are matched as strings against ``label_names`` (so integer labels in a
    file match names ``"0"``, ``"1"``, ...); when ``label_names`` is None they are
    the sorted unique label strings. Returns the dataset and the label names,
    where each ``label`` is an index into those names.

    A row with a missing or blank text or label, or a label not in ``label_names``, is an
    error naming it; with ``drop_bad_rows`` it is dropped instead (a site's choice: whether
    *some* row is bad must not decide if the site answers, see ``docs/privacy.md``).
    ``extra_columns`` are carried along as strings (e.g. the privacy unit).
    """
    table = load_table(source)
    if drop_bad_rows:
        names = None if label_names is None else [str(n) for n in label_names]
        table = _drop(table, source, [
            not _is_blank(text) and not _is_blank(label) and (names is None or _label_text(table, label_column, label) in names)
            for text, label in zip(_column(table, source, text_column, "text-column"),
                                   _column(table, source, label_column, "label-column"))
        ], extra_columns)
    _check_filled(table, source, extra_columns)
    texts = _required_strings(table, source, text_column, "text-column")
    labels = _label_strings(table, source, label_column)
    names = sorted(set(labels)) if label_names is None else [str(n) for n in label_names]
    index = {name: i for i, name in enumerate(names)}
    for row, label in enumerate(labels, start=1):
        if label not in index:
            raise DataError(
                f"{source}: row {row} has unknown label {label!r} in column "
                f"{label_column!r}; allowed labels: {', '.join(names)}",
                setting="label-names",
            )
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Value("int64"),
         **{column: datasets.Value("string") for column in extra_columns}}
    )
    dataset = datasets.Dataset.from_dict(
        {"text": texts, "label": [index[label] for label in labels],
         **{column: [str(v) for v in table[column]] for column in extra_columns}},
        features=features,
    )
    return dataset, names


def load_causal_lm(
    source: str,
    prompt_column: str = "prompt",
    response_column: str = "response",
    drop_bad_rows: bool = False,
    extra_columns: Sequence[str] = (),
) -> datasets.Dataset:
    """Load a prompt/response set as string columns ``prompt`` and ``response`` (rows with a
    missing or blank one dropped with ``drop_bad_rows``, else an error)."""
    table = load_table(source)
    if drop_bad_rows:
        table = _drop(table, source, [
            not _is_blank(p) and not _is_blank(r)
            for p, r in zip(_column(table, source, prompt_column, "prompt-column"),
                            _column(table, source, response_column, "response-column"))
        ], extra_columns)
    _check_filled(table, source, extra_columns)
    return datasets.Dataset.from_dict(
        {
            "prompt": _required_strings(table, source, prompt_column, "prompt-column"),
            "response": _required_strings(table, source, response_column, "response-column"),
            **{column: [str(v) for v in table[column]] for column in extra_columns},
        },
        features=datasets.Features(
            {"prompt": datasets.Value("string"), "response": datasets.Value("string"),
             **{column: datasets.Value("string") for column in extra_columns}}
        ),
    )


def _check_filled(table: datasets.Dataset, source: str, columns: Sequence[str]) -> None:
    """Every row has a value in each of ``columns`` (extra ones a caller carries along)."""
    for column in columns:
        if any(_is_blank(v) for v in _column(table, source, column, "privacy-unit-column")):
            raise DataError(f"{source}: column {column!r} has empty values; every row needs one", setting="privacy-unit-column")


def _drop(table: datasets.Dataset, source: str, keep: list[bool], extra_columns: Sequence[str]) -> datasets.Dataset:
    """The rows of ``table`` marked in ``keep`` that also have every extra column filled."""
    for column in extra_columns:
        keep = [k and not _is_blank(v) for k, v in zip(keep, _column(table, source, column, "privacy-unit-column"))]
    dropped = keep.count(False)
    if dropped:
        log(WARNING, "%s: %s of %s rows dropped (a missing text, label or privacy unit, or a label "
            "not in label-names)", source, dropped, len(keep))
    return table.select([i for i, k in enumerate(keep) if k], keep_in_memory=True)


def _is_blank(value: object) -> bool:
    return _is_missing(value) or not str(value).strip()


def _label_text(table: datasets.Dataset, column: str, value: object) -> str:
    feature = table.features[column]
    return feature.int2str(int(value)) if isinstance(feature, datasets.ClassLabel) else str(value)


def label_names_of(source: str, label_column: str = "label") -> list[str]:
    """Sorted unique labels of ``source`` as strings (one label order for all sites)."""
    return sorted(set(_label_strings(load_table(source), source, label_column)))


def _load_file(path: Path) -> datasets.Dataset:
    """Validate and load one data file; keep_in_memory so no cache sits beside it."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)} or a save_to_disk directory"
        )
    # Check structure ourselves first: pandas silently misreads some broken CSVs
    # (an extra field turns the first column into an index) and the library
    # errors for JSON report 0-based rows without the file's line numbers.
    if suffix == ".csv":
        _check_csv(path, _read_text(path))
        # Keep "NA", "None", "null" as text: they can be real labels or notes.
        loader, kwargs = datasets.Dataset.from_csv, {"keep_default_na": False}
    elif suffix == ".parquet":
        _check_parquet(path)
        loader, kwargs = datasets.Dataset.from_parquet, {}
    else:
        _check_json(path, _read_text(path))
        loader, kwargs = datasets.Dataset.from_json, {}
    try:
        # The prepared copy lands in the Hugging Face cache (not next to the
        # file) and is reused, so loading the same file twice is cheap.
        return loader(str(path), keep_in_memory=True, **kwargs)
    except Exception as error:  # any library failure becomes a readable DataError
        raise DataError(
            f"{path}: could not be read as {suffix[1:].upper()}: {_root_cause(error)}"
        ) from error


def _read_text(path: Path) -> str:
    """Decode a text file as UTF-8, pointing at the first bad byte if it is not."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        offset = error.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line = raw[:offset].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid UTF-8 text: undecodable byte 0x{raw[offset]:02x} at "
            f"byte offset {offset} (line {line}); re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _check_csv(path: Path, text: str) -> None:
    """Reject CSVs with unbalanced quotes, ragged rows or no data rows."""
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as error:
        raise DataError(
            f"{path}: malformed CSV near line {reader.line_num}: {error}"
        ) from None
    header = rows[0][1]
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise DataError(
                f"{path}: malformed CSV: line {line} has {len(row)} fields but the "
                f"header has {len(header)}"
            )
    if len(rows) == 1:
        raise DataError(f"{path}: contains no rows (only a header)")


def _check_json(path: Path, text: str) -> None:
    """Accept one JSON document or JSON Lines; report the first bad line otherwise."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole_error:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for number, line in lines:
            try:
                json.loads(line)
            except json.JSONDecodeError as line_error:
                # A failing first line means the file is not JSON Lines at all,
                # so the whole-document error is the accurate one.
                if number == lines[0][0]:
                    number, column, message = (
                        whole_error.lineno, whole_error.colno, whole_error.msg,
                    )
                else:
                    column, message = line_error.colno, line_error.msg
                raise DataError(
                    f"{path}: malformed JSON at line {number}, column {column}: {message}"
                ) from None
        return
    if isinstance(document, list) and not document:
        raise DataError(f"{path}: contains no rows (an empty JSON array)")


def _check_parquet(path: Path) -> None:
    """Reject files that are not Parquet or hold no rows."""
    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a valid Parquet file: {error}") from None
    if rows == 0:
        raise DataError(f"{path}: contains no rows")


def _load_saved(source: str) -> datasets.Dataset:
    """Load a save_to_disk directory in memory, so later maps write no cache into it."""
    state = Path(source, "state.json")
    # datasets cannot reload a saved 0-row Dataset (it has no data files and
    # load_from_disk fails with an IndexError), so recognise that case first.
    if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
        raise DataError(f"{source}: contains no rows")
    try:
        loaded = datasets.load_from_disk(source, keep_in_memory=True)
    except Exception as error:
        raise DataError(
            f"{source}: is a directory but not one written by save_to_disk "
            f"({_root_cause(error)})"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                f"{source}: saved DatasetDict has no 'train' split; "
                f"splits: {', '.join(loaded)}"
            )
        return loaded["train"]
    return loaded


def _load_hub(source: str) -> datasets.Dataset:
    """Load the train split of a Hub dataset, where the network allows."""
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as error:
        raise DataError(
            f"{source}: neither a local file nor a reachable Hugging Face Hub "
            f"dataset ({_root_cause(error)})"
        ) from error


def _column(table: datasets.Dataset, source: str, column: str, setting: str) -> list:
    """Values of ``column``, or a DataError listing the columns that do exist."""
    if column not in table.column_names:
        raise DataError(
            f"{source}: missing column {column!r}; available columns: "
            f"{', '.join(table.column_names)}",
            setting=setting,
        )
    return table[column]


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _required_strings(table: datasets.Dataset, source: str, column: str, setting: str) -> list[str]:
    """Column values as strings, rejecting null and blank values by row number."""
    values = []
    for row, value in enumerate(_column(table, source, column, setting), start=1):
        if _is_missing(value):
            raise DataError(f"{source}: row {row} has no value in column {column!r}", setting=setting)
        text = value if isinstance(value, str) else str(value)
        if not text.strip():
            raise DataError(f"{source}: row {row} has an empty value in column {column!r}", setting=setting)
        values.append(text)
    return values


def _label_strings(table: datasets.Dataset, source: str, column: str) -> list[str]:
    """Labels as strings; ClassLabel integers are mapped back to their names."""
    labels = _required_strings(table, source, column, "label-column")
    feature = table.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(int(label)) for label in labels]
    return labels


def _root_cause(error: BaseException) -> str:
    """The innermost cause's message: the library wrappers only say 'an error occurred'."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error) or type(error).__name__
