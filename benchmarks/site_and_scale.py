"""Issue 16's figures in one table, from one command: DP's cost, fedlora against a hand-written
loop, the split of a round's time, and 10 sites a round out of 100 against 10 out of 10.

    python benchmarks/site_and_scale.py --out /tmp/site-and-scale [--steps 8] [--repeats 3]

1. ``fedlora simulate --num-clients 100 --set num-sampled-clients=10 --rounds 3`` and the same
   with ``--num-clients 10``, one after the other: wall-clock, mean round seconds from
   ``history.json``, the largest single process's peak RSS (``ru_maxrss`` of the waited-for
   children), the peak of the summed RSS of the run's process tree, sampled every 2 s (it
   counts shared pages once per process, so it overstates), and the mean round's time split
   (``history.json``'s ``time_split``: waiting on the sites' training and evaluation replies, and
   the server's own work).
2. ``benchmarks/dp_throughput.py`` (its five modes alternating in one process), in a process of
   its own, once the load average has fallen below 0.5 (at most 5 minutes' wait); again with
   ``--device cuda`` when the machine has a CUDA device (the GPU rows).

Writes ``results.json`` and ``results.md`` under ``--out`` with the load average at each part's
start.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent


def settle(below: float = 0.5, longest: float = 300.0) -> None:
    """Wait (at most ``longest`` s) until the 1-minute load average falls below ``below``: the
    simulations' Ray processes take a while to go, and the throughput modes' ratios are finer
    than what they leave behind."""
    deadline = time.monotonic() + longest
    while os.getloadavg()[0] >= below and time.monotonic() < deadline:
        time.sleep(5)


def throughput(out: Path, steps: int, repeats: int, device: str = "cpu") -> dict:
    path = out / f"throughput-{device}.json"
    settle()
    load = os.getloadavg()[0]
    subprocess.run([sys.executable, str(HERE / "dp_throughput.py"), "--steps", str(steps), "--repeats", str(repeats),
                    "--device", device, "--json", str(path)], check=True, capture_output=True, text=True)
    return {**json.loads(path.read_text()), "load_at_start": round(load, 2)}


def has_cuda() -> bool:
    """Asked in a child, so that this process never loads torch (its RSS would count above)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, check=True)
    return probe.stdout.strip() == "True"


def simulation(out: Path, sites: int, sampled: int) -> dict:
    run_dir = out / "runs" / f"{sampled}-of-{sites}"
    command = [sys.executable, "-m", "fedlora.cli", "simulate", "--num-clients", str(sites), "--rounds", "3",
               "--output", str(run_dir)]
    if sampled < sites:
        command += ["--set", f"num-sampled-clients={sampled}"]
    load, start = os.getloadavg()[0], time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tree_peak = [0]

    def sample() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree_peak[0] = max(tree_peak[0], sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, errors = process.communicate()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{errors[-3000:]}")
    history = json.loads((run_dir / "history.json").read_text())
    rounds = [r["seconds"] for r in history]
    split = {part: statistics.mean(r["time_split"][part] for r in history) for part in history[0]["time_split"]}
    return {"sites": sites, "sampled": sampled, "wall_s": round(time.perf_counter() - start),
            "mean_round_s": statistics.mean(rounds), "rounds_s": rounds, "mean_time_split_s": split,
            "largest_process_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "tree_rss_gib": round(tree_peak[0] / 2**30, 2), "load_at_start": round(load, 2)}


def markdown(results: dict) -> str:
    t, (many, few) = results["throughput"], results["simulations"]
    rows = [
        ("DP-SGD cost: fedlora no DP / DP examples per second", f"{t['slowdown']:.2f}x", t["load_at_start"]),
        ("DP-SGD cost, both without dropout", f"{t['without_dropout']:.2f}x", t["load_at_start"]),
        ("DP-SGD's mechanism alone (the same batches, no dropout)", f"{t['mechanism']:.2f}x", t["load_at_start"]),
        ("fedlora / hand-written loop, no DP", f"{t['vs_hand']:.2f}x", t["load_at_start"]),
        ("fedlora DP-SGD / hand-written loop", f"{t['dp_vs_hand']:.2f}x", t["load_at_start"]),
        ("round time, 10 of 100 sites / 10 of 10", f"{many['mean_round_s'] / few['mean_round_s']:.2f}x "
         f"({many['mean_round_s']:.1f} / {few['mean_round_s']:.1f} s)", f"{many['load_at_start']} / {few['load_at_start']}"),
        ("round time split, 10 of 100: sites training / sites evaluating / the server's own work",
         " / ".join(f"{many['mean_time_split_s'][part] / many['mean_round_s']:.1%}"
                    for part in ("sites-training", "sites-evaluation", "server")), many["load_at_start"]),
        ("100 sites, 10 a round, 3 rounds: wall-clock", f"{many['wall_s'] // 60}:{many['wall_s'] % 60:02d}", many["load_at_start"]),
        ("the same: peak RSS, largest process / process tree (sum)",
         f"{many['largest_process_rss_mb']} MB / {many['tree_rss_gib']} GiB", many["load_at_start"]),
    ]
    g = results.get("gpu_throughput")
    if g is None:
        rows.append(("GPU rows", "no CUDA device on this machine", "–"))
    else:
        gpu = g["setup"].get("device_name", "cuda")
        rows += [
            (f"{gpu}: DP-SGD cost as each trains / mechanism alone", f"{g['slowdown']:.2f}x / {g['mechanism']:.2f}x",
             g["load_at_start"]),
            (f"{gpu}: fedlora / hand-written loop, no DP / DP", f"{g['vs_hand']:.2f}x / {g['dp_vs_hand']:.2f}x",
             g["load_at_start"]),
        ]
    lines = ["| figure | value | load at start |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # The 100-site run first: ru_maxrss is the largest of all the children waited for so far.
    simulations = [simulation(args.out, 100, 10), simulation(args.out, 10, 10)]
    results = {"simulations": simulations, "throughput": throughput(args.out, args.steps, args.repeats),
               "gpu_throughput": throughput(args.out, args.steps, args.repeats, "cuda") if has_cuda() else None}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
