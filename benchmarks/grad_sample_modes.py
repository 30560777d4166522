"""Opacus' per-example gradient modes on fedlora's model, side by side: which is fastest?

    .venv/bin/python benchmarks/grad_sample_modes.py [--data train.csv] [--batches 24] [--repeats 3]

One optimizer step per batch, on the same batches (Financial PhraseBank's ``train.csv`` grouped
by length as fedlora's no-DP batches are, 32 rows, 48 tokens), dropout off, three modes
alternating:

* "plain": the model and AdamW, no DP;
* "hooks": Opacus' ``GradSampleModule`` (per-example gradients from module hooks) and
  ``DPOptimizer`` (clip, noise), as ``privacy.dp_sgd.make_private`` builds them;
* "ghost": ``GradSampleModuleFastGradientClipping`` with ghost clipping,
  ``DPOptimizerFastGradientClipping`` and the ``DPLossFastGradientClipping`` criterion (per-example
  norms without per-example gradients, then a second backward pass).

Prints examples per second per mode and each DP mode's cost against "plain".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from client.batching import length_grouped_batches
from client.training import without_dropout
from fedlora.adapters import attach_adapter, lora_config
from fedlora.data import load_classification
from fedlora.model import EMBEDDED_MODEL, load_base_model, load_tokenizer
from fedlora.tasks import collate, encode

TASK = "classification"
FPB_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "financial_phrasebank" / "train.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=FPB_TRAIN, help="a CSV with text and label columns")
    parser.add_argument("--batches", type=int, default=24, help="timed steps per run (+1 untimed)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    rows, labels = load_classification(str(args.data))
    model = attach_adapter(load_base_model(EMBEDDED_MODEL, TASK, labels), lora_config(TASK, 8, 16, 0.05))
    examples = encode(rows, tokenizer, TASK, 48)
    lengths = [len(e["input_ids"]) for e in examples]
    batches = [collate([examples[i] for i in batch], tokenizer.pad_token_id, TASK)
               for batch in length_grouped_batches(lengths, 32, args.batches + 1, torch.Generator().manual_seed(1))]

    def trainable() -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def inputs(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "labels"}

    def plain():
        optimizer = torch.optim.AdamW(trainable(), lr=1e-4)

        def step(batch: dict) -> None:
            torch.nn.functional.cross_entropy(model(**inputs(batch)).logits, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad()
        return step, lambda: None

    def hooks():
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.AdamW(trainable(), lr=1e-4), noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=32)

        def step(batch: dict) -> None:
            torch.nn.functional.cross_entropy(wrapped(**inputs(batch)).logits, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad()
        return step, wrapped.to_standard_module

    def ghost():
        wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0,
                                                       use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(torch.optim.AdamW(trainable(), lr=1e-4), noise_multiplier=1.0,
                                                    max_grad_norm=1.0, expected_batch_size=32, loss_reduction="mean")
        criterion = DPLossFastGradientClipping(wrapped, optimizer, torch.nn.CrossEntropyLoss(reduction="mean"))

        def step(batch: dict) -> None:
            criterion(wrapped(**inputs(batch)).logits, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad()
        return step, wrapped.to_standard_module

    modes = {"plain": plain, "hooks": hooks, "ghost": ghost}
    speed: dict[str, list[float]] = {name: [] for name in modes}
    with without_dropout(model):
        model.train()
        for repeat in range(args.repeats):
            for name in list(modes) if repeat % 2 == 0 else list(reversed(modes)):
                step, close = modes[name]()
                step(batches[0])
                start, seen = time.perf_counter(), 0
                for batch in batches[1:]:
                    step(batch)
                    seen += len(batch["labels"])
                speed[name].append(seen / (time.perf_counter() - start))
                close()
    means = {name: statistics.mean(runs) for name, runs in speed.items()}
    for name, runs in speed.items():
        print(f"{name}: {means[name]:.1f} examples/s ({', '.join(f'{x:.1f}' for x in runs)})")
    print(f"cost against plain: hooks {means['plain'] / means['hooks']:.2f}x, ghost {means['plain'] / means['ghost']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
