r"""The registry of preference losses: every place that dispatches on a loss name asks here.

Each loss is one module of this package defining ``LOSS``, an instance of
:class:`~sgpo_jax.core.preference_losses.base.FollowerLoss` (a convex, non-increasing loss of the
follower's center: ``sgpo.loss``, ``sgpo.leader_loss``) or of
:class:`~sgpo_jax.core.preference_losses.base.PairLoss` (a ``train.loss_type`` of
``train.mode=dpo``). Adding a loss is one module plus its line in :data:`MODULES`.

Follower losses: ``tangents``, ``neg_log`` (probability space), ``neg_log_sigmoid``,
``neg_log_sigmoid_tangents`` (margin space). Pair losses: ``sigmoid`` (DPO, cDPO with label
smoothing), ``robust`` (rDPO), ``ipo``, ``dr_dpo`` (Dr. DPO).
"""

from __future__ import annotations

from typing import Dict, Tuple

from sgpo_jax.core.preference_losses import (
    dr_dpo,
    ipo,
    neg_log,
    neg_log_sigmoid,
    neg_log_sigmoid_tangents,
    robust,
    sigmoid,
    tangents,
)
from sgpo_jax.core.preference_losses.base import SPACES, FollowerLoss, LogRatios, PairLoss

__all__ = ["MODULES", "SPACES", "FOLLOWER_LOSSES", "PIECEWISE_LOSSES", "LOSS_TYPES", "FollowerLoss", "PairLoss",
           "LogRatios", "follower_loss", "pair_loss"]

MODULES = (tangents, neg_log, neg_log_sigmoid, neg_log_sigmoid_tangents, sigmoid, robust, ipo, dr_dpo)
_FOLLOWER: Dict[str, FollowerLoss] = {m.LOSS.name: m.LOSS for m in MODULES if isinstance(m.LOSS, FollowerLoss)}
_PAIR: Dict[str, PairLoss] = {m.LOSS.name: m.LOSS for m in MODULES if isinstance(m.LOSS, PairLoss)}

FOLLOWER_LOSSES: Tuple[str, ...] = tuple(_FOLLOWER)
PIECEWISE_LOSSES: Tuple[str, ...] = tuple(name for name, loss in _FOLLOWER.items() if loss.piecewise)
LOSS_TYPES: Tuple[str, ...] = tuple(_PAIR)


def follower_loss(name: str) -> FollowerLoss:
    """The follower loss called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in _FOLLOWER:
        raise ValueError(f"unknown follower loss {name!r}; choose one of {FOLLOWER_LOSSES}")
    return _FOLLOWER[name]


def pair_loss(name: str) -> PairLoss:
    """The ``train.loss_type`` called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in _PAIR:
        raise ValueError(f"unknown loss_type {name!r}; choose one of {LOSS_TYPES}")
    return _PAIR[name]
