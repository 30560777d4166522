"""The ``fedlora`` command: simulate, evaluate, predict, privacy plan and audit, certs, site key,
status and check.

Every ``simulate`` option is a run-config key (``--rounds`` is ``num-server-rounds``, and so
on; ``--set key=value`` reaches any other), so ``flwr run . -c ...`` and this command share one
source of truth: ``[tool.flwr.app.config]`` in pyproject.toml.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.history import SIMULATION_FILE, RunFailed

if TYPE_CHECKING:
    from fedlora.run_config import RunSettings

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


DEFAULT_OUTPUTS = Path("outputs")


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


def resolve_simulation(args: argparse.Namespace) -> tuple[RunSettings, dict[str, Any]]:
    """The run config and the simulated sites' settings that ``simulate`` (and ``privacy plan``)
    options describe; nothing is written. The simulation's own keys (``attack``...,
    ``simulations.attacks``) go into the sites' settings, never into the run config."""
    from fedlora.run_config import ConfigError, RunSettings, apply_overrides, default_run_config
    from simulations.attacks import ATTACK_KEYS, Attack

    overrides: dict[str, Any] = {}
    sites: dict[str, Any] = {"num-clients": 3, "node-config": {}, "site-config": {}}
    if args.resume:
        out = Path(args.resume)
        if not (out / "config.json").is_file() or not (out / SIMULATION_FILE).is_file():
            raise UsageError(f"--resume {args.resume}: not the output directory of a fedlora simulation")
        overrides |= json.loads((out / "config.json").read_text())
        overrides |= {"resume": True, "output-dir": str(out.resolve())}
        sites = json.loads((out / SIMULATION_FILE).read_text())
    for option, key in SIMULATE_OPTIONS.items():
        if getattr(args, option) is not None:
            overrides[key] = getattr(args, option)
    overrides |= parse_assignments(args.set or [])
    attack_settings = {key: overrides.pop(key) for key in ATTACK_KEYS if key in overrides}
    if args.no_dp:
        overrides["dp"] = False
    from strategies.factory import build_strategy

    try:
        settings = RunSettings.parse(apply_overrides(default_run_config(), overrides))
        build_strategy(settings)  # its combinations (central DP with a plain mean...) checked now
    except KeyError as err:
        raise UsageError(err.args[0]) from err
    except ConfigError as err:
        raise UsageError(str(err)) from err
    if args.num_clients is not None:
        sites["num-clients"] = args.num_clients
    sites["node-config"] |= parse_assignments(args.node_config or [])
    if args.site_config:
        sites["site-config"] = {str(k): v for k, v in load_site_configs(args.site_config).items()}
    unknown = sorted(int(k) for k in sites["site-config"] if int(k) >= int(sites["num-clients"]))
    if unknown:
        raise UsageError(f"--site-config names site(s) {unknown}, but sites are 0..{int(sites['num-clients']) - 1}")
    if attack_settings:
        try:
            attack = Attack.from_settings(attack_settings, int(sites["num-clients"]), settings.seed)
        except ValueError as err:
            raise UsageError(str(err)) from err
        sites["attack"] = attack.record()
        if attack.kind == "label-flip" and settings.data.task != "classification":
            raise UsageError("attack: label-flip needs task = classification")
        if attack.kind != "label-flip" and settings.secure.secure_aggregation:
            raise UsageError(f"attack: {attack.kind} rewrites a site's update, which secure-aggregation masks "
                             "before it leaves; only label-flip (an attack on the data) runs with it")
    if not settings.dp.dp:
        # Turning DP off is explicit at both ends: the simulated sites allow it too.
        sites["node-config"].setdefault("dp", False)
    for key in ("min-train-nodes", "min-evaluate-nodes"):
        # Else the server would wait a whole round-timeout for sites that never come.
        minimum = getattr(settings.strategy, key.replace("-", "_"))
        if minimum > int(sites["num-clients"]):
            raise UsageError(f"{key} = {minimum} but the simulation has {sites['num-clients']} site(s): "
                             f"add --set {key}={sites['num-clients']}")
    return settings, sites


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedlora.console import print_summary, quiet_flower_console
    from simulations.attacks import Attack
    from simulations.simulate import run_simulation

    settings, sites = resolve_simulation(args)
    out_dir = _output_dir(settings.output_dir, resume=bool(args.resume))
    out_dir.mkdir(parents=True, exist_ok=True)
    # What the virtual sites were given, so that --resume brings back the same sites.
    (out_dir / SIMULATION_FILE).write_text(json.dumps(sites, indent=2))
    if not args.verbose:
        quiet_flower_console()
    failure = None
    try:
        run_simulation(
            replace(settings, output_dir=str(out_dir)),
            int(sites["num-clients"]),
            node_config=sites["node-config"],
            per_site={int(k): v for k, v in sites["site-config"].items()},
            attack=Attack.from_record(sites["attack"]) if sites.get("attack") else None,
            verbose=args.verbose,
        )
    except RunFailed as err:
        failure = str(err)
    if out_dir.parent == DEFAULT_OUTPUTS.resolve():
        latest = DEFAULT_OUTPUTS / "latest"
        latest.unlink(missing_ok=True)
        latest.symlink_to(out_dir.name)
    if failure is not None:
        print(f"fedlora simulate: run failed: {failure}; no adapter written (report: {out_dir / 'report.md'})",
              file=sys.stderr)
        return 1
    print_summary(out_dir)
    print(f"results: {out_dir} (report.md, history.json, adapter/, plots/)")
    return 0


def cmd_empirical(args: argparse.Namespace) -> int:
    """``fedlora privacy empirical``: a simulation with canaries, and a measured lower bound on epsilon."""
    from fedlora.console import quiet_flower_console
    from simulations.empirical import run_empirical

    if args.resume:
        raise UsageError("--resume: an empirical audit is one whole run; start a new one")
    settings, sites = resolve_simulation(args)
    out_dir = _output_dir(settings.output_dir, resume=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SIMULATION_FILE).write_text(json.dumps(sites, indent=2))
    if not args.verbose:
        quiet_flower_console()
    try:
        result = run_empirical(settings, sites, out_dir, args.canaries, args.canary_clients, args.verbose)
    except RunFailed as err:
        print(f"fedlora privacy empirical: run failed: {err} (report: {out_dir / 'report.md'})", file=sys.stderr)
        return 1
    except ValueError as err:
        raise UsageError(str(err)) from err
    theory = "none (no DP)" if result["epsilon_theory"] is None else f"{result['epsilon_theory']:.3f}"
    print(f"epsilon: lower bound {result['epsilon_lower_bound']:.3f} (measured, {result['method']}, "
          f"{result['confidence']:.0%}), upper bound {theory} (accountant, site-0)")
    site = result["site_level"]
    if site is not None:
        central = "none (no central DP)" if site["epsilon_theory"] is None else f"{site['epsilon_theory']:.3f}"
        print(f"site level: epsilon estimate {site['epsilon']:.3f} ({site['canaries']} canary clients), "
              f"central DP's accountant {central}")
    print(f"results: {out_dir} (empirical.md, empirical.json, plots/, report.md)")
    return 0


def _output_dir(given: str, resume: bool) -> Path:
    """A new timestamped folder under ``outputs/`` unless one is given. A fresh run never
    writes into a folder that already holds a run: its sites' ledgers belong to that run."""
    if not given:
        return (DEFAULT_OUTPUTS / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out = Path(given).expanduser().resolve()
    if not resume and ((out / "history.json").exists() or (out / "privacy").exists()):
        raise UsageError(f"{out} already holds a run: pass --resume {out} to continue it, or choose another --output")
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    """``fedlora privacy plan``: each simulated site's DP plan for the run, before it trains."""
    from simulations.site_plans import print_plans, simulated_site_plans

    settings, sites = resolve_simulation(args)
    plans = simulated_site_plans(settings, sites)
    if args.json:
        print(json.dumps(plans, indent=2))
    else:
        print_plans(plans, settings.num_server_rounds)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedlora.saved_adapter import evaluate_saved_adapter

    _check_adapter_dir(args.adapter)
    result = evaluate_saved_adapter(args.adapter, args.data, args.text_column, args.label_column, args.batch_size,
                                    args.base_model, args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['num_examples']} examples  loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedlora.saved_adapter import predict

    _check_adapter_dir(args.adapter)
    texts = list(args.text or [])
    if args.file:
        try:
            texts += [line.rstrip("\n") for line in Path(args.file).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise UsageError(f"--file {args.file}: {err.strerror or err}") from err
    if not texts:
        raise UsageError("give --text TEXT (repeatable) or --file FILE (one text per line)")
    results = predict(args.adapter, texts, args.base_model, args.max_new_tokens)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results if not args.json else ():
        answer = f"{result['label']}\t{result['probability']:.3f}" if "label" in result else result["generated"]
        print(f"{answer}\t{result['text']}")
    return 0


def _check_adapter_dir(path: str) -> None:
    if not (Path(path) / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {path}: not a saved adapter (no adapter_config.json); a run writes OUT/adapter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="run a multi-site federation on this machine")
    _add_simulation_options(sim)
    sim.set_defaults(func=cmd_simulate)

    ev = commands.add_parser("evaluate", help="accuracy and loss of a saved adapter on a labelled file")
    ev.add_argument("--adapter", required=True, help="an adapter directory written by fedlora (OUT/adapter)")
    ev.add_argument("--data", required=True, help="as simulate --data: embedded:clinical-notes, a CSV/JSONL/Parquet file, a save_to_disk folder or a hub name")
    ev.add_argument("--text-column", default="text")
    ev.add_argument("--label-column", default="label")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=42,
                    help="seed of embedded:clinical-notes (42, the run default, is the corpus the sites trained on)")
    ev.add_argument("--base-model", help="where the base model is on this machine, if the adapter names a local directory")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    pr = commands.add_parser("predict", help="a saved adapter's label (or continuation) for each text")
    pr.add_argument("--adapter", required=True, help="an adapter directory written by fedlora (OUT/adapter)")
    pr.add_argument("--text", action="append", help="a text to classify, or a prompt (repeatable)")
    pr.add_argument("--file", help="a file with one text per line")
    pr.add_argument("--base-model", help="where the base model is on this machine, if the adapter names a local directory")
    pr.add_argument("--max-new-tokens", type=int, default=64, help="causal-lm adapters: tokens to generate")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)

    privacy = commands.add_parser("privacy", help="privacy ledger tools")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    audit = privacy_commands.add_parser("audit", help="recompute and verify site ledgers", add_help=False)
    audit.set_defaults(func=lambda args: _delegate("privacy.audit", "audit_main", args.rest))
    plan = privacy_commands.add_parser(
        "plan", help="each simulated site's DP plan (q, steps, sigma, epsilon after each round) before training"
    )
    _add_simulation_options(plan)
    plan.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    plan.set_defaults(func=cmd_plan)
    empirical = privacy_commands.add_parser(
        "empirical", help="a simulation with canaries: a measured lower bound on epsilon next to the accountant's")
    _add_simulation_options(empirical)
    empirical.add_argument("--canaries", type=int, default=1000, help="canaries, each in site-0's data with probability 1/2")
    empirical.add_argument("--canary-clients", type=int, default=None,
                           help="canary clients in every round's mean, for a site-level estimate "
                                "(default: 100 under central DP, else none; 0: none)")
    empirical.set_defaults(func=cmd_empirical)

    certs = commands.add_parser("certs", help="create a CA and a TLS server certificate", add_help=False)
    certs.set_defaults(func=lambda args: _delegate("server.certificates", "certs_main", args.rest))
    superlink = commands.add_parser("superlink", help="Flower's SuperLink, logging joining keys by fingerprint and site",
                                    add_help=False)
    superlink.set_defaults(func=lambda args: _delegate("server.superlink", "superlink_main", args.rest))
    site = commands.add_parser("site", help="a partner site's tools: its key pair, its budget, a pre-flight check")
    site_commands = site.add_subparsers(dest="site_command", required=True)
    key = site_commands.add_parser("key", help="create the key pair its SuperNode authenticates with", add_help=False)
    key.set_defaults(func=lambda args: _delegate("client.site_key", "site_main", args.rest))
    status = site_commands.add_parser("status", help="its privacy budget: spent, left, the next run's allowance", add_help=False)
    status.set_defaults(func=lambda args: _delegate("privacy.site_status", "status_main", args.rest))
    check = site_commands.add_parser("check", help="before starting the SuperNode: reachable, TLS, key accepted",
                                     add_help=False)
    check.set_defaults(func=lambda args: _delegate("client.preflight", "check_main", args.rest))
    return parser


def _add_simulation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-clients", type=int, help="number of simulated sites (default 3)")
    parser.add_argument("--rounds", type=int, help="num-server-rounds")
    parser.add_argument("--data", help="embedded:clinical-notes, a CSV/JSONL/Parquet file, a save_to_disk folder or a hub name")
    parser.add_argument("--text-column")
    parser.add_argument("--label-column")
    parser.add_argument("--partition", help="iid | dirichlet:ALPHA | column:NAME")
    parser.add_argument("--model", help="hub id, local path or embedded:all-MiniLM-L6-v2")
    parser.add_argument("--task", choices=["classification", "causal-lm"])
    parser.add_argument("--strategy")
    parser.add_argument("--output", help="output directory (output-dir)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key (repeatable)")
    parser.add_argument("--no-dp", action="store_true", help="train WITHOUT differential privacy (dp=false)")
    parser.add_argument("--node-config", action="append", metavar="'k=v k2=v2'",
                        help="node config of every simulated site, e.g. 'max-epsilon=4 delta=1e-5'")
    parser.add_argument("--site-config", metavar="TOML", help="per-site node config: tables [site-0], [site-1], ...")
    parser.add_argument("--resume", metavar="DIR", help="continue a stopped run from its last checkpoint")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Flower's own lines and each simulated site's log")


def _delegate(module: str, function: str, argv: list[str]) -> int:
    import importlib

    return getattr(importlib.import_module(module), function)(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    delegated = args.command in ("certs", "site", "superlink") or getattr(args, "privacy_command", None) == "audit"
    if rest and not delegated:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"fedlora {args.command}: error: {err}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    """UsageError, and DataError/ModelError if their modules were loaded (else none was raised).

    Looked up lazily: importing fedlora.data/fedlora.model pulls in torch and transformers,
    several seconds that `fedlora certs` and `fedlora site` do not need."""
    errors: list[type[Exception]] = [UsageError]
    for module, name in (("fedlora.data", "DataError"), ("fedlora.model", "ModelError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
