"""fedlora's ServerApp: aggregates LoRA adapter updates from the sites.

Writes everything into ``output-dir`` (an absolute path on the coordinator is best):
``config.json``, ``history.json``, ``checkpoints/round-<r>/``, ``adapter/``, ``report.md``,
``privacy_report.{md,json}``, ``plots/``. With ``resume=true`` it continues from the newest checkpoint there.
A run in which no round aggregated any update writes no ``adapter/`` and fails (``RunFailed``).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedlora.run_config import ConfigError, RunSettings
from server.checkpoints import check_resumable, latest_checkpoint, restore, save_checkpoint
from server.federation import Federation
from server.global_model import GlobalModel
from server.history import RunFailed, run_failure, save_history, write_json
from server.privacy_report import write_privacy_report
from server.progress import send_and_receive
from server.secure_aggregation import SecAggPlus
from server.report import write_report
from strategies.factory import build_strategy
from strategies.server_state import load_optimizer_state, optimizer_state

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = RunSettings.parse(context.run_config)
    except ConfigError as err:
        raise _refused(err) from err
    run_server(grid, context.run_id, settings)


def _refused(err: ConfigError) -> RunFailed:
    """One line naming the key, not a stack trace; Flower ends the run as failed."""
    log(ERROR, "the run config cannot be used: %s", err)
    return RunFailed(str(err))


def run_server(
    grid: Grid, run_id: int, settings: RunSettings, around_aggregation: Callable[[Strategy], Strategy] | None = None,
) -> None:
    """The whole run: rounds, checkpoints, the adapter and the reports. ``around_aggregation``:
    as in ``strategies.factory.build_strategy`` (a simulation's site-level audit)."""
    out_dir = Path(settings.output_dir or f"outputs/run-{run_id}").expanduser().resolve()
    global_model = GlobalModel.load(settings)
    start_round, history = 1, []
    try:
        strategy = build_strategy(settings, around_aggregation)
        checkpoint = latest_checkpoint(out_dir) if settings.resume else None
        if checkpoint is not None:
            check_resumable(out_dir, checkpoint, settings, global_model.label_names)
    except ConfigError as err:
        raise _refused(err) from err
    if checkpoint is not None:
        restore(global_model.model, checkpoint)
        load_optimizer_state(strategy, checkpoint.server_optimizer())
        start_round, history = checkpoint.round + 1, checkpoint.history
        log(INFO, "resuming %s from round %s", out_dir, checkpoint.round)
    write_json(out_dir / "config.json", {**settings.as_dict(), "output-dir": str(out_dir)})

    federation = Federation(
        grid=grid,
        strategy=strategy,
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        train_config={},
        evaluate_config={},
        central_eval=global_model.central_evaluator(settings.central_eval_data) if settings.central_eval_data else None,
        flag_after=settings.strategy.flag_after_rejections,
        secure=(SecAggPlus(settings.secure, send_and_receive, min_updates=settings.secure_sum_minimum,
                           distributed_step=settings.distributed_step if settings.dp.distributed else None)
                if settings.secure.secure_aggregation else None),
    )

    def on_round(server_round, arrays, rounds) -> None:
        global_model.set_arrays(arrays)
        save_checkpoint(out_dir, server_round, global_model.model, global_model.tokenizer, global_model.metadata, rounds,
                        optimizer_state(strategy))
        save_history(out_dir, rounds)
        write_report(out_dir, settings, rounds)
        write_privacy_report(out_dir, settings, rounds)

    arrays = federation.run(global_model.arrays(), start_round, history, on_round)
    failure = run_failure(history)
    if failure is None:  # an untrained adapter is never written as the run's result
        global_model.set_arrays(arrays)
        global_model.save(out_dir / "adapter")
    save_history(out_dir, history)
    write_report(out_dir, settings, history)
    write_privacy_report(out_dir, settings, history)
    if failure is not None:
        log(ERROR, "run failed: %s; no adapter written, see %s", failure, out_dir / "report.md")
        raise RunFailed(failure)  # Flower ends the run as failed
    log(INFO, "results in %s", out_dir)
