"""Does grouping rows of similar length into batches (non-DP training) cost accuracy?

    .venv/bin/python benchmarks/length_grouping.py [--data train.csv] [--seeds 3] [--json results.json]

Financial PhraseBank's ``train.csv`` is split 80/20 (seeded; ``test.csv`` is never read). For
each seed, the same fresh adapter (embedded MiniLM-L6, LoRA r=8 on ``query``/``value`` and the
head) is trained without DP with ``client.training.train`` at the project's defaults (learning
rate 0.005, batch 32, 48 tokens, one epoch of steps) twice:

* "grouped": fedlora's batches (``client.batching.length_grouped_batches``: mega-batches of 50
  batches sorted by length);
* "random": the same sampler with mega-batches of one batch, i.e. plain shuffled batches (a
  batch sorted within itself is still the same batch);

and scored on the held-out 20%. Prints accuracy per seed, the means and the difference, and the
training throughput of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from importlib import metadata
from pathlib import Path

import torch

import client.batching
from client.training import TrainSettings, train
from fedlora.adapters import attach_adapter, lora_config
from fedlora.data import load_classification
from fedlora.evaluation import evaluate
from fedlora.model import EMBEDDED_MODEL, load_base_model, load_tokenizer
from fedlora.tasks import encode

TASK = "classification"
FPB_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "financial_phrasebank" / "train.csv"
GROUPED, RANDOM = "grouped", "random"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=FPB_TRAIN, help="a CSV with text and label columns")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=0.005)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such file (Financial PhraseBank's train.csv; see --data)")
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    rows, labels = load_classification(str(args.data))
    split = rows.train_test_split(test_size=0.2, seed=0)
    train_examples = encode(split["train"], tokenizer, TASK, args.max_seq_length)
    held_out = encode(split["test"], tokenizer, TASK, args.max_seq_length)
    steps = -(-len(train_examples) // args.batch_size)  # one epoch
    results: dict[str, list[dict]] = {GROUPED: [], RANDOM: []}
    for seed in range(args.seeds):
        for mode in (GROUPED, RANDOM) if seed % 2 == 0 else (RANDOM, GROUPED):
            torch.manual_seed(seed)
            model = attach_adapter(load_base_model(EMBEDDED_MODEL, TASK, labels), lora_config(TASK, 8, 16, 0.05))
            client.batching.BATCHES_PER_GROUP = 50 if mode == GROUPED else 1
            settings = TrainSettings(learning_rate=args.learning_rate, batch_size=args.batch_size, steps=steps, seed=seed)
            trained = train(model, train_examples, TASK, tokenizer.pad_token_id, settings, None)
            scores = evaluate(model, held_out, TASK, tokenizer.pad_token_id)
            results[mode].append({"seed": seed, "accuracy": scores["accuracy"],
                                  "examples_per_second": trained.examples_per_second})
            print(f"seed {seed} {mode}: accuracy {scores['accuracy']:.4f}, {trained.examples_per_second:.1f} examples/s",
                  flush=True)
    summary = {
        "setup": {"data": str(args.data), "train_rows": len(train_examples), "held_out_rows": len(held_out),
                  "steps": steps, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
                  "learning_rate": args.learning_rate,
                  "versions": {p: metadata.version(p) for p in ("torch", "peft", "transformers")}},
        "runs": results,
        "mean_accuracy": {m: statistics.mean(r["accuracy"] for r in runs) for m, runs in results.items()},
        "mean_examples_per_second": {m: statistics.mean(r["examples_per_second"] for r in runs) for m, runs in results.items()},
    }
    acc, speed = summary["mean_accuracy"], summary["mean_examples_per_second"]
    print(f"held-out accuracy: grouped {acc[GROUPED]:.4f}, random {acc[RANDOM]:.4f} "
          f"(difference {acc[GROUPED] - acc[RANDOM]:+.4f}); throughput grouped/random {speed[GROUPED] / speed[RANDOM]:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
