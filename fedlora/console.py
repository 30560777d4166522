"""What ``fedlora simulate`` prints: one line per event, a progress bar per round on a terminal
(``server.progress``), and a short summary at the end.

By default the console leaves out Flower's own INFO lines (``configure_train: Sampled 3
nodes``, ``aggregate_train: Received 3 results``: the round's outcome lines say more), its
deprecation notice for ``run_simulation`` (the public entry point fedlora uses on purpose) and
the simulated sites' own INFO lines (what a deployed site writes to its own log; their warnings
and refusals still show). ``--verbose`` brings all of it back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import flwr

from server.history import HISTORY_FILE, load_history

_FLOWER = str(Path(flwr.__file__).parent)


# Flower's warnings about what fedlora does on purpose: the public ``run_simulation`` entry
# point, and stopping the simulation's workers when the run is over.
_EXPECTED = ("`run_simulation` function is deprecated", "Manually terminating ClientAppActor")


class OwnEvents(logging.Filter):
    """Pass fedlora's lines and everyone's warnings; drop Flower's progress chatter and its
    expected warnings. ``site``: in a simulated site's worker, pass warnings only."""

    def __init__(self, site: bool = False) -> None:
        super().__init__()
        self.site = site

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and (self.site or record.pathname.startswith(_FLOWER)):
            return False
        return not any(text in record.getMessage() for text in _EXPECTED)


def quiet_flower_console(site: bool = False) -> None:
    """Filter the console handlers Flower's logger writes through, in this process, once."""
    for handler in logging.getLogger("flwr").handlers:
        if not any(isinstance(f, OwnEvents) for f in handler.filters):
            handler.addFilter(OwnEvents(site))


def print_summary(out_dir: Path) -> None:
    """Accuracy, each site's epsilon against its budget, and where the outputs are."""
    history = load_history(out_dir / HISTORY_FILE)
    last = history[-1] if history else None
    private = bool(json.loads((out_dir / "config.json").read_text())["dp"])
    if last is not None:
        where = "sites' held-out, a noised release" if private else "sites' held-out"
        measures = [f"eval accuracy {last.eval_accuracy:.4f} ({where})" if last.eval_accuracy is not None else "",
                    f"central accuracy {last.central_accuracy:.4f}" if last.central_accuracy is not None else "",
                    f"train loss {last.train_loss:.4f}" if last.train_loss is not None else ""]
        print(f"after round {last.round}: " + (", ".join(m for m in measures if m) or "no metrics reported"))
    report = out_dir / "privacy_report.json"
    if report.is_file():
        sites = json.loads(report.read_text())["sites"]
        spent = [f"{name} {site['latest_epsilon']:.3f}" + (f" of {site['max_epsilon']:g}" if site["max_epsilon"] else "")
                 for name, site in sites.items() if site["latest_epsilon"] is not None]
        print("epsilon spent: " + (", ".join(spent) if spent else "none (no DP)"))
