"""A site's audit of its own privacy (``client.self_audit``): only its node config turns it on,
its canaries join its training rows only, its secret stays in its own folder, its report is
written at each evaluation, and nothing it sends changes."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
from flwr.app import ArrayRecord

from client.local_data import UNIT_COLUMN, SiteData
from client.self_audit import SelfAudit
from privacy.accountant import epsilon_for
from privacy.ledger import PrivacyLedger
from privacy.plan import ACCOUNTANT
from server.global_model import GlobalModel
from tests.conftest import settings_of
from tests.test_site_privacy import _write_notes, evaluate_round, privacy_run_config, reply_text, train_round


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("self-audit")


@pytest.fixture(scope="module")
def run_config(tiny_bert, folder) -> dict:
    return privacy_run_config(tiny_bert, _write_notes(folder / "notes.csv"))


def node(run_config: dict, ledger: Path, **extra) -> dict:
    return {"data-path": run_config["data"], "num-examples": 30, "ledger-path": str(ledger), **extra}


def trained_units(caplog) -> int:
    (units,) = re.findall(r"steps on \d+ rows \((\d+) units\)", caplog.text)
    caplog.clear()
    return int(units)


def test_a_site_audits_itself_and_sends_what_it_would_send_without(run_config, folder, caplog):
    caplog.set_level("INFO")
    arrays = GlobalModel.load(settings_of(run_config)).arrays()
    plain = train_round(run_config, node(run_config, folder / "plain.db"), 1, arrays)
    plain_units = trained_units(caplog)
    audited_node = node(run_config, folder / "audited.db", **{"audit-canaries": 40})
    audited = train_round(run_config, audited_node, 1, arrays)
    assert not audited.has_error(), audited.error
    audit = SelfAudit.of(audited_node, "1234")
    assert audit.folder == folder / "audited.audit" / "run-1234"
    included = int(audit.canaries(3).included.sum())
    assert trained_units(caplog) == plain_units + included  # each included canary a training unit of its own
    # What leaves is what a site without the audit sends: the same public figures, no new key.
    sent, unaudited = dict(audited.content["metrics"]), dict(plain.content["metrics"])
    assert sent.keys() == unaudited.keys()
    assert {k: sent[k] for k in ("num-examples", "sample-rate", "noise-multiplier", "steps")} == {
        k: unaudited[k] for k in ("num-examples", "sample-rate", "noise-multiplier", "steps")}
    assert set(audited.content.keys()) == set(plain.content.keys())

    evaluated = evaluate_round(run_config, audited_node, 1, audited.content["arrays"])
    assert not evaluated.has_error() and "canar" not in reply_text(evaluated).lower()
    report = (audit.folder / "empirical.json").read_text()
    result = json.loads(report)
    with PrivacyLedger(folder / "audited.db", read_only=True) as ledger:
        *training, evaluation = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.spends()]
    # The adapter scored is what the run's releases so far made; this message's evaluation came after.
    assert result["epsilon_theory"] == pytest.approx(epsilon_for(training, 1e-5, ACCOUNTANT))
    assert result["adapter"] == "the global adapter after round 1"
    # The site's own trained adapter, scored when it trained, against the same spend.
    own = json.loads((audit.folder / "own-update" / "empirical.json").read_text())
    assert own["adapter"] == "node-7's own update of round 1"
    assert own["epsilon_theory"] == pytest.approx(result["epsilon_theory"]) and own["canaries"] == 40
    assert 0 <= own["epsilon_lower_bound"] <= own["epsilon_theory"]
    assert result["round"] == 1 and result["canaries"] == 40 and result["included"] == included
    assert 0 <= result["epsilon_lower_bound"] <= result["epsilon_theory"]
    assert (audit.folder / "plots" / "canary_scores.png").is_file()
    assert "round 1" in (audit.folder / "empirical.md").read_text()
    assert (audit.folder / "secret").stat().st_mode & 0o777 == 0o600
    assert "self-audit of the global adapter after round 1, epsilon lower bound" in caplog.text


def test_the_server_cannot_turn_the_audit_on(run_config, folder):
    """The attack: a run config asking for canaries. It is refused as a key the site's run
    config does not have, spends nothing and adds no canary anywhere."""
    ledger = folder / "server-asks.db"
    reply = train_round({**run_config, "audit-canaries": 1000}, node(run_config, ledger), 1, ArrayRecord())
    assert dict(reply.content["status"]) == {"status": "config-error", "setting": ""}
    assert not ledger.with_suffix(".audit").exists()
    with PrivacyLedger(ledger, read_only=True) as kept:
        assert kept.spends() == []


@pytest.mark.parametrize(("extra", "problem"), [
    ({"audit-canaries": 1}, "audit-canaries must be 0"),
    ({"audit-canaries": True}, "audit-canaries must be 0"),
    ({"audit-canaries": "100"}, "audit-canaries must be 0"),
    ({"audit-canaries": 10, "ledger-path": ""}, "set audit-dir"),
])
def test_a_bad_audit_setting_says_which(extra, problem):
    with pytest.raises(ValueError, match=problem):
        SelfAudit.of({"ledger-path": "/site/ledger.db", **extra}, "1")
    assert SelfAudit.of({"ledger-path": "/site/ledger.db"}, "1") is None
    assert SelfAudit.of({"audit-dir": "/audits", "audit-canaries": 4}, "9").folder == Path("/audits/run-9")


def test_the_audit_never_changes_a_reply_even_when_it_fails(run_config, folder, caplog):
    """A bad audit setting, or an audit folder that cannot be written, is an error in the
    site's log; the server gets the replies of a site without the audit, and no hint of it."""
    arrays = GlobalModel.load(settings_of(run_config)).arrays()
    blocked = folder / "not-a-folder"
    blocked.write_text("a file where the audit folder would go")
    for name, extra in [("bad-setting", {"audit-canaries": 1}), ("unwritable", {"audit-canaries": 20, "audit-dir": str(blocked)})]:
        audited = node(run_config, folder / f"{name}.db", **extra)
        trained = train_round(run_config, audited, 1, arrays)
        assert "status" not in trained.content.config_records, name
        evaluated = evaluate_round(run_config, audited, 1, trained.content["arrays"])
        assert "status" not in evaluated.content.config_records and "canar" not in reply_text(evaluated).lower(), name
    assert "no self-audit: node config audit-canaries must be 0" in caplog.text
    assert "the canaries could not be added this round" in caplog.text
    assert "the canaries could not be scored this round" in caplog.text


def test_the_secret_is_drawn_once_per_run_by_whichever_message_comes_first(tmp_path):
    audits = [SelfAudit(50, tmp_path / "run-1") for _ in range(8)]
    drawn: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda a=a: drawn.append(a.canaries(3).included)) for a in audits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(drawn) == 8 and all(np.array_equal(bits, drawn[0]) for bits in drawn)
    assert sorted(p.name for p in (tmp_path / "run-1").iterdir()) == ["secret"]
    other_run = SelfAudit(50, tmp_path / "run-2").canaries(3)
    assert other_run.rows["text"] != audits[0].canaries(3).rows["text"]


def test_canaries_join_the_training_rows_each_its_own_unit(tmp_path):
    train = datasets.Dataset.from_dict({"text": ["a b", "c d", "e f"], "label": [0, 1, 0], UNIT_COLUMN: [7, 7, 8]})
    audit = SelfAudit(30, tmp_path / "run-1")
    rows = audit.with_canaries(train, 2)
    included = audit.canaries(2).included_rows
    assert rows.num_rows == 3 + included.num_rows and rows["text"][3:] == included["text"]
    assert len(set(SiteData.units(rows))) == 2 + included.num_rows
    plain = datasets.Dataset.from_dict({"text": ["a b"], "label": [1]})
    assert audit.with_canaries(plain, 2).column_names == ["text", "label"]
