"""The generated clinical corpus: deterministic, balanced, noisy and learnable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from fedlora.data import load_classification
from fedlora.corpus import CLINICAL_LABELS, generate_clinical_corpus, write_corpus


@pytest.fixture(scope="module")
def corpus():
    return generate_clinical_corpus(num_samples=1500, seed=0)


def test_schema_and_note_length(corpus) -> None:
    assert corpus.column_names == ["text", "label", "hospital"]
    assert len(CLINICAL_LABELS) == 5 and set(corpus["label"]) == set(CLINICAL_LABELS)
    assert set(corpus["hospital"]) == {f"hospital-{i}" for i in range(1, 6)}
    lengths = [len(note.split()) for note in corpus["text"]]
    assert 20 <= min(lengths) and max(lengths) <= 50


def test_same_seed_same_corpus_other_seed_differs(corpus) -> None:
    assert generate_clinical_corpus(num_samples=1500, seed=0)[:] == corpus[:]
    assert generate_clinical_corpus(num_samples=1500, seed=1)["text"] != corpus["text"]


def test_classes_roughly_balanced(corpus) -> None:
    counts = Counter(corpus["label"])
    assert all(250 <= counts[label] <= 350 for label in CLINICAL_LABELS), counts


def test_label_noise_flips_roughly_that_fraction() -> None:
    clean = generate_clinical_corpus(num_samples=1000, seed=3, label_noise=0.0)
    noisy = generate_clinical_corpus(num_samples=1000, seed=3, label_noise=0.08)
    assert clean["text"] == noisy["text"]
    flipped = sum(a != b for a, b in zip(clean["label"], noisy["label"]))
    assert 50 <= flipped <= 110


def test_hospitals_have_different_class_mixes(corpus) -> None:
    top_class = {}
    for hospital in set(corpus["hospital"]):
        labels = [lab for lab, site in zip(corpus["label"], corpus["hospital"]) if site == hospital]
        label, count = Counter(labels).most_common(1)[0]
        assert count / len(labels) > 0.3  # vs 0.2 if hospitals were IID
        top_class[hospital] = label
    assert len(set(top_class.values())) == 5


def test_bag_of_words_learnable_but_not_perfect(corpus) -> None:
    vectorizer = CountVectorizer()
    train = vectorizer.fit_transform(corpus["text"][:1000])
    classifier = LogisticRegression(max_iter=1000).fit(train, corpus["label"][:1000])
    accuracy = classifier.score(vectorizer.transform(corpus["text"][1000:]), corpus["label"][1000:])
    assert 0.6 < accuracy < 0.97, accuracy


def test_written_csv_loads_as_classification_data(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "notes" / "corpus.csv", num_samples=50, seed=2)
    dataset, names = load_classification(str(path))
    assert names == sorted(CLINICAL_LABELS)
    assert dataset.num_rows == 50
