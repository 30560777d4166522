"""A site's own data, found through its node config only.

Deployment: ``data-path`` in the SuperNode's ``--node-config`` names the site's file or folder;
the server can never point a site at other data. Simulation: Flower gives each virtual site a
``partition-id`` of ``num-partitions``, and the site takes that partition of the run's dataset.
Either way the site keeps ``eval-fraction`` of its rows as a held-out split for federated
evaluation; training never sees them.
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


@dataclass(frozen=True)
class SiteData:
    train: datasets.Dataset
    eval: datasets.Dataset
    source: str


def load_site_data(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteData:
    labels = resolve_label_names(run_config) if run_config["task"] == "classification" else None
    if "data-path" in node_config:
        source = str(node_config["data-path"])
        table = load_file(source, run_config, labels)
    elif "partition-id" in node_config:
        pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
        source = f"{run_config['data']} (partition {pid} of {parts}, {run_config['partition']})"
        table = _partitions(load_source(run_config), str(run_config["partition"]), parts, int(run_config["seed"]))[pid]
    else:
        raise DataError("this site has no 'data-path' in its node config (flower-supernode --node-config)")
    train, held_out = split_train_eval(table, float(run_config["eval-fraction"]), int(run_config["seed"]))
    return SiteData(train=train, eval=held_out, source=source)


@lru_cache(maxsize=2)
def _partitions(dataset: datasets.Dataset, spec: str, parts: int, seed: int) -> list[datasets.Dataset]:
    """All partitions at once, kept for the process: a simulation worker serves many sites."""
    return partition_dataset(dataset, spec, parts, "label", seed)
