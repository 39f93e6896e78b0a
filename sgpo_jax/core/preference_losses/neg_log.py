r"""``neg_log``: the exact :math:`\ell(p) = -\log p` (probability space).

Needs a support lower end :math:`lo > 0`: any mass at :math:`p = 0` makes the worst case
infinite. Chord slope :math:`\log(1 + d/lo) / d` with :math:`d = x - lo` (cancellation-free),
:math:`1/x` at :math:`d = 0`. Leader form :math:`-\log\max(v, p_{min})`: atoms can fall below 0
once the policy has moved.
"""

from __future__ import annotations

import jax.numpy as jnp

from sgpo_jax.core.preference_losses.base import FollowerLoss

__all__ = ["LOSS"]


class NegLog(FollowerLoss):
    name = "neg_log"
    space = "probability"

    def value(self, loss, v):
        return -jnp.log(v)

    def chord_slope(self, loss, x, lower):
        d = x - lower
        safe_d = jnp.where(d > 0, d, 1)
        return jnp.where(d > 0, jnp.log1p(d / lower) / safe_d, 1 / x)

    def support_problem(self, lower):
        if lower > 0:
            return None
        return (f"loss 'neg_log' (exact -log p) needs support lower end > 0, got {lower}: any mass at p = 0 makes "
                "the worst case infinite; use a floor p_min > 0 (e.g. support=(1e-3, 1.0)) or loss='tangents'")

    def leader_value(self, loss, v, p_min):
        return loss(jnp.maximum(v, p_min))


LOSS = NegLog()
