"""Independent LP oracles for the follower (scipy HiGHS), all in float64.

* :func:`paper_lp`: the paper's s/q program with tangent pieces ``a_k v + b_k`` (exact for the
  true 1-Wasserstein ball over ``[lo, hi]`` with the loss ``max_k a_k v + b_k``), optionally with
  the authors' per-entry bounds ``|q_ik| <= eps``.
* :func:`transport_lp`: the ball restricted to a finite grid of destinations, as a transport plan
  LP (a lower bound on the continuous optimum, equal to it when the grid holds the optimal atoms).
* :func:`ball_dual_lp`: the continuous dual ``min_{lam >= 0} lam eps + sum_i w_i sup_z (l(z) -
  lam |x_i - z|)`` for a convex loss (the sup over ``[lo, hi]`` is attained at ``lo``, ``x_i`` or
  ``hi``): an upper bound on the continuous optimum (weak duality), equal to it (strong duality).

Together ``transport_lp <= optimum <= ball_dual_lp`` sandwich the exact value of smooth losses.
"""

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog


def _weights(n, w):
    w = np.full(n, 1.0 / n) if w is None else np.asarray(w, np.float64)
    return w / w.sum()


def _solve(c, A_ub, b_ub, A_eq, b_eq, bounds):
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs",
                  options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10})
    assert res.status == 0, res.message
    return res


def paper_lp(x, eps, a, b, lo, hi, w=None, per_entry=False):
    """max sum_i w_i sum_k [s_ik (a_k x_i + b_k) - a_k q_ik] over s >= 0 (rows sum to 1), q, t >= |q|,
    s (x - hi) <= q <= s (x - lo) (atoms x - q/s in [lo, hi]), sum_ik w_i t_ik <= eps; per_entry adds
    |q_ik| <= eps. Variables are laid out [s (N*K), q (N*K), t (N*K)]."""
    x = np.asarray(x, np.float64).reshape(-1)
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    n, k = len(x), len(a)
    w = _weights(n, w)
    m = n * k
    xi = np.repeat(x, k)  # [m], sample of each (i, k)
    wi = np.repeat(w, k)
    ak = np.tile(a, n)
    bk = np.tile(b, n)
    c = np.concatenate([-wi * (ak * xi + bk), wi * ak, np.zeros(m)])
    eye = sp.identity(m, format="csr")
    zero = sp.csr_matrix((m, m))
    rows = [
        sp.hstack([zero, eye, -eye]),  # q - t <= 0
        sp.hstack([zero, -eye, -eye]),  # -q - t <= 0
        sp.hstack([-sp.diags(xi - lo), eye, zero]),  # q <= s (x - lo)
        sp.hstack([sp.diags(xi - hi), -eye, zero]),  # q >= s (x - hi)
        sp.hstack([sp.csr_matrix((1, 2 * m)), sp.csr_matrix(wi[None, :])]),  # budget
    ]
    A_ub = sp.vstack(rows, format="csr")
    b_ub = np.concatenate([np.zeros(4 * m), [eps]])
    A_eq = sp.hstack([sp.kron(sp.identity(n), np.ones((1, k))), sp.csr_matrix((n, 2 * m))], format="csr")
    b_eq = np.ones(n)
    qb = (-eps, eps) if per_entry else (None, None)
    bounds = [(0, None)] * m + [qb] * m + [(0, None)] * m
    return -_solve(c, A_ub, b_ub, A_eq, b_eq, bounds).fun


def transport_lp(x, eps, loss, grid, w=None):
    """max sum_ij pi_ij loss(g_j) s.t. sum_j pi_ij = w_i, pi >= 0, sum_ij pi_ij |x_i - g_j| <= eps."""
    x = np.asarray(x, np.float64).reshape(-1)
    g = np.asarray(grid, np.float64).reshape(-1)
    n, m = len(x), len(g)
    w = _weights(n, w)
    dist = np.abs(x[:, None] - g[None, :])
    c = -np.tile(loss(g), n)
    A_eq = sp.kron(sp.identity(n), np.ones((1, m)), format="csr")
    A_ub = sp.csr_matrix(dist.reshape(1, -1))
    return -_solve(c, A_ub, [eps], A_eq, w, [(0, None)] * (n * m)).fun


def ball_dual_lp(x, eps, loss, lo, hi, w=None):
    """min lam eps + sum_i w_i t_i over lam >= 0, t_i >= loss(z) - lam |x_i - z| for z in {lo, x_i, hi}."""
    x = np.asarray(x, np.float64).reshape(-1)
    n = len(x)
    w = _weights(n, w)
    c = np.concatenate([[eps], w])
    rows, rhs = [], []
    for z, dz in ((lo, x - lo), (x, np.zeros(n)), (hi, hi - x)):
        # loss(z) - lam dz - t_i <= 0
        rows.append(sp.hstack([sp.csr_matrix(-dz[:, None]), -sp.identity(n)]))
        rhs.append(-np.broadcast_to(loss(np.asarray(z, np.float64)), (n,)))
    A_ub = sp.vstack(rows, format="csr")
    res = _solve(c, A_ub, np.concatenate(rhs), None, None, [(0, None)] + [(None, None)] * n)
    return res.fun, res.x[0]
