"""Reading a site's data: every supported format and every reported problem."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from fedlora import data
from fedlora.data import DataError, label_names_of, load_causal_lm, load_classification, load_table

ROWS = {
    "text": ["chest pain on exertion", "wheeze and cough", "epigastric pain", "new tremor"],
    "label": ["cardiology", "respiratory", "gastroenterology", "cardiology"],
    "prompt": ["Summarise: chest pain", "Summarise: cough", "Summarise: pain", "Summarise: tremor"],
    "response": ["Angina likely.", "Asthma likely.", "Reflux likely.", "Parkinsonism likely."],
}


def _write(path: Path, rows: dict[str, list]) -> str:
    """Write ``rows`` in the format named by ``path``'s extension (or save_to_disk dirs)."""
    table = datasets.Dataset.from_dict(rows)
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        table.to_json(path, lines=True)
    elif path.suffix == ".json":
        path.write_text(json.dumps([dict(zip(rows, values)) for values in zip(*rows.values())]))
    elif path.suffix == ".parquet":
        table.to_parquet(path)
    elif path.name.endswith("dict"):
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(path)
    else:
        table.save_to_disk(path)
    return str(path)


FORMATS = ["site.csv", "site.jsonl", "site.json", "site.parquet", "saved_dataset", "saved_dict"]


@pytest.mark.parametrize("name", FORMATS)
def test_load_classification_reads_every_format(tmp_path: Path, name: str) -> None:
    source = _write(tmp_path / name, ROWS)
    dataset, names = load_classification(source)
    assert names == ["cardiology", "gastroenterology", "respiratory"]
    assert dataset.column_names == ["text", "label"]
    assert dataset["text"] == ROWS["text"]
    assert [names[i] for i in dataset["label"]] == ROWS["label"]


@pytest.mark.parametrize("name", FORMATS)
def test_load_causal_lm_reads_every_format(tmp_path: Path, name: str) -> None:
    source = _write(tmp_path / name, ROWS)
    dataset = load_causal_lm(source)
    assert dataset.column_names == ["prompt", "response"]
    assert dataset["prompt"] == ROWS["prompt"]
    assert dataset["response"] == ROWS["response"]


def test_loading_writes_nothing_next_to_the_data(tmp_path: Path) -> None:
    _write(tmp_path / "site.csv", ROWS)
    saved = _write(tmp_path / "saved_dataset", ROWS)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for source in (str(tmp_path / "site.csv"), saved):
        dataset, _ = load_classification(source)
        dataset.map(lambda row: {"text": row["text"].upper()})
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_custom_columns_and_label_names_with_integer_labels(tmp_path: Path) -> None:
    source = _write(tmp_path / "site.csv", {"note": ["a", "b", "c"], "y": [2, 0, 2]})
    dataset, names = load_classification(
        source, text_column="note", label_column="y", label_names=["0", "1", "2"]
    )
    assert names == ["0", "1", "2"]
    assert dataset["label"] == [2, 0, 2]
    assert dataset.features["label"].dtype == "int64"


def test_non_string_text_is_converted(tmp_path: Path) -> None:
    source = _write(tmp_path / "site.jsonl", {"text": [12, 7], "label": ["a", "b"]})
    dataset, _ = load_classification(source)
    assert dataset["text"] == ["12", "7"]


def test_class_label_feature_maps_to_names(tmp_path: Path) -> None:
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    table = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [1, 0]}, features=features)
    table.save_to_disk(tmp_path / "saved")
    dataset, names = load_classification(str(tmp_path / "saved"))
    assert names == ["neg", "pos"]
    assert dataset["label"] == [1, 0]


def test_label_names_of_is_sorted_unique_strings(tmp_path: Path) -> None:
    source = _write(tmp_path / "site.csv", {"text": ["a", "b", "c"], "label": [3, 1, 3]})
    assert label_names_of(source) == ["1", "3"]


def test_csv_keeps_na_like_strings_as_text(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("text,label\nNA,None\nok,1\n")
    dataset, names = load_classification(str(path))
    assert dataset["text"] == ["NA", "ok"]
    assert names == ["1", "None"]


def test_hub_id_is_tried_when_not_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_hub(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_dict(ROWS)

    monkeypatch.setattr(data.datasets, "load_dataset", fake_hub)
    assert load_table("owner/clinical")["text"] == ROWS["text"]
    assert calls == [("owner/clinical", "train")]


def test_unreachable_hub_id_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, split: str) -> datasets.Dataset:
        raise ConnectionError("Couldn't reach 'owner/clinical' on the Hub")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"owner/clinical: neither a local file nor a reachable"):
        load_table("owner/clinical")


def _error(source: str, **kwargs: object) -> str:
    with pytest.raises(DataError) as caught:
        load_classification(source, **kwargs)
    message = str(caught.value)
    assert message.startswith(source), message
    assert "Traceback" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file or directory" in _error(str(tmp_path / "nowhere" / "site.csv"))


def test_unsupported_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "site.xlsx"
    path.write_bytes(b"PK\x03\x04")
    message = _error(str(path))
    assert "unsupported file type '.xlsx'" in message
    assert ".csv, .json, .jsonl, .parquet" in message


def test_directory_not_written_by_save_to_disk(tmp_path: Path) -> None:
    assert "not one written by save_to_disk" in _error(str(tmp_path))


def test_dataset_dict_without_train_split_lists_splits(tmp_path: Path) -> None:
    table = datasets.Dataset.from_dict(ROWS)
    datasets.DatasetDict({"validation": table, "test": table}).save_to_disk(tmp_path / "dd")
    message = _error(str(tmp_path / "dd"))
    assert "no 'train' split" in message and "validation, test" in message


@pytest.mark.parametrize("column", ["text", "label"])
def test_missing_column_lists_available(tmp_path: Path, column: str) -> None:
    rows = {k: v for k, v in ROWS.items() if k != column}
    message = _error(_write(tmp_path / "site.csv", rows))
    assert f"missing column {column!r}" in message
    assert "available columns:" in message and "prompt" in message


def test_missing_response_column_for_causal_lm(tmp_path: Path) -> None:
    source = _write(tmp_path / "site.jsonl", {"prompt": ["p"], "answer": ["a"]})
    with pytest.raises(DataError, match=r"site.jsonl: missing column 'response'.*prompt, answer"):
        load_causal_lm(source)


@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "file is empty"), ("text,label\n", "contains no rows"), ("[]", "contains no rows")],
)
def test_empty_data(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / ("site.json" if content == "[]" else "site.csv")
    path.write_text(content)
    assert problem in _error(str(path))


def test_empty_parquet(tmp_path: Path) -> None:
    source = _write(tmp_path / "site.parquet", {"text": [], "label": []})
    assert "contains no rows" in _error(source)


def test_empty_saved_dataset(tmp_path: Path) -> None:
    source = _write(tmp_path / "saved_dataset", {"text": [], "label": []})
    assert "contains no rows" in _error(source)


def test_undecodable_bytes_report_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_bytes(b"text,label\ncaf\xe9 visit,a\n")
    message = _error(str(path))
    assert "not valid UTF-8" in message
    assert "byte offset 14" in message and "line 2" in message


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("text,label\na,1\nb,2,3\n", "line 3 has 3 fields but the header has 2"),
        ("text,label\na,1,3\nb,2\n", "line 2 has 3 fields"),
        ('text,label\n"unterminated,1\nb,2\n', "malformed CSV"),
    ],
)
def test_malformed_csv(tmp_path: Path, content: str, where: str) -> None:
    path = tmp_path / "site.csv"
    path.write_text(content)
    assert where in _error(str(path))


def test_malformed_json_lines_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 2}\n')
    assert "malformed JSON at line 2" in _error(str(path))


def test_malformed_json_document_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    path.write_text('[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 2}\n]\n')
    assert "malformed JSON at line 3" in _error(str(path))


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "site.parquet"
    path.write_bytes(b"not parquet at all")
    assert "not a valid Parquet file" in _error(str(path))


def test_unknown_label_names_value_row_and_allowed(tmp_path: Path) -> None:
    source = _write(tmp_path / "site.csv", ROWS)
    message = _error(source, label_names=["cardiology", "respiratory"])
    assert "row 3 has unknown label 'gastroenterology'" in message
    assert "allowed labels: cardiology, respiratory" in message


@pytest.mark.parametrize(("value", "problem"), [(None, "no value"), ("  ", "an empty value")])
def test_null_or_blank_text_names_the_row(tmp_path: Path, value: str | None, problem: str) -> None:
    source = _write(tmp_path / "site.jsonl", {"text": ["ok", value], "label": ["a", "b"]})
    assert f"row 2 has {problem} in column 'text'" in _error(source)


def test_empty_csv_field_is_reported_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("text,label\nok,a\n,b\n")
    assert "row 2 has an empty value in column 'text'" in _error(str(path))


def test_null_response_names_the_row(tmp_path: Path) -> None:
    source = _write(tmp_path / "site.parquet", {"prompt": ["p", "q"], "response": ["r", None]})
    with pytest.raises(DataError, match=r"site.parquet: row 2 has no value in column 'response'"):
        load_causal_lm(source)
