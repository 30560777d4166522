"""Compressed uploads: bytes per site per round and final accuracy, per ``upload-dtype``.

Each cell is a real ``fedlora simulate`` run (3 sites, 3 rounds, the main job's defaults
otherwise) with ``--set upload-dtype=D`` and ``--strategy S``, scored by the server on notes no
site holds (``central-eval-data``). With DP on, every run draws its own secret noise, so two runs
differ by that noise alone; ``--no-dp`` runs are seeded, and there the difference is the
compression alone.

    python benchmarks/upload_dtype.py --out /tmp/upload-dtype

Writes ``results.json`` and ``results.md`` under ``--out``; an interrupted run continues where it
stopped with the same ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# DP on: each compressed type against fp32, for FedAvg and FFA-LoRA (bf16 stores what fp16 does
# at 2 bytes, with less precision: FedAvg only). DP off, seeded: the compression's own effect.
CELLS = [*[(dtype, "fedavg", True) for dtype in ("fp32", "fp16", "bf16", "int8")],
         *[(dtype, "ffa-lora", True) for dtype in ("fp32", "fp16", "int8")],
         *[(dtype, "fedavg", False) for dtype in ("fp32", "int8")]]


def write_corpora(out: Path) -> tuple[Path, Path]:
    from fedlora.corpus import generate_clinical_corpus

    paths = out / "train.csv", out / "held_out.csv"
    for path, size, seed in zip(paths, (600, 400), (7, 123)):
        if not path.is_file():
            generate_clinical_corpus(num_samples=size, seed=seed).select_columns(["text", "label"]).to_csv(str(path), index=False)
    return paths


def measure(dtype: str, strategy: str, dp: bool, train: Path, held_out: Path, out: Path) -> dict:
    run_dir = out / "runs" / f"{strategy}-{dtype}-{'dp' if dp else 'nodp'}"
    options = ["--data", str(train), "--num-clients", "3", "--rounds", "3", "--strategy", strategy,
               "--set", f"upload-dtype={dtype}", "--set", f"central-eval-data={held_out}", "--output", str(run_dir)]
    if not dp:
        options.append("--no-dp")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", "simulate", *options], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: fedlora simulate {' '.join(options)}\n{done.stderr[-3000:]}")
    history = json.loads((run_dir / "history.json").read_text())
    uploads = [c["bytes_up"] for r in history for c in r["clients"] if c["outcome"] == "aggregated"]
    return {"dtype": dtype, "strategy": strategy, "dp": dp, "accuracy": history[-1]["central_accuracy"],
            "bytes_up_per_site_round": round(sum(uploads) / len(uploads)), "seconds": round(time.perf_counter() - start),
            "load_at_start": round(load, 2)}


def markdown(results: list[dict]) -> str:
    lines = ["| DP | strategy | upload-dtype | bytes up per site per round | vs fp32 | final accuracy (held out) | wall-clock | load at start |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        fp32 = next((x for x in results if x["dtype"] == "fp32" and x["strategy"] == r["strategy"] and x["dp"] == r["dp"]), None)
        ratio = f"{r['bytes_up_per_site_round'] / fp32['bytes_up_per_site_round']:.3f}" if fp32 else "–"
        lines.append(f"| {'on' if r['dp'] else 'off'} | {r['strategy']} | {r['dtype']} | {r['bytes_up_per_site_round']:,} | "
                     f"{ratio} | {r['accuracy']:.3f} | {r['seconds']} s | {r['load_at_start']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, held_out = write_corpora(args.out)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []
    for dtype, strategy, dp in CELLS:
        if any(r["dtype"] == dtype and r["strategy"] == strategy and r["dp"] == dp for r in results):
            continue
        results.append(measure(dtype, strategy, dp, train, held_out, args.out))
        print(results[-1], flush=True)
        saved.write_text(json.dumps(results, indent=2))
        (args.out / "results.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
