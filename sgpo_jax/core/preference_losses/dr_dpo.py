r"""``dr_dpo``: distributionally robust DPO (Dr. DPO, Wu et al. 2024, arXiv 2407.07880), the DPO
loss under the worst case over a KL ball around the batch's pair distribution, in its dual form
with temperature :math:`\beta'` (``train.dr_dpo_beta``):

.. math::

    L = -\beta' \log \frac{\sum_i w_i \exp(-\ell_i / \beta')}{\sum_i w_i},
    \qquad \frac{\partial L}{\partial \ell_i} = q_i = \frac{w_i e^{-\ell_i/\beta'}}{\sum_j w_j e^{-\ell_j/\beta'}},

with :math:`\ell_i` the per-pair (label-smoothed) sigmoid DPO loss and :math:`w_i` the pair
masses (0 = padding). Pairs with a large loss (likely flipped labels) get exponentially less
weight; :math:`\beta' \to \infty` is DPO. The loss couples the batch: the step takes :math:`q`
and :math:`L` from a forward pre-pass over the whole batch, so micro-batching is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgpo_jax.core.preference_losses.base import CoupledPairLoss
from sgpo_jax.core.preference_losses.sigmoid import LOSS as SIGMOID

__all__ = ["LOSS"]


class DrDPO(CoupledPairLoss):
    name = "dr_dpo"

    def per_pair(self, ratios, *, beta, label_smoothing):
        return SIGMOID.per_pair(ratios, beta=beta, label_smoothing=label_smoothing)

    def couple(self, losses, weights, *, temperature):
        logits = -losses / temperature
        log_total = jax.nn.logsumexp(logits, b=weights)
        value = -temperature * (log_total - jnp.log(jnp.sum(weights)))
        q = jnp.where(weights > 0, weights * jnp.exp(logits - log_total), 0)
        return value, q


LOSS = DrDPO()
