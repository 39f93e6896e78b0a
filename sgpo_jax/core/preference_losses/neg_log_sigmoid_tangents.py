r"""``neg_log_sigmoid_tangents``: the max of :math:`K` tangents of :math:`-\log\sigma` (margin
space) at the evenly spaced knots ``linspace(lo, hi, K)`` of the window (``K = 1``: the knot
``lo``): :math:`a_k = -\sigma(-t_k)`, :math:`b_k = \log(1 + e^{-t_k}) - a_k t_k`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgpo_jax.core.preference_losses.base import PiecewiseLoss

__all__ = ["LOSS"]


class NegLogSigmoidTangents(PiecewiseLoss):
    name = "neg_log_sigmoid_tangents"
    space = "margin"

    def pieces(self, num_tangents, support, dtype):
        lower = jnp.asarray(support[0], dtype)
        upper = jnp.asarray(support[1], dtype)
        frac = jnp.arange(num_tangents, dtype=dtype) / max(num_tangents - 1, 1)
        knots = lower + (upper - lower) * frac
        slopes = -jax.nn.sigmoid(-knots)
        return slopes, jax.nn.softplus(-knots) - slopes * knots


LOSS = NegLogSigmoidTangents()
