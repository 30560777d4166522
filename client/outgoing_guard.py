"""The last check before anything leaves a site: a Flower client mod around every handler.

A reply may carry only

- ``arrays``: the adapter, **exactly as received**: every key one the server sent, with the
  same dtype and the same shape (a LoRA matrix may be cut to a lower rank: HetLoRA), or its
  update in one of ``upload-dtype``'s wire types, an int8 one with its one-value scale
  (``fedlora.upload_codec``);
- ``metrics``: whitelisted scalars (public DP parameters, the FedAvg weight, noised releases);
- ``status``: a refusal's code and setting name, both from fixed lists (``client.refusals``);
- ``site``: the site's display name; ``ledger``: its ledger's row count and head hash;
- ``secaggplus_configs``: in a SecAgg+ round, the protocol's public keys, encrypted shares,
  shares and masked vector, each stage's fields with their types (``client.secure_aggregation``);
  such a reply carries no ``arrays``: its update leaves only masked.

Anything else (a base-model weight, a raw example, a free-form string) is a bug that would leak
data, so the reply is replaced by a ``disclosure-blocked`` status. An exception raised at the
site becomes an ``internal-error`` status, never Flower's error reply, whose reason would carry
the exception's text (which can quote data) to the server. Full texts go to the site's log.
"""

from __future__ import annotations

import math
import re
import traceback
from logging import ERROR

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.logger import log

from client.refusals import SETTINGS, STATUS_CODES
from client.secure_aggregation import MASKED_VECTOR, PROTOCOL_RECORD, REPLY_FIELDS
from fedlora.upload_codec import SCALE_SUFFIX, WIRE_DTYPES

ALLOWED_METRICS = frozenset(
    {
        "num-examples", "train-loss", "eval-loss", "eval-accuracy", "steps", "sample-rate",
        "noise-multiplier", "max-grad-norm", "epsilon", "delta", "max-epsilon", "dp",
        "seconds", "examples-per-second", "lora-rank", "user-level", "grid-scale",
    }
)
ALLOWED_RECORDS = {
    "arrays": ArrayRecord, "metrics": MetricRecord, "status": ConfigRecord, "site": ConfigRecord,
    "ledger": ConfigRecord, PROTOCOL_RECORD: ConfigRecord,
}
_HEX_HASH = re.compile(r"^[0-9a-f]{64}$")


class DisclosureError(RuntimeError):
    """A reply would have sent something other than the allowed records."""


def check_outgoing(reply: Message, received: ArrayRecord | None = None) -> None:
    """Raise ``DisclosureError`` naming the first thing that must not leave the site.
    ``received`` is the adapter the server sent (arrays in the reply must match it)."""
    if reply.has_error():
        raise DisclosureError("error replies carry free text; send a status code instead")
    if PROTOCOL_RECORD in reply.content.config_records and "arrays" in reply.content.array_records:
        raise DisclosureError("a secure-aggregation reply sends its update masked, never as arrays")
    for name, record in reply.content.items():
        expected = ALLOWED_RECORDS.get(name)
        if expected is None or not isinstance(record, expected):
            raise DisclosureError(f"record {name!r} ({type(record).__name__}) may not leave the site")
        if name == "arrays":
            _check_arrays(record, received if received is not None else ArrayRecord())
        elif name == "metrics":
            _check_metrics(record)
        elif name == PROTOCOL_RECORD:
            _check_protocol(record, received if received is not None else ArrayRecord())
        else:
            _check_fields(name, record)


def outgoing_guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run the handler; send its reply only if it passes ``check_outgoing``."""
    received = message.content["arrays"] if "arrays" in message.content.array_records else None
    try:
        reply = call_next(message, context)
    except Exception:  # noqa: BLE001 - whatever it was, its text stays here
        log(ERROR, "site handler failed; the server gets only 'internal-error':\n%s", traceback.format_exc())
        return _code_only(message, context, "internal-error")
    try:
        check_outgoing(reply, received)
    except DisclosureError as err:
        log(ERROR, "outgoing reply blocked, the server gets only 'disclosure-blocked': %s", err)
        return _code_only(message, context, "disclosure-blocked")
    return reply


def _code_only(message: Message, context: Context, code: str) -> Message:
    """A code, and the ledger's anchor: a round that crashed after its charge still shows the
    server the rows it added, so they cannot vanish unnoticed."""
    content = RecordDict({"status": ConfigRecord({"status": code, "setting": ""})})
    from privacy.ledger import ledger_anchor  # the training stack: only for a reply that failed

    anchor = ledger_anchor(context.node_config.get("ledger-path"))
    if anchor is not None:
        content["ledger"] = ConfigRecord({"rows": anchor.rows, "head": anchor.head})
    return Message(content, reply_to=message)


def _check_arrays(record: ArrayRecord, received: ArrayRecord) -> None:
    for key, array in record.items():
        if key.endswith(SCALE_SUFFIX):
            quantized = key.removesuffix(SCALE_SUFFIX)
            if quantized not in record or record[quantized].dtype != "int8" or tuple(array.shape) != (1,) or array.dtype != "float32":
                raise DisclosureError(f"{key!r} may only be the one float32 scale of an int8 tensor")
            if not (np.isfinite(array.numpy()).all() and array.numpy()[0] >= 0):
                raise DisclosureError(f"{key!r}: a scale is finite and >= 0")
            continue
        if key not in received:
            raise DisclosureError(f"tensor {key!r} was not in the adapter the server sent")
        sent = received[key]
        if array.dtype != sent.dtype and np.dtype(array.dtype) not in WIRE_DTYPES.values():
            raise DisclosureError(f"tensor {key!r}: dtype {array.dtype} is neither the received {sent.dtype} nor an upload-dtype's")
        if tuple(array.shape) != tuple(sent.shape) and not _lower_rank(key, tuple(array.shape), tuple(sent.shape)):
            raise DisclosureError(f"tensor {key!r}: shape {tuple(array.shape)} differs from the received {tuple(sent.shape)}")


def _lower_rank(key: str, shape: tuple[int, ...], received: tuple[int, ...]) -> bool:
    """A LoRA matrix at a lower rank: A is (r, in), B is (out, r)."""
    if len(shape) != 2 or len(received) != 2:
        return False
    if ".lora_A." in key:
        return shape[1] == received[1] and 0 < shape[0] <= received[0]
    if ".lora_B." in key:
        return shape[0] == received[0] and 0 < shape[1] <= received[1]
    return False


def _check_metrics(record: MetricRecord) -> None:
    bad = [key for key in record if key not in ALLOWED_METRICS]
    if bad:
        raise DisclosureError(f"metric(s) not whitelisted: {', '.join(bad)}")
    lists = [key for key, value in record.items() if isinstance(value, list)]
    if lists:
        raise DisclosureError(f"metric(s) must be scalars: {', '.join(lists)}")
    # A NaN or infinity is no DP release: it would tell that some record broke the computation.
    odd = [key for key, value in record.items() if not math.isfinite(value)]
    if odd:
        raise DisclosureError(f"metric(s) not finite: {', '.join(odd)}")


def _check_protocol(record: ConfigRecord, received: ArrayRecord) -> None:
    fields = REPLY_FIELDS.get(frozenset(record))
    if fields is None:
        raise DisclosureError(f"secure-aggregation fields {sorted(record)} are no stage's reply")
    for key, (kind, is_list) in fields.items():
        value = record[key]
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) != is_list or not all(type(item) is kind for item in items):
            raise DisclosureError(f"secure-aggregation field {key!r} must be {'a list of' if is_list else 'one'} {kind.__name__}")
    if MASKED_VECTOR in record:
        _check_masked_vector(record[MASKED_VECTOR], received)


def _check_masked_vector(parts: list[bytes], received: ArrayRecord) -> None:
    """Integers in the shapes the protocol masks: the weight, then every received tensor."""
    expected = [(1,), *(tuple(array.shape) for array in received.values())]
    try:
        arrays = [bytes_to_ndarray(part) for part in parts]
    except (ValueError, OSError) as err:
        raise DisclosureError(f"a masked vector part is no array: {err}") from err
    if [tuple(a.shape) for a in arrays] != expected or any(a.dtype.kind not in "iu" for a in arrays):
        raise DisclosureError("a masked vector must be integers in the received adapter's shapes, after the weight")


def _check_fields(name: str, record: ConfigRecord) -> None:
    fields = {"status": {"status", "setting"}, "site": {"name"}, "ledger": {"rows", "head"}}[name]
    if set(record) != fields:
        extra = ", ".join(sorted(set(record) ^ fields))
        raise DisclosureError(f"{name} fields not allowed or missing: {extra}")
    if name == "status" and (record["status"] not in STATUS_CODES or record["setting"] not in SETTINGS):
        raise DisclosureError(f"status {record['status']!r} / setting {record['setting']!r} is not a known code and setting")
    if name == "ledger" and not (
        isinstance(record["rows"], int) and record["rows"] >= 0 and _HEX_HASH.match(str(record["head"]))
    ):
        raise DisclosureError("ledger anchor must be a row count and a sha256 hex digest")
    if name == "site" and not isinstance(record["name"], str):
        raise DisclosureError("site name must be a string")
