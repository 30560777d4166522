"""Local-training throughput with and without DP-SGD, side by side in one process.

    .venv/bin/python benchmarks/dp_throughput.py [--steps 20] [--repeats 3] [--json results.json]

Embedded MiniLM-L6 (``embedded:all-MiniLM-L6-v2``) with LoRA on ``query``/``value`` (r=8) and
the classifier head, classifying generated clinical notes (``fedlora.corpus``), batch 32,
64 tokens: the project's defaults. Every run trains the same adapter for ``--steps`` steps with
``client.training.train``, the code a site runs. The runs are interleaved (no-DP, DP, then DP,
no-DP, ...) so that a change in machine load hits both modes alike.

Throughput is ``TrainResult.examples_per_second`` = steps * q * N / seconds: DP's Poisson
batches vary in size around their expectation q * N = batch size, so both modes are credited
with the same examples per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from importlib import metadata
from pathlib import Path

import torch

from client.training import DPSettings, TrainSettings, train
from fedlora.adapters import attach_adapter, lora_config
from fedlora.model import EMBEDDED_MODEL, load_base_model, load_tokenizer, select_device
from fedlora.tasks import encode
from fedlora.corpus import CLINICAL_LABELS, generate_clinical_corpus

TASK = "classification"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--num-examples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    base = load_base_model(EMBEDDED_MODEL, TASK, list(CLINICAL_LABELS))
    model = attach_adapter(base, lora_config(TASK, args.lora_rank, 2 * args.lora_rank, 0.05))
    corpus = generate_clinical_corpus(num_samples=args.num_examples, seed=0)
    corpus = corpus.map(lambda row: {"label": CLINICAL_LABELS.index(row["label"])})
    examples = encode(corpus, tokenizer, TASK, args.max_seq_length)
    modes = {"no DP": None, "DP-SGD": DPSettings(args.noise_multiplier, args.max_grad_norm)}

    def run(dp: DPSettings | None, steps: int, seed: int) -> float:
        settings = TrainSettings(learning_rate=5e-3, batch_size=args.batch_size, steps=steps, device=device, seed=seed)
        torch.manual_seed(seed)
        return train(model, examples, TASK, tokenizer.pad_token_id, settings, dp).examples_per_second

    for dp in modes.values():
        run(dp, args.warmup_steps, seed=0)
    throughput: dict[str, list[float]] = {name: [] for name in modes}
    for repeat in range(args.repeats):
        order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
        for name in order:
            throughput[name].append(run(modes[name], args.steps, seed=repeat + 1))

    results = summarise(args, device, throughput)
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def summarise(args: argparse.Namespace, device: torch.device, throughput: dict[str, list[float]]) -> dict:
    """Mean and spread per mode; ``slowdown`` = mean no-DP / mean DP examples per second."""
    modes = {
        name: {
            "examples_per_second": runs,
            "mean": statistics.mean(runs),
            "stdev": statistics.stdev(runs) if len(runs) > 1 else 0.0,
        }
        for name, runs in throughput.items()
    }
    return {
        "setup": {
            "model": EMBEDDED_MODEL, "lora_rank": args.lora_rank, "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length, "steps": args.steps, "repeats": args.repeats,
            "num_examples": args.num_examples, "noise_multiplier": args.noise_multiplier,
            "max_grad_norm": args.max_grad_norm, "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "versions": {p: metadata.version(p) for p in ("torch", "opacus", "peft", "transformers")},
        },
        "modes": modes,
        "slowdown": modes["no DP"]["mean"] / modes["DP-SGD"]["mean"],
    }


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"MiniLM-L6 + LoRA r={setup['lora_rank']}, batch {setup['batch_size']}, {setup['max_seq_length']} tokens, "
        f"{setup['steps']} steps x {setup['repeats']} runs per mode on {setup['device']} ({setup['torch_threads']} threads)",
        "",
        "| mode | examples/s (mean ± sd) | runs |",
        "|---|---|---|",
    ]
    for name, mode in results["modes"].items():
        runs = ", ".join(f"{x:.1f}" for x in mode["examples_per_second"])
        lines.append(f"| {name} | {mode['mean']:.1f} ± {mode['stdev']:.1f} | {runs} |")
    lines += ["", f"DP-SGD slowdown (no-DP / DP throughput): {results['slowdown']:.2f}x"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
