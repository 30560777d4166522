"""Splitting one dataset into simulated sites with flwr-datasets partitioners.

Partition specs:

* ``iid`` - rows shuffled and dealt out evenly;
* ``dirichlet:ALPHA`` - label skew drawn from Dirichlet(ALPHA), smaller is more skewed;
* ``column:NAME`` - one site per distinct value of column NAME (e.g. ``column:hospital``).
"""

from __future__ import annotations

import math
import warnings

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

VALID_SPECS = "'iid', 'dirichlet:ALPHA' (ALPHA > 0, e.g. dirichlet:0.5) or 'column:NAME'"

# Every site needs one training row and one held-out row. A larger floor makes
# small corpora (a few hundred rows over 10 sites at a low alpha) exhaust the
# library's 10 resampling attempts; self-balancing keeps most sites far above it.
_MIN_PARTITION_SIZE = 2


def make_partitioner(
    spec: str, num_partitions: int, label_column: str = "label", seed: int = 42
) -> Partitioner:
    """Build the flwr-datasets partitioner for ``spec`` (see the module docstring)."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    scheme, _, argument = spec.strip().partition(":")
    if scheme == "iid" and not argument:
        return IidPartitioner(num_partitions=num_partitions)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            alpha=_parse_alpha(spec, argument),
            min_partition_size=_MIN_PARTITION_SIZE,
            self_balancing=True,
            seed=seed,
        )
    if scheme == "column" and argument:
        return NaturalIdPartitioner(partition_by=argument)
    raise ValueError(f"unknown partition spec {spec!r}; use {VALID_SPECS}")


def partition_dataset(
    dataset: datasets.Dataset,
    spec: str,
    num_partitions: int,
    label_column: str = "label",
    seed: int = 42,
) -> list[datasets.Dataset]:
    """Split ``dataset`` into ``num_partitions`` non-empty sites according to ``spec``."""
    partitioner = make_partitioner(spec, num_partitions, label_column, seed)
    if num_partitions > dataset.num_rows:
        raise ValueError(
            f"cannot split {dataset.num_rows} rows into {num_partitions} sites; "
            "use fewer clients"
        )
    if isinstance(partitioner, IidPartitioner):
        # IidPartitioner deals out contiguous shards, so a file sorted by label
        # would give label-skewed "IID" sites without this shuffle.
        dataset = dataset.shuffle(seed=seed, keep_in_memory=True)
    elif isinstance(partitioner, DirichletPartitioner):
        _require_column(dataset, label_column, spec)
    else:
        _check_natural_ids(dataset, spec.strip().partition(":")[2], num_partitions)
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():
            # The library warns on every Dirichlet resample; only the final
            # outcome matters and is reported below.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            partitions = [partitioner.load_partition(i) for i in range(num_partitions)]
    except ValueError as error:
        raise ValueError(
            f"partition spec {spec!r} could not give all {num_partitions} sites data "
            f"({error}); use a larger alpha or fewer clients"
        ) from error
    for site, partition in enumerate(partitions):
        if partition.num_rows == 0:
            raise ValueError(
                f"partition spec {spec!r} left site {site} with no rows; "
                "use a larger alpha or fewer clients"
            )
    return partitions


def _parse_alpha(spec: str, argument: str) -> float:
    try:
        alpha = float(argument)
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"invalid partition spec {spec!r}: ALPHA must be a positive number; "
            f"use {VALID_SPECS}"
        )
    return alpha


def _require_column(dataset: datasets.Dataset, column: str, spec: str) -> None:
    if column not in dataset.column_names:
        raise ValueError(
            f"partition spec {spec!r} needs column {column!r}, but the data has "
            f"columns {', '.join(dataset.column_names)}; use {VALID_SPECS}"
        )


def _check_natural_ids(dataset: datasets.Dataset, column: str, num_partitions: int) -> None:
    """One site per distinct value, so their count must match the number of sites."""
    _require_column(dataset, column, f"column:{column}")
    values = dataset.unique(column)
    if None in values:
        raise ValueError(f"column {column!r} has missing values; every row needs a site")
    if len(values) != num_partitions:
        raise ValueError(
            f"column {column!r} has {len(values)} distinct values, so use "
            f"--num-clients {len(values)} (got {num_partitions})"
        )
