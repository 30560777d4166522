"""A site's own data, found through its node config only.

``data-path`` in the site's node config (``flower-supernode --node-config``) names its file or
folder; the server can never point a site at other data. A simulated site is no different: the
simulation partitions the data first and hands each virtual site its own file
(``simulations.site_files``). The site keeps ``eval-fraction`` of its rows as a held-out split
for federated evaluation; training never sees them.

Each row belongs to one **privacy unit**: itself, or, with ``privacy-unit-column`` in the node
config (user-level DP), every row sharing that column's value. ``units`` numbers them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets

from fedlora.data import DataError
from fedlora.run_config import DataSettings
from fedlora.sources import load_file


UNIT_COLUMN = "privacy_unit"


@dataclass(frozen=True)
class SiteData:
    train: datasets.Dataset
    eval: datasets.Dataset
    source: str

    @staticmethod
    def units(split: datasets.Dataset) -> list[int]:
        """The privacy unit of every row of ``split``: its user's number, or its own index."""
        if UNIT_COLUMN not in split.column_names:
            return list(range(split.num_rows))
        numbers: dict[str, int] = {}
        return [numbers.setdefault(value, len(numbers)) for value in split[UNIT_COLUMN]]


def load_site_data(node_config: Mapping[str, Any], data: DataSettings, seed: int, unit_column: str | None = None) -> SiteData:
    """The site's rows, split into training and held-out ones (``split_train_eval`` with the
    run's ``seed``)."""
    if "data-path" not in node_config:
        raise DataError("this site has no 'data-path' in its node config (flower-supernode --node-config)", setting="data-path")
    labels = list(data.label_names) if data.task == "classification" else None
    if labels == []:  # else they would be read from the server's ``data``, a path the server chose
        raise DataError("the run config gives no label-names; a site never reads the server's 'data' to find them",
                        setting="label-names")
    source = str(node_config["data-path"])
    table = load_file(source, data, labels, drop_bad_rows=True, extra_columns=(unit_column,) if unit_column else ())
    if unit_column:
        table = table.rename_column(unit_column, UNIT_COLUMN)
    train, held_out = split_train_eval(table, data.eval_fraction, seed, UNIT_COLUMN if unit_column else None)
    return SiteData(train=train, eval=held_out, source=source)


def split_train_eval(
    dataset: datasets.Dataset, eval_fraction: float, seed: int, key_column: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out about ``eval_fraction`` of a site's rows for evaluation, **row by row**.

    Row r is held out iff ``sha256(seed, key_r)`` read as a number in [0, 1) is below
    ``eval_fraction``, where ``key_r`` is the row's content (or its ``key_column`` value, e.g.
    the user of user-level DP, so that a user's rows stay together). No row's split depends on
    any other row: adding or removing one record changes one side of the split by that record
    and nothing else. DP accounting needs that: a shuffle-based split would move other
    records between training and evaluation when one record is added, and then "neighbouring
    datasets" would differ in many training rows.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    keys = dataset[key_column] if key_column else [
        json.dumps(row, sort_keys=True, default=str) for row in dataset
    ]
    held_out = [_uniform(seed, key) < eval_fraction for key in keys]
    train = [i for i, out in enumerate(held_out) if not out]
    evaluation = [i for i, out in enumerate(held_out) if out]
    return dataset.select(train, keep_in_memory=True), dataset.select(evaluation, keep_in_memory=True)


def _uniform(seed: int, key: object) -> float:
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
