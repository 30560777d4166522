"""Privacy against utility on Financial PhraseBank: one table and one plot, by one command.

Each cell is a real ``fedlora simulate`` run on ``--train`` followed by ``fedlora evaluate`` of
its final adapter on ``--test``:

    epsilon in {1, 3, 8, no DP}  x  strategy in {fedavg, ffa-lora}  x  partition in {iid, dirichlet:0.5}

next to two references: a centralised non-DP LoRA run (one site holding all of ``--train``) and
the DP linear probe (every round in the probe phase, epsilon 8). Reported per cell: accuracy on
``--test``, the sites' final epsilon, DP-SGD steps per site (from ``fedlora privacy plan``),
wall time. Writes ``results.json``, ``results.md`` and ``accuracy_vs_epsilon.png`` under ``--out``.

    python benchmarks/fpb_federated.py --train ../shared/data/financial_phrasebank/train.csv \\
        --test ../shared/data/financial_phrasebank/test.csv --out /tmp/fpb

Tune on a split of train.csv (``--train`` and ``--test`` both carved from it), never on test.csv.
``--only`` runs a subset of cells by name, in the order given. The data is CC BY-NC-SA 3.0 and stays outside the
repository.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

EPSILONS = (1.0, 3.0, 8.0, None)  # None: no DP
STRATEGIES = ("fedavg", "ffa-lora")
PARTITIONS = ("iid", "dirichlet:0.5")


def cells(rounds: int) -> dict[str, dict]:
    """Every run of the table: name -> what it is and its ``fedlora simulate`` options."""
    table = {}
    for epsilon in EPSILONS:
        privacy = ["--no-dp"] if epsilon is None else [
            "--set", f"target-epsilon={epsilon:g}",
            "--node-config", f"max-epsilon={epsilon:g} max-epsilon-per-run={epsilon:g} delta=1e-5"]
        for strategy in STRATEGIES:
            for partition in PARTITIONS:
                name = f"{strategy}-{partition.replace(':', '')}-{'nodp' if epsilon is None else f'eps{epsilon:g}'}"
                table[name] = {"epsilon": epsilon, "strategy": strategy, "partition": partition, "clients": 3,
                               "options": ["--strategy", strategy, "--partition", partition, *privacy]}
    table["reference-centralised-nodp"] = {
        "epsilon": None, "strategy": "centralised", "partition": "-", "clients": 1,
        "options": ["--no-dp", "--set", "min-train-nodes=1", "--set", "min-evaluate-nodes=1"]}
    table["reference-dp-linear-probe-eps8"] = {
        "epsilon": 8.0, "strategy": "linear probe", "partition": "iid", "clients": 3,
        "options": ["--set", f"probe-rounds={rounds}", "--node-config", "max-epsilon=8 max-epsilon-per-run=8 delta=1e-5"]}
    return table


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return done.stdout


def steps_per_site(simulate_options: list[str]) -> int | None:
    """DP-SGD steps each site takes over the run (the largest, should sites differ)."""
    plans = json.loads(run(["fedlora", "privacy", "plan", *simulate_options, "--json"]))
    totals = [sum((p["last_round"] - p["first_round"] + 1) * p["steps_per_round"] for p in plan["phases"])
              for plan in plans if "phases" in plan]
    return max(totals) if totals else None


def measure(name: str, cell: dict, args: argparse.Namespace) -> dict:
    out = Path(args.out) / name
    options = ["--data", args.train, "--num-clients", str(cell["clients"]), "--rounds", str(args.rounds), *cell["options"]]
    steps = steps_per_site(options)
    start = time.perf_counter()
    run(["fedlora", "simulate", *options, "--output", str(out)])
    seconds = time.perf_counter() - start
    evaluation = json.loads(run(["fedlora", "evaluate", "--adapter", str(out / "adapter"), "--data", args.test, "--json"]))
    history = json.loads((out / "history.json").read_text())
    epsilons = [c["epsilon"] for r in history for c in r["clients"] if c.get("epsilon") is not None]
    return {"cell": name, **{k: cell[k] for k in ("epsilon", "strategy", "partition", "clients")},
            "accuracy": evaluation["accuracy"], "loss": evaluation["loss"],
            "site_epsilon": max(epsilons) if epsilons else None, "steps_per_site": steps, "seconds": round(seconds, 1)}


def write_table(results: list[dict], out: Path) -> None:
    lines = ["| cell | epsilon (target) | strategy | partition | accuracy | site epsilon | steps per site | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        target = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        spent = "∞" if r["site_epsilon"] is None else f"{r['site_epsilon']:.3f}"
        lines.append(f"| {r['cell']} | {target} | {r['strategy']} | {r['partition']} | {r['accuracy']:.3f} | "
                     f"{spent} | {r['steps_per_site']} | {r['seconds']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    no_dp_x = max(e for e in EPSILONS if e is not None) * 2  # where "no DP" sits on the axis
    for strategy in STRATEGIES:
        for partition in PARTITIONS:
            points = sorted((r["epsilon"] or no_dp_x, r["accuracy"]) for r in results
                            if r["strategy"] == strategy and r["partition"] == partition)
            if points:
                axes.plot(*zip(*points), marker="o", label=f"{strategy}, {partition}")
    for r in results:
        if r["cell"].startswith("reference"):
            axes.axhline(r["accuracy"], linestyle="--", linewidth=1, color="grey" if r["epsilon"] is None else "black")
            privacy = "no DP" if r["epsilon"] is None else f"epsilon {r['epsilon']:g}"
            label = f"{r['strategy']} ({privacy})"
            axes.annotate(label, (1.0, r["accuracy"]), textcoords="offset points", xytext=(2, 3), fontsize=8)
    axes.set_xscale("log")
    ticks = [e for e in EPSILONS if e is not None] + [no_dp_x]
    axes.set_xticks(ticks, [f"{e:g}" for e in ticks[:-1]] + ["no DP"])
    axes.set_xlabel("epsilon per site (delta 1e-5)")
    axes.set_ylabel("accuracy on the test file")
    axes.set_title("Financial PhraseBank, 3 sites, MiniLM-L6 + LoRA")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "accuracy_vs_epsilon.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="the file the sites train on")
    parser.add_argument("--test", required=True, help="the held-out file every adapter is scored on")
    parser.add_argument("--out", default="benchmarks/results/fpb")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="run only these cells (names as in results.md)")
    args = parser.parse_args()
    table = cells(args.rounds)
    unknown = sorted(set(args.only or ()) - set(table))
    if unknown:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; known: {', '.join(table)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only or table:  # in the order asked for
        results.append(measure(name, table[name], args))
        print(json.dumps(results[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    write_table(results, out)
    plot(results, out)


if __name__ == "__main__":
    main()
