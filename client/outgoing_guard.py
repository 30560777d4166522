"""The last check before anything leaves a site: a Flower client mod on every reply.

A reply may carry only (1) adapter tensors — LoRA ``A``/``B`` matrices and the task head peft
keeps in ``modules_to_save`` — under ``arrays``, (2) whitelisted scalar metrics under
``metrics``, and (3) a ``status`` record saying why a site did not train and a ``site`` record with
the site's chosen display name. Anything else (a
base-model weight, a raw example, a free-form string in the metrics) is a bug that would leak
data, so the reply is replaced by an error and nothing of it is sent.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedlora.adapters import is_adapter_key

ALLOWED_METRICS = frozenset(
    {
        "num-examples", "train-loss", "eval-loss", "eval-accuracy", "steps", "sample-rate",
        "noise-multiplier", "max-grad-norm", "epsilon", "delta", "max-epsilon", "dp",
        "seconds", "examples-per-second", "lora-rank",
    }
)
ALLOWED_RECORDS = {"arrays": ArrayRecord, "metrics": MetricRecord, "status": ConfigRecord, "site": ConfigRecord}
ALLOWED_FIELDS = {"status": frozenset({"status", "reason"}), "site": frozenset({"name"})}


class DisclosureError(RuntimeError):
    """A reply would have sent something other than adapters and whitelisted scalars."""


def check_outgoing(message: Message) -> None:
    """Raise ``DisclosureError`` naming the first thing that must not leave the site."""
    if message.has_error():
        return
    for name, record in message.content.items():
        expected = ALLOWED_RECORDS.get(name)
        if expected is None or not isinstance(record, expected):
            raise DisclosureError(f"record {name!r} ({type(record).__name__}) may not leave the site")
        if isinstance(record, ArrayRecord):
            bad = [key for key in record if not is_adapter_key(key)]
            if bad:
                raise DisclosureError(f"non-adapter tensor(s) in reply: {', '.join(bad[:3])}")
        elif isinstance(record, MetricRecord):
            bad = [key for key in record if key not in ALLOWED_METRICS]
            if bad:
                raise DisclosureError(f"metric(s) not whitelisted: {', '.join(bad)}")
            lists = [key for key, value in record.items() if isinstance(value, list)]
            if lists:
                raise DisclosureError(f"metric(s) must be scalars: {', '.join(lists)}")
        elif set(record) - ALLOWED_FIELDS[name]:
            extra = ", ".join(sorted(set(record) - ALLOWED_FIELDS[name]))
            raise DisclosureError(f"{name} fields not allowed: {extra}")


def outgoing_guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run the handler, then refuse to send a reply that fails ``check_outgoing``."""
    reply = call_next(message, context)
    check_outgoing(reply)
    return reply
