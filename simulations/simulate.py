"""``fedlora simulate``: N virtual sites on this machine, through Flower's simulation engine.

The same ServerApp and site handlers as a real deployment run here; only the transport is
in-process. Each virtual site ``i`` gets node config ``{"site-name": "site-i",
"ledger-path": OUT/privacy/site-i.db, "num-examples": <its partition's rows (users)>}`` plus
``--node-config`` (every site) plus its table in ``--site-config`` (one site). Declaring the
size, as a deployed site would in its node config, keeps sampling rates and FedAvg weights on
public values (``docs/privacy.md``, A3). With ``attack`` (``simulations.attacks``), K sites
misbehave; a label-flipping one is pointed at its own flipped file through ``data-path``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
from flwr.app import Context, RecordDict

# Flower's public ``run_simulation`` accepts no run config; its engine underneath does. Every
# name below comes from that one module, so a Flower upgrade that moves them fails here, once.
engine = importlib.import_module("flwr.simulation.run_simulation")

from client.local_data import load_site_data
from fedlora.run_config import PYPROJECT
from server.app import app as server_app
from simulations.attacks import Attack, write_flipped_partition
from simulations.site_app import build_site_app
from simulations.sources import resolve_label_names


def site_node_configs(
    out_dir: Path,
    num_sites: int,
    node_config: Mapping[str, Any],
    per_site: Mapping[int, Mapping[str, Any]],
    run_config: Mapping[str, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    sites = {
        i: {
            "site-name": f"site-{i}",
            "ledger-path": str(out_dir / "privacy" / f"site-{i}.db"),
            **node_config,
            **per_site.get(i, {}),
        }
        for i in range(num_sites)
    }
    if run_config is not None:
        for i, site in sites.items():
            if not {"num-examples", "data-path"} & set(site):
                size = _partition_units(run_config, i, num_sites, site.get("privacy-unit-column"))
                if size:
                    site["num-examples"] = size
    return sites


def _partition_units(run_config: Mapping[str, Any], site: int, num_sites: int, unit_column: str | None) -> int | None:
    """Privacy units (rows, or users) of simulated site ``site``, read exactly as the site will
    read them (None when the data cannot be read: the site then logs the problem itself)."""
    try:
        data = load_site_data({"partition-id": site, "num-partitions": num_sites}, run_config, unit_column)
    except ValueError:  # DataError included
        return None
    return len(set(data.units(data.train))) + len(set(data.units(data.eval)))


def _flipped_data(run_config: Mapping[str, Any], site: int, num_sites: int, out_dir: Path) -> dict[str, Any]:
    """Node config that points a label-flipping attacker at its own partition, labels reversed."""
    data = load_site_data({"partition-id": site, "num-partitions": num_sites}, run_config)
    rows = datasets.concatenate_datasets([data.train, data.eval])
    path = write_flipped_partition(
        rows, resolve_label_names(run_config), str(run_config["text-column"]), str(run_config["label-column"]),
        out_dir / "attack" / f"site-{site}.csv",
    )
    return {"data-path": str(path), "num-examples": rows.num_rows}


def run_simulation(
    run_config: Mapping[str, Any],
    num_sites: int,
    node_config: Mapping[str, Any] | None = None,
    per_site: Mapping[int, Mapping[str, Any]] | None = None,
    client_cpus: float | None = None,
    attack: Attack | None = None,
) -> Path:
    """Run the federation to completion; returns the output directory."""
    out_dir = Path(str(run_config["output-dir"])).expanduser().resolve()
    config = {**run_config, "output-dir": str(out_dir)}
    sites = site_node_configs(out_dir, num_sites, node_config or {}, per_site or {}, config)
    unknown = sorted(set(per_site or {}) - set(sites))
    if unknown:
        raise ValueError(f"--site-config names site(s) {unknown}, but sites are 0..{num_sites - 1}")
    if attack is not None and attack.kind == "label-flip":
        for site in attack.sites:
            sites[site] |= _flipped_data(config, site, num_sites, out_dir)

    run_id = engine.generate_rand_int_from_bytes(engine.RUN_ID_NUM_BYTES)
    run = engine.Run.create_empty(run_id=run_id)
    run.primary_task_id = engine.generate_rand_int_from_bytes(engine.TASK_ID_NUM_BYTES)
    run.federation_id = engine.NOOP_FEDERATION_ID
    run.override_config = config
    identity = engine.TaskIdentity
    identity.task_id, identity.run_id, identity.node_id = 1, run_id, engine.SUPERLINK_NODE_ID
    server_context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    # One virtual site at a time, each using every core: the model is loaded once per worker
    # and torch parallelises within a batch better than two sites share two cores.
    cpus = client_cpus or float(os.cpu_count() or 1)
    # Ray's announced default (leave the visible devices alone when a site asks for no GPU), taken
    # now, so that every simulation does not print the FutureWarning about it.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    engine._run_simulation(
        num_supernodes=num_sites,
        exit_event=engine.EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=build_site_app(sites, attack, int(config["seed"])),
        server_app=server_app,
        backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}},
        server_app_context=server_context,
        app_dir=str(PYPROJECT.parent),
        run=run,
        is_app=True,
    )
    return out_dir
