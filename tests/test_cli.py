"""``fedlora`` command-line errors and the site-data paths they lead to (no simulation run)."""

from __future__ import annotations

import pandas as pd

from client.local_data import load_site_data
from fedlora.cli import main, parse_assignments
from fedlora.run_config import apply_overrides
from simulations.site_files import assign_site_files
from tests.conftest import LABELS, make_classification_rows, settings_of


def test_assignments_parse_toml_values_and_bare_strings():
    assert parse_assignments(["max-epsilon=4 delta=1e-5", "data=/x/y.csv", "dp=false"]) == {
        "max-epsilon": 4, "delta": 1e-5, "data": "/x/y.csv", "dp": False,
    }


def test_unknown_run_config_key_is_a_readable_error(capsys, tmp_path):
    assert main(["simulate", "--output", str(tmp_path / "o"), "--set", "lora-rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown run-config key(s): lora-rnak" in err and "Traceback" not in err


def test_a_simulation_smaller_than_its_minimum_of_sites_is_refused_not_left_waiting(capsys, tmp_path):
    assert main(["simulate", "--output", str(tmp_path / "o"), "--num-clients", "1"]) == 2
    assert "min-train-nodes = 2 but the simulation has 1 site(s): add --set min-train-nodes=1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_fresh_run_never_writes_into_an_existing_run(capsys, tmp_path):
    (tmp_path / "history.json").write_text("[]")
    assert main(["simulate", "--output", str(tmp_path)]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err


def test_resume_of_a_folder_that_is_not_a_run_is_refused(capsys, tmp_path):
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert "not the output directory of a fedlora simulation" in capsys.readouterr().err


def test_column_partition_of_a_file_gives_one_site_per_value(tiny_run_config, tmp_path):
    rows = make_classification_rows(60)
    for i, row in enumerate(rows):
        row["hospital"] = f"h{i % 3}"
    path = tmp_path / "notes.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    config = apply_overrides(tiny_run_config, {"data": str(path), "partition": "column:hospital", "eval-fraction": 0.0,
                                               "label-names": ",".join(LABELS)})
    sites = {i: {} for i in range(3)}
    assign_site_files(sites, settings_of(config), tmp_path / "out")
    assert [site["num-examples"] for site in sites.values()] == [20, 20, 20]
    data = [load_site_data(site, settings_of(config).data, 0, "hospital") for site in sites.values()]
    assert [len(site.train) for site in data] == [20, 20, 20]
    assert set(data[1].train["privacy_unit"]) == {"h1"} and set(data[1].train["label"]) <= set(range(len(LABELS)))


def test_the_embedded_corpus_grows_with_the_simulated_sites(tiny_run_config, tmp_path):
    """500 notes a site, whether 3 or 40 sites share it: more sites are not starved sites."""
    config = apply_overrides(tiny_run_config, {"data": "embedded:clinical-notes", "label-names": ""})
    for count in (3, 40):
        sites = {i: {} for i in range(count)}
        assign_site_files(sites, settings_of(config), tmp_path / f"out-{count}", write=False)
        assert [site["num-examples"] for site in sites.values()] == [500] * count


def test_a_simulated_site_reads_its_own_file_under_the_run_column_names(tiny_run_config, tmp_path):
    """The simulation writes each partition as the file a deployed site would hold: the run's
    column names, label names (not indices), and the rows of that partition only."""
    rows = make_classification_rows(30)
    path = tmp_path / "notes.csv"
    pd.DataFrame(rows).rename(columns={"text": "note", "label": "diagnosis"}).to_csv(path, index=False)
    config = apply_overrides(tiny_run_config, {"data": str(path), "text-column": "note", "label-column": "diagnosis",
                                               "label-names": ",".join(LABELS)})
    sites = {0: {}, 1: {}, 2: {"data-path": str(path)}}
    partitions = assign_site_files(sites, settings_of(config), tmp_path / "out")
    assert sorted(partitions) == [0, 1] and sites[2] == {"data-path": str(path)}  # its own file is kept
    written = pd.read_parquet(sites[0]["data-path"])
    assert list(written.columns) == ["note", "diagnosis"] and set(written["diagnosis"]) <= set(LABELS)
    site = load_site_data(sites[0], settings_of(config).data, 0)
    assert len(site.train) + len(site.eval) == sites[0]["num-examples"] == partitions[0].num_rows
    assert sorted([*site.train["text"], *site.eval["text"]]) == sorted(partitions[0]["text"])


def test_the_site_loader_never_reads_the_servers_data_for_labels(tiny_run_config, tmp_path):
    """Without label-names the site's own loader refuses (setting label-names) before reading
    anything: it never falls back to the run's ``data``, a path the server chose."""
    import pytest

    from fedlora.data import DataError

    config = tiny_run_config | {"label-names": "", "data": str(tmp_path / "server-chosen.csv")}
    with pytest.raises(DataError, match="gives no label-names") as refused:
        load_site_data({"data-path": str(tmp_path / "never-read.csv")}, settings_of(config).data, 0)
    assert refused.value.setting == "label-names"


def test_simulation_and_audit_usage_errors_are_one_line(capsys, tmp_path):
    cases = [
        (["simulate", "--num-clients", "2", "--set", "min-train-nodes=2", "--set", "min-evaluate-nodes=2",
          "--site-config", str(tmp_path / "sites.toml")], "--site-config names site(s) [5], but sites are 0..1"),
        (["privacy", "empirical", "--canaries", "1", "--output", str(tmp_path / "a")], "--canaries must be at least 2"),
        (["privacy", "empirical", "--canary-clients", "1", "--output", str(tmp_path / "c")],
         "--canary-clients must be 0 (none) or at least 10"),
        (["privacy", "empirical", "--resume", str(tmp_path / "a")], "an empirical audit is one whole run"),
        (["simulate", "--set", "central-dp=true", "--set", "num-sampled-clients=2", "--strategy", "median",
          "--output", str(tmp_path / "b")], "central-dp works with a plain mean"),
    ]
    (tmp_path / "sites.toml").write_text("[site-5]\nmax-epsilon = 4\n")
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
