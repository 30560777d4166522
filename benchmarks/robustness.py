"""Robustness against one hostile site of five: strategy x attack, final accuracy on held-out notes.

Each cell is a real ``fedlora simulate`` run (DP on, defaults otherwise) with 5 sites, one of them
attacking from round 1 (``--set attack=KIND --set attackers=1``, ``simulations/attacks.py``),
scored every round by the server on notes that no site holds (``central-eval-data``):

    strategy in {fedavg, trimmed-mean, median, krum, ffa-lora}
    x  attack in {none, nan, scale:1e6, sign-flip, gaussian:1, wrong-shape, label-flip, free-rider}

Both corpora are generated (``fedlora/corpus.py``): ``--notes`` training notes (seed 7) split
over the sites, and ``--held-out`` fresh notes (seed 123). Krum runs with ``krum-byzantine=1``.
Reported per cell: final accuracy, in how many rounds the attacker's update was rejected, wall
time. Writes ``results.json``, ``results.md`` and ``accuracy.png`` under ``--out``; an
interrupted run continues where it stopped with the same ``--out``.

    python benchmarks/robustness.py --out /tmp/robustness
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STRATEGIES = ("fedavg", "trimmed-mean", "median", "krum", "ffa-lora")
ATTACKS = ("none", "nan", "scale:1e6", "sign-flip", "gaussian:1", "wrong-shape", "label-flip", "free-rider")
SITES = 5


def write_corpora(out: Path, notes: int, held_out: int) -> tuple[Path, Path]:
    from fedlora.corpus import generate_clinical_corpus

    paths = out / "train.csv", out / "held_out.csv"
    for path, size, seed in zip(paths, (notes, held_out), (7, 123)):
        if not path.is_file():
            generate_clinical_corpus(num_samples=size, seed=seed).select_columns(["text", "label"]).to_csv(str(path), index=False)
    return paths


def measure(strategy: str, attack: str, train: Path, held_out: Path, out: Path, rounds: int) -> dict:
    run_dir = out / "runs" / f"{strategy}-{attack.replace(':', '')}"
    options = ["--data", str(train), "--num-clients", str(SITES), "--rounds", str(rounds), "--strategy", strategy,
               "--set", f"central-eval-data={held_out}", "--output", str(run_dir)]
    if strategy == "krum":
        options += ["--set", "krum-byzantine=1"]
    if attack != "none":
        options += ["--set", f"attack={attack}", "--set", "attackers=1"]
    start = time.perf_counter()
    done = subprocess.run(["fedlora", "simulate", *options], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: fedlora simulate {' '.join(options)}\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    history = json.loads((run_dir / "history.json").read_text())
    attackers = json.loads((run_dir / "simulation.json").read_text()).get("attack", {}).get("sites", [])
    names = {f"site-{site}" for site in attackers}
    rejected = sum(any(c["client"] in names and c["outcome"] == "rejected" for c in r["clients"]) for r in history)
    return {"strategy": strategy, "attack": attack, "accuracy": history[-1]["central_accuracy"],
            "attacker_rejected_rounds": rejected if names else None, "rounds": len(history), "seconds": round(seconds, 1)}


def write_table(results: list[dict], out: Path) -> None:
    by_cell = {(r["strategy"], r["attack"]): r for r in results}
    lines = ["| strategy | " + " | ".join(ATTACKS) + " |", "|---" * (len(ATTACKS) + 1) + "|"]
    for strategy in STRATEGIES:
        cells = []
        for attack in ATTACKS:
            r = by_cell.get((strategy, attack))
            if r is None:
                cells.append("–")
            elif r["attacker_rejected_rounds"] is None:
                cells.append(f"{r['accuracy']:.3f}")
            else:
                cells.append(f"{r['accuracy']:.3f} (rejected {r['attacker_rejected_rounds']}/{r['rounds']})")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(STRATEGIES), len(ATTACKS)), np.nan)
    for r in results:
        grid[STRATEGIES.index(r["strategy"]), ATTACKS.index(r["attack"])] = r["accuracy"]
    figure, axes = plt.subplots(figsize=(9, 3.8))
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
    for (row, column), value in np.ndenumerate(grid):
        if not np.isnan(value):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    axes.set_xticks(range(len(ATTACKS)), ATTACKS, rotation=30, ha="right")
    axes.set_yticks(range(len(STRATEGIES)), STRATEGIES)
    axes.set_title("Held-out accuracy, 1 attacker of 5 sites (DP on)")
    figure.colorbar(image, ax=axes, fraction=0.03)
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/robustness")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--notes", type=int, default=1500, help="generated training notes split over the sites")
    parser.add_argument("--held-out", type=int, default=600, help="generated notes the server scores on")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = write_corpora(out, args.notes, args.held_out)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []
    done = {(r["strategy"], r["attack"]) for r in results}
    for attack in args.attacks:
        for strategy in args.strategies:
            if (strategy, attack) in done:
                continue
            results.append(measure(strategy, attack, train, held_out, out, args.rounds))
            print(json.dumps(results[-1]), flush=True)
            saved.write_text(json.dumps(results, indent=2))
    write_table(results, out)
    plot(results, out)


if __name__ == "__main__":
    main()
