r"""``tangents``: the authors' surrogate of :math:`-\log p` (probability space).

:math:`\ell(v) = \max_{k=1..K} \ell_k(v)`, :math:`\ell_k(v) = -(K/k)(v - k/K) - \log(k/K)`, the
tangents of :math:`-\log p` at :math:`p = k/K` (independent of the support). Finite at
:math:`p = 0` (:math:`1 + \log K`), so any support inside ``[0, 1]`` works.
"""

from __future__ import annotations

import jax.numpy as jnp

from sgpo_jax.core.preference_losses.base import PiecewiseLoss

__all__ = ["LOSS"]


class Tangents(PiecewiseLoss):
    name = "tangents"
    space = "probability"

    def pieces(self, num_tangents, support, dtype):
        k = jnp.arange(1, num_tangents + 1, dtype=dtype)
        # -1 / (k / K) is not exactly -K in floating point (K = 7 in float32, 49 in float64), which
        # would split the tie class of the chord slopes; K / k is correctly rounded, exact for k = 1.
        ratio = num_tangents / k
        return -ratio, 1 + jnp.log(ratio)


LOSS = Tangents()
