"""``fedlora privacy empirical``: measure the privacy of a simulated federation, not only compute
it.

The simulation runs as ``fedlora simulate`` would, with ``--canaries N`` canaries
(``simulations.canaries``) each put into site-0's data with probability 1/2. After the run, each
canary is scored by the final global adapter: the score is minus its loss (an included canary is
expected to have a lower loss). The scores of included and excluded canaries give a lower bound
on epsilon at the stated confidence (``privacy.one_run_audit``: Steinke et al.'s one-run bound
and the tighter f-DP one), reported next to the accountant's upper bound for site-0 (its ledger's
epsilon, null without DP).

Writes ``OUT/empirical.json``, ``OUT/empirical.md`` and ``OUT/plots/canary_scores.png`` beside
the run's usual outputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.run_config import RunSettings
from fedlora.saved_adapter import load_adapter
from fedlora.evaluation import per_example_scores
from fedlora.sources import resolve_label_names
from fedlora.tasks import encode
from privacy.one_run_audit import audit
from server.history import write_json
from simulations.canaries import Canaries, make_canaries
from simulations.simulate import run_simulation

CONFIDENCE = 0.95


def run_empirical(settings: RunSettings, sites: dict[str, Any], out_dir: Path, count: int, verbose: bool = False) -> dict:
    if settings.data.task != "classification":
        raise ValueError("the empirical audit needs task = classification (canaries are labelled texts)")
    labels = resolve_label_names(settings.data)
    # The inclusion bits are the auditor's secret: drawn here, fresh every run, never from the run's seed.
    canaries = make_canaries(count, len(labels), np.random.default_rng())
    run_simulation(
        replace(settings, output_dir=str(out_dir)), int(sites["num-clients"]), node_config=sites["node-config"],
        per_site={int(k): v for k, v in sites["site-config"].items()}, verbose=verbose, canaries=canaries,
    )
    scores = canary_scores(out_dir / "adapter", canaries, settings)
    included, excluded = scores[canaries.included], scores[~canaries.included]
    delta = settings.dp.delta or 1e-5
    bounds = {method: audit(included, excluded, CONFIDENCE, delta, method) for method in ("one-run", "one-run-fdp")}
    best = max(bounds.values(), key=lambda b: b.epsilon)
    result = {
        "epsilon_lower_bound": best.epsilon,
        "epsilon_theory": _site_epsilon(out_dir, "site-0") if settings.dp.dp else None,
        "confidence": CONFIDENCE,
        "delta": delta,
        "canaries": count,
        "included": int(canaries.included.sum()),
        "guesses": best.guesses,
        "correct": best.correct,
        "method": best.method,
        "score": "minus the canary's loss under the final global adapter (black box)",
        "bounds": {method: asdict(bound) for method, bound in bounds.items()},
    }
    write_json(out_dir / "empirical.json", result)
    (out_dir / "empirical.md").write_text(_markdown(result))
    _plot(out_dir / "plots" / "canary_scores.png", included, excluded)
    return result


def canary_scores(adapter_dir: Path, canaries: Canaries, settings: RunSettings) -> np.ndarray:
    """Minus each canary's loss under the run's final adapter, on the run's own base model."""
    model, tokenizer = load_adapter(adapter_dir, base_model=settings.model.model)
    examples = encode(canaries.rows, tokenizer, "classification", settings.data.max_seq_length)
    losses, _, _ = per_example_scores(model, examples, "classification", tokenizer.pad_token_id, device=model.device)
    return -losses.numpy()


def _site_epsilon(out_dir: Path, site: str) -> float | None:
    sites = json.loads((out_dir / "privacy_report.json").read_text())["sites"]
    return sites.get(site, {}).get("latest_epsilon")


def _markdown(result: dict) -> str:
    theory = "none: DP was off" if result["epsilon_theory"] is None else f"{result['epsilon_theory']:.3f}"
    lines = [
        "# Empirical privacy audit",
        "",
        f"- epsilon, lower bound (measured, {result['confidence']:.0%} confidence): **{result['epsilon_lower_bound']:.3f}** "
        f"({result['method']}, {result['correct']} of {result['guesses']} guesses correct)",
        f"- epsilon, upper bound (the accountant, site-0's ledger): **{theory}**",
        f"- {result['canaries']} canaries, {result['included']} of them included in site-0's data; delta {result['delta']:g}",
        f"- score: {result['score']}",
        "",
        "A lower bound well below the upper bound is expected: the canaries, the score and one run see only",
        "part of what an adversary could do, and it proves nothing stronger than \"at least this much\". A lower",
        "bound above the upper bound would mean the DP implementation does not do what its accountant assumes.",
        "",
        "| method | epsilon lower bound | guesses | correct | two-sided |",
        "|---|---|---|---|---|",
    ] + [f"| {b['method']} | {b['epsilon']:.3f} | {b['guesses']} | {b['correct']} | {b['two_sided']} |"
         for b in result["bounds"].values()] + ["", "![canary scores](plots/canary_scores.png)", ""]
    return "\n".join(lines)


def _plot(path: Path, included: np.ndarray, excluded: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate([included, excluded]), bins=30)
    ax.hist(excluded, bins=bins, alpha=0.6, label=f"excluded ({len(excluded)})")
    ax.hist(included, bins=bins, alpha=0.6, label=f"included ({len(included)})")
    ax.set_xlabel("score (minus the canary's loss)")
    ax.set_ylabel("canaries")
    ax.set_title("Canary scores under the final adapter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
