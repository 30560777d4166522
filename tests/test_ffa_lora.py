"""FFA-LoRA: which tensors are frozen, and why averaging B alone is exact."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.ffa_lora import is_frozen_key, merge_frozen, trainable_subset

A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.modules_to_save.weight"


def test_is_frozen_key() -> None:
    assert is_frozen_key(A)
    assert is_frozen_key("base_model.model.embeddings.word_embeddings.lora_embedding_A")
    assert not is_frozen_key(B)
    assert not is_frozen_key(HEAD)


def test_trainable_subset_drops_the_a_matrices() -> None:
    arrays = {A: 1, B: 2, HEAD: 3}
    assert trainable_subset(arrays) == {B: 2, HEAD: 3}


def test_trainable_subset_works_on_an_array_record() -> None:
    record = ArrayRecord({A: Array(np.zeros((2, 3))), B: Array(np.ones((4, 2)))})
    assert list(trainable_subset(record)) == [B]


def test_merge_frozen_restores_global_a_in_global_order() -> None:
    merged = merge_frozen({A: "global A", B: "global B", HEAD: "global head"}, {HEAD: "h", B: "b"})
    assert merged == {A: "global A", B: "b", HEAD: "h"}
    assert list(merged) == [A, B, HEAD]


def test_merge_frozen_rejects_a_trained_a() -> None:
    with pytest.raises(ValueError, match="frozen"):
        merge_frozen({A: 0, B: 0}, {A: 1, B: 1})


def test_merge_frozen_rejects_missing_trainable_keys() -> None:
    with pytest.raises(ValueError, match="missing"):
        merge_frozen({A: 0, B: 0, HEAD: 0}, {B: 1})


def test_averaging_b_with_a_shared_a_is_exact() -> None:
    rng = np.random.default_rng(0)
    shared_a = rng.standard_normal((4, 6))
    bs = [rng.standard_normal((5, 4)) for _ in range(3)]
    weights = np.array([10.0, 30.0, 60.0])

    mean_of_updates = sum(w * (b @ shared_a) for w, b in zip(weights, bs)) / weights.sum()
    mean_b = sum(w * b for w, b in zip(weights, bs)) / weights.sum()
    np.testing.assert_allclose(mean_b @ shared_a, mean_of_updates, rtol=1e-12, atol=1e-12)

    # The same through the helpers: clients send trainable_subset, the server averages
    # it and puts the frozen A back.
    sent = [trainable_subset({A: shared_a, B: b}) for b in bs]
    averaged = {B: sum(w * s[B] for w, s in zip(weights, sent)) / weights.sum()}
    merged = merge_frozen({A: shared_a, B: np.zeros((5, 4))}, averaged)
    np.testing.assert_allclose(merged[B] @ merged[A], mean_of_updates, rtol=1e-12, atol=1e-12)


def test_averaging_a_and_b_separately_is_not_the_mean_update() -> None:
    a1, a2 = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    b1, b2 = np.array([[1.0], [0.0]]), np.array([[0.0], [1.0]])

    mean_of_updates = (b1 @ a1 + b2 @ a2) / 2  # [[0.5, 0], [0, 0.5]]
    product_of_means = ((b1 + b2) / 2) @ ((a1 + a2) / 2)  # [[0.25, 0.25], [0.25, 0.25]]
    np.testing.assert_allclose(mean_of_updates, [[0.5, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(product_of_means, [[0.25, 0.25], [0.25, 0.25]])
    assert not np.allclose(mean_of_updates, product_of_means)
    # The gap is exactly the cross term ¼ (B1 − B2)(A1 − A2) from the module docstring.
    np.testing.assert_allclose(mean_of_updates - product_of_means, (b1 - b2) @ (a1 - a2) / 4)
