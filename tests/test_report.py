"""``report.md`` says what the coordinator knows: the run's status, where the data was, and
only the files the run wrote."""

from __future__ import annotations

import json

from fedlora.run_config import default_run_config
from server.history import SIMULATION_FILE
from server.report import write_report
from server.history import read_history
from tests.conftest import settings_of


def entry(round_: int, outcome: str, reason: str = "") -> dict:
    client = {"client": "st-marys", "node_id": 7, "outcome": outcome, "reason": reason, "update_norm": None}
    return {"round": round_, "train_loss": None, "eval_loss": None, "eval_accuracy": None, "bytes_up": 0,
            "bytes_down": 0, "seconds": 1.0, "clients": [client], "failure": None}


def test_a_deployed_run_does_not_claim_the_run_configs_data(tmp_path):
    config = default_run_config() | {"num-server-rounds": 2}
    report = write_report(tmp_path, settings_of(config), read_history([entry(1, "aggregated"), entry(2, "aggregated")])).read_text()
    assert "status: completed" in report and "`adapter/`" in report
    assert "data: each site's own, which the coordinator never sees (a deployed run)" in report
    assert "embedded:clinical-notes" not in report and SIMULATION_FILE not in report
    (tmp_path / SIMULATION_FILE).write_text(json.dumps({"num-clients": 3}))
    simulated = write_report(tmp_path, settings_of(config), read_history([entry(1, "aggregated")])).read_text()
    assert "data: `embedded:clinical-notes`, partition `iid` over simulated sites" in simulated
    assert "status: stopped or running: 1 of 2 rounds done" in simulated and "`adapter/`" not in simulated


def test_a_run_without_an_aggregated_round_is_failed_and_lists_each_reason_once(tmp_path):
    config = default_run_config() | {"num-server-rounds": 2}
    refused = "budget-exhausted (setting max-epsilon)"
    report = write_report(tmp_path, settings_of(config), read_history([entry(1, "refused", refused), entry(2, "refused", refused)])).read_text()
    assert "status: **FAILED**: no round aggregated an update (2 round(s) ran). No adapter was written." in report
    assert report.count(refused) == 2 and "`adapter/`" not in report


def test_the_rounds_table_shows_the_servers_own_seconds(tmp_path):
    """From ``time_split`` (waiting on sites vs the server's own work); a history written before
    the split existed shows a dash, not a zero."""
    config = default_run_config() | {"num-server-rounds": 2}
    split = entry(1, "aggregated") | {"seconds": 42.5, "time_split": {"sites-training": 38.0, "sites-evaluation": 4.46,
                                                                       "server": 0.04}}
    report = write_report(tmp_path, settings_of(config), read_history([split, entry(2, "aggregated")])).read_text()
    assert "| seconds | server's own seconds |" in report
    rows = [line for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows[0].endswith("| 42.5 | 0.04 |") and rows[1].endswith("| 1.0 | – |")


def test_the_report_says_which_dp_mode_ran_and_what_distributed_dp_trusts(tmp_path):
    history = read_history([entry(1, "aggregated")])
    local = write_report(tmp_path, settings_of(default_run_config()), history).read_text()
    assert "differential privacy: ON, local: each site's DP-SGD" in local
    distributed = default_run_config() | {"secure-aggregation": True, "dp-mode": "distributed", "distributed-dp-colluders": 1}
    report = write_report(tmp_path, settings_of(distributed), history).read_text()
    assert "differential privacy: ON, distributed:" in report and "distributed-dp-colluders = 1" in report
    off = write_report(tmp_path, settings_of(default_run_config() | {"dp": False, "dp-mode": "distributed"}), history).read_text()
    assert "**OFF" in off
