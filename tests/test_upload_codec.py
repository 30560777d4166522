"""Compressed uploads (``fedlora.upload_codec``): each type's error bound, int8's unbiasedness,
its size on the wire, malformed uploads, the site's outgoing guard and the server's decoding."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.outgoing_guard import DisclosureError, check_outgoing
from fedlora.run_config import ConfigError, apply_overrides, default_run_config
from fedlora.upload_codec import SCALE_SUFFIX, decode_upload, encode_upload
from strategies.factory import build_strategy
from tests.conftest import settings_of
from tests.fake_grid import FakeGrid, FakeSite, honest, outcomes, record, run_federation

RNG = np.random.default_rng(0)
# An adapter-like pair: A at a random init that a round barely moves, B starting near zero.
RECEIVED = {"layer.lora_A.weight": RNG.normal(0, 0.1, (8, 384)).astype(np.float32),
            "layer.lora_B.weight": RNG.normal(0, 1e-3, (384, 8)).astype(np.float32)}
TRAINED = {name: (value + RNG.normal(0, 1e-3, value.shape)).astype(np.float32) for name, value in RECEIVED.items()}


def roundtrip(dtype: str, trained=TRAINED, seed: int = 1) -> dict[str, np.ndarray]:
    wire = encode_upload(trained, RECEIVED, dtype, np.random.default_rng(seed))
    return {name: array.numpy() for name, array in decode_upload(wire, record(RECEIVED), dtype).items()}


@pytest.mark.parametrize(("dtype", "relative", "absolute"), [
    ("fp32", 0.0, 0.0), ("fp16", 2.0**-11, 2.0**-25), ("bf16", 2.0**-8, 0.0)])
def test_floats_keep_the_update_to_their_precision(dtype, relative, absolute):
    """Half a unit in the last place of the update, relative, or absolute among fp16's
    subnormals (below 2⁻¹⁴)."""
    rebuilt = roundtrip(dtype)
    for name, value in TRAINED.items():
        update = value - RECEIVED[name]
        # The value's own float32 rounding adds at most one ulp of the value.
        bound = relative * np.abs(update) + absolute + np.spacing(np.abs(value))
        assert np.all(np.abs(rebuilt[name] - value) <= bound + 1e-12), name
        assert rebuilt[name].dtype == np.float32


def test_int8_errs_by_at_most_a_step_and_is_unbiased():
    for name, value in TRAINED.items():
        step = np.abs(value - RECEIVED[name]).max() / 127
        assert np.abs(roundtrip("int8")[name] - value).max() <= step * 1.0001 + np.spacing(np.abs(value)).max()
    repeats = 2000
    mean = sum(roundtrip("int8", seed=s)["layer.lora_B.weight"] for s in range(repeats)) / repeats
    update = TRAINED["layer.lora_B.weight"] - RECEIVED["layer.lora_B.weight"]
    step = np.abs(update).max() / 127
    # Each value's rounding error has std <= step / 2; its mean over the repeats std <= step / 2 / sqrt(n).
    z = (mean - TRAINED["layer.lora_B.weight"]) / (step / 2 / np.sqrt(repeats))
    assert np.abs(z).max() < 5 and abs(z.mean()) < 5 / np.sqrt(z.size)


def test_int8_sends_under_30_percent_of_fp32_and_halves_for_the_floats():
    size = {dtype: encode_upload(TRAINED, RECEIVED, dtype, np.random.default_rng(0)).count_bytes()
            for dtype in ("fp32", "fp16", "bf16", "int8")}
    assert size["int8"] <= 0.3 * size["fp32"] and size["fp16"] == size["bf16"] <= 0.51 * size["fp32"]


def test_a_lower_rank_site_sends_its_part_of_the_received_adapter():
    lower = {"layer.lora_A.weight": TRAINED["layer.lora_A.weight"][:4],
             "layer.lora_B.weight": TRAINED["layer.lora_B.weight"][:, :4]}
    rebuilt = roundtrip("fp16", lower)
    np.testing.assert_allclose(rebuilt["layer.lora_A.weight"], lower["layer.lora_A.weight"], atol=1e-6)


@pytest.mark.parametrize(("change", "problem"), [
    (lambda w: {k: v for k, v in w.items() if not k.endswith(SCALE_SUFFIX)}, "missing or unexpected"),
    (lambda w: {**w, "layer.lora_A.weight": Array(np.zeros((8, 384), np.float32))}, "is float32, but upload-dtype int8"),
    (lambda w: {**w, "layer.lora_A.weight" + SCALE_SUFFIX: Array(np.array([np.nan], np.float32))}, "one finite float32"),
    (lambda w: {**w, "layer.lora_A.weight": Array(np.zeros((9, 384), np.int8))}, "does not fit"),
    (lambda w: {**w, "other.weight": Array(np.zeros(3, np.int8)), "other.weight" + SCALE_SUFFIX: Array(np.ones(1, np.float32))},
     "was not in the adapter sent"),
])
def test_a_malformed_int8_upload_says_what_is_wrong(change, problem):
    wire = encode_upload(TRAINED, RECEIVED, "int8", np.random.default_rng(0))
    with pytest.raises(ValueError, match=problem):
        decode_upload(ArrayRecord(change(dict(wire.items()))), record(RECEIVED), "int8")


def reply(arrays: ArrayRecord) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    sent = Message(RecordDict({"arrays": record(RECEIVED)}), dst_node_id=7, message_type="train")
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 3})}), reply_to=sent)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_the_outgoing_guard_passes_each_wire_form_and_nothing_beside_it(dtype):
    wire = encode_upload(TRAINED, RECEIVED, dtype, np.random.default_rng(0))
    check_outgoing(reply(wire), record(RECEIVED))
    smuggled = {**dict(wire.items()), "layer.lora_B.weight" + SCALE_SUFFIX: Array(np.ones(1, np.float32))}
    if dtype != "int8":  # a scale beside a tensor that is not int8 could carry anything
        with pytest.raises(DisclosureError, match="scale of an int8 tensor"):
            check_outgoing(reply(ArrayRecord(smuggled)), record(RECEIVED))
    if dtype == "int8":  # a scale is one finite number >= 0, nothing else
        for bad in (np.nan, -1.0):
            odd = {**dict(wire.items()), "layer.lora_A.weight" + SCALE_SUFFIX: Array(np.array([bad], np.float32))}
            with pytest.raises(DisclosureError, match="finite and >= 0"):
                check_outgoing(reply(ArrayRecord(odd)), record(RECEIVED))
    wide = {**dict(wire.items()), "layer.lora_A.weight": Array(np.zeros((8, 384), np.float64))}
    with pytest.raises(DisclosureError, match="neither the received"):
        check_outgoing(reply(ArrayRecord(wide)), record(RECEIVED))


def test_the_server_aggregates_decoded_uploads_counts_wire_bytes_and_rejects_the_wrong_form():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1
    start = {name: value.copy() for name, value in RECEIVED.items()}

    def compressed(seed: int, dtype: str):
        trained = honest(seed, scale=1e-3)
        return lambda received, rnd: encode_upload(trained(received, rnd), received, dtype, np.random.default_rng(seed))

    def federation(dtype: str, sites: dict) -> tuple[dict, list]:
        settings = settings_of(apply_overrides(default_run_config(), {"upload-dtype": dtype, "min-train-nodes": 3,
                                                                       "min-evaluate-nodes": 3}))
        return run_federation(build_strategy(settings), FakeGrid(sites), start, rounds=1)

    plain, plain_history = federation("fp32", {i + 1: FakeSite(f"site-{i}", 10, honest(i, scale=1e-3)) for i in range(3)})
    sites = {i + 1: FakeSite(f"site-{i}", 10, _wire_site(compressed(i, "int8"))) for i in range(3)}
    sites[4] = FakeSite("site-3", 10, honest(3, scale=1e-3))  # float32 values where int8 is asked
    quantized, history = federation("int8", sites)
    for name in start:  # the mean of three roundings, each within a step of its site's update
        steps = [np.abs(honest(i, scale=1e-3)(start, 1)[name] - start[name]).max() / 127 for i in range(3)]
        assert np.abs(quantized[name] - plain[name]).max() <= np.mean(steps) * 1.001
    assert outcomes(history[0])["site-3"] == ("rejected", "upload-dtype int8: tensor 'layer.lora_A.weight' is float32, "
                                                           "but upload-dtype int8 sends int8")
    up = {c["client"]: c["bytes_up"] for c in history[0]["clients"]}
    # What came over the wire (one byte a value, four a scale, and the records' keys), not the decoded float32.
    assert sum(v.size + 4 for v in start.values()) <= up["site-0"] <= 0.3 * plain_history[0]["clients"][0]["bytes_up"]


def _wire_site(update):
    """FakeSite's update hook returns arrays it then wraps in a record; this one returns the
    wire form, unwrapped into numpy arrays by key."""
    return lambda received, rnd: {name: array.numpy() for name, array in update(received, rnd).items()}


def test_upload_dtype_is_one_of_four():
    with pytest.raises(ConfigError, match="upload-dtype"):
        settings_of(apply_overrides(default_run_config(), {"upload-dtype": "int4"}))


def test_a_site_sends_its_update_in_the_runs_upload_dtype(tiny_bert, tmp_path):
    """Through the site's ClientApp and its outgoing guard: int8 tensors with their scales,
    which decode against the adapter sent to finite float32 values of its keys and shapes."""
    from server.global_model import GlobalModel
    from tests.test_site_privacy import _write_notes, privacy_run_config, train_round

    run_config = apply_overrides(privacy_run_config(tiny_bert, _write_notes(tmp_path / "notes.csv")), {"upload-dtype": "int8"})
    sent = GlobalModel.load(settings_of(run_config)).arrays()
    node = {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(tmp_path / "ledger.db")}
    wire = train_round(run_config, node, 1, sent)
    assert "status" not in wire.content.config_records, dict(wire.content["status"])
    arrays = wire.content["arrays"]
    assert {arrays[name].dtype for name in arrays.keys() if not name.endswith(SCALE_SUFFIX)} == {"int8"}
    decoded = decode_upload(arrays, sent, "int8")
    assert set(decoded.keys()) == set(sent.keys())
    assert all(np.isfinite(a.numpy()).all() and a.numpy().shape == sent[n].numpy().shape for n, a in decoded.items())
    assert any(not np.array_equal(a.numpy(), sent[n].numpy()) for n, a in decoded.items())
