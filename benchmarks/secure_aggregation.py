"""What SecAgg+ costs a round: the protocol alone, and whole simulated rounds, with and without.

    python benchmarks/secure_aggregation.py --out /tmp/secagg [--sites 3,10,30] [--repeats 3] [--no-simulate]

1. *Protocol*: the server and N sites in this process, through the real site mods (outgoing
   guard, SecAgg+) and the real server code, on the default adapter's tensors (the embedded model,
   LoRA r=8 and the head), with a fixed update per site instead of training. "plain" is one
   round trip of fp32 updates, validated and averaged (``ScreenedStrategy``); "secagg" is the
   four-stage protocol and its unmasking (``server.secure_aggregation``). The two alternate
   (plain, secagg, then secagg, plain, ...) so that load hits both alike; each figure is the
   median of ``--repeats`` rounds. Bytes are the site's replies, all stages together.
2. *Simulation*: one round of ``fedlora simulate --num-clients N --no-dp`` with and without
   ``--set secure-aggregation=true``, the round's seconds from ``history.json`` (training
   included: what an operator waits for).

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.outgoing_guard import outgoing_guard
from client.secure_aggregation import masked_upload, secure_aggregation
from fedlora.run_config import RunSettings, apply_overrides, default_run_config
from server.global_model import GlobalModel
from server.progress import send_and_receive
from server.secure_aggregation import SecAggPlus
from strategies.factory import build_strategy


class InProcessGrid:
    """Sites as functions, answering at once; replies wait to be pulled as on a SuperLink."""

    def __init__(self, sites) -> None:
        self.sites, self._waiting, self.bytes_up = sites, {}, 0

    def get_node_ids(self):
        return list(self.sites)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            reply = self.sites[message.metadata.dst_node_id](message)
            ids.append(str(len(self._waiting) + len(ids) + time.perf_counter_ns()))
            self._waiting[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self._waiting.pop(i) for i in list(message_ids) if i in self._waiting]


def _site(node_id: int, update: dict[str, np.ndarray], weight: float, secure: bool):
    context = Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})

    def train(msg: Message, _context: Context) -> Message:
        received = msg.content["arrays"]
        sent = {name: array.numpy() + update[name] for name, array in received.items()}
        metrics = MetricRecord({"num-examples": weight, "train-loss": 1.0})
        if secure:
            content = masked_upload(sent, received, weight, 0.0)
        else:
            content = RecordDict({"arrays": ArrayRecord({n: Array(np.ascontiguousarray(v)) for n, v in sent.items()})})
        content["metrics"] = metrics
        content["site"] = ConfigRecord({"name": f"site-{node_id}"})
        return Message(content, reply_to=msg)

    return lambda msg: outgoing_guard(msg, context, lambda m, c: secure_aggregation(m, c, train))


def protocol_round(settings: RunSettings, arrays: ArrayRecord, sites: int, secure: bool) -> tuple[float, int]:
    """Seconds for one round (server and sites), and the bytes one site sent."""
    rng = np.random.default_rng(sites)
    shapes = {name: array.numpy().shape for name, array in arrays.items()}
    updates = [{n: (0.01 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()} for _ in range(sites)]
    grid = InProcessGrid({i + 1: _site(i + 1, updates[i], 100.0, secure) for i in range(sites)})
    strategy = build_strategy(settings)
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=i + 1, message_type="train") for i in range(sites)]
    strategy.configure_train(1, arrays, ConfigRecord({}), grid)  # sets the round's reference
    start = time.perf_counter()
    if secure:
        result = SecAggPlus(settings.secure, send_and_receive).run(grid, messages, 600.0, "bench")
        new, _ = strategy.aggregate_secure(1, result)
        sent = max(result.bytes_up.values())
    else:
        replies = send_and_receive(grid, messages, 600.0, "bench")
        sent = max(r.content["arrays"].count_bytes() for r in replies)
        new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    return time.perf_counter() - start, sent


def measure_protocol(sites: list[int], repeats: int) -> list[dict]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    base = apply_overrides(default_run_config(), {"min-train-nodes": 2, "update-norm-ratio": 0.0})
    plain, secure = RunSettings.parse(base), RunSettings.parse({**base, "secure-aggregation": True})
    arrays = GlobalModel.load(plain).arrays()
    results = []
    for n in sites:
        times: dict[bool, list[float]] = {False: [], True: []}
        sent: dict[bool, int] = {}
        load = os.getloadavg()[0]
        for i in range(repeats):
            for is_secure in ((False, True) if i % 2 == 0 else (True, False)):
                seconds, sent[is_secure] = protocol_round(secure if is_secure else plain, arrays, n, is_secure)
                times[is_secure].append(seconds)
        results.append({"part": "protocol", "sites": n, "plain_s": statistics.median(times[False]),
                        "secagg_s": statistics.median(times[True]), "plain_bytes_per_site": sent[False],
                        "secagg_bytes_per_site": sent[True], "load_at_start": round(load, 2)})
        print(json.dumps(results[-1]), flush=True)
    return results


def measure_simulation(sites: list[int], out: Path) -> list[dict]:
    results = []
    for n in sites:
        row = {"part": "simulation", "sites": n, "load_at_start": round(os.getloadavg()[0], 2)}
        for name, extra in (("plain", []), ("secagg", ["--set", "secure-aggregation=true"])):
            run_dir = out / "runs" / f"{name}-{n}"
            options = ["--num-clients", str(n), "--rounds", "1", "--no-dp", "--output", str(run_dir), *extra]
            done = subprocess.run([sys.executable, "-m", "fedlora.cli", "simulate", *options], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"failed: fedlora simulate {' '.join(options)}\n{done.stderr[-3000:]}")
            (record,) = json.loads((run_dir / "history.json").read_text())
            row[f"{name}_s"] = record["seconds"]
            row[f"{name}_accuracy"] = record["eval_accuracy"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| part | sites | plain round (s) | SecAgg+ round (s) | SecAgg+ / plain | bytes up per site, plain | SecAgg+ | load at start |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        plain_bytes = r.get("plain_bytes_per_site", "–")
        secure_bytes = r.get("secagg_bytes_per_site", "–")
        lines.append(f"| {r['part']} | {r['sites']} | {r['plain_s']:.2f} | {r['secagg_s']:.2f} | "
                     f"{r['secagg_s'] / r['plain_s']:.2f}x | {plain_bytes} | {secure_bytes} | {r['load_at_start']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sites", default="3,10,30")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-simulate", action="store_true", help="the protocol part only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sites = [int(n) for n in args.sites.split(",")]
    results = measure_protocol(sites, args.repeats)
    if not args.no_simulate:
        results += measure_simulation(sites, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
