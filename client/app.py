"""fedlora's ClientApp: what runs at a partner site (a Flower SuperNode) or a simulated one.

Each training round: check the server's DP request against the site's own policy, load the
site's data, charge the privacy ledger *before* training, train the adapter with DP-SGD,
confirm the charge, and send back only adapter tensors and whitelisted scalars. A site that
cannot or will not train replies with a ``status`` record and no weights; the federation
goes on without it.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.outgoing_guard import outgoing_guard
from client.site import RefusedRound, Site

app = ClientApp(mods=[outgoing_guard])


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = Site(context)
    try:
        config = msg.content["config"]
        proximal_mu = float(config.get("proximal-mu", 0.0))  # sent by FedProx only
        outcome = site.train(msg.content["arrays"], int(config["server-round"]), proximal_mu)
    except RefusedRound as refusal:
        return _status_reply(msg, site, refusal)
    content = RecordDict(
        {
            "arrays": ArrayRecord(outcome.adapter),
            "metrics": MetricRecord(outcome.metrics),
            "site": _site_record(site),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = Site(context)
    try:
        metrics = site.evaluate(msg.content["arrays"])
    except RefusedRound as refusal:
        return _status_reply(msg, site, refusal)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(site)})
    return Message(content=content, reply_to=msg)


def _site_record(site: Site) -> ConfigRecord:
    """The site's chosen display name (node config ``site-name``), for the server's reports."""
    return ConfigRecord({"name": site.name})


def _status_reply(msg: Message, site: Site, refusal: RefusedRound) -> Message:
    """No weights: only why this site sits the round out."""
    status = ConfigRecord({"status": refusal.status, "reason": refusal.reason})
    content = RecordDict(
        {"status": status, "metrics": MetricRecord({"num-examples": 0}), "site": _site_record(site)}
    )
    return Message(content=content, reply_to=msg)
