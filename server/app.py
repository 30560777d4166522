"""fedlora's ServerApp: aggregates LoRA adapter updates from the sites.

Writes everything into ``output-dir`` (an absolute path on the coordinator is best):
``config.json``, ``history.json``, ``checkpoints/round-<r>/``, ``adapter/``, ``report.md``,
``privacy_report.{md,json}``, ``plots/``. With ``resume=true`` it continues from the newest checkpoint there.
A run in which no round aggregated any update writes no ``adapter/`` and fails (``RunFailed``).
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.checkpoints import check_resumable, latest_checkpoint, restore, save_checkpoint
from server.federation import Federation
from server.global_model import GlobalModel
from server.history import RunFailed, run_failure, save_history, write_json
from server.privacy_report import write_privacy_report
from server.report import write_report
from strategies.factory import build_strategy
from strategies.server_state import load_optimizer_state, optimizer_state

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    out_dir = Path(str(run_config["output-dir"]) or f"outputs/run-{context.run_id}").expanduser().resolve()
    global_model = GlobalModel.load(run_config)
    strategy = build_strategy(run_config)
    start_round, history = 1, []
    if run_config["resume"] and (checkpoint := latest_checkpoint(out_dir)) is not None:
        check_resumable(out_dir, run_config)
        restore(global_model.model, checkpoint)
        load_optimizer_state(strategy, checkpoint.server_optimizer())
        start_round, history = checkpoint.round + 1, checkpoint.history
        log(INFO, "resuming %s from round %s", out_dir, checkpoint.round)
    write_json(out_dir / "config.json", {**run_config, "output-dir": str(out_dir)})

    central_data = str(run_config["central-eval-data"])
    federation = Federation(
        grid=grid,
        strategy=strategy,
        num_rounds=int(run_config["num-server-rounds"]),
        timeout=float(run_config["round-timeout"]),
        train_config={},
        evaluate_config={},
        central_eval=global_model.central_evaluator(central_data) if central_data else None,
        flag_after=int(run_config["flag-after-rejections"]),
    )

    def on_round(server_round, arrays, rounds) -> None:
        global_model.set_arrays(arrays)
        save_checkpoint(out_dir, server_round, global_model.model, global_model.tokenizer, global_model.metadata, rounds,
                        optimizer_state(strategy))
        save_history(out_dir, rounds)
        write_report(out_dir, run_config, rounds)
        write_privacy_report(out_dir, run_config, rounds)

    arrays = federation.run(global_model.arrays(), start_round, history, on_round)
    failure = run_failure(history)
    if failure is None:  # an untrained adapter is never written as the run's result
        global_model.set_arrays(arrays)
        global_model.save(out_dir / "adapter")
    save_history(out_dir, history)
    write_report(out_dir, run_config, history)
    write_privacy_report(out_dir, run_config, history)
    if failure is not None:
        log(ERROR, "run failed: %s; no adapter written, see %s", failure, out_dir / "report.md")
        raise RunFailed(failure)  # Flower ends the run as failed
    log(INFO, "results in %s", out_dir)
