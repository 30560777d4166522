"""Heterogeneous ranks: rank detection, pad/truncate, rank-aware aggregation by hand."""

import numpy as np
import pytest

from fedlora.lora_ranks import lora_rank_of, pad_to_rank, rank_axis, truncate_to_rank
from strategies.hetlora import aggregate_hetero

A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.modules_to_save.weight"


def adapter(rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        A: rng.standard_normal((rank, 6)).astype(np.float32),
        B: rng.standard_normal((5, rank)).astype(np.float32),
        HEAD: rng.standard_normal((3, 5)).astype(np.float32),
    }


def test_rank_axis() -> None:
    assert rank_axis(A) == 0
    assert rank_axis(B) == 1
    assert rank_axis(HEAD) is None
    assert rank_axis("base_model.model.embeddings.lora_embedding_B") == 1


def test_lora_rank_of() -> None:
    assert lora_rank_of(adapter(4)) == 4


def test_lora_rank_of_rejects_inconsistent_ranks() -> None:
    arrays = adapter(4) | {B: np.zeros((5, 2), np.float32)}
    with pytest.raises(ValueError, match="inconsistent"):
        lora_rank_of(arrays)


def test_lora_rank_of_needs_lora_tensors() -> None:
    with pytest.raises(ValueError, match="no LoRA"):
        lora_rank_of({HEAD: np.zeros((3, 5))})


def test_pad_adds_zero_components_and_keeps_the_product() -> None:
    small = adapter(2)
    padded = pad_to_rank(small, 4)
    assert padded[A].shape == (4, 6) and padded[B].shape == (5, 4)
    assert not padded[A][2:].any() and not padded[B][:, 2:].any()
    np.testing.assert_array_equal(padded[HEAD], small[HEAD])
    np.testing.assert_allclose(padded[B] @ padded[A], small[B] @ small[A], rtol=1e-6)
    assert padded[A].dtype == np.float32


def test_pad_then_truncate_round_trips() -> None:
    small = adapter(2)
    back = truncate_to_rank(pad_to_rank(small, 8), 2)
    assert back.keys() == small.keys()
    for name in small:
        np.testing.assert_array_equal(back[name], small[name])


def test_truncate_keeps_the_leading_components() -> None:
    full = adapter(4)
    cut = truncate_to_rank(full, 2)
    np.testing.assert_array_equal(cut[A], full[A][:2])
    np.testing.assert_array_equal(cut[B], full[B][:, :2])
    cut[A][0, 0] = 99  # the site's copy must not alias the server's arrays
    assert full[A][0, 0] != 99


def test_invalid_pad_and_truncate_ranks() -> None:
    with pytest.raises(ValueError):
        pad_to_rank(adapter(4), 2)
    with pytest.raises(ValueError):
        truncate_to_rank(adapter(4), 8)
    with pytest.raises(ValueError):
        truncate_to_rank(adapter(4), 0)


def two_clients() -> list[tuple[dict[str, np.ndarray], float]]:
    rank_1 = {
        A: np.array([[1.0, 2.0]]),
        B: np.array([[3.0], [4.0]]),
        HEAD: np.array([1.0, 1.0]),
    }
    rank_2 = {
        A: np.array([[5.0, 6.0], [7.0, 8.0]]),
        B: np.array([[1.0, 2.0], [3.0, 4.0]]),
        HEAD: np.array([5.0, 9.0]),
    }
    return [(rank_1, 1.0), (rank_2, 3.0)]


def test_aggregate_hetero_by_hand() -> None:
    result = aggregate_hetero(two_clients(), max_rank=2)
    # Component 0 is trained by both (weights 1 and 3, total 4):
    #   A[0] = (1·[1, 2] + 3·[5, 6]) / 4 = [4, 5]
    #   B[:, 0] = (1·[3, 4] + 3·[1, 3]) / 4 = [1.5, 3.25]
    # Component 1 only by the rank-2 client, so it is that client's value, undiluted
    # (a plain zero-padded mean would give 3/4 · [7, 8] = [5.25, 6]):
    #   A[1] = [7, 8], B[:, 1] = [2, 4]
    # The head is a plain weighted mean: (1·[1, 1] + 3·[5, 9]) / 4 = [4, 7].
    np.testing.assert_allclose(result[A], [[4.0, 5.0], [7.0, 8.0]])
    np.testing.assert_allclose(result[B], [[1.5, 2.0], [3.25, 4.0]])
    np.testing.assert_allclose(result[HEAD], [4.0, 7.0])


def test_untrained_components_keep_the_global_value_or_are_zero() -> None:
    previous = {
        A: np.full((3, 2), -1.0),
        B: np.full((2, 3), -2.0),
        HEAD: np.zeros(2),
    }
    kept = aggregate_hetero(two_clients(), max_rank=3, global_arrays=previous)
    np.testing.assert_allclose(kept[A], [[4.0, 5.0], [7.0, 8.0], [-1.0, -1.0]])
    np.testing.assert_allclose(kept[B], [[1.5, 2.0, -2.0], [3.25, 4.0, -2.0]])
    zeroed = aggregate_hetero(two_clients(), max_rank=3)
    np.testing.assert_allclose(zeroed[A][2], [0.0, 0.0])
    np.testing.assert_allclose(zeroed[B][:, 2], [0.0, 0.0])


def test_aggregate_hetero_keeps_dtype() -> None:
    result = aggregate_hetero([(adapter(2), 1.0), (adapter(4, seed=1), 2.0)], max_rank=4)
    assert {value.dtype for value in result.values()} == {np.dtype(np.float32)}
    assert result[A].shape == (4, 6) and result[B].shape == (5, 4)


def test_aggregate_hetero_rejects_a_rank_above_max() -> None:
    with pytest.raises(ValueError, match="exceed max_rank"):
        aggregate_hetero([(adapter(8), 1.0)], max_rank=4)


def test_aggregate_hetero_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        aggregate_hetero([(adapter(2), 0.0)], max_rank=2)
    with pytest.raises(ValueError, match="weights"):
        aggregate_hetero([(adapter(2), -1.0), (adapter(2), 2.0)], max_rank=2)
