r"""``sigmoid``: DPO (Rafailov et al. 2023), with label smoothing :math:`s > 0` conservative DPO
(cDPO, Mitchell 2023). Per pair, with :math:`h = r(y_w) - r(y_l)`:

.. math::

    \ell = -(1 - s)\log\sigma(\beta h) - s\log\sigma(-\beta h).

TRL 1.16's ``loss_type="sigmoid"`` is the :math:`s = 0` case (it applies label smoothing only to
``robust`` and ``exo_pair``).
"""

from __future__ import annotations

import jax

from sgpo_jax.core.preference_losses.base import PairLoss

__all__ = ["LOSS"]


class Sigmoid(PairLoss):
    name = "sigmoid"

    def per_pair(self, ratios, *, beta, label_smoothing):
        h = ratios.margins
        return (1 - label_smoothing) * jax.nn.softplus(-beta * h) + label_smoothing * jax.nn.softplus(beta * h)


LOSS = Sigmoid()
