"""Compressed uploads (``upload-dtype``): what a site's adapter costs on the wire.

A site sends, for each tensor it trained, either its value (``fp32``, the default) or its
**update** Δ = θ_site − θ_received in a smaller type; the server adds Δ back to the global
adapter it sent and screens and aggregates float32 values as before:

| ``upload-dtype`` | per value | how Δ is stored | error of the value the server rebuilds |
|---|---|---|---|
| ``fp32`` | 4 bytes | (the value itself) | none |
| ``fp16`` | 2 bytes | IEEE half precision (|Δ| ≤ 65504, else infinite and rejected) | relative 2⁻¹¹ of Δ; absolute 2⁻²⁵ where |Δ| < 2⁻¹⁴ (subnormals) |
| ``bf16`` | 2 bytes | torch's bfloat16 (float32 rounded to nearest even), its bits as ``uint16`` on the wire: NumPy has no bfloat16 | relative 2⁻⁸ of Δ |
| ``int8`` | 1 byte + 4 per tensor | q = ⌊Δ/s + U⌋, U ~ U[0, 1), clipped to ±127, with the tensor's scale s = max|Δ|/127 in ``<name>#scale`` | ≤ s, zero on average |

Why the update and not the value: LoRA's A starts at a random init, and a round moves it by
a tiny fraction of its size. Rounding the value would bury the move; rounding the move keeps
the error relative to the move. A site training a lower LoRA rank (HetLoRA) received its first
r components and sends r; both ends take Δ against those (:func:`_received_part`).

**int8 is unbiased.** For x = Δ/s with |x| ≤ 127, ⌊x + U⌋ is ⌈x⌉ with probability x − ⌊x⌋ and
⌊x⌋ otherwise, so E[q] = ⌊x⌋ + (x − ⌊x⌋) = x and E[s q] = Δ: the mean over sites of the
rebuilt updates is the mean of the updates plus zero-mean noise of variance at most s²/4 per
value and site (Alistarh et al. 2017, QSGD). The clip to ±127 never binds, as |x| ≤ 127 by the
choice of s (:func:`_int8_scale`, in the float32 the server reads).

**Privacy.** Encoding is post-processing of what DP-SGD released: it uses only the released
adapter, the received one and fresh randomness that nothing else sees, so it costs no epsilon.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

SCALE_SUFFIX = "#scale"
# What each compressed type stores Δ as; fp32 sends the value in the adapter's own dtype.
WIRE_DTYPES = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}


def encode_upload(sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], upload_dtype: str,
                  rng: np.random.Generator) -> ArrayRecord:
    """The reply's ``arrays`` for the tensors ``sent`` (float32), given the ``received`` ones."""
    if upload_dtype == "fp32":
        return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in sent.items()})
    encoded: dict[str, Array] = {}
    for name, value in sent.items():
        value = np.asarray(value, dtype=np.float32)
        delta = value - _received_part(np.asarray(received[name], dtype=np.float32), value.shape, name)
        if upload_dtype == "fp16":
            encoded[name] = Array(delta.astype(np.float16))
        elif upload_dtype == "bf16":
            import torch  # NumPy has no bfloat16; torch is imported only where one is needed

            encoded[name] = Array(torch.from_numpy(delta).to(torch.bfloat16).view(torch.uint16).numpy())
        else:
            scale = _int8_scale(delta)
            steps = delta.astype(np.float64) / scale if scale > 0 else np.zeros(delta.shape)
            quantized = np.clip(np.floor(steps + rng.random(delta.shape)), -127, 127).astype(np.int8)
            encoded[name] = Array(quantized)
            encoded[name + SCALE_SUFFIX] = Array(np.array([scale], dtype=np.float32))
    return ArrayRecord(encoded)


def decode_upload(arrays: ArrayRecord, received: ArrayRecord, upload_dtype: str) -> ArrayRecord:
    """The float32 values a reply's ``arrays`` stand for; ValueError saying what is malformed."""
    if upload_dtype == "fp32":
        return arrays
    wire = WIRE_DTYPES[upload_dtype]
    names = [name for name in arrays.keys() if not name.endswith(SCALE_SUFFIX)]
    for name in names:
        if arrays[name].dtype != wire:
            raise ValueError(f"tensor {name!r} is {arrays[name].dtype}, but upload-dtype {upload_dtype} sends {wire}")
    scales = {name for name in arrays.keys() if name.endswith(SCALE_SUFFIX)}
    expected_scales = {name + SCALE_SUFFIX for name in names} if upload_dtype == "int8" else set()
    if scales != expected_scales:
        raise ValueError(f"scales {sorted(scales ^ expected_scales)[:3]} missing or unexpected")
    decoded = {}
    for name in names:
        if name not in received:
            raise ValueError(f"tensor {name!r} was not in the adapter sent")
        encoded = arrays[name].numpy()
        start = _received_part(received[name].numpy(), encoded.shape, name)
        if upload_dtype == "fp16":
            delta = encoded.astype(np.float32)
        elif upload_dtype == "bf16":
            import torch

            delta = torch.from_numpy(encoded).view(torch.bfloat16).float().numpy()
        else:
            scale = arrays[name + SCALE_SUFFIX].numpy()
            if scale.shape != (1,) or scale.dtype != np.float32 or not np.isfinite(scale[0]) or scale[0] < 0:
                raise ValueError(f"tensor {name!r}: its scale must be one finite float32 >= 0")
            delta = encoded.astype(np.float32) * scale[0]
        decoded[name] = Array(np.ascontiguousarray(start + delta, dtype=start.dtype))
    return ArrayRecord(decoded)


def _int8_scale(delta: np.ndarray) -> np.float32:
    """The float32 s that the server multiplies by, the least with max|Δ| / s <= 127, so that
    the clip to ±127 never binds and E[s q] = Δ holds exactly as sent."""
    largest = float(np.max(np.abs(delta))) if delta.size else 0.0
    scale = np.float32(largest / 127)
    while float(scale) * 127 < largest:
        scale = np.nextafter(scale, np.float32(np.inf))
    return scale


def _received_part(received: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The leading ``shape`` block of a received tensor: all of it, or a lower-rank site's part."""
    if len(shape) != received.ndim or any(n > m for n, m in zip(shape, received.shape)):
        raise ValueError(f"tensor {name!r}: shape {shape} does not fit the {received.shape} sent")
    return received[tuple(slice(0, n) for n in shape)]
