r"""``robust``: robust DPO (rDPO, Chowdhury et al. 2024; TRL ``loss_type="robust"``), the unbiased
estimate of the clean DPO loss when each label is flipped with probability :math:`e`
(``train.label_smoothing``, in :math:`[0, 1/2)`). Per pair, with :math:`h = r(y_w) - r(y_l)`:

.. math::

    \ell = \frac{-(1 - e)\log\sigma(\beta h) + e\log\sigma(-\beta h)}{1 - 2e}.

Convex and decreasing in :math:`h` (second derivative :math:`\beta^2\sigma(\beta h)\sigma(-\beta h)`);
:math:`e = 0` is DPO.
"""

from __future__ import annotations

import jax

from sgpo_jax.core.preference_losses.base import PairLoss

__all__ = ["LOSS"]


class Robust(PairLoss):
    name = "robust"

    def per_pair(self, ratios, *, beta, label_smoothing):
        h = ratios.margins
        e = label_smoothing
        return ((1 - e) * jax.nn.softplus(-beta * h) - e * jax.nn.softplus(beta * h)) / (1 - 2 * e)


LOSS = Robust()
