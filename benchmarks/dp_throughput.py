"""Local-training throughput: fedlora with and without DP-SGD against a hand-written loop, side
by side in one process.

    .venv/bin/python benchmarks/dp_throughput.py [--data train.csv | notes] [--steps 20] [--repeats 3] [--json results.json]

Five modes on the same model, adapter and rows:

* "hand-written loop": what a user writes from the transformers and peft tutorials, no DP: the
  rows tokenised once, padded to ``--max-seq-length`` (``padding="max_length"``), a shuffled
  ``DataLoader``, ``model(**batch).loss.backward()``, AdamW, dropout on;
* "fedlora, no DP": ``client.training.train`` without DP (batches of rows of similar length,
  each padded to its own longest row, dropout on);
* "fedlora, no DP, no dropout": the same with dropout off, as DP-SGD trains;
* "fedlora, DP-SGD": ``client.training.train`` with DP (Poisson sampling, each batch computed
  in passes of similar length, Opacus per-example gradients, clipping, noise; dropout off);
* "DP-SGD's mechanism on the no-DP batches": the same DP-SGD steps on the batches the no-DP run
  of the same seed draws (not private; :func:`batches_of_the_no_dp_run`), so that the ratio to
  "no DP, no dropout" is the cost of per-example gradients, clipping and noise alone.

Embedded MiniLM-L6 (``embedded:all-MiniLM-L6-v2``) with LoRA on ``query``/``value`` (r=8) and
the classifier head, batch 32, 48 tokens: the project's defaults. The rows are Financial
PhraseBank's ``train.csv`` (``--data``; by default ``../shared/data/financial_phrasebank`` beside
the repository when it is there) or, with ``--data notes`` or without that file, generated
clinical notes (``fedlora.corpus``), which all fill the 48 tokens. Every run trains the same
adapter for ``--steps`` steps with ``client.training.train``, the code a site runs. The runs are
interleaved (no-DP, DP, then DP, no-DP, ...) so that a change in machine load hits all modes
alike.

On CUDA fedlora trains under bf16 autocast (``client.training``) and the hand-written loop in
fp32, as the tutorials write it.

Throughput is rows trained per second (``TrainResult.examples_per_second``; DP's Poisson
batches vary in size, and each mode is credited with the rows it really trained).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import datasets

import client.training
from client.batching import length_grouped_batches
from client.training import DPSettings, TrainSettings, train, without_dropout
from fedlora.adapters import attach_adapter, lora_config
from fedlora.corpus import CLINICAL_LABELS, generate_clinical_corpus
from fedlora.data import load_classification
from fedlora.model import EMBEDDED_MODEL, load_base_model, load_tokenizer, select_device
from fedlora.tasks import encode

TASK = "classification"
FPB_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "financial_phrasebank" / "train.csv"
HAND, NO_DP, NO_DP_NO_DROPOUT, DP = "hand-written loop", "fedlora, no DP", "fedlora, no DP, no dropout", "fedlora, DP-SGD"
DP_ON_NO_DP_BATCHES = "DP-SGD's mechanism on the no-DP batches (a measurement, not private)"


def hand_written_loop(model: torch.nn.Module, data: TensorDataset, batch_size: int, steps: int, seed: int,
                      device: torch.device) -> float:
    """Examples per second of the plain transformers + peft loop (no DP)."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.to(device).train()
    start, seen = time.perf_counter(), 0
    for input_ids, attention_mask, labels in itertools.islice(itertools.cycle(loader), steps):
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen += len(labels)
    return seen / (time.perf_counter() - start)


@contextmanager
def batches_of_the_no_dp_run(lengths: list[int], batch_size: int, seed: int) -> Iterator[None]:
    """DP-SGD's steps on the batches the no-DP run of the same seed trains on, instead of Poisson
    samples: the cost of per-example gradients, clipping and noise alone. Not private (the
    accounting assumes Poisson sampling); it only separates the mechanism's cost from that of
    Poisson batches, whose rows cannot be grouped by length."""
    poisson_batches = client.training.poisson_batches
    client.training.poisson_batches = lambda _n, _q, steps, _generator: length_grouped_batches(
        lengths, batch_size, steps, torch.Generator().manual_seed(seed))
    try:
        yield
    finally:
        client.training.poisson_batches = poisson_batches


def rows(args: argparse.Namespace) -> tuple[datasets.Dataset, list[str]]:
    """The rows (``text``, integer ``label``) and the label names."""
    if args.data == "notes":
        corpus = generate_clinical_corpus(num_samples=args.num_examples, seed=0)
        return corpus.map(lambda row: {"label": CLINICAL_LABELS.index(row["label"])}), list(CLINICAL_LABELS)
    return load_classification(args.data)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--data", default=str(FPB_TRAIN) if FPB_TRAIN.is_file() else "notes",
                        help="a CSV with text and label columns, or 'notes' (generated)")
    parser.add_argument("--num-examples", type=int, default=1024, help="generated notes (with --data notes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=48)
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
    corpus, labels = rows(args)
    base = load_base_model(EMBEDDED_MODEL, TASK, labels)
    model = attach_adapter(base, lora_config(TASK, args.lora_rank, 2 * args.lora_rank, 0.05))
    examples = encode(corpus, tokenizer, TASK, args.max_seq_length)
    padded = tokenizer(list(corpus["text"]), padding="max_length", truncation=True, max_length=args.max_seq_length,
                       return_tensors="pt")
    hand_data = TensorDataset(padded["input_ids"], padded["attention_mask"], torch.tensor(corpus["label"]))
    dp = DPSettings(args.noise_multiplier, args.max_grad_norm)

    lengths = [len(example["input_ids"]) for example in examples]

    def fedlora(private: DPSettings | None, dropout: bool, no_dp_batches: bool = False) -> Callable[[int, int], float]:
        def run(steps: int, seed: int) -> float:
            settings = TrainSettings(learning_rate=5e-3, batch_size=args.batch_size, steps=steps, device=device, seed=seed)
            torch.manual_seed(seed)
            with nullcontext() if dropout else without_dropout(model), \
                    batches_of_the_no_dp_run(lengths, args.batch_size, seed) if no_dp_batches else nullcontext():
                return train(model, examples, TASK, tokenizer.pad_token_id, settings, private).examples_per_second
        return run

    modes: dict[str, Callable[[int, int], float]] = {
        HAND: lambda steps, seed: hand_written_loop(model, hand_data, args.batch_size, steps, seed, device),
        NO_DP: fedlora(None, dropout=True),
        NO_DP_NO_DROPOUT: fedlora(None, dropout=False),
        DP: fedlora(dp, dropout=False),
        DP_ON_NO_DP_BATCHES: fedlora(dp, dropout=False, no_dp_batches=True),
    }
    for run in modes.values():
        run(args.warmup_steps, 0)
    throughput: dict[str, list[float]] = {name: [] for name in modes}
    for repeat in range(args.repeats):
        order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
        for name in order:
            throughput[name].append(modes[name](args.steps, repeat + 1))

    results = summarise(args, device, throughput, len(examples))
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def summarise(args: argparse.Namespace, device: torch.device, throughput: dict[str, list[float]], num_examples: int) -> dict:
    """Mean and spread per mode, and the ratios of means: DP's cost (``slowdown``: fedlora no DP /
    DP, as each trains; ``without_dropout``: the same with dropout off in both, which leaves DP's
    mechanism and its Poisson batches, whose lengths cannot be grouped; ``mechanism``: the
    mechanism alone, on the same batches), and fedlora against the hand-written loop
    (``vs_hand``: no DP, ``dp_vs_hand``: DP)."""
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
            "model": EMBEDDED_MODEL, "data": args.data, "lora_rank": args.lora_rank, "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length, "steps": args.steps, "repeats": args.repeats,
            "num_examples": num_examples, "noise_multiplier": args.noise_multiplier,
            "max_grad_norm": args.max_grad_norm, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
            "versions": {p: metadata.version(p) for p in ("torch", "opacus", "peft", "transformers")},
        },
        "modes": modes,
        "slowdown": modes[NO_DP]["mean"] / modes[DP]["mean"],
        "without_dropout": modes[NO_DP_NO_DROPOUT]["mean"] / modes[DP]["mean"],
        "mechanism": modes[NO_DP_NO_DROPOUT]["mean"] / modes[DP_ON_NO_DP_BATCHES]["mean"],
        "vs_hand": modes[NO_DP]["mean"] / modes[HAND]["mean"],
        "dp_vs_hand": modes[DP]["mean"] / modes[HAND]["mean"],
    }


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"MiniLM-L6 + LoRA r={setup['lora_rank']} on {Path(setup['data']).name}, batch {setup['batch_size']}, {setup['max_seq_length']} tokens, "
        f"{setup['steps']} steps x {setup['repeats']} runs per mode on {setup['device']} ({setup['torch_threads']} threads)",
        "",
        "| mode | examples/s (mean ± sd) | runs |",
        "|---|---|---|",
    ]
    for name, mode in results["modes"].items():
        runs = ", ".join(f"{x:.1f}" for x in mode["examples_per_second"])
        lines.append(f"| {name} | {mode['mean']:.1f} ± {mode['stdev']:.1f} | {runs} |")
    lines += [
        "",
        f"DP-SGD slowdown (fedlora no DP / DP throughput): {results['slowdown']:.2f}x; "
        f"both without dropout: {results['without_dropout']:.2f}x; "
        f"the mechanism alone (the same batches, no dropout): {results['mechanism']:.2f}x",
        f"fedlora / hand-written loop: {results['vs_hand']:.2f}x without DP, {results['dp_vs_hand']:.2f}x with DP",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
