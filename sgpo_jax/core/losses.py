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

from sgpo_jax.core.follower import make_loss

Array = jax.Array
SPACES = ("probability", "margin")

__all__ = [
    "SPACES",
    "LeaderLoss",
    "sequence_logps",
    "preference_centers",
    "reward_metrics",
    "dpo_loss",
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
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = (1 - label_smoothing) * jax.nn.softplus(-beta * h) + label_smoothing * jax.nn.softplus(beta * h)
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
    ``"neg_log_sigmoid_tangents"``); ``support`` gives the margin window for
    ``"neg_log_sigmoid_tangents"`` knots. ``"neg_log"`` is evaluated as
    :math:`-\log\max(v, p_{min})` because atoms can fall below 0 when the policy has moved.
    With ``epsilon = 0`` atoms (shift 0, unit mass) and an exact loss this equals DPO.

    Returns ``(LeaderLoss, metrics)`` (TRL reward metrics weighted by pair mass).
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    xi = preference_centers(h, beta=beta, space=space)
    ell = make_loss(loss, num_tangents, support, xi.dtype)
    shift = jax.lax.stop_gradient(atom_shift).astype(xi.dtype)
    mass = jax.lax.stop_gradient(atom_mass).astype(xi.dtype)
    v = xi[:, None] - shift
    if loss == "neg_log":
        v = jnp.maximum(v, p_min)
    per_pair = jnp.sum(mass * ell(v), axis=1)
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
