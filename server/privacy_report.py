"""``privacy_report.json``, ``privacy_report.md`` and ``plots/epsilon.png``: what DP cost each site.

Everything comes from ``history.json``'s client entries, i.e. from what the sites reported.
A site's epsilon is its **cumulative** spend read from its own privacy ledger after the round:
every round it ever trained in, and every noised metric it released (the evaluation included), in
this run and earlier ones, composed at its delta (``privacy.accountant``). It is a lifetime figure, not the cost of one round, and it only grows;
the site's budget is its ``max-epsilon``. The server cannot verify it: the site's ledger and
``fedlora privacy audit`` are the record of truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.run_config import RunSettings, StrategySettings
from server.history import RoundRecord, write_json
from server.report import plot_series

# history.json client entry "privacy" key -> report key
_ROUND_PRIVACY = {"noise-multiplier": "noise_multiplier", "sample-rate": "sample_rate", "steps": "steps",
                  "delta": "delta", "max-epsilon": "max_epsilon", "user-level": "user_level"}


def write_privacy_report(out_dir: Path, settings: RunSettings, history: list[RoundRecord]) -> dict:
    """Write the three files under ``out_dir`` and return the JSON document."""
    report = privacy_summary(settings, history)
    write_json(out_dir / "privacy_report.json", report)
    (out_dir / "privacy_report.md").write_text(_markdown(report))
    _plot_epsilon(out_dir / "plots" / "epsilon.png", report)
    return report


def privacy_summary(settings: RunSettings, history: list[RoundRecord]) -> dict[str, Any]:
    """The JSON document: ``dp`` (the run's requested settings), ``sites`` (per site: every
    round it was sent work, its latest epsilon and privacy parameters, its refusals) and
    ``central`` (server-side DP, null unless the history records carry ``central_epsilon``)."""
    rounds_by_site: dict[str, list[dict[str, Any]]] = {}
    for record in history:
        evaluated = {e.client: e.epsilon for e in record.evaluations}
        for client in record.clients:
            privacy = client.privacy
            spent = [e for e in (client.epsilon, evaluated.get(client.client)) if e is not None]
            rounds_by_site.setdefault(client.client, []).append(
                {
                    "round": record.round,
                    "outcome": client.outcome,
                    "reason": client.reason,
                    "epsilon": max(spent) if spent else None,
                    "dp": bool(privacy["dp"]) if "dp" in privacy else None,
                    **{new: privacy.get(old) for old, new in _ROUND_PRIVACY.items()},
                }
            )
    request = settings.dp
    dp = {"dp": request.dp, "target-epsilon": request.target_epsilon, "noise-multiplier": request.noise_multiplier,
          "max-grad-norm": request.max_grad_norm, "delta": request.delta, "max-epsilon": request.max_epsilon}
    return {
        "dp": dp,
        "sites": {name: _site_summary(rounds) for name, rounds in sorted(rounds_by_site.items())},
        "central": _central_summary(settings.strategy, history),
    }


def _site_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The site's parameters are those of the last round it reported them in (a site that was
    only ever refused has none)."""
    reported = [r for r in rounds if r["noise_multiplier"] is not None]
    last = reported[-1] if reported else {}
    spent = [r["epsilon"] for r in rounds if r["epsilon"] is not None]
    latest = spent[-1] if spent else None
    max_epsilon = last.get("max_epsilon")
    return {
        "latest_epsilon": latest,
        "max_epsilon": max_epsilon,
        "budget_used": latest / max_epsilon if latest is not None and max_epsilon else None,
        "dp": last.get("dp"),
        **{key: last.get(key) for key in ("delta", "noise_multiplier", "sample_rate", "steps")},
        "privacy_unit": None if not last else ("user" if last.get("user_level") else "row"),
        "rounds": [
            {key: r[key] for key in ("round", "outcome", "epsilon", "noise_multiplier", "sample_rate", "steps")}
            for r in rounds
        ],
        "refusals": [
            {"round": r["round"], "reason": r["reason"]} for r in rounds if r["outcome"] == "refused"
        ],
    }


def _central_summary(strategy: StrategySettings, history: list[RoundRecord]) -> dict[str, Any] | None:
    points = [
        {"round": r.round, "epsilon": r.central_epsilon}
        for r in history if r.central_epsilon is not None
    ]
    if not points:
        return None
    return {
        "epsilon_per_round": points,
        "latest_epsilon": points[-1]["epsilon"],
        "noise_multiplier": strategy.central_dp_noise_multiplier,
        "clipping_norm": strategy.central_dp_clipping_norm,
        "delta": strategy.central_dp_delta,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# fedlora privacy report", ""]
    if not report["dp"]["dp"]:
        lines += [
            "> **WARNING: DIFFERENTIAL PRIVACY WAS OFF FOR THIS RUN (`dp = false`).**",
            "> The sites trained without DP-SGD: their adapter updates carry **no** formal privacy",
            "> guarantee and may reveal information about individual training examples.",
            "",
        ]
    lines += _settings(report["dp"]) + _site_table(report["sites"]) + _round_table(report["sites"])
    lines += _refusals(report["sites"]) + _central(report["central"])
    lines += ["", "Verify any site's figures with `fedlora privacy audit LEDGER` at that site.", ""]
    return "\n".join(lines)


def _settings(dp: dict[str, Any]) -> list[str]:
    return [
        "## Local DP-SGD settings requested by the server",
        "",
        f"- dp: {'on' if dp['dp'] else '**OFF**'}",
        f"- target-epsilon: {_fmt(dp['target-epsilon'])} (sigma is calibrated to it when noise-multiplier is 0)",
        f"- noise-multiplier: {_fmt(dp['noise-multiplier'])} (0: calibrated at each site)",
        f"- max-grad-norm: {_fmt(dp['max-grad-norm'])}",
        f"- delta: {_fmt(dp['delta'])} (0: each site's own)",
        f"- max-epsilon: {_fmt(dp['max-epsilon'])} (0: each site's own budget)",
        "",
        "Each site sets its own limits (node config); these settings can only tighten them.",
        "",
    ]


def _site_table(sites: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "## Sites",
        "",
        "epsilon is each site's cumulative spend from its own privacy ledger after the round (every",
        "round it ever trained in and every noised metric it released, this run and earlier ones),",
        "at its delta. The unit is what one epsilon protects: a row, or a user (all of a person's rows).",
        "",
        "| site | latest epsilon | budget (max-epsilon) | used | delta | unit | noise multiplier "
        "| sample rate | steps/round | refusals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, site in sites.items():
        used = f"{site['budget_used']:.0%}" if site["budget_used"] is not None else "–"
        lines.append(
            f"| {name} | {_fmt(site['latest_epsilon'])} | {_fmt(site['max_epsilon'])} | {used} "
            f"| {_fmt(site['delta'])} | {_fmt(site['privacy_unit'])} | {_fmt(site['noise_multiplier'])} | {_fmt(site['sample_rate'])} "
            f"| {_fmt(site['steps'])} | {len(site['refusals'])} |"
        )
    return lines


def _round_table(sites: dict[str, dict[str, Any]]) -> list[str]:
    """One row per round, one column per site; a round the site did not contribute to is
    marked with its outcome (a rejected update was still trained, so it has an epsilon)."""
    cells: dict[int, dict[str, str]] = {}
    for name, site in sites.items():
        for r in site["rounds"]:
            cell = _fmt(r["epsilon"]) + ("" if r["outcome"] == "aggregated" else f" ({r['outcome']})")
            cells.setdefault(r["round"], {})[name] = cell
    lines = ["", "## Epsilon per round", "", "| round | " + " | ".join(sites) + " |", "|---" * (len(sites) + 1) + "|"]
    for server_round in sorted(cells):
        lines.append(f"| {server_round} | " + " | ".join(cells[server_round].get(name, "") for name in sites) + " |")
    return lines


def _refusals(sites: dict[str, dict[str, Any]]) -> list[str]:
    refusals = sorted((r["round"], name, r["reason"]) for name, site in sites.items() for r in site["refusals"])
    lines = [f"- round {server_round}: {name}: {reason}" for server_round, name, reason in refusals]
    return ["", "## Refusals", ""] + (lines or ["None: no site refused a round."])


def _central(central: dict[str, Any] | None) -> list[str]:
    if central is None:
        return []
    return [
        "", "## Central DP (server side, site-level)", "",
        f"- latest epsilon: {_fmt(central['latest_epsilon'])} at delta {_fmt(central['delta'])}",
        f"- noise multiplier {_fmt(central['noise_multiplier'])}, clipping norm {_fmt(central['clipping_norm'])}",
    ]


def _plot_epsilon(path: Path, report: dict[str, Any]) -> Path | None:
    """epsilon per site per round with each site's budget dashed; skipped when no site
    reported an epsilon."""
    series = {
        name: [(r["round"], r["epsilon"]) for r in site["rounds"] if r["epsilon"] is not None]
        for name, site in report["sites"].items()
    }
    budgets = {name: site["max_epsilon"] for name, site in report["sites"].items()}
    if report["central"] is not None:
        series["central (site-level)"] = [(p["round"], p["epsilon"]) for p in report["central"]["epsilon_per_round"]]
    return plot_series(path, "Privacy spent per site", "cumulative epsilon", series, budgets)
