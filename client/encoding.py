"""A site's rows as model inputs: tokenised once per process, each with its privacy unit.

A warm site (a simulation worker, a long-lived ClientApp process) re-reads its data every round;
the same rows under the same tokenizer, task and length are tokenised once and served from
``_ENCODED`` afterwards. The key is a digest of the rows' content, so a file edited between
rounds is tokenised afresh. A row the tokenizer cannot encode is dropped with a warning in the
site's own log (its text never leaves the site).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from logging import WARNING

import datasets
from flwr.common.logger import log

from fedlora.tasks import encode

_ENCODED_KEPT = 256  # splits: a simulation worker serves many sites, each a train and an eval split


@dataclass(frozen=True)
class Encoded:
    """A split's model inputs and each one's privacy unit (rows that failed to encode dropped)."""

    examples: list[dict[str, list[int]]]
    units: list[int]

    @property
    def num_units(self) -> int:
        return len(set(self.units))


_ENCODED: dict[tuple, Encoded] = {}


def encode_split(split: datasets.Dataset, units: list[int], tokenizer, task: str, max_length: int, what: str) -> Encoded:
    """``split``'s rows as model inputs and their units; ``what`` names the split in warnings."""
    key = (tokenizer.name_or_path, task, max_length, _content_digest(split))  # units derive from the rows
    if key not in _ENCODED:
        while len(_ENCODED) >= _ENCODED_KEPT:
            del _ENCODED[next(iter(_ENCODED))]  # the oldest
        _ENCODED[key] = _encode_rows(split, units, tokenizer, task, max_length, what)
    return _ENCODED[key]


def _encode_rows(split: datasets.Dataset, units: list[int], tokenizer, task: str, max_length: int, what: str) -> Encoded:
    try:
        examples = encode(split, tokenizer, task, max_length)
        kept = list(range(len(examples)))
    except Exception:  # a tokenizer failure on some row: find it, keep the others
        examples, kept = [], []
        for index in range(split.num_rows):
            try:
                examples += encode(split.select([index]), tokenizer, task, max_length)
                kept.append(index)
            except Exception as err:  # noqa: BLE001 - any failure drops the row, locally noted
                log(WARNING, "%s row %s could not be encoded (%s); dropped", what, index, type(err).__name__)
    nonempty = [(e, i) for e, i in zip(examples, kept) if e["input_ids"]]
    return Encoded([e for e, _ in nonempty], [units[i] for _, i in nonempty])


def _content_digest(split: datasets.Dataset) -> str:
    """A digest of every value of ``split``."""
    # Not repr(split[name]): datasets' Column shows only its first values.
    return hashlib.sha256(repr(sorted(split.to_dict().items())).encode()).hexdigest()
