"""Seconds from a training message to the start of training at a deployed site.

    .venv/bin/python benchmarks/site_startup.py [--repeats 3] [--json results.json]

A deployed SuperNode runs each message in a fresh ClientApp process (Flower's default
``--isolation subprocess``; ``flwr-clientapp`` takes one app execution per process), so every
round pays for a process start. Each repeat starts such a process, with the project's default
run config (embedded MiniLM-L6, DP on) and a site of 500 generated notes, and hands the train
message to fedlora's ClientApp. Timed in the child, from the parent's clock just before it
starts the process:

* ``import client.app``: the interpreter and the ClientApp module (the training stack is
  imported lazily, by the handlers that need it);
* ``training starts``: the site's first optimizer step is about to run (torch, transformers,
  peft and Opacus imported, the model and the site's file loaded, rows tokenised, the ledger
  opened and the plan charged);
* ``reply``: the update is ready to be sent.

The server's initial adapter is built in the parent and handed over in a file, so the child
does only what a site does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
started = float(sys.argv[1])
marks = {}
import client.app as client_app
marks["import client.app"] = time.time() - started
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
import client.training
train = client.training.train

def timed_train(*args, **kwargs):
    marks["training starts"] = time.time() - started
    return train(*args, **kwargs)

client.training.train = timed_train  # before client.site imports it
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as the SuperNode sets them
arrays = np.load(sys.argv[2])
message = Message(RecordDict({"arrays": ArrayRecord({k: Array(arrays[k]) for k in arrays.files}),
                              "config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
context = Context(run_id=1, node_id=7, node_config=json.loads(sys.argv[3]), state=RecordDict(),
                  run_config=json.loads(sys.argv[4]))
reply = client_app.app(message, context)
assert not reply.has_error() and "arrays" in reply.content, reply.error if reply.has_error() else reply.content
marks["reply"] = time.time() - started
print(json.dumps(marks))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)

    import numpy as np

    from fedlora.corpus import CLINICAL_LABELS, generate_clinical_corpus
    from fedlora.run_config import RunSettings, default_run_config
    from server.global_model import GlobalModel

    run_config = {**default_run_config(), "label-names": ",".join(CLINICAL_LABELS)}  # public under DP
    arrays = GlobalModel.load(RunSettings.parse(run_config)).arrays()
    runs = []
    with tempfile.TemporaryDirectory() as work:
        data = Path(work, "site.csv")
        generate_clinical_corpus(num_samples=500, seed=1).to_csv(data)
        np.savez(Path(work, "adapter.npz"), **{name: array.numpy() for name, array in arrays.items()})
        for repeat in range(args.repeats):
            node_config = {"data-path": str(data), "ledger-path": str(Path(work, f"ledger-{repeat}.db")), "num-examples": 500}
            started = time.time()
            child = subprocess.run([sys.executable, "-c", CHILD, str(started), str(Path(work, "adapter.npz")),
                                    json.dumps(node_config), json.dumps(run_config)],
                                   capture_output=True, text=True, check=False)
            if child.returncode != 0:
                sys.exit(f"the site process failed:\n{child.stderr[-3000:]}")
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(", ".join(f"{mark} {seconds:.2f} s" for mark, seconds in runs[-1].items()), flush=True)
    means = {mark: statistics.mean(run[mark] for run in runs) for mark in runs[0]}
    print("mean: " + ", ".join(f"{mark} {seconds:.2f} s" for mark, seconds in means.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "mean_seconds": means}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
