"""The default screen on update size: an update far larger than the round's others is rejected.

An update's size is its L2 distance from the global adapter the site was sent,
``‖Δ_i‖ = ‖w_i − w_global‖₂`` over every tensor it sends. Honest sites of one run take
comparable steps (the same optimizer, learning rate and clipping, step counts set by the plan
from similar sizes), so their norms fall within a small factor of each other, while a scaled,
boosted or noise update is orders of magnitude apart. The rule needs no tuning to a model:

    m_i  = median{ ‖Δ_j‖ : j ≠ i, ‖Δ_j‖ > 0 }        the round's *other* well-formed updates
           (none this round: the median of the norms accepted in the latest round that had any;
            none ever: no relative check)
    reject i   when   ‖Δ_i‖ > κ · m_i                 κ = ``update-norm-ratio`` (default 10)
    reject i   when   ‖Δ_i‖ = 0                       it sends the global adapter back: nothing
                                                      trained (a free rider; an honest site always
                                                      moves, if only by its DP noise)
    reject i   when   ‖Δ_i‖ > ``max-update-norm``     an absolute bound, when set (0 = none)

Leaving update i out of its own reference is what makes the rule work with **2 sites**: with the
median of all norms, one huge update drags the reference up to half its own size. It assumes an
honest majority among the updates of a round: attackers who are most of a round set the
reference themselves. A small or sign-flipped update passes (its damage to a mean is bounded by
its weight); robust aggregators (``median``, ``trimmed-mean``, ``krum``) are the defence there.

The rule's premise is comparable step counts. Adam moves each value by about the learning rate a
step, so an update grows at most linearly with the site's local steps, which the plan sets from
its size (at most 100 a round). Without DP, a site planned over 10 times the others' steps (100
steps at 1,100 rows or more, against 6 at 50 rows) can exceed the ratio: such a federation raises
``update-norm-ratio``. Under DP the steps' noise dominates and sizes grow about as √steps (5x for
100 steps against 4), inside the ratio.

A site rejected in ``flag-after-rejections`` rounds running is flagged in ``history.json`` and
the report.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class NormScreen:
    ratio: float = 10.0  # κ; 0 switches the relative check off
    max_norm: float | None = None
    _last_accepted: list[float] = field(default_factory=list)

    def reasons(self, norms: Mapping[int, float]) -> dict[int, str]:
        """For one round's well-formed updates (reply index -> ‖Δ‖), why each rejected one is;
        the norms of the accepted ones become the reference of a later lone update."""
        rejected = {}
        for index, norm in norms.items():
            if (reason := self._reason(norm, [n for i, n in norms.items() if i != index])) is not None:
                rejected[index] = reason
        accepted = [n for i, n in norms.items() if i not in rejected]
        if accepted:
            self._last_accepted = accepted
        return rejected

    def _reason(self, norm: float, others: list[float]) -> str | None:
        if norm == 0:
            return "update equals the global adapter it was sent: nothing was trained"
        if self.max_norm is not None and norm > self.max_norm:
            return f"update norm {norm:.4g} exceeds max-update-norm {self.max_norm:.4g}"
        reference = [n for n in others if n > 0] or self._last_accepted
        if self.ratio > 0 and reference:
            median = statistics.median(reference)
            if norm > self.ratio * median:
                return (f"update norm {norm:.4g} is over update-norm-ratio {self.ratio:g} x the median "
                        f"{median:.4g} of the other updates")
        return None

    def restore(self, accepted_norms: list[float]) -> None:
        """A resumed run's reference: the norms accepted in its latest round."""
        self._last_accepted = list(accepted_norms)
