"""Splitting one dataset into sites: iid, Dirichlet label skew and natural columns."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

from fedlora.corpus import CLINICAL_LABELS, generate_clinical_corpus
from client.local_data import split_train_eval
from simulations.partitioning import make_partitioner, partition_dataset


@pytest.fixture(scope="module")
def corpus() -> datasets.Dataset:
    return generate_clinical_corpus(num_samples=300, seed=0)


def _label_shares(partition: datasets.Dataset) -> list[float]:
    counts = Counter(partition["label"])
    return [counts[label] / partition.num_rows for label in CLINICAL_LABELS]


def test_make_partitioner_builds_the_right_kind() -> None:
    assert isinstance(make_partitioner("iid", 3), IidPartitioner)
    assert isinstance(make_partitioner("dirichlet:0.5", 3), DirichletPartitioner)
    assert isinstance(make_partitioner("column:hospital", 3), NaturalIdPartitioner)


def test_iid_sizes_even_and_cover_every_row() -> None:
    # Sorted by label: without shuffling, contiguous shards would be label-pure.
    rows = datasets.Dataset.from_dict({"text": [str(i) for i in range(100)], "label": sorted("ab" * 50)})
    partitions = partition_dataset(rows, "iid", 3)
    assert [p.num_rows for p in partitions] == [34, 33, 33]
    assert sorted(t for p in partitions for t in p["text"]) == sorted(rows["text"])
    assert all(set(p["label"]) == {"a", "b"} for p in partitions)


@pytest.mark.parametrize("num_partitions", [3, 5, 10])
def test_dirichlet_skews_labels_and_keeps_sites_non_empty(corpus, num_partitions: int) -> None:
    partitions = partition_dataset(corpus, "dirichlet:0.3", num_partitions)
    assert sum(p.num_rows for p in partitions) == corpus.num_rows
    assert all(p.num_rows > 0 for p in partitions)
    shares = [_label_shares(p) for p in partitions]
    # Under IID every site would hold ~20% of each class; skewed sites stray far.
    assert max(abs(s - 0.2) for site in shares for s in site) > 0.3


def test_dirichlet_deterministic_by_seed(corpus) -> None:
    first = partition_dataset(corpus, "dirichlet:0.5", 4, seed=7)
    again = partition_dataset(corpus, "dirichlet:0.5", 4, seed=7)
    other = partition_dataset(corpus, "dirichlet:0.5", 4, seed=8)
    assert [p["text"] for p in first] == [p["text"] for p in again]
    assert [p["text"] for p in first] != [p["text"] for p in other]


def test_column_partitioning_matches_hospitals(corpus) -> None:
    partitions = partition_dataset(corpus, "column:hospital", 5)
    hospitals = [set(p["hospital"]) for p in partitions]
    assert all(len(h) == 1 for h in hospitals)
    assert set().union(*hospitals) == set(corpus["hospital"])
    assert sum(p.num_rows for p in partitions) == corpus.num_rows


def test_column_count_mismatch_suggests_num_clients(corpus) -> None:
    with pytest.raises(ValueError, match=r"'hospital' has 5 distinct values, so use --num-clients 5"):
        partition_dataset(corpus, "column:hospital", 3)


@pytest.mark.parametrize(
    "spec", ["random", "iid:2", "dirichlet", "dirichlet:abc", "dirichlet:0", "dirichlet:-1", "dirichlet:nan", "column:"]
)
def test_bad_specs_list_valid_forms(spec: str) -> None:
    with pytest.raises(ValueError, match=r"'iid', 'dirichlet:ALPHA'.*'column:NAME'"):
        make_partitioner(spec, 3)


@pytest.mark.parametrize("spec", ["column:ward", "dirichlet:0.5"])
def test_missing_column_lists_valid_forms(corpus, spec: str) -> None:
    with pytest.raises(ValueError, match=r"needs column '(ward|diagnosis)'.*'column:NAME'"):
        partition_dataset(corpus, spec, 3, label_column="diagnosis")


def test_impossible_dirichlet_suggests_larger_alpha() -> None:
    rows = datasets.Dataset.from_dict({"text": list("abcdefghij"), "label": list("aaaaaaaaab")})
    with pytest.raises(ValueError, match=r"larger alpha or fewer clients"):
        partition_dataset(rows, "dirichlet:0.01", 5)


def test_more_sites_than_rows() -> None:
    rows = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})
    with pytest.raises(ValueError, match=r"cannot split 2 rows into 3 sites"):
        partition_dataset(rows, "iid", 3)


def test_split_train_eval_is_deterministic_and_disjoint(corpus) -> None:
    train, held_out = split_train_eval(corpus, 0.2, seed=1)
    assert train.num_rows + held_out.num_rows == corpus.num_rows == 300
    assert 40 <= held_out.num_rows <= 80  # 60 expected; each row is held out with p = 0.2
    assert not set(train["text"]) & set(held_out["text"])
    assert split_train_eval(corpus, 0.2, seed=1)[1]["text"] == held_out["text"]
    assert split_train_eval(corpus, 0.2, seed=2)[1]["text"] != held_out["text"]


def test_zero_eval_fraction_gives_empty_eval_with_same_columns(corpus) -> None:
    train, held_out = split_train_eval(corpus, 0.0, seed=1)
    assert train.num_rows == corpus.num_rows
    assert held_out.num_rows == 0 and held_out.column_names == corpus.column_names


def test_adding_one_record_moves_no_other_record_between_splits(corpus) -> None:
    """DP neighbours: with one more record, training and held-out sets each differ by at most
    that record. The shuffle-based split this replaced moved dozens of other rows."""
    train, held_out = split_train_eval(corpus, 0.2, seed=1)
    extra = datasets.Dataset.from_dict({name: ["one more patient note"] if name == "text" else [corpus[0][name]] for name in corpus.column_names}, features=corpus.features)
    train2, held_out2 = split_train_eval(datasets.concatenate_datasets([extra, corpus]), 0.2, seed=1)
    assert len(set(train2["text"]) ^ set(train["text"])) + len(set(held_out2["text"]) ^ set(held_out["text"])) == 1


def test_key_column_keeps_a_users_rows_together() -> None:
    site = datasets.Dataset.from_dict({"text": [f"note {i}" for i in range(200)], "label": ["a"] * 200, "patient": [str(i // 4) for i in range(200)]})
    train, held_out = split_train_eval(site, 0.3, seed=0, key_column="patient")
    assert not set(train["patient"]) & set(held_out["patient"])
    assert held_out.num_rows % 4 == 0 and held_out.num_rows > 0


def test_eval_fraction_out_of_range(corpus) -> None:
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        split_train_eval(corpus, 1.0, seed=0)
