r"""The SGPO follower: the worst-case distribution in a 1-Wasserstein ball, solved exactly.

Problem (SGPO_NOTES section 3). Given centers :math:`\xi_i` (shape ``[N]``) with probability
masses :math:`w_i` (default :math:`1/N`), a convex non-increasing loss :math:`\ell` and a
support :math:`[lo, hi]`, the follower solves

.. math::

    \max_{Q:\ W_1(Q, \hat P) \le \epsilon,\ \mathrm{supp}\, Q \subset [lo, hi]} \ \mathbb{E}_Q[\ell(z)],
    \qquad \hat P = \textstyle\sum_i w_i \delta_{\xi_i}.

With the paper's variables (mass :math:`s_{ik}` and shift :math:`q_{ik}` per tangent piece
:math:`k`) this is a linear program. In one dimension it has an exact :math:`O(N \log N)`
solution: moving mass from :math:`\xi_i` gains most per unit of transport when it goes all
the way to ``lo`` (chord above a convex curve), the gain per unit of transport is the chord
slope :math:`c_i = (\ell(lo) - \ell(\xi_i)) / (\xi_i - lo)`, non-increasing in :math:`\xi_i`,
so a greedy fractional knapsack in ascending :math:`\xi` order is optimal: whole unit masses
of the lowest centers move to ``lo`` while :math:`\sum_i w_i \theta_i (\xi_i - lo) \le \epsilon`,
the marginal sample moves a fraction, the rest stay. The dual price :math:`\lambda^*` is the
chord slope of the marginal sample and certifies optimality:

.. math::

    \text{value} = \lambda^* \epsilon + \textstyle\sum_i w_i
        \max\big(\ell(\xi_i),\ \ell(lo) - \lambda^* (\xi_i - lo)\big).

Everything is sort + compensated cumsum + threshold: static shapes, jit/vmap/sharding friendly,
no host round trips.

Losses (``loss=``):

* ``"tangents"``: the authors' surrogate, the max of the :math:`K` tangents of :math:`-\log p`
  at :math:`p = k/K`, :math:`k = 1..K` (probability space, support inside ``[0, 1]``).
* ``"neg_log"``: exact :math:`-\log p` (probability space, ``lo > 0`` required: any mass at
  :math:`p = 0` makes the worst case infinite).
* ``"neg_log_sigmoid"``: exact :math:`-\log \sigma(z)` in margin space on a finite window
  (see :func:`margin_window`; in an unbounded space the supremum is not attained).
* ``"neg_log_sigmoid_tangents"``: max of :math:`K` tangents of :math:`-\log\sigma` at the evenly
  spaced knots ``linspace(lo, hi, K)`` of the window (``K = 1``: the knot ``lo``).

Variants (``variant=``):

* ``"ball"`` (default): the true 1-Wasserstein ball above.
* ``"per_entry"``: what the authors' SciPy program defines: the ball constraint
  :math:`\sum_i w_i \sum_k |q_{ik}| \le \epsilon` *plus* their bounds :math:`|q_{ik}| \le \epsilon`,
  :math:`s_{ik} \ge 0`, solved exactly (tangent losses only). Each piece of each sample may
  carry at most :math:`\epsilon` of transport, so the adversary can no longer move a whole unit
  of mass of a hard sample; in the usual regime (centers in a narrow band) the optimum moves a
  fraction :math:`\epsilon / (\xi_i - lo)` of *every* sample's mass to ``lo``, a smooth
  inverse-probability reweighting instead of the ball's "lowest few percent entirely". The
  solution is the same greedy over (sample, piece) items sorted by their gain per unit of
  transport, each item capped at :math:`\epsilon` and each sample at :math:`\xi_i - lo`.
  The program credits mass moved through piece :math:`k` with that piece's own value
  :math:`\ell_k(lo) \le \ell(lo)`; :meth:`WorstCase.atoms` therefore places it where the loss
  equals :math:`\ell_k(lo)` (``[N, K + 1]`` atoms), so that the expected loss of the atoms, with
  :math:`\ell` the max over tangents as the leader evaluates it, is ``value`` exactly.

``group_size=G`` reproduces the authors' grouping (consecutive blocks of ``G`` samples, each
block its own ball of radius :math:`\epsilon`; the last block may be shorter) as one batched
exact solve.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sgpo_jax.core import preference_losses

Array = jax.Array
ArrayLike = Union[Array, np.ndarray, float, Sequence[float]]

LOSSES = preference_losses.FOLLOWER_LOSSES  # the registry's follower losses (docstring above)
PIECEWISE_LOSSES = preference_losses.PIECEWISE_LOSSES
VARIANTS = ("ball", "per_entry")

__all__ = [
    "LOSSES",
    "VARIANTS",
    "ConvexLoss",
    "make_loss",
    "margin_window",
    "WorstCase",
    "worst_case",
    "w1_certificate",
    "W1Certificate",
    "SmoothWorstCase",
    "entropic_worst_case",
]


# --------------------------------------------------------------------------- losses


@struct.dataclass
class ConvexLoss:
    r"""A convex, non-increasing loss :math:`\ell` on the follower's support.

    Piecewise losses are :math:`\ell(v) = \max_k (a_k v + b_k)` with ``slopes`` :math:`a`
    and ``intercepts`` :math:`b` of shape ``[K]``; exact losses have ``K = 0``.
    """

    name: str = struct.field(pytree_node=False)
    slopes: Array  # [K]
    intercepts: Array  # [K]

    @property
    def piecewise(self) -> bool:
        return preference_losses.follower_loss(self.name).piecewise

    def __call__(self, v: Array) -> Array:
        """Loss value, elementwise (any shape)."""
        return preference_losses.follower_loss(self.name).value(self, v)

    def piece(self, v: Array) -> Array:
        """Index of the active tangent piece at ``v`` (piecewise losses only), int32."""
        return jnp.argmax(v[..., None] * self.slopes + self.intercepts, axis=-1)

    def level(self, y: Array) -> Array:
        r"""Smallest :math:`v` with :math:`\ell(v) \le y`, elementwise (piecewise losses only).

        :math:`\ell(v) \le y` iff :math:`a_k v + b_k \le y` for every piece, i.e.
        :math:`v \ge (y - b_k) / a_k` for every decreasing piece (:math:`a_k < 0`); pieces with
        :math:`a_k \ge 0` (none for the tangent losses here) are ignored. For :math:`y` between
        :math:`\ell(hi)` and :math:`\ell(lo)` the result lies in the support and
        :math:`\ell(\text{level}(y)) = y` up to rounding (:math:`\ell` is continuous and
        decreasing there)."""
        down = self.slopes < 0
        a = jnp.where(down, self.slopes, -1)
        return jnp.max(jnp.where(down, (y[..., None] - self.intercepts) / a, -jnp.inf), axis=-1)

    def chord_slope(self, x: Array, lower: Array) -> Array:
        r"""Gain per unit of transport :math:`(\ell(lo) - \ell(x)) / (x - lo)`, elementwise.

        At ``x == lower`` this is the limit :math:`-\ell'(x)`. For piecewise losses the slope is
        exact (the piece's own slope) whenever ``x`` and ``lower`` lie on the same piece, so the
        large tie class of the authors' tangents (every :math:`x \le 2\ln 2 / K` has slope
        exactly :math:`K`) is never split by rounding. Smooth losses use cancellation-free forms.
        """
        return preference_losses.follower_loss(self.name).chord_slope(self, x, lower)


def make_loss(
    name: str = "tangents",
    num_tangents: int = 6,
    support: Tuple[ArrayLike, ArrayLike] = (0.0, 1.0),
    dtype=jnp.float32,
) -> ConvexLoss:
    r"""Builds a :class:`ConvexLoss` (traceable: ``support`` may hold traced scalars).

    ``"tangents"``: :math:`\ell_k(v) = -(K/k)(v - k/K) - \log(k/K)`, the tangents of
    :math:`-\log p` at :math:`k/K` (independent of ``support``).
    ``"neg_log_sigmoid_tangents"``: tangents of :math:`-\log\sigma` at ``linspace(lo, hi, K)``.
    """
    _check_name(name, num_tangents)
    slopes, intercepts = preference_losses.follower_loss(name).pieces(num_tangents, support, dtype)
    return ConvexLoss(name=name, slopes=slopes, intercepts=intercepts)


def margin_window(
    centers: ArrayLike,
    *,
    tau: float = 1.0,
    quantiles: Optional[Tuple[float, float]] = None,
) -> Tuple[Array, Array]:
    """Finite margin-space support ``(lo, hi)`` built from data (traceable).

    Default: ``(min - tau, max + tau)``. With ``quantiles=(q_lo, q_hi)``:
    ``(quantile(q_lo) - tau, quantile(q_hi) + tau)``; centers outside that window are outliers
    that :func:`worst_case` rejects, so clip them into the window first
    (``jnp.clip(centers, lo, hi)``).
    """
    centers = jnp.asarray(centers)
    if quantiles is None:
        lo, hi = jnp.min(centers), jnp.max(centers)
    else:
        q_lo, q_hi = quantiles
        if not 0.0 <= q_lo < q_hi <= 1.0:
            raise ValueError(f"margin_window: quantiles must satisfy 0 <= q_lo < q_hi <= 1, got {quantiles}")
        lo, hi = jnp.quantile(centers, q_lo), jnp.quantile(centers, q_hi)
    if tau < 0:
        raise ValueError(f"margin_window: tau must be >= 0, got {tau}")
    return lo - tau, hi + tau


# --------------------------------------------------------------------------- result


@struct.dataclass
class WorstCase:
    r"""The follower's exact worst case.

    ``variant="ball"``: the worst-case distribution puts mass :math:`w_i (1 - \text{moved}_i)` at
    :math:`\xi_i` and :math:`w_i\, \text{moved}_i` at ``lower``, for every sample :math:`i`.
    ``variant="per_entry"``: mass :math:`w_i (1 - \text{moved}_i)` stays at :math:`\xi_i` and,
    for every tangent piece :math:`k`, mass :math:`w_i\, \text{piece\_mass}_{ik}` sits at the
    point where the loss equals that piece's value at ``lower`` (see :meth:`atoms`).
    Either way :meth:`atoms` is the distribution and its expected loss is ``value``.

    Attributes:
      value: ``[]`` worst-case expected loss :math:`\mathbb{E}_Q[\ell]` (for ``per_entry``: the
        optimum of the authors' program, whose objective scores each piece's mass with that
        piece's own linear function; :meth:`atoms` realizes it as an expected loss).
      dual: optimal price :math:`\lambda^*` of the transport budget; ``[]`` for the global
        problem, ``[num_groups]`` with ``group_size``.
      dual_value: ``[]`` the dual objective at ``dual`` (equals ``value`` at the optimum).
      transport: ``[]`` transport the solver used, :math:`\sum_i w_i \sum_k |q_{ik}|`
        (``<= epsilon``); for ``ball`` this is :math:`\sum_i w_i\, \text{moved}_i (\xi_i - lo)`.
      epsilon: ``[]`` the radius.
      centers: ``[N]`` the centers :math:`\xi`.
      weights: ``[N]`` probability mass of each center (sums to 1).
      moved: ``[N]`` fraction of each sample's mass that leaves its center.
      lower: ``[]`` the support's lower end.
      piece_mass: ``[N, K]`` mass moved through tangent piece ``k`` (to ``lower`` in the solver's
        program; ``K = 0`` for exact losses).
      loss: the :class:`ConvexLoss` used.
      variant: ``"ball"`` or ``"per_entry"`` (static).
    """

    value: Array
    dual: Array
    dual_value: Array
    transport: Array
    epsilon: Array
    centers: Array
    weights: Array
    moved: Array
    lower: Array
    piece_mass: Array
    loss: ConvexLoss
    variant: str = struct.field(pytree_node=False, default="ball")

    def atoms(self) -> Tuple[Array, Array]:
        r"""Per-sample atoms ``(shift, mass)``, each ``[N, J]``: atom :math:`j` of sample :math:`i`
        sits at ``centers[i] - shift[i, j]`` with mass ``mass[i, j]``; masses per row sum to 1,
        shifts are :math:`\ge 0` and positions lie in ``[lower, centers]``. Exact: with ``l`` the
        loss itself (max over tangents for the tangent losses, as :func:`sgpo_loss` evaluates it),
        :math:`\sum_i w_i \sum_j \text{mass}_{ij}\, \ell(\xi_i - \text{shift}_{ij}) = ` ``value``.

        ``ball``: ``J = 2``; column 0 stays at the center (shift 0), column 1 sits at ``lower``
        (shift ``center - lower``).

        ``per_entry``: ``J = K + 1``; column 0 stays at the center, column ``1 + k`` carries the
        mass moved through tangent piece ``k``. The authors' program scores that mass with the
        piece's *own* linear function at ``lower``, :math:`\ell_k(lo) \le \ell(lo)`, so an atom
        at ``lower`` scored with the max over tangents would overstate the value (by up to 0.15 on
        random instances). The atom sits instead at :math:`z_k = \ell^{-1}(\ell_k(lo))`
        (:meth:`ConvexLoss.level`), where the loss equals exactly what the program credits; since
        :math:`\ell_k(lo) > \ell(\xi_i)` for every piece that carries mass,
        :math:`lo \le z_k < \xi_i`, so the atoms move less than ``transport`` (still inside the
        ball and the per-entry bounds) and their expected loss is ``value``."""
        d = jnp.maximum(self.centers - self.lower, 0)
        if self.variant != "per_entry":
            shift = jnp.stack([jnp.zeros_like(d), d], axis=1)
            mass = jnp.stack([1 - self.moved, self.moved], axis=1)
            return shift, mass
        loss = self.loss
        y = loss.slopes * self.lower + loss.intercepts  # [K] each piece's value at lower
        z = jnp.where(y >= loss(self.lower), self.lower, jnp.maximum(loss.level(y), self.lower))
        carried = self.piece_mass > 0
        piece_shift = jnp.where(carried, jnp.maximum(self.centers[:, None] - z[None, :], 0), 0)
        shift = jnp.concatenate([jnp.zeros_like(d)[:, None], piece_shift], axis=1)
        mass = jnp.concatenate([(1 - self.moved)[:, None], self.piece_mass], axis=1)
        return shift, mass

    def authors_columns(self) -> Tuple[Array, Array]:
        r"""The authors' per-pair columns ``(s, shift)``, each ``[N, K]``: mass per tangent piece
        and shift :math:`q_{ik}/s_{ik}` (0 where :math:`s_{ik} = 0`), i.e. their ``ai`` and
        ``qi / ai``. Exact: :math:`\sum_k s_{ik} \ell_k(\xi_i - \text{shift}_{ik})` is sample
        :math:`i`'s worst-case loss and :math:`\sum_k s_{ik}\, \text{shift}_{ik}` its transport.
        Mass that stays at the center rides on the piece active there; when that is also the
        piece receiving the moved mass, the two atoms merge into one (the piece is linear).
        Tangent losses only."""
        if not self.loss.piecewise:
            raise ValueError(
                f"authors_columns: loss {self.loss.name!r} has no tangent pieces; use atoms() or "
                f"one of {PIECEWISE_LOSSES}"
            )
        k = self.loss.slopes.shape[0]
        stay = jax.nn.one_hot(self.loss.piece(self.centers), k, dtype=self.piece_mass.dtype)
        s = self.piece_mass + stay * (1 - self.moved)[:, None]
        q = self.piece_mass * jnp.maximum(self.centers - self.lower, 0)[:, None]
        shift = jnp.where(s > 0, q / jnp.where(s > 0, s, 1), 0)
        return s, shift


# --------------------------------------------------------------------------- accurate sums


def _two_sum(a: Array, b: Array) -> Tuple[Array, Array]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _add_double(x: Tuple[Array, Array], y: Tuple[Array, Array]) -> Tuple[Array, Array]:
    s, e = _two_sum(x[0], y[0])
    e = e + x[1] + y[1]
    hi = s + e
    return hi, e - (hi - s)


def _cumsum(v: Array) -> Tuple[Array, Array]:
    """Inclusive prefix sums of ``v`` as unevaluated pairs ``hi + lo`` (double-word arithmetic):
    float32 inputs keep ~1e-14 relative accuracy at N = 1e6 instead of drifting."""
    return jax.lax.associative_scan(_add_double, (v, jnp.zeros_like(v)))


def _exclusive_cumsum(v: Array) -> Tuple[Array, Array]:
    hi, lo = _cumsum(v)
    zero = jnp.zeros_like(v[:1])
    return jnp.concatenate([zero, hi[:-1]]), jnp.concatenate([zero, lo[:-1]])


def _total(v: Array) -> Array:
    hi, lo = _cumsum(v.reshape(-1))
    return hi[-1] + lo[-1]


# --------------------------------------------------------------------------- exact solvers


def _replicated(x: Array) -> Array:
    """Gathers an input sharded over *Explicit* mesh axes (``jax.make_mesh``'s default in recent
    JAX), whose sharding-in-types rejects the global sort and prefix sums below (slicing a sharded
    dim). Auto-axis and unsharded inputs pass through; GSPMD handles them."""
    reshard = getattr(jax.sharding, "reshard", None)
    sharding = getattr(jax.typeof(x), "sharding", None) if hasattr(jax, "typeof") else None
    spec = getattr(sharding, "spec", None)
    if reshard is None or spec is None or all(axis is None for axis in spec):
        return x
    return reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def _solve_ball(x, w, eps, lower, loss: ConvexLoss):
    """True ball, one group. x, w: [N]; returns (value, dual, dual_value, transport, moved, piece_mass)."""
    n = x.shape[0]
    xs, ws, perm = jax.lax.sort((x, w, jnp.arange(n)), num_keys=1)  # ascending centers
    d = jnp.maximum(xs - lower, 0)
    cost = ws * d
    used_hi, used_lo = _exclusive_cumsum(cost)
    room = (eps - used_hi) - used_lo
    movable = cost > 0
    theta = jnp.where(movable, jnp.clip(room / jnp.where(movable, cost, 1), 0, 1), 0)
    moved = jnp.zeros_like(x).at[perm].set(theta)

    marginal = movable & (theta < 1)
    j = jnp.argmax(marginal)
    dual = jnp.where(jnp.any(marginal), loss.chord_slope(xs[j], lower), 0).astype(x.dtype)

    l_x, l_lo = loss(x), loss(lower)
    value = _total(w * (l_x + moved * (l_lo - l_x)))
    transport = _total(theta * cost)
    dist = jnp.maximum(x - lower, 0)
    dual_value = dual * eps + _total(w * jnp.maximum(l_x, l_lo - dual * dist))

    k = loss.slopes.shape[0]
    piece_mass = (moved[:, None] * jax.nn.one_hot(loss.piece(lower), k, dtype=x.dtype) if k
                  else jnp.zeros((n, 0), x.dtype))
    return value, dual, dual_value, transport, moved, piece_mass


def _solve_per_entry(x, w, eps, lower, loss: ConvexLoss):
    """Ball plus the authors' per-entry bounds |q_ik| <= eps, one group (piecewise losses).

    Items (i, j): sample i moves transport through the j-th piece in decreasing order of the
    piece's value at ``lower``, at rate r_ij = (ell_j(lo) - l(xi_i)) / (xi_i - lo) per unit,
    capped at eps per item and xi_i - lo per sample; a global greedy by rate is exact (laminar
    caps). Same return as :func:`_solve_ball`.
    """
    n = x.shape[0]
    k = loss.slopes.shape[0]
    l_lo_k = loss.slopes * lower + loss.intercepts  # [K]
    korder = jnp.argsort(-l_lo_k, stable=True)
    l_lo_o = l_lo_k[korder]
    vals = x[:, None] * loss.slopes + loss.intercepts  # [N, K]
    l_x, kx = jnp.max(vals, axis=1), jnp.argmax(vals, axis=1)
    d = jnp.maximum(x - lower, 0)
    safe_d = jnp.where(d > 0, d, 1)[:, None]
    rate = (l_lo_o[None, :] - l_x[:, None]) / safe_d
    rate = jnp.where(korder[None, :] == kx[:, None], -loss.slopes[korder][None, :], rate)
    rate = jax.lax.cummin(rate, axis=1)  # exactly monotone within a sample
    rank = jnp.arange(k, dtype=x.dtype)
    cap = jnp.clip(d[:, None] - rank * eps, 0, eps)
    cap = jnp.where((rate > 0) & (d[:, None] > 0), cap, 0)
    cost = w[:, None] * cap

    # Global order: rate descending, then ascending center, then piece rank.
    sample_key = jnp.broadcast_to(jnp.argsort(jnp.argsort(x, stable=True))[:, None], (n, k))
    rank_key = jnp.broadcast_to(jnp.arange(k)[None, :], (n, k))
    flat = jnp.arange(n * k)
    neg_rate_s, _, _, cost_s, order = jax.lax.sort(
        (-rate.ravel(), sample_key.ravel(), rank_key.ravel(), cost.ravel(), flat), num_keys=3
    )
    used_hi, used_lo = _exclusive_cumsum(cost_s)
    room = (eps - used_hi) - used_lo
    movable = cost_s > 0
    frac_s = jnp.where(movable, jnp.clip(room / jnp.where(movable, cost_s, 1), 0, 1), 0)
    frac = jnp.zeros_like(frac_s).at[order].set(frac_s).reshape(n, k)
    carried = frac * cap  # transport per item, in the sample's own units
    mass_o = carried / safe_d  # mass moved to lower through each item's piece
    moved = jnp.sum(mass_o, axis=1)

    marginal = movable & (frac_s < 1)
    dual = jnp.where(jnp.any(marginal), -neg_rate_s[jnp.argmax(marginal)], 0)
    value = _total(w * ((1 - moved) * l_x + mass_o @ l_lo_o))
    transport = _total(w * jnp.sum(carried, axis=1))
    dual_value = dual * eps + _total(w * (l_x + jnp.sum(cap * jnp.maximum(rate - dual, 0), axis=1)))
    piece_mass = jnp.zeros_like(mass_o).at[:, korder].set(mass_o)
    return value, dual, dual_value, transport, moved, piece_mass


@functools.partial(jax.jit, static_argnames=("loss_name", "num_tangents", "group_size", "variant"))
def _worst_case(centers, weights, epsilon, lower, upper, *, loss_name, num_tangents, group_size, variant):
    centers, weights = _replicated(centers), _replicated(weights)
    dtype = centers.dtype
    loss = make_loss(loss_name, num_tangents, (lower, upper), dtype)
    eps = jnp.asarray(epsilon, dtype)
    lower = jnp.asarray(lower, dtype)
    solve = _solve_ball if variant == "ball" else _solve_per_entry
    w = weights / jnp.maximum(_total(weights), jnp.finfo(dtype).tiny)  # all-padding batch: no NaN
    if group_size is None:
        value, dual, dual_value, transport, moved, piece_mass = solve(centers, w, eps, lower, loss)
    else:
        n = centers.shape[0]
        groups = -(-n // group_size)
        pad = groups * group_size - n
        xg = jnp.concatenate([centers, jnp.full((pad,), lower, dtype)]).reshape(groups, group_size)
        wg = jnp.pad(w, (0, pad)).reshape(groups, group_size)
        mass = jnp.sum(wg, axis=1)
        wg = wg / jnp.where(mass > 0, mass, 1)[:, None]
        out = jax.vmap(solve, in_axes=(0, 0, None, None, None))(xg, wg, eps, lower, loss)
        value_g, dual, dual_value_g, transport_g, moved_g, piece_g = out
        value, dual_value, transport = (_total(mass * v) for v in (value_g, dual_value_g, transport_g))
        moved = moved_g.reshape(-1)[:n]
        piece_mass = piece_g.reshape(groups * group_size, -1)[:n]
    return WorstCase(
        variant=variant,
        value=value,
        dual=dual,
        dual_value=dual_value,
        transport=transport,
        epsilon=eps,
        centers=centers,
        weights=w,
        moved=moved,
        lower=lower,
        piece_mass=piece_mass,
        loss=loss,
    )


def worst_case(
    centers: ArrayLike,
    epsilon: ArrayLike,
    *,
    loss: str = "tangents",
    num_tangents: int = 6,
    support: Tuple[ArrayLike, ArrayLike] = (0.0, 1.0),
    group_size: Optional[int] = None,
    weights: Optional[ArrayLike] = None,
    variant: str = "ball",
) -> WorstCase:
    r"""Exact worst case over the 1-Wasserstein ball of radius ``epsilon`` around the centers.

    Args:
      centers: ``[N]`` per-pair centers :math:`\xi_i` (probabilities for ``"tangents"`` and
        ``"neg_log"``, scaled margins for the ``neg_log_sigmoid*`` losses), inside ``support``.
      epsilon: radius :math:`\epsilon \ge 0` (scalar, may be traced).
      loss: one of :data:`LOSSES` (see the module docstring).
      num_tangents: :math:`K` for the tangent losses.
      support: ``(lo, hi)``, finite, ``lo < hi``; may be traced (e.g. from :func:`margin_window`).
      group_size: ``None`` for the global problem, or ``G`` for the authors' consecutive groups.
      weights: optional ``[N]`` non-negative masses (e.g. 0 for padding rows); normalized to 1.
      variant: ``"ball"`` (the true ball) or ``"per_entry"`` (the authors' SciPy bounds).

    Returns:
      A :class:`WorstCase`. Works under ``jax.jit`` and ``jax.vmap`` and with sharded inputs.
      Inputs are validated eagerly when they are concrete (not traced): NaN/inf centers, centers
      outside the support, a negative epsilon, an empty array, or a support that does not suit
      the loss raise ``ValueError``.
    """
    _check_name(loss, num_tangents)
    if variant not in VARIANTS:
        raise ValueError(f"worst_case: variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "per_entry" and not preference_losses.follower_loss(loss).piecewise:
        raise ValueError(
            f"worst_case: variant 'per_entry' is defined on tangent pieces; loss must be one of "
            f"{PIECEWISE_LOSSES}, got {loss!r}"
        )
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"worst_case: group_size must be a positive int or None, got {group_size!r}")
    centers = _as_float(centers, "centers")
    if centers.ndim != 1:
        raise ValueError(f"worst_case: centers must have shape [N], got shape {centers.shape}")
    if centers.shape[0] == 0:
        raise ValueError("worst_case: centers is empty; the follower needs at least one sample")
    weights = (
        jnp.ones_like(centers) if weights is None else _as_float(weights, "weights").astype(centers.dtype)
    )
    if weights.shape != centers.shape:
        raise ValueError(f"worst_case: weights shape {weights.shape} != centers shape {centers.shape}")
    lower, upper = support
    _validate(centers, weights, epsilon, lower, upper, loss)
    epsilon, lower, upper = _scalars(centers.dtype, epsilon, lower, upper)
    return _worst_case(
        centers,
        weights,
        epsilon,
        lower,
        upper,
        loss_name=loss,
        num_tangents=num_tangents,
        group_size=group_size,
        variant=variant,
    )


class W1Certificate(NamedTuple):
    r"""What :func:`w1_certificate` checks (all ``[]`` arrays).

    Attributes:
      w1: Wasserstein-1 distance between the empirical distribution and the atoms.
      expected_loss: :math:`\mathbb{E}_Q[\ell]` over the atoms, computed from them.
      within_budget: ``w1 <= epsilon + tol``.
      matches_value: ``|expected_loss - value| <= tol * max(1, |value|)``.
    """

    w1: Array
    expected_loss: Array
    within_budget: Array
    matches_value: Array


def w1_certificate(result: WorstCase, *, tol: Optional[float] = None) -> W1Certificate:
    r"""Checks that :meth:`WorstCase.atoms` is a distribution :math:`Q` inside the ball whose
    expected loss is ``value``: the two facts the leader relies on when it trains on the atoms.

    ``w1`` is computed with ott-jax's univariate (quantile) solver and the cost ``|x - y|``: a
    sort-and-cumsum of the two CDFs, not the follower's own arithmetic. It is *not* an independent
    certificate of optimality: in one dimension, when every atom lies at or below its center (all
    mass moves the same way), :math:`W_1` equals the atoms' mean shift
    :math:`\sum_i w_i \sum_j \text{mass}_{ij}\, \text{shift}_{ij}` exactly. For ``variant="ball"``,
    where all moved mass goes to one point (``lower``), that is ``transport`` by construction, so
    ``w1`` re-derives ``transport`` and ``within_budget`` re-checks ``transport <= epsilon``. For
    ``per_entry`` the atoms sit above ``lower`` and ``w1 <= transport``. Optimality is certified by
    ``dual_value == value`` (weak duality), not here.

    ``expected_loss`` is :math:`\sum_i w_i \sum_j \text{mass}_{ij}\, \ell(\xi_i - \text{shift}_{ij})`
    with the follower's loss (the max over tangents for the tangent losses, as the leader's
    :func:`~sgpo_jax.core.losses.sgpo_loss` evaluates it), accumulated in double-word arithmetic.

    Args:
      result: a :class:`WorstCase` (global or grouped: each group's ball has radius
        :math:`\epsilon` and carries its share of the mass, so the whole is within
        :math:`\epsilon` too).
      tol: float tolerance, absolute for ``w1 <= epsilon + tol`` and relative (to
        ``max(1, |value|)``) for ``expected_loss == value``. Default
        ``sqrt(finfo(dtype).eps) * max(1, epsilon)`` (3.5e-4 in float32, 1.5e-8 in float64):
        the quantile solver sorts and sums in the inputs' dtype, so its rounding grows with N.

    Returns:
      A :class:`W1Certificate` ``(w1, expected_loss, within_budget, matches_value)``; traceable.
    """
    from ott.geometry import costs, pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import univariate

    x = result.centers
    if tol is None:
        tol = math.sqrt(float(jnp.finfo(x.dtype).eps)) * jnp.maximum(1, result.epsilon)
    shift, mass = result.atoms()
    positions = x[:, None] - shift
    masses = result.weights[:, None] * mass
    geom = pointcloud.PointCloud(x[:, None], positions.reshape(-1, 1), cost_fn=costs.PNormP(1))
    prob = linear_problem.LinearProblem(geom, a=result.weights, b=masses.reshape(-1))
    w1 = univariate.quantile_solver(prob).ot_costs[0]
    loss_at = jnp.where(masses > 0, result.loss(positions), 0)  # zero-mass atoms never count
    expected = _total(masses * loss_at)
    return W1Certificate(
        w1=w1,
        expected_loss=expected,
        within_budget=w1 <= result.epsilon + tol,
        matches_value=jnp.abs(expected - result.value) <= tol * jnp.maximum(1, jnp.abs(result.value)),
    )


# --------------------------------------------------------------------------- entropic follower


@struct.dataclass
class SmoothWorstCase:
    r"""Entropic (smooth) worst case on a grid.

    Attributes:
      value: ``[]`` :math:`\mathbb{E}_\pi[\ell(g)]` under the soft plan (a feasible point of the
        ball, so ``<=`` the exact value; converges to it as ``regularization -> 0``).
      dual: ``[]`` the price :math:`\lambda` found by bisection (its gradient is the implicit one
        of the active budget constraint).
      transport: ``[]`` :math:`\sum_{ij} \pi_{ij} |\xi_i - g_j|` (``<= epsilon``).
      grid: ``[M]`` destinations (``lo..hi`` evenly, plus every center).
      plan: ``[N, M]`` the soft transport plan (rows sum to the sample masses).
    """

    value: Array
    dual: Array
    transport: Array
    grid: Array
    plan: Array


def _soft_plan(lam, dist, loss_grid, weights, regularization):
    """Semi-relaxed entropic OT with an ott-jax geometry: source marginal ``weights`` fixed,
    target free (Sinkhorn with tau_b = 0), cost ``lam * |x - g| - loss(g)``. With a free target
    the g-potential stays 0 and a single f-update is the exact solution, so this is one
    Sinkhorn half-step, differentiable without implicit differentiation."""
    from ott.geometry import geometry

    geom = geometry.Geometry(cost_matrix=lam * dist - loss_grid[None, :], epsilon=regularization)
    g = jnp.zeros(dist.shape[1], dist.dtype)
    f = geom.update_potential(jnp.zeros(dist.shape[0], dist.dtype), g, jnp.log(weights), axis=1)
    plan = geom.transport_from_potentials(f, g)
    # Rows sum to the weights in exact arithmetic; in float32 at small regularization the rounding
    # of f (relative 1e-7, divided by the regularization) leaves them off by ~1e-4, enough for the
    # value to exceed the exact worst case. Rescaling is the identity in exact arithmetic.
    rows = jnp.sum(plan, axis=1)
    return plan * jnp.where(rows > 0, weights / jnp.where(rows > 0, rows, 1), 0)[:, None]


@functools.partial(
    jax.jit, static_argnames=("loss_name", "num_tangents", "grid_size", "bisection_steps")
)
def _entropic(centers, weights, epsilon, lower, upper, regularization, *, loss_name, num_tangents,
              grid_size, bisection_steps):
    centers, weights = _replicated(centers), _replicated(weights)
    dtype = centers.dtype
    loss = make_loss(loss_name, num_tangents, (lower, upper), dtype)
    w = weights / jnp.sum(weights)
    grid = jnp.concatenate([jnp.linspace(lower, upper, grid_size, dtype=dtype), centers])
    dist = jnp.abs(centers[:, None] - grid[None, :])
    loss_grid = loss(grid)
    eps = jnp.asarray(epsilon, dtype)

    def transport(lam):
        return jnp.sum(_soft_plan(lam, dist, loss_grid, w, regularization) * dist)

    steepest = jnp.max(loss.chord_slope(centers, jnp.asarray(lower, dtype)))
    hi0 = steepest + grid.shape[0] * regularization / jnp.maximum(eps, jnp.finfo(dtype).tiny) + 1

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        feasible = transport(mid) <= eps
        return jnp.where(feasible, lo, mid), jnp.where(feasible, mid, hi)

    free = transport(jnp.zeros((), dtype)) <= eps
    _, lam = jax.lax.fori_loop(0, bisection_steps, bisect, (jnp.zeros((), dtype), hi0))
    binding = (~free) & (eps > 0)
    lam = jax.lax.stop_gradient(jnp.where(binding, lam, 0))  # eps = 0: keep inf/NaN out of grads
    # The price depends on the centers and on epsilon through the active budget
    # T(lam, centers) = eps. `value` is E_pi[loss], not the Lagrangian, so the envelope theorem
    # does not apply: differentiate lam implicitly, d lam = -(dT - d eps) / (dT / d lam). The
    # correction is exactly 0 in the forward pass.
    t = transport(lam)
    slope = jax.lax.stop_gradient(jax.grad(transport)(lam))
    implicit = binding & (slope < 0)
    resid = (t - jax.lax.stop_gradient(t)) - (eps - jax.lax.stop_gradient(eps))
    lam = lam - jnp.where(implicit, resid / jnp.where(implicit, slope, -1), 0)
    plan = _soft_plan(lam, dist, loss_grid, w, regularization)
    at_center = grid[None, :] == centers[:, None]
    stay = w[:, None] * at_center / jnp.sum(at_center, 1, keepdims=True)
    plan = jnp.where(eps > 0, plan, stay)
    return SmoothWorstCase(
        value=jnp.sum(plan * loss_grid[None, :]),
        dual=lam,
        transport=jnp.sum(plan * dist),
        grid=grid,
        plan=plan,
    )


def entropic_worst_case(
    centers: ArrayLike,
    epsilon: ArrayLike,
    *,
    regularization: float = 1e-2,
    loss: str = "tangents",
    num_tangents: int = 6,
    support: Tuple[ArrayLike, ArrayLike] = (0.0, 1.0),
    weights: Optional[ArrayLike] = None,
    grid_size: int = 64,
    bisection_steps: int = 60,
) -> SmoothWorstCase:
    r"""A differentiable follower: entropic OT (ott-jax Sinkhorn, free target marginal) from the
    empirical distribution to a grid, with the transport budget enforced by bisection on its
    price :math:`\lambda`:

    .. math::

        \pi_\lambda = \arg\max_{\pi \mathbf{1} = w}\ \langle \pi, \ell(g) - \lambda |\xi - g| \rangle
            + \text{reg} \cdot H(\pi), \qquad \lambda: \ \langle \pi_\lambda, |\xi - g| \rangle \le \epsilon.

    ``value`` is differentiable in ``centers`` and ``epsilon`` (the price is differentiated
    implicitly through the active budget :math:`\langle \pi_\lambda, |\xi - g| \rangle = \epsilon`) and
    converges to :func:`worst_case`'s value as ``regularization -> 0`` (the grid contains every
    center and ``lo``, where the exact worst case puts its atoms). Memory is ``O(N (N + M))``:
    meant for batches, not for millions of pairs. Ball variant, no grouping.
    """
    _check_name(loss, num_tangents)
    centers = _as_float(centers, "centers")
    if centers.ndim != 1 or centers.shape[0] == 0:
        raise ValueError(f"entropic_worst_case: centers must be a non-empty [N] array, got shape {centers.shape}")
    weights = jnp.ones_like(centers) if weights is None else _as_float(weights, "weights").astype(centers.dtype)
    if not regularization > 0:
        raise ValueError(f"entropic_worst_case: regularization must be > 0, got {regularization}")
    if grid_size < 2:
        raise ValueError(f"entropic_worst_case: grid_size must be >= 2, got {grid_size}")
    lower, upper = support
    _validate(centers, weights, epsilon, lower, upper, loss)
    epsilon, lower, upper, regularization = _scalars(centers.dtype, epsilon, lower, upper, regularization)
    return _entropic(
        centers, weights, epsilon, lower, upper, regularization,
        loss_name=loss, num_tangents=num_tangents, grid_size=grid_size, bisection_steps=bisection_steps,
    )


# --------------------------------------------------------------------------- validation


def _check_name(name: str, num_tangents: int) -> None:
    bad_k = not isinstance(num_tangents, (int, np.integer)) or num_tangents < 1
    if preference_losses.follower_loss(name).piecewise and bad_k:
        raise ValueError(f"num_tangents must be a positive int for loss {name!r}, got {num_tangents!r}")


def _as_float(x: ArrayLike, what: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.dtype in (jnp.float16, jnp.bfloat16):
        x = x.astype(jnp.float32)  # the follower always accumulates in >= float32
    return x


def _scalars(dtype, *values) -> Tuple[Array, ...]:
    """Scalars as arrays of the centers' dtype, so Python floats, NumPy scalars and arrays share
    one compiled solver instead of each triggering a recompile."""
    return tuple(jnp.asarray(v, dtype) for v in values)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _validate(centers, weights, epsilon, lower, upper, loss: str) -> None:
    """Eager checks on whatever is concrete; traced values pass through unchecked."""
    if _concrete(epsilon):
        eps = np.asarray(epsilon, dtype=np.float64)
        if eps.shape != () or not np.isfinite(eps) or eps < 0:
            raise ValueError(f"epsilon must be a finite scalar >= 0, got {epsilon!r}")
    lo = hi = None
    if _concrete(lower) and _concrete(upper):
        lo, hi = float(np.asarray(lower)), float(np.asarray(upper))
        if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
            raise ValueError(
                f"support must be finite with lo < hi, got ({lo}, {hi}); in margin space build a "
                "window with margin_window(centers, tau=...)"
            )
        problem = preference_losses.follower_loss(loss).support_problem(lo)
        if problem:
            raise ValueError(problem)
    if _concrete(weights):
        wn = np.asarray(weights, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(wn) | (wn < 0))
        if bad.size:
            raise ValueError(f"weights must be finite and >= 0; weights[{bad[0]}] = {wn[bad[0]]}")
        if wn.sum() <= 0:
            raise ValueError("weights sum to 0: at least one sample needs positive mass")
    if _concrete(centers):
        xn = np.asarray(centers, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(xn))
        if bad.size:
            raise ValueError(f"centers must be finite; centers[{bad[0]}] = {xn[bad[0]]} ({bad.size} bad values)")
        if lo is not None:
            out = np.flatnonzero((xn < lo) | (xn > hi))
            if out.size:
                raise ValueError(
                    f"centers[{out[0]}] = {xn[out[0]]} lies outside the support [{lo}, {hi}] "
                    f"({out.size} of {xn.size} centers do); probability-space losses take centers in "
                    "[0, 1], margin-space losses need a window from margin_window()"
                )
