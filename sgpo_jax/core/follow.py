r"""From margins to the follower's atoms: the one place where a training run turns pair margins
into the worst case its leader trains on (the step's in-batch follower, the trainer's epoch and
annotation followers, the SSAPO report's plots).

For margins :math:`h [N]` (policy margins against the reference, or self-annotation reward gaps)
and a scale :math:`s` (the step's :math:`\beta`, or the authors' 0.1 on reward gaps), the
centers are :math:`\xi = \sigma(s h)` (probability space, support ``config.support``) or
:math:`\xi = s h` (margin space, on the window ``[min \xi - \tau, max \xi + \tau]`` of the real
pairs, padding rows clipped into it); the exact follower
:func:`~sgpo_jax.core.follower.worst_case` with the config's loss, radius, tangents and variant
gives the atoms ``shift, mass [N, J]`` (atom :math:`j` of pair :math:`i` sits at
:math:`\xi_i - \text{shift}_{ij}` with mass :math:`\text{mass}_{ij}`).

Which atoms: :meth:`~sgpo_jax.core.follower.WorstCase.atoms` (the worst-case distribution itself:
the follower's loss at them averages to its value), except for the authors' pairing, the
``per_entry`` tangent follower with a different leader loss (``leader_loss="neg_log"``, preset
``authors``): there the leader reads :meth:`~sgpo_jax.core.follower.WorstCase.authors_columns`
(``mass`` = their :math:`s_{ik}`, ``shift`` = :math:`q_{ik}/s_{ik}`, ``J = K``), as their training
loss :math:`\sum_k s_{ik} (-\log \max(p_i - q_{ik}/s_{ik}, 10^{-6}))` does.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from sgpo_jax.core.follower import WorstCase, worst_case
from sgpo_jax.core.losses import preference_centers

__all__ = ["Follow", "follow"]


@struct.dataclass
class Follow:
    """The follower's answer for one set of pairs.

    Attributes:
      centers: ``[N]`` the follower's centers.
      support: ``(lo, hi)`` the support it was solved on (scalars; traced in margin space).
      worst_case: the :class:`~sgpo_jax.core.follower.WorstCase`.
      shift, mass: ``[N, J]`` the atoms the leader trains on (see the module docstring).
      metrics: ``follower/value``, ``follower/dual``, ``follower/moved`` (mass moved, weighted),
        ``follower/transport``; with groups, means over the groups (and pairs).
    """

    centers: jax.Array
    support: tuple
    worst_case: WorstCase
    shift: jax.Array
    mass: jax.Array
    metrics: dict


def follow(margins: jax.Array, config: Any, *, scale: Optional[float] = None,
           weights: Optional[jax.Array] = None) -> Follow:
    """The exact follower on ``margins [N]`` (traceable; see the module docstring).

    Args:
      margins: ``[N]`` margins (held constant: no gradient flows through the follower).
      config: the step settings, a :class:`~sgpo_jax.core.step.SGPOConfig` (space, loss, epsilon,
        num_tangents, support, window_tau, variant, group_size, beta).
      scale: the centers' scale; default ``config.beta``.
      weights: ``[N]`` pair masses (0 = padding row, ignored by the follower and the window);
        None = uniform.
    """
    margins = jax.lax.stop_gradient(jnp.asarray(margins))
    centers = preference_centers(margins, beta=config.beta if scale is None else scale, space=config.space)
    if config.space == "probability":
        support = config.support
    else:
        real = jnp.ones(centers.shape, bool) if weights is None else weights > 0
        lo = jnp.min(jnp.where(real, centers, jnp.inf)) - config.window_tau
        hi = jnp.max(jnp.where(real, centers, -jnp.inf)) + config.window_tau
        support = (lo, hi)
        centers = jnp.clip(centers, lo, hi)  # padding rows only
    wc = worst_case(centers, config.epsilon, loss=config.loss, num_tangents=config.num_tangents, support=support,
                    weights=weights, variant=config.variant, group_size=config.group_size)
    if config.variant == "per_entry" and wc.loss.piecewise and (config.leader_loss or config.loss) != config.loss:
        mass, shift = wc.authors_columns()  # the authors' pairing: their s_ik and q_ik / s_ik
    else:
        shift, mass = wc.atoms()
    mean = lambda x: jnp.mean(jnp.atleast_1d(x))  # groups: the mean over groups; one ball: itself
    metrics = {
        "follower/value": mean(wc.value),
        "follower/dual": mean(wc.dual),
        "follower/moved": jnp.sum(wc.weights * wc.moved) if config.group_size is None else mean(wc.moved),
        "follower/transport": mean(wc.transport),
    }
    return Follow(centers=centers, support=support, worst_case=wc, shift=shift, mass=mass, metrics=metrics)
