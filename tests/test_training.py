"""Local training: how a batch is split into passes changes memory use and padding, never the
result; length-grouped batches still visit every row once per epoch."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import client.batching
from client.batching import PASS_COST_TOKENS, UNMEASURED_PASS_COST, length_grouped_batches, length_passes
from client.training import DPSettings, TrainSettings, train
from fedlora.adapters import adapter_state, attach_adapter, lora_config
from fedlora.model import load_base_model, load_tokenizer
from fedlora.tasks import encode
import client.training
from tests.conftest import LABELS, make_classification_rows

import datasets


def _train_once(model_dir: str, physical_batch_size: int, dp: DPSettings | None,
                stale_gradients: bool = False) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(model_dir)
    rows = make_classification_rows(40)
    dataset = datasets.Dataset.from_list([{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows])
    # Every note is truncated to 8 tokens, so chunks pad exactly like the whole batch and only
    # the splitting differs (Adam would amplify float noise from other padding lengths).
    examples = encode(dataset, tokenizer, "classification", 8)
    assert {len(e["input_ids"]) for e in examples} == {8}
    torch.manual_seed(0)
    model = attach_adapter(load_base_model(model_dir, "classification", LABELS), lora_config("classification", 4, 8, 0.0))
    for module in model.modules():  # dropout would draw different masks per chunk
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    settings = TrainSettings(learning_rate=0.01, batch_size=12, steps=3, physical_batch_size=physical_batch_size, seed=5)
    if stale_gradients:  # what an earlier user of a warm model could leave behind
        for param in model.parameters():
            param.grad = torch.full_like(param, 3.0)
    torch.manual_seed(1)  # the DP noise comes from torch's global generator
    train(model, examples, "classification", tokenizer.pad_token_id, settings, dp)
    return adapter_state(model)


def test_gradients_left_on_a_warm_model_never_reach_its_next_training(tiny_bert):
    """A site's model is kept warm across messages: a gradient left on it (by a distributed-DP
    round, or anything else) must not enter the next training's first step."""
    clean, stale = _train_once(tiny_bert, 0, None), _train_once(tiny_bert, 0, None, stale_gradients=True)
    assert all(torch.equal(clean[name], stale[name]) for name in clean)


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, max_grad_norm=0.5)], ids=["no-dp", "dp"])
def test_physical_batches_give_the_same_update(tiny_bert, dp):
    whole = _train_once(tiny_bert, 0, dp)
    split = _train_once(tiny_bert, 4, dp)
    start = _train_once(tiny_bert, 0, dp) if dp is None else None
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-6)
    if start is not None:  # training is deterministic without DP: the comparison is meaningful
        torch.testing.assert_close(start[next(iter(start))], whole[next(iter(whole))])


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, max_grad_norm=0.5)], ids=["no-dp", "dp"])
def test_dropout_is_off_under_dp_only(tiny_bert, dp, monkeypatch):
    """DP-SGD's noise already regularises; dropout would only add variance (Li et al. 2021).
    Attention dropout too: BERT hands its dropout's ``p`` to the attention kernel whenever the
    layer trains, so switching the dropout modules to eval mode missed it (and kept the kernel
    off its fast path)."""
    tokenizer = load_tokenizer(tiny_bert)
    rows = make_classification_rows(16)
    dataset = datasets.Dataset.from_list([{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows])
    examples = encode(dataset, tokenizer, "classification", 8)
    model = attach_adapter(load_base_model(tiny_bert, "classification", LABELS), lora_config("classification", 4, 8, 0.1))
    seen: set[float] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_pre_hook(lambda module, _: seen.add(module.p if module.training else 0.0))
    attention = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, dropout_p=0.0, **kwargs):
        seen.add(dropout_p)
        return attention(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    settings = TrainSettings(learning_rate=0.01, batch_size=8, steps=2, seed=5)
    train(model, examples, "classification", tokenizer.pad_token_id, settings, dp)
    assert (seen == {0.0}) if dp else (max(seen) > 0)
    assert all(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # restored for later use


def _train_varied_lengths(model_dir: str, dp: DPSettings | None, users: bool = False) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(model_dir)
    rows = make_classification_rows(40)
    dataset = datasets.Dataset.from_list([{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows])
    examples = encode(dataset, tokenizer, "classification", 32)
    assert len({len(e["input_ids"]) for e in examples}) > 4
    torch.manual_seed(0)
    model = attach_adapter(load_base_model(model_dir, "classification", LABELS), lora_config("classification", 4, 8, 0.0))
    for module in model.modules():  # dropout would draw different masks per pass
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    settings = TrainSettings(learning_rate=0.01, batch_size=4 if users else 12, steps=3, seed=5)
    torch.manual_seed(1)
    units = [i % 10 for i in range(len(examples))] if users else None  # 10 users of 4 rows, rows of each far apart
    train(model, examples, "classification", tokenizer.pad_token_id, settings, dp, units=units)
    return adapter_state(model)


@pytest.mark.parametrize("dp, users", [(None, False), (DPSettings(noise_multiplier=1.0, max_grad_norm=0.5), False),
                                       (DPSettings(noise_multiplier=1.0, max_grad_norm=0.5), True)],
                         ids=["no-dp", "dp", "dp-user-level"])
def test_length_passes_give_the_same_update(tiny_bert, dp, users, monkeypatch):
    """Rows of many lengths: one pass per batch (a pass priced out of reach) and a pass per
    length (passes free) train the same adapter; only the padding differs. With user-level DP
    a user's rows stay in one pass (its gradient is their mean), whatever the cut."""
    monkeypatch.setattr(client.training, "PASS_COST_TOKENS", {"cpu": 10**9})
    whole = _train_varied_lengths(tiny_bert, dp, users)
    monkeypatch.setattr(client.training, "PASS_COST_TOKENS", {"cpu": 0})
    cut = _train_varied_lengths(tiny_bert, dp, users)
    passes = []
    monkeypatch.setattr(client.training, "length_passes", lambda *a: passes.append(length_passes(*a)) or passes[-1])
    _train_varied_lengths(tiny_bert, dp, users)
    assert max(len(p) for p in passes) > (1 if users else 2)  # the batches really were computed in several passes
    for key in whole:
        torch.testing.assert_close(cut[key], whole[key], rtol=1e-4, atol=1e-6)


COST = PASS_COST_TOKENS["cpu"]


def _brute_force_cost(units: list[list[int]], lengths: list[int], max_rows: float) -> float:
    """The cheapest cut of ``units`` into passes, over every set partition (small cases only)."""
    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for partition in partitions(rest):
            yield [[first], *partition]
            for k in range(len(partition)):
                yield [*partition[:k], [first, *partition[k]], *partition[k + 1:]]

    best = math.inf
    for partition in partitions(units):
        rows = [sum(len(u) for u in part) for part in partition]
        if any(r > max_rows and len(part) > 1 for r, part in zip(rows, partition)):
            continue
        cost = sum(r * max(lengths[i] for u in part for i in u) + COST for r, part in zip(rows, partition))
        best = min(best, cost)
    return best


def _cost(passes, lengths):
    return sum(sum(len(u) for u in p) * max(lengths[i] for u in p for i in u) + COST for p in passes)


@pytest.mark.parametrize("seed", range(16))
def test_length_passes_are_the_cheapest_cut_and_keep_units_whole(seed):
    """Against every partition of the units: the cheapest, unless a row bound meets units of
    several rows (a packing problem; then only the cheapest cut of the sorted units)."""
    rng = random.Random(seed)
    lengths = [rng.choice([3, 8, 20, 47, 48, 90, 200]) for _ in range(12)]
    indices = list(range(12))
    rng.shuffle(indices)
    units, i = [], 0
    most_rows = 1 if seed % 2 else 3
    while i < len(indices):  # units of 1 to 3 rows
        size = rng.randint(1, most_rows)
        units.append(indices[i : i + size])
        i += size
    units = units[:7]
    max_rows = rng.choice([math.inf, 4, 2])
    passes = length_passes(units, lengths, max_rows)
    assert sorted(map(tuple, itertools.chain.from_iterable(passes))) == sorted(map(tuple, units))  # every unit once, whole
    assert all(sum(len(u) for u in p) <= max_rows or len(p) == 1 for p in passes)
    if max_rows == math.inf or most_rows == 1:
        assert _cost(passes, lengths) == _brute_force_cost(units, lengths, max_rows)
    else:
        assert _cost(passes, lengths) >= _brute_force_cost(units, lengths, max_rows)


def test_an_unmeasured_device_takes_as_few_passes_as_its_bound_allows():
    """A GPU's price per pass is not measured, and far above its price per token: cutting a
    batch by length there would slow it down."""
    lengths = list(range(5, 49)) * 2
    groups = [[i] for i in range(len(lengths))]
    assert len(length_passes(groups, lengths, math.inf)) > 1  # on the CPU, worth it
    assert len(length_passes(groups, lengths, math.inf, UNMEASURED_PASS_COST)) == 1
    assert len(length_passes(groups, lengths, 32, UNMEASURED_PASS_COST)) == 3


def test_no_rows_is_an_error_not_an_endless_loop():
    with pytest.raises(ValueError, match="no rows"):
        next(length_grouped_batches([], 32, 1, torch.Generator()))


def test_equal_lengths_take_one_pass():
    """Cached features (no tokens) and notes of one length: a batch is one pass, as before."""
    assert length_passes([[i] for i in range(32)], [0] * 32, math.inf) == [[[i] for i in range(32)]]
    assert len(length_passes([[i] for i in range(32)], [48] * 32, math.inf)) == 1


def test_length_grouped_batches_visit_every_row_once_per_epoch_with_less_padding():
    rng = random.Random(0)
    lengths = [min(48, int(rng.lognormvariate(3.3, 0.45))) for _ in range(1000)]
    batches = list(length_grouped_batches(lengths, 32, 2 * 32, torch.Generator().manual_seed(1)))  # 2 epochs of 32 batches
    for epoch in (batches[:32], batches[32:]):
        assert sorted(i for b in epoch for i in b) == list(range(1000))
    assert batches != list(length_grouped_batches(lengths, 32, 64, torch.Generator().manual_seed(2)))  # random
    assert batches == list(length_grouped_batches(lengths, 32, 64, torch.Generator().manual_seed(1)))  # seeded
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    random_padded = 2 * sum(len(order[k:k + 32]) * max(lengths[i] for i in order[k:k + 32]) for k in range(0, 1000, 32))
    assert padded < 0.8 * random_padded
