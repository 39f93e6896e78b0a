r"""``neg_log_sigmoid``: the exact :math:`\ell(z) = -\log\sigma(z)` (margin space, on a finite
window: in an unbounded space the supremum is not attained).

Chord slope from :math:`\ell(lo) - \ell(x) = \log(1 + \sigma(-x)(e^{d} - 1))`, :math:`d = x - lo`
(stable for small :math:`d`; the direct difference beyond :math:`d = 20`), :math:`\sigma(-x)` at
:math:`d = 0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgpo_jax.core.preference_losses.base import FollowerLoss

__all__ = ["LOSS"]


class NegLogSigmoid(FollowerLoss):
    name = "neg_log_sigmoid"
    space = "margin"

    def value(self, loss, v):
        return jax.nn.softplus(-v)

    def chord_slope(self, loss, x, lower):
        d = x - lower
        safe_d = jnp.where(d > 0, d, 1)
        small = jnp.minimum(d, 20.0)
        stable = jnp.log1p(jax.nn.sigmoid(-x) * jnp.expm1(small)) / safe_d
        direct = (jax.nn.softplus(-lower) - jax.nn.softplus(-x)) / safe_d
        return jnp.where(d <= 0, jax.nn.sigmoid(-x), jnp.where(d < 20.0, stable, direct))


LOSS = NegLogSigmoid()
