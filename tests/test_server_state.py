"""FedAdam's and FedYogi's moments are checkpointed with the adapter and restored on resume, so a
resumed run takes exactly the steps an uninterrupted one does."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedlora.run_config import apply_overrides, default_run_config
from server.checkpoints import latest_checkpoint, restore, save_checkpoint
from server.federation import Federation
from server.global_model import GlobalModel
from strategies.factory import build_strategy
from strategies.server_state import load_optimizer_state, optimizer_state
from tests.conftest import LABELS, settings_of
from tests.fake_grid import FakeGrid, FakeSite, decode, honest, record, run_federation


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 1


def run_config(tiny_bert, strategy: str):
    return apply_overrides(default_run_config(), {
        "model": tiny_bert, "label-names": ",".join(LABELS), "strategy": strategy,
        "server-learning-rate": 0.05, "min-train-nodes": 2, "min-evaluate-nodes": 2,
    })


def sites(ffa: bool) -> FakeGrid:
    return FakeGrid({n: FakeSite(f"s{n}", 10 * n, honest(n, ffa=ffa)) for n in range(1, 4)})


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "ffa-lora+fedadam"])
def test_a_resumed_run_equals_an_uninterrupted_one(strategy, tiny_bert, tmp_path):
    config = run_config(tiny_bert, strategy)
    ffa = strategy.startswith("ffa-lora")
    model = GlobalModel.load(settings_of(config))
    initial = decode(model.arrays())
    straight, _ = run_federation(build_strategy(settings_of(config)), sites(ffa), initial, rounds=3)

    first = build_strategy(settings_of(config))

    def checkpoint_round(server_round, arrays, history):
        model.set_arrays(arrays)
        save_checkpoint(tmp_path, server_round, model.model, model.tokenizer, model.metadata, history, optimizer_state(first))

    Federation(sites(ffa), first, 2, 10.0, {}, {}).run(record(initial), 1, [], checkpoint_round)

    def resume(restore_moments: bool) -> dict[str, np.ndarray]:
        checkpoint = latest_checkpoint(tmp_path)
        resumed_model = GlobalModel.load(settings_of(config))
        restore(resumed_model.model, checkpoint)
        strategy_after_restart = build_strategy(settings_of(config))
        if restore_moments:
            load_optimizer_state(strategy_after_restart, checkpoint.server_optimizer())
        federation = Federation(sites(ffa), strategy_after_restart, 3, 10.0, {}, {})
        return decode(federation.run(resumed_model.arrays(), 3, list(checkpoint.history), lambda *_: None))

    # Flower samples the sites in a random order, so sums differ in the last bits, which Adam's
    # division by sqrt(v) can amplify where v is tiny: compare the step taken, to 0.1 %.
    def third_step_error(final: dict[str, np.ndarray]) -> float:
        step = np.concatenate([(straight[k] - two_rounds[k]).ravel() for k in straight])
        diff = np.concatenate([(final[k] - straight[k]).ravel() for k in straight])
        return float(np.linalg.norm(diff) / np.linalg.norm(step))

    model_after_two = GlobalModel.load(settings_of(config))
    restore(model_after_two.model, latest_checkpoint(tmp_path))
    two_rounds = decode(model_after_two.arrays())
    assert third_step_error(resume(restore_moments=True)) < 1e-3
    # The control: a restart that forgets the moments takes a different third step.
    assert third_step_error(resume(restore_moments=False)) > 0.1


def test_moments_for_a_strategy_without_them_are_refused(tiny_bert):
    with pytest.raises(ValueError, match="keeps none"):
        load_optimizer_state(build_strategy(settings_of(run_config(tiny_bert, "fedavg"))), {"m_t/x": np.zeros(2)})
    assert optimizer_state(build_strategy(settings_of(run_config(tiny_bert, "median")))) == {}
