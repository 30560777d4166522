"""The ClientApp of a simulated federation: fedlora's own site handlers, each virtual site
given the node config a real SuperNode would get from ``flower-supernode --node-config``.

Flower's simulation engine gives virtual sites only ``partition-id``/``num-partitions``; a
mod adds the site's own settings (ledger path, budget, delta, rank...) before the handler
runs, so simulated sites enforce exactly what deployed ones do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client import app as site_handlers
from client.outgoing_guard import outgoing_guard
from simulations.attacks import Attack


def build_site_app(site_configs: Mapping[int, Mapping[str, Any]], attack: Attack | None = None, seed: int = 0) -> ClientApp:
    """A ClientApp whose site with partition id ``i`` runs with node config ``site_configs[i]``;
    with an ``attack``, its attackers' replies are rewritten after their honest site (and its
    outgoing guard) produced them."""

    def with_site_config(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        context.node_config.update(site_configs.get(int(context.node_config["partition-id"]), {}))
        return call_next(msg, context)

    attacking = [attack.mod(seed)] if attack is not None else []
    app = ClientApp(mods=[with_site_config, *attacking, outgoing_guard])
    app.train()(site_handlers.train)
    app.evaluate()(site_handlers.evaluate)
    return app
