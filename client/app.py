"""fedlora's ClientApp: what runs at a partner site (a Flower SuperNode) or a simulated one.

Each training round: read the run config (once, here, into ``fedlora.run_config.RunSettings``),
check the server's DP request against the site's own policy, load the site's data, charge the
privacy ledger *before* training, train the adapter with DP-SGD, release the noised metrics,
confirm the charges, and send back only adapter tensors (as ``upload-dtype`` encodes them,
``fedlora.upload_codec``; in a SecAgg+ round, its update masked, ``client.secure_aggregation``),
public scalars and the ledger's anchor.
A site that cannot or will not train replies with a ``status`` record (a code and a setting
name, ``client.refusals``) and no weights; the full reason goes to the site's own log, the code
and setting to its ledger (a row that spends nothing), and the federation goes on without it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.outgoing_guard import outgoing_guard
from client.refusals import SETTINGS, RefusedRound
from client.secure_aggregation import (
    check_distributed_round, grid_upload, is_secure_round, masked_upload, secure_aggregation,
)
from fedlora.run_config import ConfigError, RunSettings
from fedlora.upload_codec import encode_upload

if TYPE_CHECKING:
    from privacy.ledger import Anchor

# A deployed site starts a fresh ClientApp process for every message. The site's training stack
# (torch, transformers, peft, Opacus: about 4 s of imports) is imported by the handlers that train,
# evaluate or refuse, never at load: a SecAgg+ round's key, share and unmask stages answer without it.
app = ClientApp(mods=[outgoing_guard, secure_aggregation])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_site(msg, context, context.run_config)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_site(msg, context, context.run_config)


def train_site(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """A training round under ``run_config``: the SuperLink's for a deployed site (the context's),
    the simulation's for a simulated one."""
    from client.site import record_refusal

    config = msg.content["config"]
    server_round = int(config["server-round"])
    secure = is_secure_round(msg)
    try:
        settings = _settings(run_config)
        if secure:
            _check_secure_site(context, settings)
            if settings.dp.distributed:
                check_distributed_round(context, settings)
        elif settings.dp.distributed:  # one site's vector alone would carry only its share of the noise
            raise RefusedRound("policy-refused", "secure-aggregation", "dp-mode = distributed, but this round is "
                               "not a SecAgg+ round; a site's share of the noise protects nothing alone")
        proximal_mu = float(config.get("proximal-mu", 0.0))  # sent by FedProx only
        site = _site_class(settings)(context, settings)
        outcome = site.train(msg.content["arrays"], server_round, proximal_mu)
        weight = float(outcome.metrics["num-examples"])
        if secure and outcome.grid is None and weight > settings.secure.secagg_max_weight:  # a site that declares no size (no DP)
            raise RefusedRound("config-error", "secagg-max-weight",
                               f"this site's FedAvg weight {weight:g} exceeds secagg-max-weight; SecAgg+ would overflow")
    except RefusedRound as refusal:
        record_refusal(context, refusal, server_round, "training")
        reply = _status_reply(msg, context, refusal)
        if secure:  # its masks must still reach the sum: a zero update at weight 0
            for name, record in masked_upload({}, msg.content["arrays"], 0.0, 0.0).items():
                reply.content[name] = record
        return reply
    adapter = {name: value.numpy() for name, value in outcome.adapter.items()}
    if outcome.grid is not None:
        upload = dict(grid_upload(outcome.grid, msg.content["arrays"], settings.secure.secagg_clipping_range,
                                  settings.secure.secagg_max_weight).items())
    elif secure:
        upload = dict(masked_upload(adapter, msg.content["arrays"], weight, settings.strategy.max_update_norm).items())
    else:
        # Stochastic rounding's randomness is the site's own: nothing the server knows seeds it.
        upload = {"arrays": encode_upload(adapter, {name: array.numpy() for name, array in msg.content["arrays"].items()},
                                          settings.strategy.upload_dtype, np.random.default_rng(secrets.randbits(128)))}
    content = RecordDict(
        {
            **upload,
            "metrics": MetricRecord(outcome.metrics),
            "site": _site_record(context),
            **_ledger_record(outcome.anchor),
        }
    )
    return Message(content=content, reply_to=msg)


def evaluate_site(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    from client.site import Site, record_refusal

    server_round = int(msg.content["config"]["server-round"])
    try:
        site = Site(context, _settings(run_config))
        outcome = site.evaluate(msg.content["arrays"], server_round)
    except RefusedRound as refusal:
        record_refusal(context, refusal, server_round, "evaluation")
        return _status_reply(msg, context, refusal)
    content = RecordDict(
        {"metrics": MetricRecord(outcome.metrics), "site": _site_record(context), **_ledger_record(outcome.anchor)}
    )
    return Message(content=content, reply_to=msg)


def _site_class(settings: RunSettings) -> type:
    """The round's site: DP-SGD (or no DP) trains locally; distributed DP sends a gradient."""
    if settings.dp.distributed:
        from client.distributed_site import DistributedSite

        return DistributedSite
    from client.site import Site

    return Site


def _check_secure_site(context: Context, settings: RunSettings) -> None:
    """What would make a SecAgg+ round fail after this site spent its budget on it, refused
    before it trains: a declared size (its FedAvg weight's bound) over ``secagg-max-weight``, an
    adapter of another rank than everyone's (its update could not be summed)."""
    declared = context.node_config.get("num-examples")
    if isinstance(declared, int | float) and declared > settings.secure.secagg_max_weight:
        raise RefusedRound("config-error", "secagg-max-weight",
                           f"node config num-examples {declared} exceeds secagg-max-weight; SecAgg+ would overflow")
    rank = context.node_config.get("lora-rank", settings.model.lora_rank)
    if rank != settings.model.lora_rank:
        raise RefusedRound("model-error", "lora-rank", f"secure aggregation sums adapters of the run's lora-rank "
                                                       f"{settings.model.lora_rank}; this site's node config says {rank}")


def _settings(run_config: Mapping[str, Any]) -> RunSettings:
    """The server's run config, typed; one that cannot be read is refused, naming its key (a
    key this site does not know is the server's own, and goes back as no setting)."""
    try:
        return RunSettings.parse(run_config)
    except ConfigError as err:
        raise RefusedRound("config-error", err.setting if err.setting in SETTINGS else "", str(err)) from err


def _site_record(context: Context) -> ConfigRecord:
    """The site's chosen display name (node config ``site-name``), for the server's reports."""
    from client.site import site_name

    return ConfigRecord({"name": site_name(context)})


def _ledger_record(anchor: Anchor | None) -> dict[str, ConfigRecord]:
    """The ledger's row count and head hash: the server keeps them in ``history.json``, and an
    audit with ``--history`` fails if the ledger later stops extending them."""
    return {} if anchor is None else {"ledger": ConfigRecord({"rows": anchor.rows, "head": anchor.head})}


def _status_reply(msg: Message, context: Context, refusal: RefusedRound) -> Message:
    """No weights and no metrics: only a code and a setting name (and the ledger's anchor)."""
    from privacy.ledger import ledger_anchor

    anchor = ledger_anchor(context.node_config.get("ledger-path"))
    content = RecordDict({"status": refusal.record(), "site": _site_record(context), **_ledger_record(anchor)})
    return Message(content=content, reply_to=msg)
