"""Why a site sits a round out, as the server may learn it: a **code** and a **setting name**.

A refusal's full text (the file, the row, the value, the local path) can carry the site's data:
an unknown label quotes the cell, and the server chooses which column is the label. So the
text stays in the site's own log, and the reply carries only

    status   one of :data:`STATUS_CODES`
    setting  the public config key at fault (a run-config or node-config key), or ""

which is public configuration: the server learns *which setting*, never *which value*.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ConfigRecord
from flwr.common.logger import log

from fedlora.run_config import all_keys

STATUS_CODES = frozenset(
    {
        "budget-exhausted",  # the round would take the site past its max-epsilon
        "policy-refused",  # the run config asks for less privacy than the site's policy
        "config-error",  # the run config cannot be read: an unknown key, a wrong type, a value out of range
        "data-error",  # the site's data cannot be used with the run's settings
        "model-error",  # the model or the received adapter cannot be used
        "ledger-error",  # the privacy ledger cannot be read or its hash chain is broken
        "metrics-withheld",  # report-metrics = none: no evaluation release
        "internal-error",  # anything else raised at the site (the text stays local)
        "disclosure-blocked",  # the outgoing guard stopped a reply that would have leaked
    }
)


SETTINGS = frozenset(
    {
        "",  # none in particular
        *all_keys(),  # the run config's keys, as this site's code knows them
        # node config
        "data-path", "ledger-path", "num-examples", "max-epsilon-per-run", "min-noise-multiplier", "report-metrics",
        "metric-noise-multiplier", "privacy-unit-column", "lora-rank", "device",
    }
)
"""The setting names a refusal may carry: fixed by this code, never taken from the
(server-chosen) run config, so that a setting name cannot smuggle a value out."""


class RefusedRound(Exception):
    """The site does not take part in this round. ``detail`` is for the site's log only."""

    def __init__(self, code: str, setting: str, detail: str) -> None:
        if code not in STATUS_CODES:
            raise ValueError(f"unknown status code {code!r}")
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting name {setting!r}")
        super().__init__(f"{code} ({setting or 'no setting'}): {detail}")
        self.code, self.setting, self.detail = code, setting, detail

    def record(self) -> ConfigRecord:
        return ConfigRecord({"status": self.code, "setting": self.setting})

    def log_locally(self, site: str, event: str) -> None:
        """One line in the site's own log, with the full reason."""
        log(WARNING, "%s %s refused: %s", site, event, self)
