"""The run config, typed at the edges: every key has one home, and a bad key fails by name."""

from __future__ import annotations

import pytest

from fedlora.run_config import ConfigError, DPRequest, RunSettings, all_keys, apply_overrides, default_run_config


def test_every_pyproject_key_has_exactly_one_typed_home():
    keys = all_keys()
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(default_run_config())


def test_the_defaults_parse_into_typed_sections_and_back():
    settings = RunSettings.parse(default_run_config())
    assert settings.model.lora_rank == 8 and isinstance(settings.model.lora_alpha, float)
    assert settings.data.label_names == () and settings.dp == DPRequest(
        dp=True, noise_multiplier=0.0, target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, max_epsilon=0.0,
        secure_noise=False, dp_mode="local", distributed_dp_colluders=0,
        distributed_probe_learning_rate=10.0, distributed_learning_rate=1.0)
    assert settings.strategy.freezes_lora_a is False
    assert RunSettings.parse(settings.as_dict()) == settings
    assert settings.as_dict() == default_run_config()


def test_lists_are_comma_separated_text_in_the_config():
    config = apply_overrides(default_run_config(), {"label-names": " a, b ,c", "lora-target-modules": "query,value",
                                                    "strategy": "ffa-lora+median"})
    settings = RunSettings.parse(config)
    assert settings.data.label_names == ("a", "b", "c") and settings.model.lora_target_modules == ("query", "value")
    assert settings.strategy.freezes_lora_a
    assert settings.as_dict()["label-names"] == "a,b,c"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora-rank", "8", "must be a whole number"),
        ("lora-rank", 2.5, "must be a whole number"),
        ("seed", float("nan"), "must be a whole number"),
        ("seed", float("inf"), "must be a whole number"),
        ("lora-rank", 0, "must be >= 1"),
        ("learning-rate", "fast", "must be a finite number"),
        ("learning-rate", float("nan"), "must be a finite number"),
        ("dp", 1, "must be true or false"),
        ("model", 3, "must be text"),
        ("task", "regression", "must be one of classification, causal-lm"),
        ("eval-fraction", 1.0, "must be in [0, 1)"),
        ("max-grad-norm", 0.0, "must be > 0"),
        ("delta", 1.5, "must be in [0, 1)"),
        ("noise-multiplier", -1.0, "must be >= 0"),
        ("batch-size", -4, "must be >= 0"),
        ("fraction-train", 1.5, "must be in [0, 1]"),
    ],
)
def test_a_bad_value_fails_naming_its_key(key, value, message):
    config = default_run_config() | {key: value}
    with pytest.raises(ConfigError) as caught:
        RunSettings.parse(config)
    assert caught.value.setting == key
    assert str(caught.value).startswith(f"run config {key} must") and message in str(caught.value)


def test_whole_floats_are_ints_and_ints_are_floats():
    settings = RunSettings.parse(default_run_config() | {"lora-rank": 4.0, "learning-rate": 1})
    assert settings.model.lora_rank == 4 and type(settings.model.lora_rank) is int
    assert settings.schedule.learning_rate == 1.0 and type(settings.schedule.learning_rate) is float


def test_an_unknown_or_missing_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="unknown run-config key.*lora-rnak") as caught:
        RunSettings.parse(default_run_config() | {"lora-rnak": 4})
    assert caught.value.setting == "lora-rnak"
    config = default_run_config()
    del config["seed"]
    with pytest.raises(ConfigError, match="the run config has no seed"):
        RunSettings.parse(config)


def test_the_server_app_refuses_a_bad_run_config_by_name():
    """The deployed ServerApp types the run config first: a bad key fails the run with one
    line naming it, before any model is loaded."""
    from flwr.app import Context, RecordDict

    from server.app import main as server_main
    from server.history import RunFailed
    from tests.fake_grid import FakeGrid

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=default_run_config() | {"lora-rank": "eight"})
    with pytest.raises(RunFailed, match="run config lora-rank must be a whole number"):
        server_main(FakeGrid({}), context)
