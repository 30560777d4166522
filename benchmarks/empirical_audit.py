"""The empirical audit's table: measured epsilon against the accountant's, repeated.

Runs ``fedlora privacy empirical`` on the embedded defaults (3 sites, 1,000 canaries in site-0,
100 canary clients) for each setting, ``--repeats`` times, one run at a time, and writes
``OUT/summary.json`` and ``OUT/summary.md``: per run the record-level lower bound, the ledger's
epsilon, the site-level estimate and its accountant, wall-clock and peak RSS of the command
(``/usr/bin/time -v``: the simulation's main process), and the load average at its start.

    python benchmarks/empirical_audit.py --repeats 2 --output /tmp/empirical-audit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "target-epsilon 1": ["--set", "target-epsilon=1"],
    "target-epsilon 3": ["--set", "target-epsilon=3"],
    "target-epsilon 8": ["--set", "target-epsilon=8"],
    "no DP": ["--no-dp"],
    "target-epsilon 8 + central DP z=1": ["--set", "target-epsilon=8", "--set", "central-dp=true",
                                          "--set", "num-sampled-clients=3"],
}


def run_one(args: list[str], out: Path) -> dict:
    load = os.getloadavg()[0]
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "fedlora.cli", "privacy", "empirical",
               "--canaries", "1000", "--num-clients", "3", *args, "--output", str(out)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    result = json.loads((out / "empirical.json").read_text())
    site = result["site_level"] or {}
    own = result.get("own_update") or {}
    return {
        "lower_bound": result["epsilon_lower_bound"], "method": result["method"], "theory": result["epsilon_theory"],
        "own_update_lower_bound": own.get("epsilon_lower_bound"),
        "site_estimate": site.get("epsilon"), "site_interval": site.get("epsilon_interval"),
        "site_theory": site.get("epsilon_theory"), "seconds": round(seconds), "peak_rss_mb": rss_kb // 1024,
        "load_at_start": round(load, 2),
    }


def _number(value, digits: int = 3) -> str:
    return "none" if value is None else f"{value:.{digits}f}"


def markdown(runs: dict[str, list[dict]]) -> str:
    lines = ["| setting | run | epsilon (ledger, site-0) | lower bound (records, final model) | lower bound (site-0's "
             "own last update) | site-level estimate [95%] | central DP accountant | wall-clock | peak RSS | load at start |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for setting, results in runs.items():
        for i, r in enumerate(results, 1):
            interval = "" if r["site_interval"] is None else f" [{r['site_interval'][0]:.2f}, {r['site_interval'][1]:.2f}]"
            lines.append(
                f"| {setting} | {i} | {_number(r['theory'])} | {_number(r['lower_bound'])} ({r['method']}) | "
                f"{_number(r.get('own_update_lower_bound'))} | "
                f"{_number(r['site_estimate'], 2)}{interval} | {_number(r['site_theory'])} | "
                f"{r['seconds'] // 60}:{r['seconds'] % 60:02d} | {r['peak_rss_mb']} MB | {r['load_at_start']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--only", action="append", choices=list(SETTINGS), help="run only these settings")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {}
    # Repeat-major, so that a drift in the machine's load spreads over every setting.
    for repeat in range(1, args.repeats + 1):
        for setting in args.only or list(SETTINGS):
            out = args.output / f"{setting.replace(' ', '_').replace('=', '')}-{repeat}"
            runs.setdefault(setting, []).append(run_one(SETTINGS[setting], out))
            print(f"{setting} #{repeat}: {runs[setting][-1]}", flush=True)
            (args.output / "summary.json").write_text(json.dumps(runs, indent=2))
            (args.output / "summary.md").write_text(markdown(runs))


if __name__ == "__main__":
    main()
