"""One site's learning curve under DP-SGD for several (learning rate, batch size) pairs.

    python benchmarks/dp_defaults_sweep.py --samples 1200 --train 400 --max-length 32 \
        0.002:32:dp 0.02:128:dp 0.005:64:nodp

Each ``LR:BATCH:dp|nodp`` trains a fresh adapter on the embedded MiniLM for 3 epochs with
``client.training.train`` (the code a site runs), DP calibrated to epsilon 8 (delta 1e-5) over
the 3 epochs, and prints the test accuracy after each epoch on 300 held-out generated notes.
This is how the DP defaults in pyproject.toml were chosen (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from client.training import DPSettings, TrainSettings, train
from fedlora.adapters import attach_adapter, lora_config
from fedlora.evaluation import evaluate
from fedlora.model import EMBEDDED_MODEL, load_base_model, load_tokenizer
from fedlora.tasks import encode
from privacy.accountant import calibrate_noise
from fedlora.corpus import CLINICAL_LABELS, generate_clinical_corpus

EPOCHS, TEST_SIZE = 3, 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("configs", nargs="+", help="LR:BATCH:dp or LR:BATCH:nodp")
    args = parser.parse_args()
    labels = list(CLINICAL_LABELS)
    corpus = generate_clinical_corpus(num_samples=args.samples, seed=42).shuffle(seed=0)
    corpus = corpus.map(lambda row: {"label": labels.index(row["label"])})
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    examples = encode(corpus, tokenizer, "classification", args.max_length)
    train_examples, test_examples = examples[: args.train], examples[-TEST_SIZE:]
    print("| lr | batch | DP | sigma | accuracy after each epoch | seconds |\n|---|---|---|---|---|---|")
    for config in args.configs:
        lr, batch, mode = config.split(":")
        lr, batch, private = float(lr), int(batch), mode == "dp"
        torch.manual_seed(0)
        model = attach_adapter(load_base_model(EMBEDDED_MODEL, "classification", labels), lora_config("classification", 8, 16, 0.05))
        sample_rate, steps = batch / len(train_examples), math.ceil(len(train_examples) / batch)
        sigma = calibrate_noise(8.0, 1e-5, [(sample_rate, EPOCHS * steps)]) if private else 0.0
        start, accuracies = time.perf_counter(), []
        for epoch in range(EPOCHS):
            settings = TrainSettings(learning_rate=lr, batch_size=batch, steps=steps, seed=epoch)
            train(model, train_examples, "classification", tokenizer.pad_token_id, settings,
                  DPSettings(sigma, 1.0) if private else None)
            accuracies.append(evaluate(model, test_examples, "classification", tokenizer.pad_token_id)["accuracy"])
        print(f"| {lr} | {batch} | {'yes' if private else 'no'} | {sigma:.2f} | "
              f"{', '.join(f'{a:.3f}' for a in accuracies)} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
