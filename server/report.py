"""``report.md`` and ``plots/*.png``: what a person reads after a run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: coordinators and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedlora.run_config import RunSettings  # noqa: E402
from server.history import SIMULATION_FILE, RoundRecord, run_failure  # noqa: E402


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def plot_series(
    path: Path,
    title: str,
    ylabel: str,
    series: Mapping[str, list[tuple[int, float]]],
    limits: Mapping[str, float] | None = None,
) -> Path | None:
    """One line per named series of (round, value), plus a dashed line in the same colour for
    each series with a limit (e.g. a site's epsilon budget); skipped when there is nothing to plot."""
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        xs, ys = zip(*points)
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        if (limits or {}).get(name):
            ax.axhline(limits[name], linestyle="--", color=line.get_color(), alpha=0.7, label=f"{name} budget")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _points(history: list[RoundRecord], key: str) -> list[tuple[int, float]]:
    return [(r.round, getattr(r, key)) for r in history if getattr(r, key) is not None]


def _status(settings: RunSettings, history: list[RoundRecord]) -> tuple[str, bool]:
    """The run's status line, and whether it completed with an adapter."""
    done = bool(history) and history[-1].round >= settings.num_server_rounds
    failure = run_failure(history)
    if done and failure:
        return f"**FAILED**: {failure}. No adapter was written.", False
    if done:
        return "completed", True
    return f"stopped or running: {history[-1].round if history else 0} of {settings.num_server_rounds} rounds done", False


def _files(simulated: bool, completed: bool) -> list[str]:
    """What this output directory holds, for the person reading the report."""
    files = ["`adapter/`: the final global adapter (PEFT format; `fedlora.load_adapter`, `fedlora predict`)"] if completed else []
    files += [
        "`checkpoints/round-<r>/`: the adapter after each round (`--resume` continues from the newest)",
        "`history.json`: every round and every site's outcome; `config.json`: the resolved run config",
        "`plots/loss.png`, `plots/accuracy.png`: this report's curves",
        "`privacy_report.md`, `privacy_report.json`, `plots/epsilon.png`: epsilon per site and round, budgets, refusals",
    ]
    if simulated:
        files += ["`privacy/site-<i>.db`: each simulated site's privacy ledger (`fedlora privacy audit`)",
                  "`sites/site-<i>.parquet`: each simulated site's own data (its `data-path`)",
                  f"`{SIMULATION_FILE}`: what the simulated sites were given"]
    return files


def _secure(settings: RunSettings, history: list[RoundRecord]) -> str:
    """Whether the server saw only each round's masked sum (SecAgg+), and how many dropped out."""
    if not settings.secure.secure_aggregation:
        return "off (the server saw each site's update)"
    survived = sum(int((r.secure_aggregation or {}).get("dropped", 0)) for r in history if not r.failure)
    return (f"ON, SecAgg+: the server saw only each round's masked sum (threshold {settings.secure.secagg_threshold:g} "
            f"of the shares, values clipped to ±{settings.secure.secagg_clipping_range:g}); "
            f"{survived} site dropout(s) in rounds that still aggregated")


def write_report(out_dir: Path, settings: RunSettings, history: list[RoundRecord]) -> Path:
    plots = out_dir / "plots"
    plot_series(plots / "loss.png", "Loss per round", "loss", {
        "train (sites)": _points(history, "train_loss"),
        "eval (sites' held-out)": _points(history, "eval_loss"),
        "central test set": _points(history, "central_loss"),
    })
    plot_series(plots / "accuracy.png", "Accuracy per round", "accuracy", {
        "eval (sites' held-out)": _points(history, "eval_accuracy"),
        "central test set": _points(history, "central_accuracy"),
    })
    dp = "**OFF — training was not differentially private**"
    if settings.dp.distributed:
        dp = (f"ON, distributed: each round one gradient step whose Skellam noise the sites share through SecAgg+, "
              f"trusting that at most max(distributed-dp-colluders = {settings.dp.distributed_dp_colluders}, "
              f"each site's own) sites collude with the server")
    elif settings.dp.dp:
        dp = "ON, local: each site's DP-SGD"
    simulated = (out_dir / SIMULATION_FILE).is_file()
    data = (f"`{settings.data.data}`, partition `{settings.data.partition}` over simulated sites" if simulated
            else "each site's own, which the coordinator never sees (a deployed run)")
    status, completed = _status(settings, history)
    lines = [
        "# fedlora run report",
        "",
        f"- status: {status}",
        f"- model: `{settings.model.model}` ({settings.data.task}), LoRA rank {settings.model.lora_rank}",
        f"- data: {data}",
        f"- strategy: `{settings.strategy.strategy}`, rounds: {settings.num_server_rounds}",
        f"- differential privacy: {dp}",
        f"- secure aggregation: {_secure(settings, history)}",
        "",
        "## Rounds",
        "",
        "| round | train loss | eval loss | eval accuracy | central accuracy | sites aggregated | bytes up | bytes down | seconds | server's own seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in history:
        lines.append(
            f"| {r.round} | {_fmt(r.train_loss)} | {_fmt(r.eval_loss)} | {_fmt(r.eval_accuracy)} "
            f"| {_fmt(r.central_accuracy)} | {len(r.aggregated)}/{len(r.clients)} | {r.bytes_up} "
            f"| {r.bytes_down} | {_fmt(r.seconds, 1)} | {_fmt((r.time_split or {}).get('server'), 2)} |"
        )
    problems = [
        f"- round {r.round}: {c.client} {c.outcome}: {c.reason}"
        + (f" (update norm {c.update_norm:.4g})" if c.update_norm is not None and "norm" not in c.reason else "")
        + (" — **flagged**: rejected in consecutive rounds" if c.flagged else "")
        for r in history for c in r.clients if c.outcome != "aggregated"
    ] + [f"- round {r.round}: not aggregated: {r.failure}" for r in history if r.failure]
    lines += ["", "## Sites that did not contribute", ""] + (problems or ["None: every site sent a valid update every round."])
    flagged = sorted({c.client for r in history for c in r.clients if c.flagged})
    if flagged:
        lines += ["", f"**Flagged sites** (update rejected {settings.strategy.flag_after_rejections} rounds running): "
                  + ", ".join(flagged)]
    lines += ["", "## Files", ""] + [f"- {line}" for line in _files(simulated, completed)] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
