"""Simulated attackers: K of a simulation's sites misbehave from a given round.

``fedlora simulate --set attack=KIND --set attackers=K [--set attack-from-round=R]``. These keys
belong to the simulation, not to the run: they are taken out of the run config before the
ServerApp starts, and which sites attack (drawn with the run's ``seed``) is written only to the
simulation's own record, ``simulation.json``. The server sees attackers only through what they
send, exactly as it would in a deployment.

Update attacks rewrite an attacker's training reply after its honest site has produced it
(Δ = honest reply − global adapter it received, per tensor):

| KIND | what the attacker sends |
|---|---|
| ``nan`` | its update with every value NaN |
| ``scale:F`` | global + F·Δ (a boosted or shrunk update) |
| ``sign-flip`` | global − Δ |
| ``gaussian:STD`` | global + noise, N(0, STD²) per value, instead of Δ |
| ``wrong-shape`` | its first tensor flattened to one dimension |
| ``free-rider`` | the global adapter back, unchanged (Δ = 0) |

The data attack ``label-flip`` trains honestly on its partition with every label reversed
(class k of K becomes K−1−k), in every round: the simulation writes that file and the site reads
it through its node config ``data-path``, as a deployed site reads its own.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedlora.upload_codec import decode_upload, encode_upload

ATTACK_KEYS = ("attack", "attackers", "attack-from-round")
UPDATE_ATTACKS = ("nan", "scale", "sign-flip", "gaussian", "wrong-shape", "free-rider")
KINDS = (*UPDATE_ATTACKS, "label-flip")
_WITH_PARAMETER = ("scale", "gaussian")


@dataclass(frozen=True)
class Attack:
    kind: str  # one of KINDS
    parameter: float  # F of scale:F, STD of gaussian:STD; unused otherwise
    sites: tuple[int, ...]  # the attackers' site indices (partition ids)
    from_round: int

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], num_sites: int, seed: int) -> Attack | None:
        """The attack that ``attack``/``attackers``/``attack-from-round`` describe (None without
        ``attack``); attackers are drawn from the sites with ``seed``. Bad values raise
        ValueError naming the key."""
        spec = str(settings.get("attack", "")).strip()
        if not spec:
            return None
        kind, _, value = spec.partition(":")
        if kind not in KINDS:
            raise ValueError(f"attack: unknown kind {kind!r}; choose one of {', '.join(KINDS)} (scale:F, gaussian:STD)")
        if (kind in _WITH_PARAMETER) != bool(value):
            form = f"{kind}:NUMBER" if kind in _WITH_PARAMETER else kind
            raise ValueError(f"attack: write {form}")
        try:
            parameter = float(value) if value else 0.0
        except ValueError:
            raise ValueError(f"attack: {value!r} in {spec!r} is not a number") from None
        count, first = settings.get("attackers", 1), settings.get("attack-from-round", 1)
        if not isinstance(count, int) or not 1 <= count <= num_sites:
            raise ValueError(f"attackers: a whole number of sites from 1 to {num_sites}")
        if not isinstance(first, int) or first < 1:
            raise ValueError("attack-from-round: a round number, 1 or more")
        sites = tuple(sorted(random.Random(seed).sample(range(num_sites), count)))
        return cls(kind, parameter, sites, first)

    def record(self) -> dict[str, Any]:
        """What ``simulation.json`` keeps (and ``--resume`` reads back through ``from_record``)."""
        return {"kind": self.kind, "parameter": self.parameter, "sites": list(self.sites), "from-round": self.from_round}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Attack:
        return cls(str(record["kind"]), float(record["parameter"]), tuple(record["sites"]), int(record["from-round"]))

    def corrupt(self, sent: ArrayRecord, reply: ArrayRecord, rng: np.random.Generator) -> ArrayRecord:
        """The attacker's version of an honest ``reply`` to the global adapter ``sent``."""
        corrupted = {}
        for index, (name, array) in enumerate(reply.items()):
            honest = array.numpy()
            start = sent[name].numpy() if name in sent else np.zeros_like(honest)
            delta = honest - start
            if self.kind == "nan":
                value = np.full_like(honest, np.nan)
            elif self.kind == "scale":
                value = start + self.parameter * delta
            elif self.kind == "sign-flip":
                value = start - delta
            elif self.kind == "gaussian":
                value = start + rng.normal(0.0, self.parameter, honest.shape)
            elif self.kind == "wrong-shape":
                value = honest.reshape(-1) if index == 0 else honest
            else:  # free-rider
                value = start
            corrupted[name] = Array(np.ascontiguousarray(value, dtype=honest.dtype))
        return ArrayRecord(corrupted)

    def mod(self, seed: int, upload_dtype: str = "fp32"):
        """A ClientApp mod that rewrites the training replies of attacking sites (update attacks),
        sent in the run's ``upload-dtype`` as an honest site's are (a tensor the encoding cannot
        hold, the wrong shape, goes as float32 values)."""

        def attacking(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
            reply = call_next(msg, context)
            site = int(context.node_config["partition-id"])
            server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content.config_records else 0
            if (
                self.kind in UPDATE_ATTACKS and site in self.sites and server_round >= self.from_round
                and msg.metadata.message_type == MessageType.TRAIN
                and not reply.has_error() and "arrays" in reply.content.array_records
            ):
                rng = np.random.default_rng([seed, site, server_round])
                sent = msg.content["arrays"]
                honest = decode_upload(reply.content["arrays"], sent, upload_dtype)
                corrupted = self.corrupt(sent, honest, rng)
                try:
                    reply.content["arrays"] = encode_upload(
                        {name: array.numpy() for name, array in corrupted.items()},
                        {name: array.numpy() for name, array in sent.items()}, upload_dtype, rng)
                except ValueError:
                    reply.content["arrays"] = corrupted
            return reply

        return attacking


def flip_labels(rows: datasets.Dataset, num_labels: int) -> datasets.Dataset:
    """A site's rows (``text``/``label`` index columns) with each label k of K replaced by K−1−k."""
    return rows.map(lambda row: {"label": num_labels - 1 - int(row["label"])})
