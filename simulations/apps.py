"""The ServerApp and ClientApp of a simulated federation: fedlora's own server and site
handlers, given what a deployment gives them.

- The run config, which a deployment's SuperLink hands to both ends (``flwr run . -c``):
  Flower's public ``run_simulation`` takes none (and a context's run config is read-only), so
  both apps hand the simulation's to fedlora's handlers.
- Each virtual site's node config, which a real SuperNode gets from ``flower-supernode
  --node-config``: Flower's engine gives virtual sites only ``partition-id``/``num-partitions``,
  so a mod adds the site's own settings (data path, ledger path, budget, delta, rank...) before
  the handler runs, and simulated sites enforce exactly what deployed ones do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp

from client import app as site_handlers
from client.outgoing_guard import outgoing_guard
from client.secure_aggregation import secure_aggregation
from fedlora.console import quiet_flower_console
from fedlora.run_config import RunSettings
from server.app import run_server
from simulations.attacks import Attack
from simulations.canary_clients import CanaryClients


def build_server_app(settings: RunSettings, canary_clients: CanaryClients | None = None) -> ServerApp:
    """fedlora's ServerApp on ``settings``; with ``canary_clients``, they join every round's mean."""
    app = ServerApp()
    insertion = canary_clients.insertion(settings) if canary_clients is not None else None

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context.run_id, settings, insertion)

    return app


def build_site_app(
    settings: RunSettings, site_configs: Mapping[int, Mapping[str, Any]], attack: Attack | None = None,
    verbose: bool = False,
) -> ClientApp:
    """A ClientApp whose site with partition id ``i`` runs with node config ``site_configs[i]``;
    with an ``attack``, its attackers' replies are rewritten after their honest site (and its
    outgoing guard) produced them. Unless ``verbose``, a simulated site logs only its warnings
    (its refusals among them): its INFO lines are what a deployed site keeps in its own log."""

    def with_site_config(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not verbose:  # in the worker process that runs the site
            quiet_flower_console(site=True)
        context.node_config.update(site_configs.get(int(context.node_config["partition-id"]), {}))
        return call_next(msg, context)

    attacking = [attack.mod(settings.seed, settings.strategy.upload_dtype)] if attack is not None else []
    # The handlers read the run config as a deployed site reads its SuperLink's: flat, and
    # parsed at their edge.
    run_config = settings.as_dict()
    app = ClientApp(mods=[with_site_config, *attacking, outgoing_guard, secure_aggregation])
    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return site_handlers.train_site(msg, context, run_config)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return site_handlers.evaluate_site(msg, context, run_config)

    return app
