r"""The two kinds of preference loss the registry (:mod:`sgpo_jax.core.preference_losses`) holds.

* :class:`FollowerLoss`: a convex, non-increasing loss :math:`\ell` of the follower's center
  :math:`\xi` (``[N]`` or any shape, elementwise), in probability space (:math:`\xi = \sigma(\beta h)`)
  or margin space (:math:`\xi = \beta h`). The exact follower needs from it its value, its chord
  slope :math:`(\ell(lo) - \ell(x)) / (x - lo)`, its tangent pieces when it is piecewise linear
  (``slopes, intercepts [K]``, which also give the per-entry atoms' levels), and the supports it
  is finite on; the leader evaluates it at the follower's atoms (its *leader form*).
* :class:`PairLoss`: a ``train.loss_type`` of ``train.mode=dpo``, a loss of each pair's policy
  log-ratios (``[B]``), averaged over the batch; a *coupled* one (Dr. DPO) is a function of the
  whole batch's losses (:class:`CoupledPairLoss`), which the step evaluates exactly under
  micro-batching (it fixes each pair's weight from a forward pre-pass).

A loss is one module defining one instance of one of these classes; the registry lists the
modules.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
SPACES = ("probability", "margin")

__all__ = ["SPACES", "FollowerLoss", "PiecewiseLoss", "PairLoss", "CoupledPairLoss", "LogRatios"]


class FollowerLoss(abc.ABC):
    """A convex, non-increasing loss of the follower's center (one instance per loss).

    Attributes:
      name: the registry key (``sgpo.loss``, ``sgpo.leader_loss``).
      space: ``"probability"`` or ``"margin"``: which centers it takes.
      piecewise: ``True`` for a max of tangent pieces (:class:`PiecewiseLoss`).
    """

    name: str
    space: str
    piecewise: bool = False

    def pieces(self, num_tangents: int, support: Tuple[Any, Any], dtype) -> Tuple[Array, Array]:
        """Tangent pieces ``(slopes, intercepts)``, each ``[K]``; exact losses have ``K = 0``."""
        del num_tangents, support
        return jnp.zeros((0,), dtype), jnp.zeros((0,), dtype)

    @abc.abstractmethod
    def value(self, loss: Any, v: Array) -> Array:
        """:math:`\\ell(v)` elementwise; ``loss`` is the built
        :class:`~sgpo_jax.core.follower.ConvexLoss` (its pieces)."""

    @abc.abstractmethod
    def chord_slope(self, loss: Any, x: Array, lower: Array) -> Array:
        r""":math:`(\ell(lo) - \ell(x)) / (x - lo)` elementwise, :math:`-\ell'(x)` at ``x == lower``."""

    def support_problem(self, lower: float) -> Optional[str]:
        """Why a support with lower end ``lower`` does not suit the loss (None: it does)."""
        del lower
        return None

    def leader_value(self, loss: Any, v: Array, p_min: float) -> Array:
        """The loss the leader evaluates at atoms ``v`` (which may leave the follower's support
        once the policy has moved); default :math:`\\ell(v)`."""
        del p_min
        return loss(v)


class PiecewiseLoss(FollowerLoss):
    r""":math:`\ell(v) = \max_k (a_k v + b_k)`: value and chord slope from the pieces alone."""

    piecewise = True

    @abc.abstractmethod
    def pieces(self, num_tangents: int, support: Tuple[Any, Any], dtype) -> Tuple[Array, Array]:
        """``(slopes a, intercepts b)``, each ``[K]``, ``K = num_tangents``."""

    def value(self, loss: Any, v: Array) -> Array:
        r"""The active piece's value, taken by index rather than by ``jnp.max``: the gradient of a
        max compares the lines :math:`a_k v + b_k` with the max again and divides by the number
        that are equal, and XLA recomputes the lines inside each fusion that reads them, where
        they may round differently (at ``--xla_backend_optimization_level=0`` on CPU the fusion
        that counts found no line equal to the max while the one that selects found one: a
        gradient of ``-inf``). Taken by index, the gradient is the active piece's slope whatever
        the rounding; at a kink, the slope of the first tied piece in the loss's order."""
        lines = v[..., None] * loss.slopes + loss.intercepts
        active = jnp.argmax(lines, axis=-1)[..., None]
        return jnp.take_along_axis(lines, active, axis=-1)[..., 0]

    def chord_slope(self, loss: Any, x: Array, lower: Array) -> Array:
        r"""Exact (the piece's own slope) whenever ``x`` and ``lower`` lie on the same piece, so
        the large tie class of the authors' tangents (every :math:`x \le 2\ln 2 / K` has slope
        exactly :math:`K`) is never split by rounding."""
        d = x - lower
        safe_d = jnp.where(d > 0, d, 1)
        # The chord from ``lower`` never beats the slope of the piece active at ``lower``
        # (convexity); it equals it exactly when that piece is also active at ``x``. Decide
        # "active" up to a few ulps, so centers at the edge of the tie class (where the two
        # pieces agree to rounding) are not split off by argmax noise.
        p = loss.piece(lower)
        own = -loss.slopes[p]
        l_x = loss(x)
        on_p = loss.slopes[p] * x + loss.intercepts[p]
        ulp = jnp.finfo(l_x.dtype).eps
        tol = 8 * ulp * (jnp.abs(loss.slopes[p] * x) + jnp.abs(loss.intercepts[p]) + jnp.abs(l_x))
        same = on_p >= l_x - tol
        chord = jnp.minimum((loss(lower) - l_x) / safe_d, own)
        return jnp.where(same | (d <= 0), own, chord)


class LogRatios(NamedTuple):
    r"""A batch's policy log-ratios :math:`r(y) = \log\pi(y|x) - \log\pi_{ref}(y|x)` and
    response lengths (tokens scored, each at least 1), all ``[B]``."""

    chosen: Array
    rejected: Array
    chosen_tokens: Array
    rejected_tokens: Array

    @property
    def margins(self) -> Array:
        """:math:`h = r(y_w) - r(y_l)`, ``[B]``."""
        return self.chosen - self.rejected


class PairLoss(abc.ABC):
    """A ``train.loss_type`` (one instance per loss).

    Attributes:
      name: the registry key, TRL's ``loss_type`` name where TRL has the loss.
      uses_label_smoothing: whether ``train.label_smoothing`` enters the loss (if not, a
        nonzero value is a configuration error rather than silently ignored).
      coupled: the loss is not a mean of per-pair terms (:class:`CoupledPairLoss`).
    """

    name: str
    uses_label_smoothing: bool = True
    coupled: bool = False

    @abc.abstractmethod
    def per_pair(self, ratios: LogRatios, *, beta: float, label_smoothing: float) -> Array:
        """Each pair's loss ``[B]`` (for a coupled loss, the terms it couples)."""


class CoupledPairLoss(PairLoss):
    """A loss of the whole batch's per-pair terms (not their mean): the step computes every
    pair's term in a forward pre-pass, then :meth:`couple` gives the batch value and each pair's
    weight, held fixed while the micro-batches accumulate the gradient."""

    coupled = True

    @abc.abstractmethod
    def couple(self, losses: Array, weights: Array, *, temperature: float) -> Tuple[Array, Array]:
        r"""``(value [], q [B])`` for the per-pair terms ``losses [B]`` with pair masses
        ``weights [B]`` (0 = padding): the batch loss and :math:`q = \partial\,\text{value} /
        \partial\,\text{losses}` (non-negative, summing to 1)."""
