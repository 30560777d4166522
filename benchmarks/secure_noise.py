"""Cost of secure DP-SGD noise (os.urandom + Box-Muller) vs Opacus' default torch noise.

    .venv/bin/python benchmarks/secure_noise.py [--steps 15] [--noise-draws 300] [--json results.json]

The embedded default model (``embedded:all-MiniLM-L6-v2``) with the default LoRA adapter from
the run config (r=8 on ``query``/``value``, plus the classifier head), classifying generated
clinical notes. Two measurements, each side by side in one process:

* noise only: one step's worth of noise for the exact trainable parameter shapes. "default" is
  what Opacus' ``_generate_noise`` runs (``torch.normal`` on torch's global generator per
  tensor); "secure" is :func:`privacy.secure_noise.secure_gaussian` per tensor.
* full step: forward, backward, per-example clipping, noise and AdamW update on one fixed batch
  (``--batch-size`` notes, up to ``--max-seq-length`` tokens). "default" is Opacus'
  ``DPOptimizer`` with its own noise; "secure" is ``DPOptimizer(noise_multiplier=0)`` plus
  :func:`privacy.secure_noise.attach_secure_noise`.

Calls alternate between the two sources (default, secure, then secure, default, ...), so that
a change in machine load hits both alike. Each source's figure is the median over its calls;
the ratio is the median of secure / default over adjacent pairs of calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedlora.adapters import attach_adapter, lora_config
from fedlora.model import EMBEDDED_MODEL, load_base_model, load_tokenizer
from fedlora.run_config import RunSettings, default_run_config
from fedlora.tasks import collate, encode, forward_logits, per_example_loss
from privacy.secure_noise import attach_secure_noise, secure_gaussian
from fedlora.corpus import CLINICAL_LABELS, generate_clinical_corpus

TASK = "classification"
SOURCES = ("default", "secure")

# Opacus' hooks fire on every frozen block whose inputs need no gradient; harmless, but torch
# warns on each backward pass.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed full steps per source")
    parser.add_argument("--noise-draws", type=int, default=300, help="timed noise draws per source")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=48)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_average = os.getloadavg()
    shape = RunSettings.parse(default_run_config()).model
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = attach_adapter(load_base_model(EMBEDDED_MODEL, TASK, list(CLINICAL_LABELS)), lora_config(TASK, shape.lora_rank, shape.lora_alpha, shape.lora_dropout, shape.lora_target_modules))
    model.train()
    corpus = generate_clinical_corpus(num_samples=args.batch_size, seed=0)
    corpus = corpus.map(lambda row: {"label": CLINICAL_LABELS.index(row["label"])})
    batch = collate(encode(corpus, tokenizer, TASK, args.max_seq_length), tokenizer.pad_token_id, TASK)
    params = [p for p in model.parameters() if p.requires_grad]

    # Noise only. Opacus adds sigma*C noise to the clipped sum; the secure hook adds sigma*C/B to
    # the mean. The scale does not change the cost, so both draw at sigma*C.
    std = args.noise_multiplier * args.max_grad_norm
    noise = {
        "default": lambda: [torch.normal(mean=0, std=std, size=p.shape, dtype=p.dtype) for p in params],
        "secure": lambda: [secure_gaussian(p.shape, std, dtype=p.dtype) for p in params],
    }
    noise_seconds = _alternating(noise, args.noise_draws)

    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizers = {
        "default": _dp_optimizer(params, args, args.noise_multiplier),
        "secure": _dp_optimizer(params, args, 0.0),
    }
    attach_secure_noise(optimizers["secure"], args.noise_multiplier, args.max_grad_norm, args.batch_size)

    def step(optimizer: DPOptimizer) -> None:
        per_example_loss(forward_logits(private_model, batch), batch["labels"], TASK).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {name: (lambda o=optimizer: step(o)) for name, optimizer in optimizers.items()}
    for run in steps.values():  # warm-up, untimed
        run()
    step_seconds = _alternating(steps, args.steps)

    results = summarise(args, load_average, params, tuple(batch["input_ids"].shape), noise_seconds, step_seconds)
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _dp_optimizer(params: list[torch.nn.Parameter], args: argparse.Namespace, noise_multiplier: float) -> DPOptimizer:
    return DPOptimizer(
        torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        expected_batch_size=args.batch_size,
        loss_reduction="mean",
    )


def _alternating(runs: dict[str, Callable[[], object]], calls: int) -> dict[str, list[float]]:
    """Seconds of each of ``calls`` calls per run; the order of the two alternates per call."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for call in range(calls):
        for name in SOURCES if call % 2 == 0 else reversed(SOURCES):
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summarise(
    args: argparse.Namespace,
    load_average: tuple[float, float, float],
    params: list[torch.nn.Parameter],
    batch_shape: tuple[int, int],
    noise_seconds: dict[str, list[float]],
    step_seconds: dict[str, list[float]],
) -> dict:
    """Per source: median, fastest and slowest seconds per step, and every call's seconds.
    ``ratio``: the median over the calls of secure / default of the adjacent pair, so that both
    sides of each ratio ran under nearly the same load."""

    def measure(seconds: dict[str, list[float]]) -> dict:
        medians = {name: statistics.median(seconds[name]) for name in SOURCES}
        return {
            **{
                name: {"median": medians[name], "min": min(seconds[name]), "max": max(seconds[name]), "calls": seconds[name]}
                for name in SOURCES
            },
            "ratio": statistics.median(s / d for d, s in zip(seconds["default"], seconds["secure"])),
        }

    return {
        "setup": {
            "model": EMBEDDED_MODEL,
            "trainable_tensors": len(params),
            "trainable_values": sum(p.numel() for p in params),
            "batch_shape": list(batch_shape),
            "steps": args.steps,
            "noise_draws": args.noise_draws,
            "noise_multiplier": args.noise_multiplier,
            "max_grad_norm": args.max_grad_norm,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": list(load_average),
            "versions": {p: metadata.version(p) for p in ("torch", "opacus", "peft", "numpy")},
        },
        "noise_generation": measure(noise_seconds),
        "full_step": measure(step_seconds),
    }


def markdown(results: dict) -> str:
    setup = results["setup"]
    rows, columns = setup["batch_shape"]
    lines = [
        f"MiniLM-L6 + LoRA: {setup['trainable_values']:,} trainable values in {setup['trainable_tensors']} tensors; "
        f"batch {rows} x {columns} tokens; {setup['torch_threads']} torch threads; "
        f"load average at start {setup['load_average_at_start'][0]:.2f}",
        "",
        "| per DP-SGD step | default (torch MT19937) | secure (os.urandom) | secure / default |",
        "|---|---|---|---|",
    ]
    for label, key in (("noise generation", "noise_generation"), ("full step", "full_step")):
        m = results[key]
        cells = [f"{_time(m[n]['median'])} ({_time(m[n]['min'])} to {_time(m[n]['max'])})" for n in SOURCES]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {m['ratio']:.2f}x |")
    lines += [
        "",
        f"Median over {setup['noise_draws']} noise draws and {setup['steps']} full steps per source "
        "(fastest to slowest in parentheses); ratio: median of secure / default over adjacent pairs.",
    ]
    return "\n".join(lines)


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"


if __name__ == "__main__":
    sys.exit(main())
