"""Each simulated site's own data file.

A deployed site reads its own file, named by ``data-path`` in its node config
(``client.local_data``). A simulated site does exactly the same: the simulation reads the run's
``data`` once, partitions it (``simulations.partitioning``) and writes partition i to
``OUT/sites/site-i.parquet`` under the run's column names (labels as their names), which becomes
site i's ``data-path``. A site whose ``--site-config`` table gives a ``data-path`` of its own
keeps it.

Like a deployed site, each simulated site also declares its size (``num-examples``): the privacy
units of its partition (rows, or distinct values of its ``privacy-unit-column``), so that
sampling rates and FedAvg weights rest on public values (``docs/privacy.md``, A3).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from fedlora.data import DataError
from fedlora.run_config import DataSettings, RunSettings
from fedlora.sources import load_source, resolve_label_names
from simulations.partitioning import partition_dataset

SITES_DIR = "sites"
_CANONICAL = ("text", "label", "prompt", "response")


def site_file(out_dir: Path, site: int) -> Path:
    return out_dir / SITES_DIR / f"site-{site}.parquet"


def assign_site_files(
    sites: Mapping[int, dict[str, Any]], settings: RunSettings, out_dir: Path, write: bool = True
) -> dict[int, datasets.Dataset]:
    """Give every site without its own ``data-path`` its partition: the file's path, and its
    size as ``num-examples`` unless the site declares one. Writes the files when ``write``
    (``privacy plan`` only needs the sizes). Returns the partitions handed out, by site."""
    needing = [index for index, site in sites.items() if "data-path" not in site]
    if not needing:
        return {}
    unit_columns = tuple(sorted({str(sites[i]["privacy-unit-column"]) for i in needing if sites[i].get("privacy-unit-column")}))
    dataset = load_source(settings.data, settings.seed, unit_columns, sites=len(sites))
    try:
        parts = partition_dataset(dataset, settings.data.partition, len(sites), "label", settings.seed)
    except ValueError as err:
        raise DataError(str(err), setting="partition") from err
    handed_out = {}
    for index in needing:
        site, rows = sites[index], parts[index]
        unit_column = site.get("privacy-unit-column")
        site.setdefault("num-examples", len(set(rows[str(unit_column)])) if unit_column else rows.num_rows)
        site["data-path"] = str(site_file(out_dir, index))
        if write:
            write_site_file(rows, settings.data, site_file(out_dir, index))
        handed_out[index] = rows
    return handed_out


def write_site_file(rows: datasets.Dataset, data: DataSettings, path: Path) -> Path:
    """``rows`` (``text``/``label`` index, or ``prompt``/``response``, plus any other columns)
    as a parquet file a site reads with the run's column settings."""
    if data.task == "classification":
        names = resolve_label_names(data)
        columns = {data.text_column: rows["text"], data.label_column: [names[int(label)] for label in rows["label"]]}
    else:
        columns = {data.prompt_column: rows["prompt"], data.response_column: rows["response"]}
    for column in rows.column_names:
        if column not in _CANONICAL and column not in columns:
            columns[column] = rows[column]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    return path
