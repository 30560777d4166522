"""``server.privacy_report`` on a synthetic two-round history of three sites, one of which
refuses round 2 because its budget is spent."""

from __future__ import annotations

import json

import pytest

from fedlora.run_config import default_run_config
from server.privacy_report import write_privacy_report
from server.history import read_history
from tests.conftest import settings_of

RUN_CONFIG = default_run_config() | {"dp": True, "target-epsilon": 8.0, "noise-multiplier": 0.0, "max-grad-norm": 1.0,
                                     "delta": 1e-5, "max-epsilon": 0.0}
NODES = {"site-a": 11, "site-b": 12, "site-c": 13}
REFUSAL = "budget-exhausted: budget exhausted: this round would bring epsilon to 4.2000 > max-epsilon 4.0000"


def _trained(name: str, epsilon: float, max_epsilon: float, sigma: float) -> dict:
    return {
        "client": name, "node_id": NODES[name], "outcome": "aggregated", "reason": "",
        "epsilon": epsilon,
        "privacy": {"noise-multiplier": sigma, "sample-rate": 0.25, "steps": 4, "delta": 1e-5, "max-epsilon": max_epsilon, "dp": 1},
    }


def _refused(name: str, reason: str) -> dict:
    return {"client": name, "node_id": NODES[name], "outcome": "refused", "reason": reason, "epsilon": None, "privacy": {}}


def _history(central: bool = False) -> list[dict]:
    rounds = [
        [_trained("site-a", 1.0, 10.0, 1.1), _trained("site-b", 2.0, 4.0, 0.9), _trained("site-c", 0.5, 8.0, 1.3)],
        [_trained("site-a", 1.5, 10.0, 1.1), _refused("site-b", REFUSAL), _trained("site-c", 0.75, 8.0, 1.3)],
    ]
    return [
        {"round": r, "clients": clients, **({"central_epsilon": 0.3 * r} if central else {})}
        for r, clients in enumerate(rounds, start=1)
    ]


def test_json_has_each_sites_epsilon_budget_parameters_and_refusals(tmp_path):
    report = write_privacy_report(tmp_path, settings_of(RUN_CONFIG), read_history(_history()))
    assert json.loads((tmp_path / "privacy_report.json").read_text()) == report

    assert report["dp"] == {key: RUN_CONFIG[key] for key in ("dp", "target-epsilon", "noise-multiplier", "max-grad-norm",
                                                              "delta", "max-epsilon")}
    assert report["central"] is None
    assert list(report["sites"]) == ["site-a", "site-b", "site-c"]
    a, b = report["sites"]["site-a"], report["sites"]["site-b"]
    assert [(r["round"], r["epsilon"]) for r in a["rounds"]] == [(1, 1.0), (2, 1.5)]
    assert a["latest_epsilon"] == 1.5 and a["max_epsilon"] == 10.0 and a["budget_used"] == pytest.approx(0.15)
    assert (a["delta"], a["noise_multiplier"], a["sample_rate"], a["steps"], a["dp"]) == (1e-5, 1.1, 0.25, 4, True)
    assert a["privacy_unit"] == "row"
    assert a["refusals"] == []
    # The refused round reports no epsilon; the latest spend and budget stay those of round 1.
    assert [(r["round"], r["outcome"], r["epsilon"]) for r in b["rounds"]] == [(1, "aggregated", 2.0), (2, "refused", None)]
    assert b["latest_epsilon"] == 2.0 and b["max_epsilon"] == 4.0 and b["noise_multiplier"] == 0.9
    assert b["refusals"] == [{"round": 2, "reason": REFUSAL}]


def test_markdown_lists_the_refusal_and_png_is_written(tmp_path):
    write_privacy_report(tmp_path, settings_of(RUN_CONFIG), read_history(_history()))
    md = (tmp_path / "privacy_report.md").read_text()
    assert f"- round 2: site-b: {REFUSAL}" in md
    assert "| 2 | 1.5 | – (refused) | 0.75 |" in md
    assert "DIFFERENTIAL PRIVACY WAS OFF" not in md
    png = tmp_path / "plots" / "epsilon.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dp_off_is_said_loudly_at_the_top(tmp_path):
    site = {**_trained("site-a", 0.0, 10.0, 0.0), "epsilon": None}  # what a non-DP site reports
    site["privacy"] = {**site["privacy"], "dp": 0}
    report = write_privacy_report(tmp_path, settings_of({**RUN_CONFIG, "dp": False}), read_history([{"round": 1, "clients": [site]}]))
    md = (tmp_path / "privacy_report.md").read_text()
    assert "WARNING: DIFFERENTIAL PRIVACY WAS OFF" in md.split("##")[0]
    assert report["dp"]["dp"] is False
    assert report["sites"]["site-a"]["dp"] is False and report["sites"]["site-a"]["latest_epsilon"] is None
    assert not (tmp_path / "plots" / "epsilon.png").exists()  # nothing to plot


def test_central_section_only_when_history_has_central_epsilon(tmp_path):
    config = {**RUN_CONFIG, "central-dp-noise-multiplier": 1.0, "central-dp-clipping-norm": 0.5, "central-dp-delta": 1e-5}
    central = write_privacy_report(tmp_path, settings_of(config), read_history(_history(central=True)))["central"]
    assert central == {
        "epsilon_per_round": [{"round": 1, "epsilon": 0.3}, {"round": 2, "epsilon": 0.6}],
        "latest_epsilon": 0.6, "noise_multiplier": 1.0, "clipping_norm": 0.5, "delta": 1e-5,
    }
    assert "## Central DP" in (tmp_path / "privacy_report.md").read_text()
