"""A site's own data, found through its node config only.

Deployment: ``data-path`` in the SuperNode's ``--node-config`` names the site's file or folder;
the server can never point a site at other data. Simulation: Flower gives each virtual site a
``partition-id`` of ``num-partitions``, and the site takes that partition of the run's dataset.
Either way the site keeps ``eval-fraction`` of its rows as a held-out split for federated
evaluation; training never sees them.

Each row belongs to one **privacy unit**: itself, or, with ``privacy-unit-column`` in the node
config (user-level DP), every row sharing that column's value. ``units`` numbers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import datasets

from fedlora.data import DataError
from simulations.partitioning import partition_dataset, split_train_eval
from simulations.sources import load_file, load_source, resolve_label_names


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


def load_site_data(node_config: Mapping[str, Any], run_config: Mapping[str, Any], unit_column: str | None = None) -> SiteData:
    labels = resolve_label_names(run_config) if run_config["task"] == "classification" else None
    if "data-path" in node_config:
        source = str(node_config["data-path"])
        table = load_file(source, run_config, labels, drop_bad_rows=True, extra_columns=(unit_column,) if unit_column else ())
        if unit_column:
            table = table.rename_column(unit_column, UNIT_COLUMN)
    elif "partition-id" in node_config:
        pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
        source = f"{run_config['data']} (partition {pid} of {parts}, {run_config['partition']})"
        dataset = load_source(run_config, unit_column)
        table = _partitions(dataset, str(run_config["partition"]), parts, int(run_config["seed"]))[pid]
        if unit_column:
            table = table.rename_column(unit_column, UNIT_COLUMN)
    else:
        raise DataError("this site has no 'data-path' in its node config (flower-supernode --node-config)", setting="data-path")
    train, held_out = split_train_eval(
        table, float(run_config["eval-fraction"]), int(run_config["seed"]), UNIT_COLUMN if unit_column else None
    )
    return SiteData(train=train, eval=held_out, source=source)


@lru_cache(maxsize=2)
def _partitions(dataset: datasets.Dataset, spec: str, parts: int, seed: int) -> list[datasets.Dataset]:
    """All partitions at once, kept for the process: a simulation worker serves many sites."""
    return partition_dataset(dataset, spec, parts, "label", seed)
