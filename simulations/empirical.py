"""``fedlora privacy empirical``: measure the privacy of a simulated federation, not only compute
it.

The simulation runs as ``fedlora simulate`` would, with site-0 auditing itself
(``client.self_audit``, node config ``audit-canaries = N``): N canaries (``privacy.canaries``),
each among its training rows with probability 1/2, from a secret it keeps in its audit folder.
After the run, each canary is scored by the final global adapter, and the scores of included
and excluded canaries give a lower bound on epsilon at 95% confidence
(``privacy.empirical_report``), next to the accountant's upper bound for site-0 (its ledger's
epsilon for the run; null without DP).

Under central DP (and with ``--canary-clients K`` without it; a plain-mean strategy) the same
run also measures site-level
privacy, the unit central DP protects: K canary clients join every round's mean with random
directions (``simulations.canary_clients``), and their cosines with the run's change of the
global adapter give Andrew et al.'s estimate ε̂ (``privacy.canary_cosines``), reported next to
central DP's accountant (null without central DP: then no site-level guarantee is claimed).

Writes ``OUT/empirical.json``, ``OUT/empirical.md``, ``OUT/plots/canary_scores.png`` and, with
canary clients, ``OUT/plots/canary_cosines.png`` beside the run's usual outputs.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.self_audit import OWN_UPDATE, SelfAudit
from fedlora.run_config import RunSettings
from fedlora.saved_adapter import load_adapter
from fedlora.sources import resolve_label_names
from privacy.canaries import canary_scores
from privacy.canary_cosines import MIN_DIMENSION, estimate_epsilon
from privacy.empirical_report import record_level, write_report
from server.checkpoints import latest_checkpoint, restore
from server.global_model import GlobalModel
from server.history import load_history
from simulations.canary_clients import CanaryClients
from simulations.simulate import run_simulation, site_node_configs
from strategies.factory import averages_plainly
from strategies.ffa_lora import trainable_subset

DEFAULT_CANARY_CLIENTS = 100
MIN_CANARY_CLIENTS = 10  # fewer make the mean cosine, and its bootstrap, too coarse to read

def run_empirical(
    settings: RunSettings, sites: dict[str, Any], out_dir: Path, count: int, canary_clients: int | None = None,
    verbose: bool = False,
) -> dict:
    if settings.data.task != "classification":
        raise ValueError("the empirical audit needs task = classification (canaries are labelled texts)")
    if count < 2:
        raise ValueError(f"--canaries must be at least 2, got {count}")
    labels = resolve_label_names(settings.data)
    # The canary clients' directions are the auditor's secret: drawn here, fresh every run,
    # never from the run's seed, and never written. The canaries' secret is site-0's own.
    clients, skipped = canary_clients_for(settings, canary_clients)
    settings = replace(settings, output_dir=str(out_dir))
    num_sites = int(sites["num-clients"])
    per_site = {int(k): v for k, v in sites["site-config"].items()}
    per_site[0] = {**per_site.get(0, {}), "audit-canaries": count}
    run_simulation(settings, num_sites, node_config=sites["node-config"], per_site=per_site, verbose=verbose,
                   canary_clients=clients)
    audit = _site_audit(site_node_configs(out_dir, num_sites, sites["node-config"], per_site)[0], count)
    model, tokenizer = load_adapter(out_dir / "adapter", base_model=settings.model.model)
    canaries = audit.canaries(len(labels))
    scores = canary_scores(model, tokenizer, canaries, settings.data.max_seq_length, model.device)
    theory = _site_epsilon(out_dir, "site-0") if settings.dp.dp else None
    result = {
        **record_level(scores, canaries.included, settings.dp.delta or 1e-5, theory, "site-0"),
        "own_update": _own_update(audit),
        "site_level": None,
        "site_level_skipped": skipped,
    }
    cosines = None
    if clients is not None:
        change = run_change(out_dir, settings)
        dimension = sum(v.size for v in change.values())
        if dimension < MIN_DIMENSION:
            result["site_level_skipped"] = f"the adapter has {dimension} values; the estimate needs {MIN_DIMENSION}"
        else:
            cosines = clients.cosines(change)
            result["site_level"] = _site_level(out_dir, settings, *cosines, dimension)
    write_report(out_dir, result, scores, canaries.included, cosines)
    return result


def _site_audit(node_config: dict[str, Any], count: int) -> SelfAudit:
    """Site-0's audit of this run: the one run folder in its audit folder."""
    folders = sorted(SelfAudit.root(node_config).glob("run-*"))
    if len(folders) != 1:
        raise ValueError(f"site-0's audit folder {SelfAudit.root(node_config)} holds {len(folders)} runs, not this run's "
                         "alone (did site-0 ever train? see report.md)")
    return SelfAudit(count, folders[0])


def _own_update(audit: SelfAudit) -> dict | None:
    """Site-0's own report on its last trained adapter (``client.self_audit``), in brief."""
    path = audit.folder / OWN_UPDATE / "empirical.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return {key: report[key] for key in ("epsilon_lower_bound", "epsilon_theory", "method", "round", "adapter")}


def canary_clients_for(settings: RunSettings, count: int | None) -> tuple[CanaryClients | None, str | None]:
    """The run's canary clients, with a fresh secret, or None and why there are none. ``count``
    None: ``DEFAULT_CANARY_CLIENTS`` under central DP, else none (``simulations.canary_clients``
    says what they cost the model without central DP's noise)."""
    if count is None and not settings.strategy.central_dp:
        return None, ("no central DP, so no site-level guarantee to measure; canary clients would be a large "
                      "part of every round's mean (ask for them with --canary-clients K)")
    count = DEFAULT_CANARY_CLIENTS if count is None else count
    if not count:
        return None, "no canary clients (--canary-clients 0)"
    if count < MIN_CANARY_CLIENTS:
        raise ValueError(f"--canary-clients must be 0 (none) or at least {MIN_CANARY_CLIENTS}, got {count}")
    if not averages_plainly(settings.strategy):
        return None, (f"strategy {settings.strategy.strategy!r} does not average the site updates plainly; "
                      "canary clients need fedavg, fedprox, ffa-lora or ffa-lora+fedprox")
    return CanaryClients(count, secrets.randbits(63)), None


def run_change(out_dir: Path, settings: RunSettings) -> dict[str, np.ndarray]:
    """θ_T − θ_0 over the tensors the sites sent (under FFA-LoRA not the frozen A's): θ_0 is the
    run's seeded initial adapter, θ_T its last checkpoint."""
    model = GlobalModel.load(settings)
    initial = {name: array.numpy() for name, array in model.arrays().items()}
    restore(model.model, latest_checkpoint(out_dir))
    final = {name: array.numpy() for name, array in model.arrays().items()}
    sent = trainable_subset(initial) if settings.strategy.freezes_lora_a else initial
    return {name: final[name].astype(np.float64) - sent[name] for name in sent}


def _site_level(out_dir: Path, settings: RunSettings, seen: np.ndarray, unseen: np.ndarray, dimension: int) -> dict:
    """The site-level estimate, next to central DP's accountant (its ε after the last round)."""
    strategy = settings.strategy
    estimate = estimate_epsilon(seen, unseen, dimension, strategy.central_dp_delta)
    history = load_history(out_dir / "history.json")
    return {
        **asdict(estimate),
        "epsilon_theory": history[-1].central_epsilon if strategy.central_dp and history else None,
        "canary_norm": "central-dp-clipping-norm" if strategy.central_dp else "the median site update of each round",
        "rounds": len(history),
    }


def _site_epsilon(out_dir: Path, site: str) -> float | None:
    sites = json.loads((out_dir / "privacy_report.json").read_text())["sites"]
    return sites.get(site, {}).get("latest_epsilon")
