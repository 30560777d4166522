"""DP-SGD on LoRA adapters does what the accounting assumes (``privacy.dp_sgd``).

For a batch B, Opacus' per-sample gradients must satisfy

    sum_{i in B} grad_sample_i = grad( sum_{i in B} loss_i )      (nothing lost or invented)
    grad_sample_i              = grad( loss_i on example i alone ) (no cross-example leakage)

and one DP-SGD step must move the parameters by ``-lr * (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / E[|B|]``.

Models run in float64; ``per_example_loss`` still computes the loss in float32, so gradients
agree to ~2e-7 of their largest entry (measured), while leakage between examples shows up at
order 1: :data:`GRAD_RTOL` sits between the two.
"""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F

from fedlora.adapters import adapter_state, attach_adapter, lora_config
from fedlora.model import load_base_model, load_tokenizer
from fedlora.tasks import IGNORE_INDEX, collate, encode, forward_logits, per_example_loss
from privacy.dp_sgd import group_by_unit, make_private, noise_only_step, zero_non_finite
from tests.conftest import LABELS, make_classification_rows, make_instruction_rows

BATCH = 5
PAD_ID = 0  # [PAD] of the MiniLM tokenizer both tiny models use
GRAD_RTOL = 1e-5  # of the largest entry of the reference gradient


def _lora_model(path: str, task: str) -> torch.nn.Module:
    """Tiny model + LoRA (r=4) in float64, train mode, every dropout off, and adapter weights
    randomised: peft starts ``lora_B`` at zero, which would make every ``lora_A`` gradient zero
    and the comparisons below vacuous for half of the tensors."""
    torch.manual_seed(0)
    base = load_base_model(path, task, LABELS if task == "classification" else None)
    model = attach_adapter(base, lora_config(task, rank=4, alpha=8, dropout=0.0)).double().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        for param in _trainable(model).values():
            param.normal_(0.0, 0.3)
    return model


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _examples(path: str, task: str) -> list[dict[str, list[int]]]:
    """BATCH examples of different lengths, so the batch has padding."""
    if task == "classification":
        rows = make_classification_rows(BATCH, seed=1)
        data = datasets.Dataset.from_dict(
            {"text": [r["text"] for r in rows], "label": [LABELS.index(r["label"]) for r in rows]}
        )
    else:
        rows = make_instruction_rows(BATCH, seed=1)
        data = datasets.Dataset.from_dict(
            {"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]}
        )
    examples = encode(data, load_tokenizer(path), task, max_length=32)
    assert len({len(e["input_ids"]) for e in examples}) > 1, "test data must need padding"
    return examples


def _gradients(model, examples, task, loss_fn=per_example_loss) -> dict[str, torch.Tensor]:
    """Autograd's gradient of the summed per-example loss over ``examples`` (no Opacus)."""
    model.zero_grad(set_to_none=True)
    batch = collate(examples, PAD_ID, task)
    loss_fn(forward_logits(model, batch), batch["labels"], task).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in _trainable(model).items()}
    model.zero_grad(set_to_none=True)
    return grads


def _per_sample_gradients(model, examples, task, loss_fn=per_example_loss) -> dict[str, torch.Tensor]:
    """Opacus' per-sample gradients, hooks installed exactly as ``make_private`` does."""
    params = list(_trainable(model).values())
    runner, optimizer = make_private(model, torch.optim.SGD(params, lr=0.1), 1.0, 1.0, BATCH)
    batch = collate(examples, PAD_ID, task)
    # Opacus wants the batch *mean* and rescales by the batch size (loss_reduction="mean").
    loss_fn(forward_logits(runner, batch), batch["labels"], task).mean().backward()
    samples = {name: p.grad_sample.detach().clone() for name, p in _trainable(model).items()}
    optimizer.zero_grad(set_to_none=True)
    runner.to_standard_module()
    return samples


@pytest.fixture(params=["classification", "causal-lm"])
def task_setup(request, tiny_bert, tiny_llama):
    task = request.param
    path = tiny_bert if task == "classification" else tiny_llama
    return task, _lora_model(path, task), _examples(path, task)


def test_per_sample_gradients_match_autograd(task_setup):
    task, model, examples = task_setup
    expected_tensors = 2 * 2 * 2 + (2 if task == "classification" else 0)  # layers x (q, v) x (A, B) + head
    assert len(_trainable(model)) == expected_tensors

    summed = _gradients(model, examples, task)
    alone = [_gradients(model, [example], task) for example in examples]
    samples = _per_sample_gradients(model, examples, task)

    assert samples.keys() == summed.keys()
    for name, grad_sample in samples.items():
        assert grad_sample.shape == (BATCH, *summed[name].shape), name
        assert summed[name].abs().max() > 0, f"{name}: zero gradient makes the check vacuous"
        _assert_same(grad_sample.sum(0), summed[name], name)
        for i, single in enumerate(alone):
            _assert_same(grad_sample[i], single[name], f"{name}[{i}]")


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = expected.abs().max().item()
    gap = (actual - expected).abs().max().item()
    assert gap <= GRAD_RTOL * scale, f"{name}: differs by {gap:.3g} (largest entry {scale:.3g})"


def _batch_normalised_loss(logits, labels, task):
    """Hugging Face's causal-LM loss: token losses divided by the token count of the whole batch."""
    shifted = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shifted.shape)
    total_tokens = (shifted != IGNORE_INDEX).sum()
    return token_loss.sum(dim=1) / total_tokens * len(labels)


def test_leakage_check_catches_batch_level_normalisation(tiny_llama):
    """The per-example check above has teeth: a loss normalised over the batch couples the
    examples, and the per-sample gradients then differ from each example's own gradient."""
    model = _lora_model(tiny_llama, "causal-lm")
    examples = _examples(tiny_llama, "causal-lm")
    samples = _per_sample_gradients(model, examples, "causal-lm", _batch_normalised_loss)
    alone = _gradients(model, examples[:1], "causal-lm", _batch_normalised_loss)
    name = next(iter(samples))
    gap = (samples[name][0] - alone[name]).abs().max().item()
    assert gap > 1e3 * GRAD_RTOL * alone[name].abs().max().item()


def test_one_dp_step_changes_every_adapter_tensor(task_setup):
    """Opacus issue #820: DP-LoRA that trains "normally" while the adapter is not updated."""
    task, model, examples = task_setup
    params = _trainable(model)
    before = adapter_state(model)
    lr = 0.05
    runner, optimizer = make_private(model, torch.optim.SGD(list(params.values()), lr=lr), 1.0, 1.0, BATCH)
    snapshot = {name: p.detach().clone() for name, p in params.items()}
    batch = collate(examples, PAD_ID, task)
    per_example_loss(forward_logits(runner, batch), batch["labels"], task).mean().backward()
    optimizer.step()
    for name, p in params.items():
        # The update landed on the model's own parameters, and it is the privatised gradient.
        torch.testing.assert_close(p.detach(), snapshot[name] - lr * p.grad, msg=name)
    runner.to_standard_module()

    after = adapter_state(model)
    assert after.keys() == before.keys()
    unchanged = [key for key in before if torch.equal(before[key], after[key])]
    assert not unchanged, f"adapter tensors not updated by the DP step: {unchanged}"


def _linear_private(noise_multiplier: float, max_grad_norm: float, expected_batch_size: int):
    """A zero-initialised 256x256 linear layer (65,792 coordinates) under ``make_private`` with
    plain SGD at lr=1, so that a step's update is exactly minus the privatised gradient."""
    layer = torch.nn.Linear(256, 256)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    _, optimizer = make_private(
        layer, torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier, max_grad_norm, expected_batch_size
    )
    return layer, optimizer


def _update(layer: torch.nn.Linear) -> torch.Tensor:
    return -torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])


SIGMA, CLIP, EXPECTED_BATCH = 0.7, 1.5, 16
NOISE_STD = SIGMA * CLIP / EXPECTED_BATCH  # std of each coordinate of the averaged noise


def test_noise_has_the_calibrated_std():
    """Per-sample gradients all zero: the whole update is noise, N(0, (sigma C / E|B|)^2) per
    coordinate. Over 65,792 coordinates the sample std is within ~0.3 % (1 SE) of the truth."""
    torch.manual_seed(1)
    layer, optimizer = _linear_private(SIGMA, CLIP, EXPECTED_BATCH)
    for p in (layer.weight, layer.bias):
        p.grad_sample = torch.zeros((EXPECTED_BATCH, *p.shape))
    optimizer.step()
    noise = _update(layer)
    assert abs(noise.mean()) < 4 * NOISE_STD / noise.numel() ** 0.5
    assert noise.std().item() == pytest.approx(NOISE_STD, rel=0.02)


def test_empty_poisson_batch_still_adds_noise():
    """An empty batch is a step of pure noise with the same std, not a skipped step."""
    torch.manual_seed(2)
    layer, optimizer = _linear_private(SIGMA, CLIP, EXPECTED_BATCH)
    noise_only_step(optimizer)
    noise = _update(layer)
    assert noise.std().item() == pytest.approx(NOISE_STD, rel=0.02)
    assert layer.weight.grad is None  # noise_only_step leaves no gradient behind


def test_each_example_contributes_at_most_max_grad_norm():
    """Examples with gradient norms 0.5C, 2C and 100C: the (nearly noise-free) update is
    ``sum_i g_i min(1, C / ||g_i||) / E|B|``; the small one passes unclipped, the others
    are scaled down to norm exactly C."""
    torch.manual_seed(3)
    clip, expected_batch = 1.5, 3
    layer, optimizer = _linear_private(1e-9, clip, expected_batch)
    directions = torch.randn(3, 256 * 256 + 256, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    per_example = directions * torch.tensor([0.5 * clip, 2 * clip, 100 * clip], dtype=torch.float64)[:, None]
    layer.weight.grad_sample = per_example[:, : 256 * 256].reshape(3, 256, 256).float()
    layer.bias.grad_sample = per_example[:, 256 * 256 :].float()
    optimizer.step()

    clipped = per_example * (clip / per_example.norm(dim=1)).clamp(max=1.0)[:, None]
    assert clipped.norm(dim=1).tolist() == pytest.approx([0.5 * clip, clip, clip], rel=1e-9)
    expected = clipped.sum(0) / expected_batch
    torch.testing.assert_close(_update(layer).double(), expected, rtol=1e-4, atol=1e-7)


# --- user-level units and non-finite gradients ------------------------------------------------


def test_per_unit_gradients_are_the_autograd_gradient_of_each_units_mean_loss(tiny_bert):
    """User-level DP: rows 0-1 are user a, 2 is user b, 3-4 user c. After ``group_by_unit``
    each user's per-sample gradient is the gradient of the mean loss over that user's rows."""
    task = "classification"
    model, examples = _lora_model(tiny_bert, task), _examples(tiny_bert, task)
    units = [0, 0, 1, 2, 2]
    params = list(_trainable(model).values())
    runner, optimizer = make_private(model, torch.optim.SGD(params, lr=0.1), 1.0, 1.0, BATCH)
    batch = collate(examples, PAD_ID, task)
    per_example_loss(forward_logits(runner, batch), batch["labels"], task).mean().backward()
    group_by_unit(optimizer, units)
    grouped = {name: p.grad_sample.detach().clone() for name, p in _trainable(model).items()}
    optimizer.zero_grad(set_to_none=True)
    runner.to_standard_module()
    for unit, rows in enumerate(([0, 1], [2], [3, 4])):
        expected = _gradients(model, [examples[i] for i in rows], task)
        for name, grad_sample in grouped.items():
            assert grad_sample.shape[0] == 3
            _assert_same(grad_sample[unit], expected[name] / len(rows), f"{name}[unit {unit}]")


@pytest.mark.parametrize("bad", [{7: float("nan")}, {7: float("inf")}, {300: float("-inf")},
                                 {7: float("inf"), 65_600: float("-inf")}], ids=["nan", "inf", "-inf", "inf-and-minus-inf"])
def test_a_non_finite_per_example_gradient_is_zeroed_not_spread(bad):
    """The attack: one record whose gradient overflows (an fp16 overflow, a crafted row) made
    the clipped sum, and with it the whole noised update, NaN."""
    clip, expected_batch = 1.5, 3
    grads = torch.randn(3, 256 * 256 + 256, dtype=torch.float64)
    for index, value in bad.items():  # in the weight's part, the bias's, or both
        grads[1, index] = value

    def step(sanitise: bool) -> torch.Tensor:
        layer, optimizer = _linear_private(1e-9, clip, expected_batch)
        layer.weight.grad_sample = grads[:, : 256 * 256].reshape(3, 256, 256).float()
        layer.bias.grad_sample = grads[:, 256 * 256 :].float()
        zeroed = zero_non_finite(optimizer) if sanitise else 0
        optimizer.step()
        return _update(layer), zeroed

    unsafe, _ = step(sanitise=False)
    assert not torch.isfinite(unsafe).all()  # before: one record poisoned the update (NaN: every coordinate)
    safe, zeroed = step(sanitise=True)
    assert zeroed == 1 and torch.isfinite(safe).all()
    others = grads[[0, 2]]
    clipped = others * (clip / others.norm(dim=1)).clamp(max=1.0)[:, None]
    torch.testing.assert_close(safe.double(), clipped.sum(0) / expected_batch, rtol=1e-4, atol=1e-7)


def test_training_survives_a_record_with_a_non_finite_loss(tiny_bert):
    """End to end through the site's training loop: a row whose logits overflow to inf."""
    from client.training import DPSettings, TrainSettings, train

    task = "classification"
    model, examples = _lora_model(tiny_bert, task), _examples(tiny_bert, task)
    poisoned = examples[2]["input_ids"]
    head = model.base_model.model.classifier.modules_to_save["default"]

    def overflow(module, inputs, output):
        ids = current["input_ids"]
        rows = [i for i in range(ids.shape[0]) if ids[i, : len(poisoned)].tolist() == poisoned]
        output = output.clone()
        output[rows] = float("inf")
        return output

    current: dict = {}
    model.register_forward_pre_hook(lambda module, args, kwargs: current.update(input_ids=kwargs["input_ids"]), with_kwargs=True)
    head.register_forward_hook(overflow)
    settings = TrainSettings(learning_rate=0.05, batch_size=BATCH, steps=3, seed=0)
    result = train(model, examples, task, PAD_ID, settings, DPSettings(1.0, 1.0))
    assert result.zeroed_gradients >= 1
    assert all(torch.isfinite(t).all() for t in adapter_state(model).values())
