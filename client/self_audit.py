"""A site's audit of its own privacy, at its own request: node config ``audit-canaries = N``.

The site adds canaries (``privacy.canaries``) to its own training rows, and measures, from the
global adapters it is sent, how much privacy the federation's DP actually leaves them: a lower
bound on epsilon at 95% confidence beside its ledger's upper bound, for this run, on the real
deployment (its DP-SGD, the server's aggregation, every round).

- **The secret.** Once per run the site draws a secret and keeps it in
  ``<audit-dir>/run-<run id>/secret`` (mode 0600; ``audit-dir`` defaults to the ledger's path
  with the suffix ``.audit``). The N canaries and which of them are included follow from it, so
  every training message of the run adds the same ones, in whatever process it runs.
- **Training.** The included canaries join the training rows after the held-out split, each its
  own privacy unit; DP-SGD samples them like any row and the ledger charges for them. What the
  site reports does not change: under DP every count it sends derives from its declared
  ``num-examples`` (``docs/privacy.md``, claim 2), which need not count the canaries.
- **Scoring.** At every evaluation message the site scores all N canaries under the global
  adapter it was sent (the adapter after that round) and rewrites ``empirical.json``,
  ``empirical.md`` and ``plots/canary_scores.png`` in the same folder. After every training
  round it scores them under its own trained adapter too, the release its ledger charged,
  before averaging with other sites dilutes it: the same files in ``own-update/``, a stronger
  check of its own DP-SGD. Nothing of it leaves the site: its replies carry what they would
  carry without the audit.

Only the site can turn this on: ``audit-canaries`` and ``audit-dir`` are node-config keys, and a
run config naming them is refused like any key the site's code does not know (claim 18). A
server that wanted canaries at a site could only send adapters, which any site already trains.
And nothing about the audit reaches the server: a bad audit setting, or any failure while
adding or scoring canaries, goes to the site's log as an error and leaves the round, and its
reply, as they would be without the audit (:func:`requested_audit`, :meth:`SelfAudit.training_rows`,
:meth:`SelfAudit.report_safely`).
"""

from __future__ import annotations

import os
import secrets
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from flwr.common.logger import log

from client.local_data import UNIT_COLUMN
from fedlora.run_config import DataSettings, RunSettings
from privacy.canaries import Canaries, canary_scores, make_canaries
from privacy.empirical_report import record_level, write_report

SECRET_FILE = "secret"
OWN_UPDATE = "own-update"  # the reports on the site's own trained adapter


@dataclass(frozen=True)
class SelfAudit:
    count: int  # N canaries, each included with probability 1/2
    folder: Path  # <audit-dir>/run-<run id>: the secret and the reports

    @classmethod
    def of(cls, node_config: Mapping[str, Any], run_id: str) -> SelfAudit | None:
        """The audit this site's node config asks for (None when it asks for none); ValueError
        naming the bad setting."""
        count = node_config.get("audit-canaries", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or count == 1:
            raise ValueError(f"node config audit-canaries must be 0 (no audit) or a whole number >= 2, got {count!r}")
        return cls(count, cls.root(node_config) / f"run-{run_id}") if count else None

    @staticmethod
    def root(node_config: Mapping[str, Any]) -> Path:
        """``audit-dir``, else the ledger's path with the suffix ``.audit``: one folder per run in it."""
        if node_config.get("audit-dir"):
            return Path(str(node_config["audit-dir"])).expanduser()
        if node_config.get("ledger-path"):
            return Path(str(node_config["ledger-path"])).expanduser().with_suffix(".audit")
        raise ValueError("audit-canaries needs a folder for its secret: set audit-dir (or ledger-path) in the node config")

    def canaries(self, num_labels: int) -> Canaries:
        return make_canaries(self.count, num_labels, np.random.default_rng(self._secret()))

    def training_rows(self, train: datasets.Dataset, num_labels: int, site: str) -> datasets.Dataset:
        """``train`` with the included canaries; ``train`` alone, and an error in the site's log,
        when they cannot be added."""
        try:
            return self.with_canaries(train, num_labels)
        except Exception:  # noqa: BLE001 - whatever it is, the round goes on as without the audit
            log(ERROR, "%s: self-audit: the canaries could not be added this round:\n%s", site, traceback.format_exc())
            return train

    def with_canaries(self, train: datasets.Dataset, num_labels: int) -> datasets.Dataset:
        """``train`` and the included canaries, each canary its own privacy unit."""
        added = self.canaries(num_labels).included_rows
        if UNIT_COLUMN in train.column_names:
            # A NUL cannot come from a CSV cell or a JSON key the site wrote by hand.
            train = train.cast_column(UNIT_COLUMN, datasets.Value("string"))
            added = added.add_column(UNIT_COLUMN, [f"\0canary-{i}" for i in range(added.num_rows)])
        if not train.num_rows:
            return added
        return datasets.concatenate_datasets([train, added.select_columns(train.column_names).cast(train.features)])

    def _secret(self) -> int:
        """This run's secret, drawn by the first message that needs it and read by the rest."""
        path = self.folder / SECRET_FILE
        if not path.exists():
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            drawn = self.folder / f"{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
            # Created readable by the site alone, never for a moment by anyone else.
            with os.fdopen(os.open(drawn, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w") as file:
                file.write(f"{secrets.randbits(128)}\n")
            try:
                os.link(drawn, path)  # atomic, and never over a secret another message drew first
            except FileExistsError:
                pass
            finally:
                drawn.unlink()
        return int(path.read_text())

    def report_safely(self, model, tokenizer, run: RunSettings, server_round: int, epsilon_theory: float | None,
                      delta: float, site: str, device: torch.device, own_update: bool = False) -> None:
        """:meth:`report`, whose failure is the site's own business: an error in its log only."""
        try:
            self.report(model, tokenizer, run, server_round, epsilon_theory, delta, site, device, own_update)
        except Exception:  # noqa: BLE001 - the evaluation and its reply go on as without the audit
            log(ERROR, "%s: self-audit: the canaries could not be scored this round:\n%s", site, traceback.format_exc())

    def report(self, model, tokenizer, run: RunSettings, server_round: int, epsilon_theory: float | None,
               delta: float, site: str, device: torch.device, own_update: bool = False) -> dict:
        """Score the canaries under ``model``, the global adapter after ``server_round`` or the
        site's ``own_update`` of it, and rewrite that report; returns it."""
        canaries = self.canaries(len(run.data.label_names))
        scores = canary_scores(model, tokenizer, canaries, run.data.max_seq_length, device)
        scored = f"{site}'s own update of round {server_round}" if own_update else f"the global adapter after round {server_round}"
        result = {**record_level(scores, canaries.included, delta, epsilon_theory, site), "round": server_round,
                  "adapter": scored}
        folder = self.folder / OWN_UPDATE if own_update else self.folder
        write_report(folder, result, scores, canaries.included)
        theory = "none (no DP)" if epsilon_theory is None else f"{epsilon_theory:.3f}"
        log(INFO, "%s round %s: self-audit of %s, epsilon lower bound %.3f (measured, %s) against %s (ledger, this "
            "run); %s", site, server_round, scored, result["epsilon_lower_bound"], result["method"], theory, folder)
        return result


def requested_audit(node_config: Mapping[str, Any], run_id: str, data: DataSettings, site: str) -> SelfAudit | None:
    """The audit the node config asks for, for a classification run with label names (canaries
    are labelled texts); a bad setting is an error in the site's log, never a refusal."""
    if not node_config.get("audit-canaries") or data.task != "classification" or not data.label_names:
        return None
    try:
        return SelfAudit.of(node_config, run_id)
    except ValueError as err:
        log(ERROR, "%s: no self-audit: %s", site, err)
        return None
