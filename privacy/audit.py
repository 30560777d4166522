"""What an auditor runs: recompute every site's epsilon from its ledger's raw rows.

For each spend row the audit recomputes the site's cumulative epsilon from the rows up to it,
three ways: Opacus with the row's own accountant (must equal the recorded value), Google's
dp-accounting RDP (independent implementation; compared for ``rdp`` rows, within
:data:`privacy.accountant.DP_ACCOUNTING_RTOL`) and Opacus PRV (for information: a tighter
numerical bound). It also verifies the hash chain and flags any row whose recomputed epsilon
exceeds the budget recorded with it. Each row shows its mechanism (``dp-sgd``, a noised
``release:...`` or a distributed-DP round, ``distributed:skellam``) and its privacy unit (``row``
or ``user:<column>``). Once a Skellam row is in the history, Opacus' RDP runs over the integer
orders, dp-accounting composes the Gaussian that dominates the Skellam bound
(``privacy.skellam``), and PRV, which has no Skellam mechanism, is not shown.

With ``--history OUT/history.json`` it also checks every ledger against the anchors (row count,
head hash) its site reported to the server each round: a ledger whose tail was truncated or
rewritten, which a hash chain alone cannot show, no longer extends them. A ledger belongs to the
site whose ``site-name`` is its file name (``site-0.db``), or else to the site whose anchors it
holds; a ledger that matches no site fails.

    fedlora privacy audit LEDGER [LEDGER ...] [--history HISTORY] [--json]

Exit code 0: every ledger is intact, consistent and within budget; 1: at least one is not;
2: a file is missing or not a privacy ledger.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from privacy.accountant import DP_ACCOUNTING_RTOL, History, epsilon_dp_accounting, epsilon_for
from privacy.skellam import SkellamRow
from privacy.ledger import Anchor, LedgerError, PrivacyLedger
from server.history import RoundRecord, load_history


@dataclass(frozen=True)
class AuditRow:
    """One spend row with its recorded and recomputed cumulative epsilons."""

    id: int
    run_id: str
    round: int
    recorded_at: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    mechanism: str
    privacy_unit: str
    recorded_epsilon: float
    opacus_epsilon: float
    dp_accounting_epsilon: float
    prv_epsilon: float | None  # None once a Skellam row (distributed DP) is in the history: PRV has none
    confirmed: bool
    max_epsilon: float
    budget_left: float


@dataclass(frozen=True)
class LedgerAudit:
    path: str
    site: str
    head_hash: str
    rows: list[AuditRow]
    chain_problems: list[str]
    epsilon_mismatches: list[str]
    budget_exceeded: list[str]
    anchor_problems: list[str] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)  # messages the site declined: no spend

    @property
    def ok(self) -> bool:
        return not (self.chain_problems or self.epsilon_mismatches or self.budget_exceeded or self.anchor_problems)


_TABLE_WIDTH = 120
_NUMERIC = {
    "noise_multiplier": float, "sample_rate": float, "steps": int, "delta": float,
    "epsilon": float, "max_epsilon": float,
}


def audit_ledger(path: str | Path, tolerance: float = 1e-6) -> LedgerAudit:
    """Audit one ledger file. ``tolerance`` is the relative gap allowed between the recorded
    epsilon and Opacus' recomputation (both run the same code, so only float noise).

    Raises FileNotFoundError or :class:`privacy.ledger.LedgerError` if it cannot be read.
    """
    with PrivacyLedger(path, read_only=True) as ledger:
        entries = ledger.entries()
        chain_problems = ledger.verify_chain()
        head_hash = ledger.head_hash()
    confirmed = {e.refers_to for e in entries if e.kind == "confirm"}
    rows: list[AuditRow] = []
    mismatches: list[str] = []
    exceeded: list[str] = []
    history: History = []
    for spend in (e for e in entries if e.kind == "spend"):
        label = f"row {spend.id} (run {spend.run_id}, round {spend.round})"
        # SQLite keeps text that an editor wrote into a REAL column as text.
        not_numbers = [c for c in _NUMERIC if not isinstance(getattr(spend, c), _NUMERIC[c])]
        if not_numbers:
            mismatches.extend(
                f"{label}: {c} holds {getattr(spend, c)!r}, not a number" for c in not_numbers
            )
            continue
        history.append(spend.charge.row)
        try:
            opacus = epsilon_for(history, spend.delta, spend.accountant)
            independent = epsilon_dp_accounting(history, spend.delta)
            distributed = any(isinstance(row, SkellamRow) for row in history)
            prv = None if distributed else opacus if spend.accountant == "prv" else epsilon_for(history, spend.delta, "prv")
        except ValueError as err:
            mismatches.append(f"{label}: cannot recompute epsilon: {err}")
            continue
        recorded = spend.epsilon
        if not _close(recorded, opacus, tolerance):
            mismatches.append(
                f"{label}: recorded epsilon {recorded:.6f} != {opacus:.6f} recomputed with "
                f"Opacus ({spend.accountant}) from the ledger's rows"
            )
        # dp-accounting is an RDP accountant: comparing it with a PRV epsilon means nothing.
        if spend.accountant == "rdp" and not _close(recorded, independent, DP_ACCOUNTING_RTOL):
            mismatches.append(
                f"{label}: recorded epsilon {recorded:.6f} differs from {independent:.6f} "
                f"recomputed with dp-accounting by more than {DP_ACCOUNTING_RTOL:.0%}"
            )
        if opacus > spend.max_epsilon:
            reason = " (non-private training)" if math.isinf(opacus) else ""
            exceeded.append(
                f"{label}: epsilon {opacus:.4f}{reason} > max-epsilon {spend.max_epsilon:.4f}"
            )
        rows.append(
            AuditRow(
                id=spend.id, run_id=spend.run_id, round=spend.round,
                recorded_at=spend.recorded_at, noise_multiplier=spend.noise_multiplier,
                sample_rate=spend.sample_rate, steps=spend.steps,
                max_grad_norm=spend.max_grad_norm, delta=spend.delta,
                accountant=spend.accountant, mechanism=spend.mechanism or "dp-sgd",
                privacy_unit=spend.privacy_unit or "row", recorded_epsilon=recorded, opacus_epsilon=opacus,
                dp_accounting_epsilon=independent, prv_epsilon=prv,
                confirmed=spend.id in confirmed, max_epsilon=spend.max_epsilon,
                budget_left=spend.max_epsilon - opacus,
            )
        )
    refusals = [{"id": e.id, "run_id": e.run_id, "round": e.round, "recorded_at": e.recorded_at, "reason": e.reason}
                for e in entries if e.kind == "refusal"]
    return LedgerAudit(
        path=str(path), site=Path(path).stem, head_hash=head_hash, rows=rows,
        chain_problems=chain_problems, epsilon_mismatches=mismatches, budget_exceeded=exceeded, refusals=refusals,
    )


def check_anchors(path: str | Path, history: list[RoundRecord]) -> tuple[str | None, list[str]]:
    """The site (its ``site-name``) whose ledger ``path`` is, by file name or by the anchors it
    holds, and the ledger's problems against that site's anchors in a run's ``history.json``."""
    reported: dict[str, list[tuple[int, Anchor]]] = {}
    for record in history:
        for entry in [*record.clients, *record.evaluations]:
            if entry.ledger:
                anchor = Anchor(int(entry.ledger["rows"]), str(entry.ledger["head"]))
                reported.setdefault(entry.client, []).append((record.round, anchor))
    with PrivacyLedger(path, read_only=True) as ledger:
        site = Path(path).stem
        if site not in reported:
            held = [name for name, anchors in reported.items() if any(ledger.extends(a) for _, a in anchors)]
            if len(held) != 1:
                return None, [f"no site in the history matches this ledger (sites: {', '.join(sorted(reported)) or 'none'}); "
                              "name the file after its site-name"]
            site = held[0]
        return site, [
            f"round {round_}: site {site} reported {anchor.rows} ledger rows ending in hash "
            f"{anchor.head[:12]}...; this ledger no longer holds that row (its tail was removed or rewritten)"
            for round_, anchor in reported[site] if not ledger.extends(anchor)
        ]


def audit_main(argv: list[str] | None = None) -> int:
    """``fedlora privacy audit``: print one table (or a JSON document) for all ledgers."""
    parser = argparse.ArgumentParser(
        prog="fedlora privacy audit",
        description="Verify privacy ledgers: hash chain, epsilon recomputed with Opacus and "
        "dp-accounting, budgets. Exit 0 if all are OK, 1 if not, 2 if a file cannot be read.",
    )
    parser.add_argument("ledgers", nargs="+", metavar="LEDGER", help="a site's ledger file (.db)")
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of tables")
    parser.add_argument("--history", metavar="HISTORY", help="a run's history.json: check each ledger still extends what its site reported")
    args = parser.parse_args(argv)
    history = None
    if args.history:
        try:
            history = load_history(Path(args.history))
        except ValueError as err:
            print(f"fedlora privacy audit: error: --history {args.history}: {err}", file=sys.stderr)
            return 2

    audits: list[LedgerAudit] = []
    unreadable = False
    # Opacus advises widening its order grid when the optimum sits at the edge; the epsilon is
    # still a valid bound, and the advice would only clutter the auditor's report.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        # PRV at q = 1 (an evaluation release) takes log(1 - q) = -inf on purpose; the value is right.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus.accountants.analysis.prv")
        for path in args.ledgers:
            try:
                audit = audit_ledger(path)
                if history is not None:
                    site, problems = check_anchors(path, history)
                    audit = replace(audit, site=site or audit.site, anchor_problems=problems)
                audits.append(audit)
            except (FileNotFoundError, LedgerError) as err:
                print(f"fedlora privacy audit: error: {err}", file=sys.stderr)
                unreadable = True
    if unreadable:
        return 2
    if args.json:
        document = {"ok": all(a.ok for a in audits), "ledgers": [_ledger_json(a) for a in audits]}
        print(json.dumps(document, indent=2))
    else:
        # Off a terminal (CI logs, files) Rich would squeeze the table into 80 columns.
        console = Console() if sys.stdout.isatty() else Console(width=_TABLE_WIDTH)
        for audit in audits:
            _print_audit(console, audit)
    return 0 if all(a.ok for a in audits) else 1


def _close(recorded: float, recomputed: float, rtol: float) -> bool:
    if math.isinf(recorded) or math.isinf(recomputed):
        return recorded == recomputed
    return math.isclose(recorded, recomputed, rel_tol=rtol, abs_tol=1e-12)


def _ledger_json(audit: LedgerAudit) -> dict[str, Any]:
    """JSON has no infinity: a non-private epsilon is written as the string "inf"."""
    return {
        "site": audit.site,
        "path": audit.path,
        "ok": audit.ok,
        "head_hash": audit.head_hash,
        "rows": [
            {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in asdict(row).items()}
            for row in audit.rows
        ],
        "problems": {
            "chain": audit.chain_problems,
            "epsilon_mismatch": audit.epsilon_mismatches,
            "budget_exceeded": audit.budget_exceeded,
            "history_anchor": audit.anchor_problems,
        },
        "refusals": audit.refusals,
    }


def _print_audit(console: Console, audit: LedgerAudit) -> None:
    """One table per ledger, at most ``_TABLE_WIDTH`` columns wide: the full run ids, times and
    accountant names are in ``--json``."""
    accountants = ", ".join(sorted({row.accountant for row in audit.rows})) or "none"
    table = Table(
        title=escape(f"site {audit.site}  ({audit.path})"), title_justify="left",
        caption=f"eps: as recorded; opacus, dp-acc: recomputed ({accountants}); prv: Opacus' PRV bound (- with a Skellam row)",
        caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
    )
    left_aligned = ("run", "mechanism", "unit", "status")
    # epsilon: as recorded, recomputed with Opacus and with dp-accounting, and Opacus' PRV bound
    for header in ("id", "run", "rnd", "mechanism", "unit", "sigma", "q", "steps", "C", "delta",
                   "eps", "opacus", "dp-acc", "prv", "status", "left"):
        table.add_column(header, justify="left" if header in left_aligned else "right")
    for row in audit.rows:
        table.add_row(
            str(row.id), escape(row.run_id[-6:]), str(row.round),
            escape(row.mechanism), escape(row.privacy_unit),
            f"{row.noise_multiplier:.4g}", f"{row.sample_rate:.3g}", str(row.steps),
            f"{row.max_grad_norm:.3g}", f"{row.delta:.0e}",
            f"{row.recorded_epsilon:.4f}", f"{row.opacus_epsilon:.4f}",
            f"{row.dp_accounting_epsilon:.4f}", "-" if row.prv_epsilon is None else f"{row.prv_epsilon:.4f}",
            "confirmed" if row.confirmed else "[yellow]pending[/]",
            f"{row.budget_left:.4f}" if row.budget_left >= 0 else f"[red]{row.budget_left:.4f}[/]",
        )
    console.print(table)
    console.print(f"head hash {audit.head_hash}")
    for refusal in audit.refusals:
        console.print(f"refused (spent nothing): row {refusal['id']}, run {escape(refusal['run_id'][-6:])}, "
                      f"round {refusal['round']}: {escape(refusal['reason'] or '')}", highlight=False, soft_wrap=True)
    for heading, problems in (
        ("hash chain", audit.chain_problems),
        ("epsilon mismatch", audit.epsilon_mismatches),
        ("budget exceeded", audit.budget_exceeded),
        ("history anchor", audit.anchor_problems),
    ):
        for problem in problems:
            console.print(f"[red]{heading}:[/] {escape(problem)}", highlight=False, soft_wrap=True)  # one line each
    console.print("[green]OK[/]" if audit.ok else "[red]FAILED[/]")
    console.print()
