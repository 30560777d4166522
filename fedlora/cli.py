"""The ``fedlora`` command: simulate, evaluate, privacy audit, certs, site.

Every ``simulate`` option is a run-config key (``--rounds`` is ``num-server-rounds``, and so
on; ``--set key=value`` reaches any other), so ``flwr run . -c ...`` and this command share one
source of truth: ``[tool.flwr.app.config]`` in pyproject.toml.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

SIMULATE_OPTIONS = {
    "rounds": "num-server-rounds",
    "data": "data",
    "text_column": "text-column",
    "label_column": "label-column",
    "partition": "partition",
    "model": "model",
    "task": "task",
    "output": "output-dir",
    "strategy": "strategy",
}


class UsageError(Exception):
    """A mistake in the command line or its files: printed as one line, exit code 2."""


def parse_value(text: str) -> Any:
    """A TOML literal (``8``, ``1e-5``, ``true``, ``"x"``), else the text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x y"]`` or ``["a=1 b=2"]`` (Flower's ``--node-config`` form) -> dict."""
    result: dict[str, Any] = {}
    for item in items:
        for pair in shlex.split(item):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UsageError(f"expected key=value, got {pair!r}")
            result[key.strip()] = parse_value(value.strip())
    return result


def load_site_configs(path: str | None) -> dict[int, dict[str, Any]]:
    """``--site-config sites.toml``: one table per simulated site, ``[site-0]``, ``[site-1]``..."""
    if not path:
        return {}
    try:
        tables = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"--site-config {path}: {err}") from err
    configs = {}
    for name, table in tables.items():
        index = name.removeprefix("site-")
        if not index.isdigit() or not isinstance(table, dict):
            raise UsageError(f"--site-config {path}: expected tables named [site-N], got [{name}]")
        configs[int(index)] = table
    return configs


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedlora.run_config import apply_overrides, default_run_config
    from simulations.simulate import run_simulation

    overrides: dict[str, Any] = {}
    num_clients = args.num_clients
    if args.resume:
        previous = Path(args.resume) / "config.json"
        if not previous.is_file():
            raise UsageError(f"--resume {args.resume}: no config.json there (not a fedlora output directory)")
        saved = json.loads(previous.read_text())
        num_clients = num_clients or saved.pop("num-clients", None)
        overrides |= {k: v for k, v in saved.items() if k in default_run_config()}
        overrides |= {"resume": True, "output-dir": str(Path(args.resume).resolve())}
    for option, key in SIMULATE_OPTIONS.items():
        if getattr(args, option) is not None:
            overrides[key] = getattr(args, option)
    overrides |= parse_assignments(args.set or [])
    if args.no_dp:
        overrides["dp"] = False
    try:
        config = apply_overrides(default_run_config(), overrides)
    except KeyError as err:
        raise UsageError(err.args[0]) from err
    node_config = parse_assignments(args.node_config or [])
    if not config["dp"]:
        # Turning DP off is explicit at both ends: the simulated sites allow it too.
        node_config.setdefault("dp", False)
    num_clients = int(num_clients or 3)
    config["num-clients"] = num_clients
    out_dir = run_simulation(
        {k: v for k, v in config.items() if k != "num-clients"},
        num_clients,
        node_config=node_config,
        per_site=load_site_configs(args.site_config),
    )
    _record_num_clients(out_dir, num_clients)
    print(f"results: {out_dir} (report.md, history.json, adapter/, plots/)")
    return 0


def _record_num_clients(out_dir: Path, num_clients: int) -> None:
    path = out_dir / "config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "num-clients": num_clients}, indent=2))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedlora.saved_adapter import evaluate_saved_adapter

    result = evaluate_saved_adapter(args.adapter, args.data, args.text_column, args.label_column, args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['num_examples']} examples  loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="run a multi-site federation on this machine")
    sim.add_argument("--num-clients", type=int, help="number of simulated sites (default 3)")
    sim.add_argument("--rounds", type=int, help="num-server-rounds")
    sim.add_argument("--data", help="embedded:clinical-notes, a CSV/JSONL/Parquet file, a save_to_disk folder or a hub name")
    sim.add_argument("--text-column")
    sim.add_argument("--label-column")
    sim.add_argument("--partition", help="iid | dirichlet:ALPHA | column:NAME")
    sim.add_argument("--model", help="hub id, local path or embedded:all-MiniLM-L6-v2")
    sim.add_argument("--task", choices=["classification", "causal-lm"])
    sim.add_argument("--strategy")
    sim.add_argument("--output", help="output directory (output-dir)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key (repeatable)")
    sim.add_argument("--no-dp", action="store_true", help="train WITHOUT differential privacy (dp=false)")
    sim.add_argument("--node-config", action="append", metavar="'k=v k2=v2'",
                     help="node config of every simulated site, e.g. 'max-epsilon=4 delta=1e-5'")
    sim.add_argument("--site-config", metavar="TOML", help="per-site node config: tables [site-0], [site-1], ...")
    sim.add_argument("--resume", metavar="DIR", help="continue a stopped run from its last checkpoint")
    sim.set_defaults(func=cmd_simulate)

    ev = commands.add_parser("evaluate", help="accuracy and loss of a saved adapter on a labelled file")
    ev.add_argument("--adapter", required=True, help="an adapter directory written by fedlora (OUT/adapter)")
    ev.add_argument("--data", required=True)
    ev.add_argument("--text-column", default="text")
    ev.add_argument("--label-column", default="label")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    privacy = commands.add_parser("privacy", help="privacy ledger tools")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    audit = privacy_commands.add_parser("audit", help="recompute and verify site ledgers", add_help=False)
    audit.set_defaults(func=lambda args: _delegate("privacy.audit", "audit_main", args.rest))

    certs = commands.add_parser("certs", help="create a CA and a TLS server certificate", add_help=False)
    certs.set_defaults(func=lambda args: _delegate("server.certificates", "certs_main", args.rest))
    site = commands.add_parser("site", help="create a site's key pair for node authentication", add_help=False)
    site.set_defaults(func=lambda args: _delegate("client.site_key", "site_main", args.rest))
    return parser


def _delegate(module: str, function: str, argv: list[str]) -> int:
    import importlib

    return getattr(importlib.import_module(module), function)(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("privacy", "certs", "site"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    from fedlora.data import DataError
    from fedlora.model import ModelError

    try:
        return int(args.func(args) or 0)
    except (UsageError, DataError, ModelError) as err:
        print(f"fedlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
