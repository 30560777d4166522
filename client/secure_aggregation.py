"""SecAgg+ at the site: Flower's ``secaggplus_mod`` for the training rounds whose server runs it
(``server.secure_aggregation``), and the update it masks.

A training message that carries the protocol's record (``secaggplus_configs``) goes through
Flower's mod: its *setup*, *share keys* and *unmask* stages answer with public keys, encrypted
Shamir shares and shares, without training; its *collect masked vectors* stage trains
(``client.app.train_site``, which answers in the shape the mod reads, :func:`masked_upload`) and
sends the masked, quantized update instead of the adapter, as uint32 (:func:`_as_uint32`).
Every other message passes through.

What the mod masks is the site's update Δ (its adapter minus the one received), every received
tensor in the order received (0 where the site trains none of it, as FFA-LoRA's A), with
``max-update-norm`` as a bound on its L2 norm when that is set: under SecAgg no server can
screen one update's size, so an honest site bounds its own (the per-value clipping to
``secagg-clipping-range`` bounds every site's, honest or not). A site that refuses sends a zero
update at weight 0: its masks must still be in the sum for the others' to cancel.

Under distributed DP (``dp-mode = distributed``) the site masks no update but its integer vector
(clipped gradient sum plus its share of the noise, ``client.distributed_site``), passed through
the mod's quantization exactly (:func:`grid_upload`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Array, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key

from client.refusals import RefusedRound
from fedlora.run_config import RunSettings
from fedlora.secagg_grid import LEVELS, MODULUS, is_power_of_two, quantizer_input

PROTOCOL_RECORD = RECORD_KEY_CONFIGS
MASKED_VECTOR = Key.MASKED_PARAMETERS
# What each stage's reply may carry in the protocol record (the outgoing guard checks it): two
# public keys; encrypted shares and their destinations; the masked vector; shares and their owners.
# Each field: the type of its values, and whether it is a list of them.
REPLY_FIELDS: dict[frozenset[str], dict[str, tuple[type, bool]]] = {
    frozenset({Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}): {Key.PUBLIC_KEY_1: (bytes, False), Key.PUBLIC_KEY_2: (bytes, False)},
    frozenset({Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}): {Key.DESTINATION_LIST: (int, True), Key.CIPHERTEXT_LIST: (bytes, True)},
    frozenset({Key.MASKED_PARAMETERS}): {Key.MASKED_PARAMETERS: (bytes, True)},
    frozenset({Key.NODE_ID_LIST, Key.SHARE_LIST}): {Key.NODE_ID_LIST: (int, True), Key.SHARE_LIST: (bytes, True)},
}
_LEGACY_PREFIX = "fitres."  # the records Flower's mod reads the update from


def is_secure_round(message: Message) -> bool:
    return message.metadata.message_type == MessageType.TRAIN and PROTOCOL_RECORD in message.content.config_records


def secure_aggregation(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run SecAgg+ on the messages of a secure round; pass every other one on."""
    if not is_secure_round(message):
        return call_next(message, context)
    reply = secaggplus_mod(message, context, call_next)
    for name in [name for name in reply.content if name.startswith(_LEGACY_PREFIX)]:
        del reply.content[name]  # read by the mod, emptied of the update: nothing for the server
    if not reply.has_error() and MASKED_VECTOR in reply.content.config_records.get(PROTOCOL_RECORD, {}):
        record = reply.content.config_records[PROTOCOL_RECORD]
        record[MASKED_VECTOR] = [_as_uint32(part) for part in record[MASKED_VECTOR]]
    return reply


def _as_uint32(part: bytes) -> bytes:
    """A masked vector part as uint32. Flower's mod sends the masked values, integers mod 2^32,
    as int64 (half their bytes zero), and the sum needs each only mod 2^32, which the cast keeps
    exactly (it keeps the low 32 bits): a site uploads what an fp32 adapter takes, not twice it."""
    return ndarray_to_bytes(bytes_to_ndarray(part).astype(np.uint32))


def check_distributed_round(context: Context, settings: RunSettings) -> None:
    """Refuse, before anything is charged, a distributed-DP round whose SecAgg+ setup is not the
    run config's: Flower's mod quantizes with the clipping range, levels and max weight the
    server sent at setup, so another max weight would scale this site's vector (its noise share
    included) down, and another range would break the grid's exact passage; and a round of fewer
    sites than a sum must hold (``RunSettings.secure_sum_minimum``) cannot hold the shares the
    site counts on. (The setup's site count is the server's word: that the sum holds that many is
    SecAgg+'s honest-but-curious assumption, docs/privacy.md A11.)"""
    state = context.state.config_records.get(RECORD_KEY_STATE, {})
    expected = {"clipping_range": settings.secure.secagg_clipping_range, "target_range": LEVELS, "mod_range": MODULUS,
                "max_weight": settings.secure.secagg_max_weight}
    if any(state.get(key) != value for key, value in expected.items()) or not is_power_of_two(expected["clipping_range"]):
        raise RefusedRound("policy-refused", "secure-aggregation", "this SecAgg+ round was set up with other parameters "
                           "than the run config's (clipping range, levels, modulus, max weight), or with a clipping "
                           "range that is not a power of two (the grid's exact passage needs one)")
    if int(state.get("sample_num", 0)) < settings.secure_sum_minimum:
        raise RefusedRound("policy-refused", "min-valid-updates", "this SecAgg+ round was set up with fewer sites than "
                           "a secure sum must hold, so the noise shares this site counts on cannot all be there")


def grid_upload(vectors: Mapping[str, np.ndarray], received: ArrayRecord, clipping_range: float,
                max_weight: float) -> RecordDict:
    """Distributed DP's integer vectors for Flower's mod to mask, in the (legacy) records it
    reads: per received tensor (0 for one not trained), as the floats its quantization maps to
    the vector exactly (``fedlora.secagg_grid``), at weight ratio 1 (num-examples = max-weight)."""
    parameters = {}
    for name, array in received.items():
        k = vectors[name] if name in vectors else np.zeros(array.numpy().shape, np.int64)
        parameters[name] = Array(np.ascontiguousarray(quantizer_input(k, clipping_range)))
    return _legacy_records(ArrayRecord(parameters), max_weight)


def masked_upload(sent: Mapping[str, np.ndarray], received: ArrayRecord, weight: float, norm_bound: float) -> RecordDict:
    """The update for Flower's mod to mask, in the (legacy) records it reads: Δ = sent − received
    per received tensor (0 for one not sent), scaled down to ``norm_bound`` if over it (0: no
    bound), at FedAvg weight ``weight``."""
    delta = {}
    for name, array in received.items():
        base = array.numpy().astype(np.float32)
        delta[name] = sent[name].astype(np.float32) - base if name in sent else np.zeros_like(base)
    norm = float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta.values())))
    if norm_bound > 0 and norm > norm_bound:
        delta = {name: d * np.float32(norm_bound / norm) for name, d in delta.items()}
    return _legacy_records(ArrayRecord({name: Array(np.ascontiguousarray(d)) for name, d in delta.items()}), weight)


def _legacy_records(parameters: ArrayRecord, weight: float) -> RecordDict:
    return RecordDict({
        f"{_LEGACY_PREFIX}parameters": parameters,
        f"{_LEGACY_PREFIX}num_examples": MetricRecord({"num_examples": weight}),
        f"{_LEGACY_PREFIX}metrics": ConfigRecord({}),
        f"{_LEGACY_PREFIX}status": ConfigRecord({"code": 0, "message": ""}),
    })
