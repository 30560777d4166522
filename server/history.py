"""``history.json``: one entry per round, readable by a person and a program.

Each entry: ``round``, ``train_loss``, ``eval_loss``, ``eval_accuracy`` (weighted over the
sites' held-out splits), ``central_loss``/``central_accuracy`` (server-side test set, when
configured), ``bytes_up``/``bytes_down`` (adapter payloads), ``seconds``, ``failure`` (why a
round could not be aggregated, else null), ``central_epsilon`` and ``central_dp`` (the central-DP
noise multiplier, clipping norm, sample size and delta this round released with; null when it
released nothing) and ``clients``: one item per site sent work, with
``client``, ``node_id``, ``outcome`` (aggregated / valid, when its round had too few valid updates
to aggregate / rejected / refused / failed / no-reply),
``reason``, ``num_examples``, ``train_loss``, ``epsilon``, ``bytes_up``, ``bytes_down``,
``ledger`` (the site's privacy-ledger anchor ``{"rows", "head"}`` after that message, or null),
``update_norm`` (‖update − global adapter‖₂ of a well-formed update, else null) and ``flagged``
(its update was rejected in ``flag-after-rejections`` rounds running);
``evaluations`` likewise per site evaluated. Under DP, ``num_examples`` is the site's public
FedAvg weight and ``train_loss``/``eval_accuracy`` are noised releases (``privacy.release``);
``reason`` is a status code and a setting name, never the site's own text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HISTORY_FILE = "history.json"
SIMULATION_FILE = "simulation.json"  # written by ``fedlora simulate``: what its virtual sites were given


class RunFailed(RuntimeError):
    """No round of the run aggregated an update: there is no trained adapter to write."""


def run_failure(history: list[dict[str, Any]]) -> str | None:
    """Why the run as a whole failed (no round aggregated any site's update), else None. Each
    site's own outcome and reason are in its round's entry, and reported once, from there."""
    if any(c["outcome"] == "aggregated" for r in history if not r.get("failure") for c in r["clients"]):
        return None
    return f"no round aggregated an update ({len(history)} round(s) ran)"


def json_safe(value: Any) -> Any:
    """NaN/inf become null so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
    tmp.replace(path)


def save_history(out_dir: Path, rounds: list[dict[str, Any]]) -> Path:
    path = out_dir / HISTORY_FILE
    write_json(path, rounds)
    return path


def load_history(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []
