"""Local against distributed DP at the same epsilon, on Financial PhraseBank: one table, one command.

Each cell is a real ``fedlora simulate`` run of 3 sites on ``--train``, then ``fedlora evaluate``
of its final adapter on ``--test``:

- ``local``: DP-SGD at each site (the default, fedavg, 3 rounds);
- ``distributed-R<rounds>-plr<rate>-lr<rate>-probe<rounds>``: ``dp-mode = distributed`` under
  SecAgg+, each round one full-batch gradient step (step size plr in the probe rounds, lr after)
  whose noise the three sites share (no site assumed to collude: ``distributed-dp-colluders = 0``,
  every sum of all three).

Every site has ``max-epsilon = max-epsilon-per-run = target-epsilon = --epsilon``. Reported per
cell: accuracy on ``--test``, the sites' final epsilon (from ``history.json``), rounds, wall time.
Writes ``results.json`` and ``results.md`` under ``--out``.

    python benchmarks/distributed_dp.py --train ../shared/data/financial_phrasebank/train.csv \\
        --test ../shared/data/financial_phrasebank/test.csv --out /tmp/distributed-dp

Tune (``--cells``) on a split of train.csv (``--train`` and ``--test`` both carved from it),
never on test.csv. The data is CC BY-NC-SA 3.0 and stays outside the repository.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from fpb_federated import run

CELL = re.compile(r"^(local|distributed-R(\d+)-plr([0-9.]+)-lr([0-9.]+)-probe(\d+))$")


def options(cell: str, epsilon: float) -> tuple[list[str], int]:
    """A cell's ``fedlora simulate`` options and its rounds."""
    match = CELL.match(cell)
    if not match:
        raise SystemExit(f"unknown cell {cell!r}: local or distributed-R<rounds>-plr<rate>-lr<rate>-probe<rounds>")
    budget = f"max-epsilon={epsilon:g} max-epsilon-per-run={epsilon:g} delta=1e-5"
    common = ["--num-clients", "3", "--strategy", "fedavg", "--set", f"target-epsilon={epsilon:g}"]
    if match.group(1) == "local":
        return [*common, "--node-config", budget], 3
    rounds, probe_rate, rate, probe = int(match.group(2)), match.group(3), match.group(4), match.group(5)
    return [*common, "--set", "secure-aggregation=true", "--set", "dp-mode=distributed", "--set", "min-valid-updates=3",
            "--set", f"distributed-probe-learning-rate={probe_rate}", "--set", f"distributed-learning-rate={rate}",
            "--set", f"probe-rounds={probe}",
            "--node-config", f"{budget} distributed-dp-colluders=0"], rounds


def measure(cell: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / cell
    simulate, rounds = options(cell, args.epsilon)
    start = time.perf_counter()
    run(["fedlora", "simulate", "--data", args.train, "--rounds", str(rounds), *simulate, "--output", str(out)])
    seconds = time.perf_counter() - start
    evaluation = json.loads(run(["fedlora", "evaluate", "--adapter", str(out / "adapter"), "--data", args.test, "--json"]))
    history = json.loads((out / "history.json").read_text())
    epsilons = [c["epsilon"] for r in history for c in r["clients"] if c.get("epsilon") is not None]
    return {"cell": cell, "rounds": rounds, "accuracy": evaluation["accuracy"],
            "site_epsilon": max(epsilons) if epsilons else None, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="the file the sites train on")
    parser.add_argument("--test", required=True, help="the held-out file every adapter is scored on")
    parser.add_argument("--out", default="benchmarks/results/distributed-dp")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--cells", nargs="+", default=["local", "distributed-R30-plr10-lr1-probe20"])
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    for cell in args.cells:
        results.append(measure(cell, args))
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"| cell (epsilon {args.epsilon:g}) | rounds | accuracy | site epsilon | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['rounds']} | {r['accuracy']:.4f} | {r['site_epsilon']:.3f} | {r['seconds']:.0f} |"
              for r in results]
    (Path(args.out) / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
