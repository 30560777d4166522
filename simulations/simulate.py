"""``fedlora simulate``: N virtual sites on this machine, through Flower's simulation engine.

The same ServerApp and site handlers as a real deployment run here; only the transport is
in-process. First the data: each virtual site ``i`` gets its own file (``simulations.site_files``)
and node config ``{"site-name": "site-i", "ledger-path": OUT/privacy/site-i.db, "data-path":
OUT/sites/site-i.parquet, "num-examples": <its partition's units>}`` plus ``--node-config``
(every site) plus its table in ``--site-config`` (one site). With ``attack``
(``simulations.attacks``), K sites misbehave; a label-flipping one is handed its file with
every label reversed.

Flower's public ``run_simulation`` takes no run config: the apps built here carry it, as a
deployment's SuperLink would hand it to the ServerApp and the SuperNodes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation as run_flower_simulation

from fedlora.run_config import RunSettings
from fedlora.sources import resolve_label_names
from simulations.attacks import Attack, flip_labels
from simulations.apps import build_server_app, build_site_app
from simulations.canary_clients import CanaryClients
from simulations.site_files import assign_site_files, write_site_file


def site_node_configs(
    out_dir: Path, num_sites: int, node_config: Mapping[str, Any], per_site: Mapping[int, Mapping[str, Any]],
) -> dict[int, dict[str, Any]]:
    """Each virtual site's node config, before its data is assigned (``assign_site_files``)."""
    unknown = sorted(set(per_site) - set(range(num_sites)))
    if unknown:
        raise ValueError(f"--site-config names site(s) {unknown}, but sites are 0..{num_sites - 1}")
    return {
        i: {
            "site-name": f"site-{i}",
            "ledger-path": str(out_dir / "privacy" / f"site-{i}.db"),
            **node_config,
            **per_site.get(i, {}),
        }
        for i in range(num_sites)
    }


def run_simulation(
    settings: RunSettings,
    num_sites: int,
    node_config: Mapping[str, Any] | None = None,
    per_site: Mapping[int, Mapping[str, Any]] | None = None,
    client_cpus: float | None = None,
    attack: Attack | None = None,
    verbose: bool = False,
    canary_clients: CanaryClients | None = None,
) -> Path:
    """Run the federation to completion; returns the output directory. ``canary_clients`` join
    every round's mean (the empirical audit's)."""
    out_dir = Path(settings.output_dir).expanduser().resolve()
    # Each site reads its own file, as a deployed one does, so the run names the labels.
    labels = tuple(resolve_label_names(settings.data)) if settings.data.task == "classification" else ()
    settings = replace(settings, output_dir=str(out_dir), data=replace(settings.data, label_names=labels))
    sites = site_node_configs(out_dir, num_sites, node_config or {}, per_site or {})
    partitions = assign_site_files(sites, settings, out_dir)
    if attack is not None and attack.kind == "label-flip":
        flipped = out_dir / "attack" / "sites"
        for site in attack.sites:
            if site not in partitions:
                raise ValueError(f"attack label-flip: site-{site} has a data-path of its own to flip; give it none")
            rows = flip_labels(partitions[site], len(labels))
            sites[site]["data-path"] = str(write_site_file(rows, settings.data, flipped / f"site-{site}.parquet"))
    # One virtual site at a time, each using every core: the model is loaded once per worker
    # and torch parallelises within a batch better than two sites share two cores.
    cpus = client_cpus or float(os.cpu_count() or 1)
    # Ray's announced default (leave the visible devices alone when a site asks for no GPU), taken
    # now, so that every simulation does not print the FutureWarning about it.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_flower_simulation(
        server_app=build_server_app(settings, canary_clients),
        client_app=build_site_app(settings, sites, attack, verbose),
        num_supernodes=num_sites,
        backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}},
    )
    return out_dir
