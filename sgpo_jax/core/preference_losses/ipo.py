r"""``ipo``: identity preference optimization (Azar et al. 2023, Eq. 17) in TRL 1.16's convention
(``loss_type="ipo"``, ``beta`` as the paper's :math:`\tau`): the log-ratios are averaged over each
response's scored tokens :math:`n_w, n_l` (at least 1) before the squared loss,

.. math::

    \ell = \Big(\frac{r(y_w)}{n_w} - \frac{r(y_l)}{n_l} - \frac{1}{2\beta}\Big)^2.

Label smoothing does not enter.
"""

from __future__ import annotations

import jax.numpy as jnp

from sgpo_jax.core.preference_losses.base import PairLoss

__all__ = ["LOSS"]


class IPO(PairLoss):
    name = "ipo"
    uses_label_smoothing = False

    def per_pair(self, ratios, *, beta, label_smoothing):
        delta = ratios.chosen / ratios.chosen_tokens - ratios.rejected / ratios.rejected_tokens
        return jnp.square(delta - 1 / (2 * beta))


LOSS = IPO()
