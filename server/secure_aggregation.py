"""SecAgg+ (Bell et al. 2020) on Flower's Message API: the server learns only the weighted sum of
a round's updates, of at least two sites, never one site's.

Flower 1.42's ``SecAggPlusWorkflow`` runs only inside the legacy strategy API (a
``LegacyContext``). This is the same four-stage protocol, driven by fedlora's round loop, with
Flower's public primitives (``flwr.common.secure_aggregation``: Shamir shares, key agreement,
the seeded mask generator, quantization) and Flower's own client mod at the sites
(``flwr.client.mod.secaggplus_mod``, through ``client.secure_aggregation``):

1. *setup*: each sampled site gets the protocol's parameters and answers with two public keys;
2. *share keys*: each site gets its neighbours' public keys and answers with its mask seed and
   first secret key, Shamir-shared among them, each share encrypted for its holder;
3. *collect masked vectors*: each site gets the round's adapter and its shares, trains, and
   answers with ``[q(w), q(w·Δ + c)] + private mask ± pairwise masks (mod 2^32)``, where Δ is its
   update, w = num-examples / max-weight and q quantizes to ``quantization_range`` levels over
   [-c, c];
4. *unmask*: each surviving site hands over, for every neighbour, the share the server may have:
   the mask seed of one whose vector is in the sum, the first secret key of one that dropped
   after sharing its keys (to cancel the pairwise masks it left in the others' vectors).

With the masks cancelled, the sum is ``[Σ q(w_i), Σ q(w_i·Δ_i + c)]``, so the weighted mean
update is ``(dequantize(Σ) + (n - 1)·c) / Σ w_i``. Before that the server holds only masked
vectors and their masked sum; a sum is unmasked only if it holds at least ``min_updates``
updates (refusals add zero at weight 0) and every site in it keeps ``MIN_HIDDEN_MASKS`` pairwise
masks with others in it (Flower's mask generator has 32-bit seeds: ``docs/privacy.md``, A11).

Trust: this is SecAgg+ against an *honest-but-curious* server. A malicious server that tells
some sites that a site dropped and others that it survived can collect both of its secrets and
unmask it; the site's update is then what it would be without SecAgg (its own DP release), and
``docs/privacy.md`` (A11) says so.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedlora.run_config import SecureAggregationSettings
from fedlora.secagg_grid import LEVELS, MODULUS, integer_sum

MAX_SITES = MODULUS // LEVELS - 1
# Flower's mask generator seeds a 32-bit generator. Every site in a sum keeps at least this many
# pairwise masks with other sites in it, whose seeds the server never learns, so that reading one
# site's update means searching at least two 32-bit seeds at once, never one.
MIN_HIDDEN_MASKS = 2
SendAndReceive = Callable[[Grid, list[Message], float, str], list[Message]]


@dataclass
class SecureRound:
    """What one SecAgg+ round left the server: each site's last reply (masks taken out), the
    weighted mean update over the sites in the sum, or why there is none."""

    replies: list[Message]
    summed: set[int] = field(default_factory=set)  # node ids whose masked vector is in the sum
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> the stage it dropped at
    mean_update: dict[str, np.ndarray] | None = None
    total_weight: float = 0.0
    failure: str = ""
    bytes_up: dict[int, int] = field(default_factory=dict)
    num_shares: int = 0
    threshold: int = 0

    def summary(self, clipping_range: float) -> dict[str, float | int]:
        """The round's record in ``history.json`` (``secure_aggregation``)."""
        return {"sites": len(self.replies), "summed": len(self.summed), "dropped": len(self.dropped),
                "shares": self.num_shares, "threshold": self.threshold, "clipping_range": clipping_range}


@dataclass
class SecAggPlus:
    """The server's side of SecAgg+ for one round at a time (see the module's docstring)."""

    settings: SecureAggregationSettings
    send_and_receive: SendAndReceive
    min_updates: int = 2  # updates (replies without a refusal) a sum needs before it is unmasked
    # Distributed DP (``dp-mode = distributed``): the sum is of integer gradient vectors
    # (``fedlora.secagg_grid``), and each tensor's update is minus its step size in the round
    # (``RunSettings.distributed_step``) times their noisy mean.
    distributed_step: Callable[[int, str], float] | None = None
    rng: random.Random = field(default_factory=random.SystemRandom)  # the neighbour ring: not the run's seed

    def run(self, grid: Grid, messages: Sequence[Message], timeout: float, label: str) -> SecureRound:
        """Train ``messages`` (one per sampled site, as the strategy configured them) under
        SecAgg+; the result holds only the sum's mean, never a site's update."""
        train = {m.metadata.dst_node_id: m for m in messages}
        sampled = list(train)
        result = SecureRound(replies=[], num_shares=self._num_shares(len(sampled)))
        result.threshold = max(2, round(self.settings.secagg_threshold * result.num_shares))
        if not MIN_HIDDEN_MASKS + 1 <= len(sampled) <= MAX_SITES:
            result.failure = (f"secure aggregation needs {MIN_HIDDEN_MASKS + 1} to {MAX_SITES} sites in a round, "
                              f"{len(sampled)} sampled")
            return result
        group = str(messages[0].content["config"]["server-round"])
        self.rng.shuffle(sampled)
        half = result.num_shares // 2
        neighbours = {nid: {sampled[(i + k) % len(sampled)] for k in range(-half, half + 1)} for i, nid in enumerate(sampled)}
        reported: dict[int, Message] = {}  # per site: its training reply, else the last it sent

        def stage(name: str, nodes: set[int], make: Callable[[int], RecordDict], needed: tuple[str, ...],
                  drops: bool = True) -> dict[int, ConfigRecord]:
            """One round trip: the nodes whose reply carries the stage's fields, and those fields;
            the others dropped out there (``drops``)."""
            sent = [Message(make(nid), dst_node_id=nid, message_type=MessageType.TRAIN, group_id=group) for nid in sorted(nodes)]
            answered: dict[int, ConfigRecord] = {}
            for reply in self.send_and_receive(grid, sent, timeout, f"{label} ({name})"):
                nid = reply.metadata.src_node_id
                if nid not in nodes:
                    continue
                if name == "collect masked vectors" or nid not in reported:
                    reported[nid] = reply  # the training reply, once there is one
                if not reply.has_error():
                    result.bytes_up[nid] = result.bytes_up.get(nid, 0) + _wire_bytes(reply.content)
                record = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
                if record is not None and all(key in record for key in needed):
                    answered[nid] = record
            for nid in nodes - set(answered) if drops else ():
                result.dropped.setdefault(nid, name)
            return answered

        def enough(alive: set[int], name: str) -> bool:
            short = [nid for nid in alive if len(neighbours[nid] & alive) < result.threshold]
            if short:
                result.failure = (f"secure aggregation stopped at {name}: {len(alive)} of {len(sampled)} sites left, "
                                  f"fewer than secagg-threshold's {result.threshold} neighbours each")
            return not short

        setup = {
            Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(sampled), Key.SHARE_NUMBER: result.num_shares,
            Key.THRESHOLD: result.threshold, Key.CLIPPING_RANGE: self.settings.secagg_clipping_range,
            Key.TARGET_RANGE: LEVELS, Key.MOD_RANGE: MODULUS, Key.MAX_WEIGHT: self.settings.secagg_max_weight,
        }
        keys = stage("setup", set(sampled), lambda nid: _configs(setup), (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2))
        public_keys = _usable_keys(keys, result.dropped)
        if not enough(set(public_keys), "setup"):
            return _ended(result, reported)

        alive = set(public_keys)
        shared = stage("share keys", alive, lambda nid: _configs(
            {Key.STAGE: Stage.SHARE_KEYS, **{str(n): public_keys[n] for n in neighbours[nid] & alive}}),
            (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST))
        sharers = set(shared)  # their pairwise masks go into their neighbours' vectors
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in sharers}
        for src, record in shared.items():
            sent_to: set[int] = set()  # one ciphertext per neighbour: a second would add its mask twice
            for dst, ciphertext in zip(cast(list[int], record[Key.DESTINATION_LIST]), cast(list[bytes], record[Key.CIPHERTEXT_LIST]), strict=False):
                if dst in forward and dst in neighbours[src] and dst not in sent_to and isinstance(ciphertext, bytes):
                    sent_to.add(dst)
                    forward[dst][0].append(src)
                    forward[dst][1].append(ciphertext)
        if not enough(sharers, "share keys"):
            return _ended(result, reported)

        def train_content(nid: int) -> RecordDict:
            content = RecordDict(dict(train[nid].content.items()))
            srcs, ciphertexts = forward[nid]
            content[RECORD_KEY_CONFIGS] = ConfigRecord(
                {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: srcs})
            return content

        shapes = [(1,), *(tuple(array.shape) for array in train[sampled[0]].content["arrays"].values())]
        masked = stage("collect masked vectors", sharers, train_content, (Key.MASKED_PARAMETERS,))
        total: list[np.ndarray] | None = None
        for nid, record in masked.items():
            vector = _masked_vector(record, shapes)
            if vector is None:
                result.dropped[nid] = "collect masked vectors (malformed masked vector)"
                continue
            result.summed.add(nid)
            total = vector if total is None else parameters_addition(total, vector)
            del record[Key.MASKED_PARAMETERS]  # only the sum stays
        if total is None or not enough(result.summed, "collect masked vectors"):
            result.failure = result.failure or "secure aggregation stopped: no masked vector arrived"
            return _ended(result, reported)
        dead = sharers - result.summed
        refusal = self._refused_unmasking(result.summed, dead, neighbours, reported, result.threshold)
        if refusal:  # the sum stays masked: nothing of it is learnt
            result.failure = f"secure aggregation stopped before unmasking: {refusal}"
            return _ended(result, reported)

        unmask = stage("unmask", result.summed, lambda nid: _configs({
            Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: sorted(neighbours[nid] & result.summed),
            Key.DEAD_NODE_ID_LIST: sorted(neighbours[nid] & dead)}), (Key.NODE_ID_LIST, Key.SHARE_LIST), drops=False)
        by_holder: dict[int, dict[int, bytes]] = {nid: {} for nid in sharers}  # owner -> holder -> share
        for nid, record in unmask.items():
            for owner, share in zip(cast(list[int], record[Key.NODE_ID_LIST]), cast(list[bytes], record[Key.SHARE_LIST]), strict=False):
                # a share the server may hold: the seed of a summed neighbour, the key of a dead one
                if owner in by_holder and owner in neighbours[nid] and isinstance(share, bytes):
                    by_holder[owner].setdefault(nid, share)
        shares = {owner: list(held.values()) for owner, held in by_holder.items()}
        short = sorted(nid for nid, got in shares.items() if len(got) < result.threshold)
        if short:
            result.failure = (f"secure aggregation stopped at unmask: {len(short)} site(s) have fewer than "
                              f"secagg-threshold = {result.threshold} shares back")
            return _ended(result, reported)
        total = _unmasked(total, shares, dead, neighbours, public_keys, result.summed)
        names = list(train[sampled[0]].content["arrays"].keys())
        if self.distributed_step is not None:
            updates = [reported[nid] for nid in result.summed if "status" not in reported[nid].content.config_records]
            rates = [self.distributed_step(int(group), name) for name in names]
            step = _gradient_step(total, len(result.summed), updates, rates)
            if isinstance(step, str):
                result.failure = f"distributed DP: {step}"
                return _ended(result, reported)
            result.mean_update, result.total_weight = dict(zip(names, step[0], strict=True)), step[1]
            return _ended(result, reported)
        mean, weight = _weighted_mean(total, len(result.summed), self.settings.secagg_clipping_range)
        result.total_weight = weight * self.settings.secagg_max_weight
        result.mean_update = dict(zip(names, mean, strict=True))
        return _ended(result, reported)

    def _refused_unmasking(self, summed: set[int], dead: set[int], neighbours: dict[int, set[int]],
                           reported: dict[int, Message], threshold: int) -> str:
        """Why this sum must stay masked, or "": it must hold at least ``min_updates`` updates
        (a refusing site adds zero at weight 0, so a sum of one update and refusals would be that
        update); each site in it must keep ``MIN_HIDDEN_MASKS`` pairwise masks with others in
        it; a dropped site's masks must be removable (enough summed neighbours to hold its key)."""
        updates = [nid for nid in summed if "status" not in reported[nid].content.config_records]
        if len(updates) < self.min_updates:
            return f"{len(updates)} update(s) in the sum, fewer than {self.min_updates} (min-valid-updates, at least 2)"
        exposed = [nid for nid in summed if len((neighbours[nid] & summed) - {nid}) < MIN_HIDDEN_MASKS]
        if exposed:
            return f"{len(exposed)} site(s) with fewer than {MIN_HIDDEN_MASKS} other sites of the sum among their neighbours"
        orphaned = [nid for nid in dead if len(neighbours[nid] & summed) < threshold]
        if orphaned:
            return f"{len(orphaned)} dropped site(s) with fewer than secagg-threshold = {threshold} neighbours left to unmask them"
        return ""

    def _num_shares(self, sites: int) -> int:
        """Flower's rule: a fraction of the round's sites, odd when below all of them, at least 3."""
        shares = round(self.settings.secagg_shares * sites)
        if shares < sites and shares % 2 == 0:
            shares += 1
        return sites if shares <= 2 else min(shares, sites)


def _configs(values: dict) -> RecordDict:
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(values)})


def _wire_bytes(content: RecordDict) -> int:
    """A reply's payload in bytes (Flower's ``count_bytes``, which refuses an empty list)."""
    total = 0
    for record in content.values():
        if isinstance(record, ConfigRecord):
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                total += sum(len(item) if isinstance(item, bytes | str) else 8 for item in items)
        else:
            total += record.count_bytes()
    return total


def _usable_keys(replies: dict[int, ConfigRecord], dropped: dict[int, str]) -> dict[int, list[bytes]]:
    """Each site's two public keys, if they are bytes and no other site sent the same key (a
    copied key would let its sender read another's shares); the others drop out here."""
    keys = {nid: [r[Key.PUBLIC_KEY_1], r[Key.PUBLIC_KEY_2]] for nid, r in replies.items()}
    owners: dict[bytes, set[int]] = {}
    for nid, pair in keys.items():
        for key in pair if all(isinstance(k, bytes) for k in pair) else ():
            owners.setdefault(key, set()).add(nid)
    usable = {nid: cast(list[bytes], pair) for nid, pair in keys.items()
              if all(isinstance(k, bytes) and len(owners[k]) == 1 for k in pair) and pair[0] != pair[1]}
    for nid in set(keys) - set(usable):
        dropped[nid] = "setup (unusable public keys)"
    return usable


def _masked_vector(record: ConfigRecord, shapes: list[tuple[int, ...]]) -> list[np.ndarray] | None:
    """The site's masked vector as integers mod 2^32, if it has the round's shapes; else None."""
    try:
        vector = [bytes_to_ndarray(b) for b in cast(list[bytes], record[Key.MASKED_PARAMETERS])]
    except (TypeError, ValueError, OSError):
        return None
    if [tuple(v.shape) for v in vector] != shapes or any(v.dtype.kind not in "iu" for v in vector):
        return None
    return [np.mod(v.astype(np.int64), MODULUS) for v in vector]


def _unmasked(total: list[np.ndarray], shares: dict[int, list[bytes]], dead: set[int], neighbours: dict[int, set[int]],
              public_keys: dict[int, list[bytes]], summed: set[int]) -> list[np.ndarray]:
    """The sum with every mask cancelled: each summed site's private mask, and the pairwise masks
    a dead site left in its summed neighbours' vectors."""
    shapes = [v.shape for v in total]
    for nid, got in shares.items():
        secret = combine_shares(got)
        if nid not in dead:
            total = parameters_subtraction(total, pseudo_rand_gen(secret, MODULUS, shapes))
            continue
        for neighbour in neighbours[nid] & summed:
            shared = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public_keys[neighbour][0]))
            mask = pseudo_rand_gen(shared, MODULUS, shapes)
            # the neighbour added the mask if its id is the larger one, else subtracted it
            total = parameters_addition(total, mask) if nid > neighbour else parameters_subtraction(total, mask)
    return parameters_mod(total, MODULUS)


def _weighted_mean(total: list[np.ndarray], summed: int, clipping_range: float) -> tuple[list[np.ndarray], float]:
    """Σ w_i·Δ_i / Σ w_i from ``[Σ q(w_i), Σ q(w_i·Δ_i + c)]``; and Σ w_i (in max-weight units)."""
    weight_levels = int(total[0][0])
    if weight_levels <= 0:
        log(WARNING, "secure aggregation: the summed weights are zero (every site in the sum sent weight 0)")
        return [np.zeros(v.shape, np.float32) for v in total[1:]], 0.0
    values = dequantize(total[1:], clipping_range, LEVELS)
    offset = (summed - 1) * clipping_range  # each site's quantization shifted its values by +c; dequantize took one c off
    return [((v - offset) * (LEVELS / weight_levels)).astype(np.float32) for v in values], weight_levels / LEVELS


def _gradient_step(total: list[np.ndarray], summed: int, updates: list[Message],
                   rates: list[float]) -> tuple[list[np.ndarray], float] | str:
    """Distributed DP's update, -lr * (sum of the integer gradient vectors) / (gamma * N) with
    each tensor's lr in ``rates``: the
    noisy mean of the sites' clipped per-example gradients over N = the summed sites' public
    populations (``num-examples``), gamma the grid's public scale (``grid-scale``, equal at every
    site, or the sum means nothing); or why there is none."""
    if any("metrics" not in m.content for m in updates):
        return "a site in the sum sent no metrics (its grid scale and population)"
    scales = {float(m.content["metrics"].get("grid-scale", 0.0)) for m in updates}
    population = sum(float(m.content["metrics"].get("num-examples", 0.0)) for m in updates)
    if len(scales) != 1 or not min(scales) > 0:
        return f"the sites in the sum report grid scales {sorted(scales)}, not one positive scale"
    if not population > 0:
        return "the sites in the sum report no public population (num-examples)"
    (scale,) = scales
    sums = [integer_sum(v, summed) for v in total[1:]]
    return [(-rate * s / (scale * population)).astype(np.float32) for rate, s in zip(rates, sums, strict=True)], population


def _ended(result: SecureRound, reported: dict[int, Message]) -> SecureRound:
    """The replies to report per site, their protocol records taken out."""
    for reply in reported.values():
        if not reply.has_error() and RECORD_KEY_CONFIGS in reply.content.config_records:
            del reply.content[RECORD_KEY_CONFIGS]
    result.replies = list(reported.values())
    return result
