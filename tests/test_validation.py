"""Update validation: every rejection reason, rank-flexible shapes, and the update norm."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.validation import UpdateSpec, spec_from_arrays, update_norm, validate_update

A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD_W = "base_model.model.classifier.modules_to_save.weight"
HEAD_B = "base_model.model.classifier.modules_to_save.bias"


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def global_arrays(rank: int = 8) -> dict[str, np.ndarray]:
    # Large values so that comparing a reply with the wrong reference shows in the norm.
    rng = np.random.default_rng(0)
    return {
        A: (10 + rng.standard_normal((rank, 6))).astype(np.float32),
        B: (10 + rng.standard_normal((5, rank))).astype(np.float32),
        HEAD_W: (10 + rng.standard_normal((3, 5))).astype(np.float32),
        HEAD_B: np.full(3, 10, dtype=np.float32),
    }


def replaced(**changes: np.ndarray) -> dict[str, np.ndarray]:
    names = {"a": A, "b": B, "head_w": HEAD_W, "head_b": HEAD_B}
    arrays = global_arrays()
    arrays.update({names[key]: value for key, value in changes.items()})
    return arrays


@pytest.fixture
def spec() -> UpdateSpec:
    return spec_from_arrays(record(global_arrays()))


def test_spec_from_arrays_records_shapes_and_dtypes(spec: UpdateSpec) -> None:
    assert spec.shapes == {A: (8, 6), B: (5, 8), HEAD_W: (3, 5), HEAD_B: (3,)}
    assert set(spec.dtypes.values()) == {"float32"}
    assert not spec.rank_flexible


def test_valid_update_passes(spec: UpdateSpec) -> None:
    reply = {name: value + np.float32(0.01) for name, value in global_arrays().items()}
    assert validate_update(record(reply), spec) is None


def test_unexpected_key_is_named(spec: UpdateSpec) -> None:
    reply = global_arrays() | {"base_model.model.extra.weight": np.zeros(2, np.float32)}
    reason = validate_update(record(reply), spec)
    assert reason is not None
    assert "unexpected keys" in reason and "base_model.model.extra.weight" in reason


def test_many_unexpected_keys_are_capped_at_five(spec: UpdateSpec) -> None:
    extras = {f"extra.{i}": np.zeros(1, np.float32) for i in range(7)}
    reason = validate_update(record(global_arrays() | extras), spec)
    assert reason is not None
    assert "'extra.4'" in reason and "'extra.5'" not in reason and "and 2 more" in reason


def test_missing_key_is_named(spec: UpdateSpec) -> None:
    reply = global_arrays()
    del reply[HEAD_B]
    reason = validate_update(record(reply), spec)
    assert reason is not None and "missing keys" in reason and HEAD_B in reason


def test_wrong_shape_names_key_expected_and_got(spec: UpdateSpec) -> None:
    reason = validate_update(record(replaced(a=np.zeros((8, 7), np.float32))), spec)
    assert reason is not None
    assert "wrong shape" in reason and A in reason and "(8, 6)" in reason and "(8, 7)" in reason


def test_shape_is_checked_on_the_payload_not_the_metadata(spec: UpdateSpec) -> None:
    reply = record(global_arrays())
    real = Array(np.zeros((8, 7), np.float32))
    reply[A] = Array(dtype="float32", shape=(8, 6), stype=real.stype, data=real.data)
    reason = validate_update(reply, spec)
    assert reason is not None and "wrong shape" in reason and "(8, 7)" in reason


def test_undecodable_array_is_rejected(spec: UpdateSpec) -> None:
    reply = record(global_arrays())
    reply[A] = Array(dtype="float32", shape=(8, 6), stype="numpy.ndarray", data=b"junk")
    reason = validate_update(reply, spec)
    assert reason is not None and "cannot decode" in reason and A in reason


def test_wrong_dtype(spec: UpdateSpec) -> None:
    reason = validate_update(record(replaced(head_b=np.zeros(3, np.float64))), spec)
    assert reason is not None
    assert "wrong dtype" in reason and HEAD_B in reason and "float32" in reason
    assert "float64" in reason


def test_nan_values_are_counted(spec: UpdateSpec) -> None:
    bad = global_arrays()[B]
    bad[0, 0] = bad[1, 1] = np.nan
    reason = validate_update(record(replaced(b=bad)), spec)
    assert reason is not None
    assert "non-finite" in reason and B in reason and "2 NaN, 0 Inf" in reason


def test_inf_values_are_counted(spec: UpdateSpec) -> None:
    bad = np.array([1, np.inf, -np.inf], dtype=np.float32)
    reason = validate_update(record(replaced(head_b=bad)), spec)
    assert reason is not None and HEAD_B in reason and "0 NaN, 2 Inf" in reason


def test_norm_is_taken_from_the_reference() -> None:
    reply = global_arrays()
    reply[A][0, 0] += 3  # the update has L2 norm exactly 5 = sqrt(3² + 4²)
    reply[HEAD_B][2] += 4
    assert update_norm(record(reply), record(global_arrays())) == pytest.approx(5.0)


def test_without_reference_the_reply_itself_is_measured() -> None:
    reply = {name: np.zeros_like(value) for name, value in global_arrays().items()}
    reply[HEAD_B][:] = [0, 3, 4]
    assert update_norm(record(reply), None) == pytest.approx(5.0)


def test_validation_accepts_large_updates_the_norm_screen_judges_them() -> None:
    spec = spec_from_arrays(record(global_arrays()))
    reply = {name: value * 1000 for name, value in global_arrays().items()}
    assert validate_update(record(reply), spec) is None


def rank_4_reply() -> dict[str, np.ndarray]:
    arrays = global_arrays()
    return arrays | {A: arrays[A][:4].copy(), B: arrays[B][:, :4].copy()}


def test_rank_flexible_accepts_a_lower_rank() -> None:
    spec = spec_from_arrays(record(global_arrays()), rank_flexible=True)
    assert validate_update(record(rank_4_reply()), spec) is None


def test_rank_fixed_rejects_a_lower_rank() -> None:
    spec = spec_from_arrays(record(global_arrays()))
    reason = validate_update(record(rank_4_reply()), spec)
    assert reason is not None and "wrong shape" in reason and "(4, 6)" in reason


def test_rank_flexible_norm_uses_the_truncated_reference() -> None:
    # A rank-4 site started from the first 4 components of the global adapter, so its
    # update is its reply minus that prefix: here 0.5 in one entry.
    reply = rank_4_reply()
    reply[B][0, 0] += 0.5
    assert update_norm(record(reply), record(global_arrays())) == pytest.approx(0.5)


def test_rank_flexible_rejects_rank_zero() -> None:
    spec = spec_from_arrays(record(global_arrays()), rank_flexible=True)
    reply = global_arrays() | {A: np.zeros((0, 6), np.float32), B: np.zeros((5, 0), np.float32)}
    reason = validate_update(record(reply), spec)
    assert reason is not None and "invalid LoRA rank 0" in reason


def test_rank_flexible_rejects_a_rank_above_the_spec() -> None:
    spec = spec_from_arrays(record(global_arrays()), rank_flexible=True)
    reason = validate_update(record(global_arrays(rank=16)), spec)
    assert reason is not None and "invalid LoRA rank 16" in reason


def test_rank_flexible_rejects_a_wrong_non_rank_dim() -> None:
    spec = spec_from_arrays(record(global_arrays()), rank_flexible=True)
    reply = rank_4_reply() | {A: np.zeros((4, 7), np.float32)}
    reason = validate_update(record(reply), spec)
    assert reason is not None and "wrong shape" in reason and A in reason and "(4, 7)" in reason


def test_rank_flexible_rejects_mismatched_a_and_b_ranks() -> None:
    spec = spec_from_arrays(record(global_arrays()), rank_flexible=True)
    reply = rank_4_reply() | {B: np.zeros((5, 2), np.float32)}
    reason = validate_update(record(reply), spec)
    assert reason is not None and "inconsistent LoRA ranks" in reason and "[2, 4]" in reason
