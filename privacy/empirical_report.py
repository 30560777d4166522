"""The report of an empirical privacy audit, for a person and a machine: ``empirical.json``,
``empirical.md``, ``plots/canary_scores.png`` and, with canary clients, ``plots/canary_cosines.png``
in one folder (a simulation's output folder, or a site's own audit folder).

The record-level part (``record_level``): the canaries' scores under the final model give a lower
bound on epsilon at 95% confidence, the better of Steinke et al.'s one-run bound and the f-DP
one (``privacy.one_run_audit``), next to the accountant's upper bound from the site's ledger.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from privacy.one_run_audit import audit

CONFIDENCE = 0.95
SCORE = "minus the canary's loss under the global adapter (black box)"


def record_level(scores: np.ndarray, included: np.ndarray, delta: float, epsilon_theory: float | None, site: str) -> dict:
    """The lower bound from the canaries' ``scores`` and secret ``included`` bits, at ``delta``,
    next to ``epsilon_theory`` (the ledger's epsilon; None without DP)."""
    bounds = {method: audit(scores[included], scores[~included], CONFIDENCE, delta, method)
              for method in ("one-run", "one-run-fdp")}
    best = max(bounds.values(), key=lambda b: b.epsilon)
    return {
        "site": site,
        "epsilon_lower_bound": best.epsilon,
        "epsilon_theory": epsilon_theory,
        "confidence": CONFIDENCE,
        "delta": delta,
        "canaries": int(scores.size),
        "included": int(included.sum()),
        "guesses": best.guesses,
        "correct": best.correct,
        "method": best.method,
        "score": SCORE,
        "bounds": {method: asdict(bound) for method, bound in bounds.items()},
    }


def write_report(
    folder: Path, result: dict, scores: np.ndarray, included: np.ndarray,
    cosines: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """``result`` as JSON and markdown, with the plots; ``cosines``: the inserted and the never
    inserted canary clients' (site level)."""
    folder.mkdir(parents=True, exist_ok=True)
    _replace(folder / "empirical.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    _replace(folder / "empirical.md", markdown(result))
    _plot(folder / "plots" / "canary_scores.png", scores[included], scores[~included])
    if cosines is not None:
        _plot_cosines(folder / "plots" / "canary_cosines.png", *cosines, result["site_level"]["dimension"])


def _replace(path: Path, text: str) -> None:
    """A site rewrites its report every round: never leave a half-written one."""
    partial = path.with_suffix(path.suffix + ".tmp")
    partial.write_text(text)
    partial.replace(path)


def markdown(result: dict) -> str:
    theory = "none: DP was off" if result["epsilon_theory"] is None else f"{result['epsilon_theory']:.3f}"
    where = f"scored under {result['adapter']}; " if result.get("adapter") else ""
    lines = [
        f"# Empirical privacy audit: {result['site']}",
        "",
        f"- epsilon, lower bound (measured, {result['confidence']:.0%} confidence): **{result['epsilon_lower_bound']:.3f}** "
        f"({result['method']}, {result['correct']} of {result['guesses']} guesses correct)",
        f"- epsilon, upper bound (the accountant, {result['site']}'s ledger{', this run' if where else ''}): **{theory}**",
        f"- {result['canaries']} canaries, {result['included']} of them in {result['site']}'s training rows; "
        f"{where}delta {result['delta']:g}",
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
    own = result.get("own_update")
    if own:
        lines += [f"Scored under {own['adapter']} (its own release, before averaging): lower bound "
                  f"**{own['epsilon_lower_bound']:.3f}** ({own['method']}) against "
                  f"{'none' if own['epsilon_theory'] is None else format(own['epsilon_theory'], '.3f')} "
                  "from its ledger at that point.", ""]
    return "\n".join(lines + (_site_level_markdown(result) if "site_level" in result else []))


def _site_level_markdown(result: dict) -> list[str]:
    site = result["site_level"]
    lines = ["## Site level: canary clients", ""]
    if site is None:
        return lines + [f"Not measured: {result['site_level_skipped']}.", ""]
    theory = ("none: no central DP, so no site-level guarantee is claimed" if site["epsilon_theory"] is None
              else f"{site['epsilon_theory']:.3f}")
    low, high = site["epsilon_interval"]
    null = ("agree with the null" if site["null_consistent"]
            else "DO NOT agree with the null: the measurement itself is off; do not read the estimate")
    return lines + [
        f"- epsilon, estimated (Andrew et al. 2023, from the final adapter): **{site['epsilon']:.3f}** "
        f"(95% bootstrap interval {low:.3f} to {high:.3f}) at delta {site['delta']:g}",
        f"- epsilon, central DP's accountant after {site['rounds']} round(s): **{theory}**",
        f"- {site['canaries']} canary clients in every round's mean, each a random direction over "
        f"{site['dimension']:,} values with norm {site['canary_norm']}; {site['canaries']} more never inserted",
        f"- cosine with the run's change: inserted {site['mean_cosine']:.5f} ± {site['std_cosine']:.5f}, "
        f"never inserted {site['unseen_mean_cosine']:.5f} ± {site['unseen_std_cosine']:.5f}, which {null} "
        f"(0 ± {site['null_std']:.5f})",
        f"- with the inserted cosines' own spread fitted too (the paper's variant, biased upward at small delta): "
        f"{site['epsilon_fitted_spread']:.3f}",
        "",
        "An estimate, not a bound: the Gaussian mechanism's epsilon at the inserted canaries' mean shift.",
        "Near the accountant's epsilon it says the noise and the composition do what the accountant",
        "assumes; an accountant's epsilon below the whole interval says they do not.",
        "",
        "![canary cosines](plots/canary_cosines.png)",
        "",
    ]


def _plot_cosines(path: Path, seen: np.ndarray, unseen: np.ndarray, dimension: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate([seen, unseen]), bins=30)
    ax.hist(unseen, bins=bins, alpha=0.6, density=True, label=f"never inserted ({len(unseen)})")
    ax.hist(seen, bins=bins, alpha=0.6, density=True, label=f"inserted ({len(seen)})")
    grid = np.linspace(bins[0], bins[-1], 400)
    ax.plot(grid, np.exp(-grid**2 * dimension / 2) * np.sqrt(dimension / (2 * np.pi)), "k--", label="null N(0, 1/d)")
    ax.set_xlabel("cosine of the canary client with the run's change of the adapter")
    ax.set_ylabel("density")
    ax.set_title("Canary clients (site level)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
