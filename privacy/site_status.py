"""``fedlora site status``: where a site's privacy budget stands, from its own ledger.

For the site's operator, before agreeing to a run: the epsilon its ledger records (composed over
every spend row, at the site's delta), what is left of its lifetime ``max-epsilon``, each run's
own spend, the refusals recorded, and the **allowance of the next run**: the most a new run may
spend, ``max-epsilon-per-run`` or ``RUN_SHARE`` of what is left (``privacy.budget``). The limits
come from the site's node config, given as the SuperNode is given it:

    fedlora site status --ledger PATH [--node-config node-config.toml | 'max-epsilon=8 ...'] [--json]

A ledger that does not exist yet is a site that has spent nothing. Exit code 0; 2 when the
ledger cannot be read or the node config is not a valid policy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from privacy.budget import RUN_SHARE, PolicyViolation, run_allowance, site_policy
from privacy.ledger import LedgerError, PrivacyLedger
from privacy.plan import ACCOUNTANT
from privacy.accountant import epsilon_for


def site_status(ledger_path: str, node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The site's budget as its ledger and node config define it."""
    policy = site_policy(node_config)
    spends, refusals = [], []
    if Path(ledger_path).exists():  # else a new site: nothing spent yet
        with PrivacyLedger(ledger_path, read_only=True) as ledger:
            spends, refusals = ledger.spends(), ledger.refusals()
    runs: dict[str, list] = {}
    for entry in spends:
        runs.setdefault(entry.run_id, []).append(entry)
    spent = epsilon_for([e.charge.row for e in spends], policy.delta, ACCOUNTANT)
    left = max(0.0, policy.max_epsilon - spent)
    return {
        "ledger": str(ledger_path),
        "delta": policy.delta,
        "max_epsilon": policy.max_epsilon,
        "spent": spent,
        "left": left,
        "next_run_allowance": run_allowance(policy.max_epsilon, policy.max_epsilon_per_run, spent),
        "ledger_exists": Path(ledger_path).exists(),
        "max_epsilon_per_run": policy.max_epsilon_per_run,
        "runs": [
            {"run_id": run_id, "rounds": len({e.round for e in rows}), "first": rows[0].recorded_at,
             "epsilon": epsilon_for([e.charge.row for e in rows], policy.delta, ACCOUNTANT)}
            for run_id, rows in runs.items()
        ],
        "refusals": [{"run_id": r.run_id, "round": r.round, "recorded_at": r.recorded_at, "reason": r.reason}
                     for r in refusals],
    }


def print_status(status: dict[str, Any]) -> None:
    rule = (f"max-epsilon-per-run {status['max_epsilon_per_run']:g}" if status["max_epsilon_per_run"]
            else f"{RUN_SHARE:.0%} of what is left")
    print(f"ledger {status['ledger']} (delta {status['delta']:g})"
          + ("" if status["ledger_exists"] else ": not there yet, so nothing is spent (check the path if this site trained)"))
    print(f"  spent      epsilon {status['spent']:.4f} of max-epsilon {status['max_epsilon']:g}")
    print(f"  left       {status['left']:.4f}")
    print(f"  next run   may spend up to {status['next_run_allowance']:.4f} ({rule}); "
          "a run's target-epsilon is capped to it")
    for run in status["runs"]:
        print(f"  run {run['run_id']}: {run['rounds']} round(s) from {run['first'][:19]}, epsilon {run['epsilon']:.4f}")
    for refusal in status["refusals"]:
        print(f"  refused: run {refusal['run_id']} round {refusal['round']} at {refusal['recorded_at'][:19]}: {refusal['reason']}")


def status_main(argv: list[str] | None = None) -> int:
    from fedlora.cli import UsageError, parse_assignments

    parser = argparse.ArgumentParser(prog="fedlora site status", description=__doc__.splitlines()[0])
    parser.add_argument("--ledger", required=True, help="the site's ledger (node config ledger-path)")
    parser.add_argument("--node-config", action="append", default=[], metavar="FILE or 'k=v k2=v2'",
                        help="the SuperNode's node config (its TOML file or key=value pairs, as flower-supernode "
                             "takes it), for max-epsilon, max-epsilon-per-run and delta")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        node_config: dict[str, Any] = {}
        for item in args.node_config:
            node_config |= tomllib.loads(Path(item).read_text()) if Path(item).is_file() else parse_assignments([item])
        status = site_status(args.ledger, node_config)
    except (FileNotFoundError, LedgerError, PolicyViolation, UsageError, tomllib.TOMLDecodeError) as err:
        print(f"fedlora site status: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return 0
