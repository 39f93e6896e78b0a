r"""Preference losses on per-sequence log-probabilities (pure functions, shapes ``[B]``).

Notation (SGPO_NOTES section 2): the policy log-ratio of a response is
:math:`r(y) = \log\pi(y|x) - \log\pi_{ref}(y|x)`, the margin of a pair is
:math:`h = r(y_w) - r(y_l)`, and the follower's center is :math:`\xi = \sigma(\beta h)` in
probability space or :math:`\xi = \beta h` in margin space.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import struct

from sgpo_jax.core import preference_losses
from sgpo_jax.core.follower import make_loss
from sgpo_jax.core.preference_losses import SPACES, LogRatios

Array = jax.Array

__all__ = [
    "SPACES",
    "LeaderLoss",
    "sequence_logps",
    "preference_centers",
    "reward_metrics",
    "dpo_loss",
    "pair_loss",
    "sgpo_loss",
    "authors_weighted_loss",
]


@struct.dataclass
class LeaderLoss:
    """A loss as a mass-weighted sum: ``mean = total / mass``. Summing ``total`` and ``mass``
    separately over micro-batches keeps gradient accumulation exact."""

    total: Array  # []
    mass: Array  # []
    per_pair: Array  # [B] each pair's mass-weighted loss

    @property
    def mean(self) -> Array:
        return self.total / jnp.maximum(self.mass, jnp.finfo(self.total.dtype).tiny)


def sequence_logps(logits: Array, input_ids: Array, loss_mask: Array) -> Array:
    r"""Per-row :math:`\sum_t m_t \log p(x_t \mid x_{<t})`.

    Args:
      logits: ``[B, T, V]``; ``logits[:, t]`` predicts token ``t + 1``.
      input_ids: ``[B, T]`` int.
      loss_mask: ``[B, T]``, 1 on the tokens to score (the response), 0 elsewhere; position 0
        is never scored (nothing predicts it).

    Returns ``[B]`` in float32 (float64 for float64 logits). Uses ``logit[target] - logsumexp(logits)``
    per position, so the float32 ``[B, T, V]`` log-softmax is never materialized.
    """
    logits = logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32))
    targets = input_ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    token_logps = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(token_logps * loss_mask[:, 1:].astype(token_logps.dtype), axis=-1)


def preference_centers(margins: Array, *, beta: float, space: str) -> Array:
    r"""Follower centers from margins :math:`h`: :math:`\sigma(\beta h)` or :math:`\beta h`."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    return jax.nn.sigmoid(beta * margins) if space == "probability" else beta * margins


def _weighted_mean(x: Array, weights: Array) -> Array:
    return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)


def reward_metrics(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float,
    weights: Optional[Array] = None,
) -> Dict[str, Array]:
    """TRL-named metrics (``rewards/chosen`` etc.), means over pairs weighted by ``weights``
    (padding rows have weight 0)."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    w = jnp.ones_like(chosen) if weights is None else weights
    return {
        "rewards/chosen": _weighted_mean(chosen, w),
        "rewards/rejected": _weighted_mean(rejected, w),
        "rewards/margins": _weighted_mean(chosen - rejected, w),
        "rewards/accuracies": _weighted_mean((chosen > rejected).astype(chosen.dtype), w),
        "logps/chosen": _weighted_mean(policy_chosen_logps, w),
        "logps/rejected": _weighted_mean(policy_rejected_logps, w),
    }


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    weights: Optional[Array] = None,
) -> Tuple[Array, Dict[str, Array]]:
    r"""Sigmoid DPO: :math:`-(1-s)\log\sigma(\beta h) - s \log\sigma(-\beta h)` per pair.

    Returns ``(losses [B], metrics)``; metrics use TRL's names and are weighted means.
    """
    return pair_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        loss_type="sigmoid", beta=beta, label_smoothing=label_smoothing, weights=weights,
    )


def pair_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_tokens: Optional[Array] = None,
    rejected_tokens: Optional[Array] = None,
    weights: Optional[Array] = None,
) -> Tuple[Array, Dict[str, Array]]:
    r"""The per-pair terms ``[B]`` of a ``train.loss_type`` (:mod:`sgpo_jax.core.preference_losses`:
    ``sigmoid``, ``robust``, ``ipo``, ``dr_dpo``) and TRL's reward metrics (weighted means).

    ``chosen_tokens``/``rejected_tokens`` ``[B]``: the responses' scored token counts (``ipo``
    averages its log-ratios over them, at least 1 each); None = 1. For the coupled ``dr_dpo``
    these are its per-pair DPO terms; the batch value is
    :meth:`~sgpo_jax.core.preference_losses.base.CoupledPairLoss.couple`'s.
    """
    ones = jnp.ones_like(policy_chosen_logps)
    count = lambda n: ones if n is None else jnp.maximum(jnp.asarray(n, ones.dtype), 1)
    ratios = LogRatios(policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps,
                       count(chosen_tokens), count(rejected_tokens))
    losses = preference_losses.pair_loss(loss_type).per_pair(ratios, beta=beta, label_smoothing=label_smoothing)
    metrics = reward_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, weights=weights,
    )
    return losses, metrics


def sgpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    atom_shift: Array,
    atom_mass: Array,
    *,
    beta: float = 0.1,
    space: str = "probability",
    loss: str = "tangents",
    num_tangents: int = 6,
    support: Tuple[float, float] = (0.0, 1.0),
    p_min: float = 1e-6,
) -> Tuple[LeaderLoss, Dict[str, Array]]:
    r"""The SGPO leader loss (SGPO_NOTES section 4).

    .. math::

        L(\theta) = \frac{\sum_i \sum_j m_{ij}\, \ell(\xi_i(\theta) - d_{ij})}{\sum_{ij} m_{ij}}

    with the follower's atoms (shifts :math:`d` and masses :math:`m`, ``[B, J]``) held fixed
    (``stop_gradient``): gradients flow only through the current centers :math:`\xi_i(\theta)`
    (:func:`preference_centers`). Pairs with zero total mass (padding) contribute nothing.

    ``loss`` is the follower's loss name (``"tangents"``, ``"neg_log"``, ``"neg_log_sigmoid"``,
    ``"neg_log_sigmoid_tangents"``), evaluated in its leader form
    (:meth:`~sgpo_jax.core.preference_losses.base.FollowerLoss.leader_value`: ``"neg_log"`` as
    :math:`-\log\max(v, p_{min})` because atoms can fall below 0 when the policy has moved);
    ``support`` gives the margin window for ``"neg_log_sigmoid_tangents"`` knots.
    With ``epsilon = 0`` atoms (shift 0, unit mass) and an exact loss this equals DPO.

    Returns ``(LeaderLoss, metrics)`` (TRL reward metrics weighted by pair mass).
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    xi = preference_centers(h, beta=beta, space=space)
    ell = make_loss(loss, num_tangents, support, xi.dtype)
    shift = jax.lax.stop_gradient(atom_shift).astype(xi.dtype)
    mass = jax.lax.stop_gradient(atom_mass).astype(xi.dtype)
    v = xi[:, None] - shift
    per_pair = jnp.sum(mass * preference_losses.follower_loss(loss).leader_value(ell, v, p_min), axis=1)
    pair_mass = jnp.sum(mass, axis=1)
    metrics = reward_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, weights=pair_mass,
    )
    return LeaderLoss(total=jnp.sum(per_pair), mass=jnp.sum(pair_mass), per_pair=per_pair), metrics


def authors_weighted_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    s: Array,
    shift: Array,
    *,
    beta: float = 0.1,
    floor: float = 1e-6,
) -> Array:
    r"""The authors' training loss (compatibility), averaged over the batch:

    .. math::

        \frac{1}{B}\sum_i \sum_k s_{ik} \cdot -\log\max\big(\sigma(\beta h_i) - \text{shift}_{ik},\ 10^{-6}\big)

    with ``s``/``shift`` ``[B, K]`` from :meth:`sgpo_jax.core.follower.WorstCase.authors_columns`.
    Note the floor: an atom pushed to :math:`p \le 10^{-6}` adds a constant and no gradient.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    p = jax.nn.sigmoid(beta * h)
    per_pair = jnp.sum(s * -jnp.log(jnp.maximum(p[:, None] - shift, floor)), axis=1)
    return jnp.mean(per_pair)
