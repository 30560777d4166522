"""``history.json``: one entry per round, readable by a person and a program.

Each entry: ``round``, ``train_loss``, ``eval_loss``, ``eval_accuracy`` (weighted over the
sites' held-out splits), ``central_loss``/``central_accuracy`` (server-side test set, when
configured), ``bytes_up``/``bytes_down`` (adapter payloads), ``seconds``, ``time_split`` (of those seconds:
``sites-training``, ``sites-evaluation`` waiting on the sites' replies, ``server`` its own work
within the round; the checkpoint and reports are written after it), ``failure`` (why a
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HISTORY_FILE = "history.json"
SIMULATION_FILE = "simulation.json"  # written by ``fedlora simulate``: what its virtual sites were given


@dataclass
class SiteRound:
    """One site's part in a round's training, as the server saw it."""

    client: str
    node_id: int | None
    outcome: str  # aggregated / valid / rejected / refused / failed / no-reply
    reason: str = ""
    num_examples: float | None = None
    train_loss: float | None = None
    epsilon: float | None = None
    privacy: dict[str, float] = field(default_factory=dict)  # the DP parameters the site reported
    bytes_up: int = 0
    bytes_down: int = 0
    ledger: dict[str, Any] | None = None
    update_norm: float | None = None
    flagged: bool = False


@dataclass
class SiteEvaluation:
    """One site's part in a round's federated evaluation."""

    client: str
    node_id: int | None
    outcome: str
    reason: str = ""
    num_examples: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    epsilon: float | None = None
    ledger: dict[str, Any] | None = None


@dataclass
class RoundRecord:
    round: int
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    central_loss: float | None = None
    central_accuracy: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    # seconds waiting on the sites' training replies (SecAgg+: its four exchanges), on their
    # evaluation replies, and the server's own work (the rest of ``seconds``)
    time_split: dict[str, float] | None = None
    failure: str | None = None
    central_epsilon: float | None = None
    central_dp: dict[str, float] | None = None
    secure_aggregation: dict[str, float] | None = None  # SecAgg+'s round: sites, summed, dropped, shares, threshold
    clients: list[SiteRound] = field(default_factory=list)
    evaluations: list[SiteEvaluation] = field(default_factory=list)

    @property
    def aggregated(self) -> list[SiteRound]:
        return [c for c in self.clients if c.outcome == "aggregated"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "RoundRecord":
        """An entry of ``history.json`` (keys it does not know, from a newer fedlora, are an error)."""
        try:
            return cls(**{
                **entry,
                "clients": [SiteRound(**c) for c in entry.get("clients", [])],
                "evaluations": [SiteEvaluation(**e) for e in entry.get("evaluations", [])],
            })
        except TypeError as err:
            raise ValueError(f"not a history.json round entry: {err}") from err


class RunFailed(RuntimeError):
    """No round of the run aggregated an update: there is no trained adapter to write."""


def run_failure(history: list[RoundRecord]) -> str | None:
    """Why the run as a whole failed (no round aggregated any site's update), else None. Each
    site's own outcome and reason are in its round's entry, and reported once, from there."""
    if any(r.aggregated for r in history if not r.failure):
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


def save_history(out_dir: Path, rounds: list[RoundRecord]) -> Path:
    path = out_dir / HISTORY_FILE
    write_json(path, history_json(rounds))
    return path


def history_json(rounds: list[RoundRecord]) -> list[dict[str, Any]]:
    return [r.to_json() for r in rounds]


def read_history(entries: list[dict[str, Any]]) -> list[RoundRecord]:
    return [RoundRecord.from_json(entry) for entry in entries]


def load_history(path: Path) -> list[RoundRecord]:
    """``history.json`` as records; ValueError when it is not one."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{path} is not a history.json (a list of round entries)")
    return read_history(entries)
