"""The exact follower against independent oracles.

Oracles (never the code's own output):
* ``lp_oracle.paper_lp``: the paper's s/q linear program (HiGHS) for tangent losses, with the
  authors' per-entry bounds for ``variant="per_entry"``;
* ``lp_oracle.transport_lp`` (primal, grid of destinations holding every center, lo, hi and a fine
  linspace) and ``lp_oracle.ball_dual_lp`` (continuous dual) for the exact smooth losses: the
  first is a lower bound, the second an upper bound on the true optimum, so matching both pins it;
* closed forms (everything moves, eps = 0, N = 1, group_size = 1), float64 numpy re-implementations
  of the greedy and of the loss functions, numpy CDF Wasserstein distances.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sgpo_jax.core import losses as leader_losses
from sgpo_jax.core.follower import (
    LOSSES,
    VARIANTS,
    W1Certificate,
    entropic_worst_case,
    make_loss,
    margin_window,
    w1_certificate,
    worst_case,
)

from lp_oracle import ball_dual_lp, paper_lp, transport_lp

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- numpy references


def tangents_ab(k):
    """Slopes/intercepts of the tangents of -log p at p = j/K, j = 1..K (float64)."""
    j = np.arange(1, k + 1, dtype=np.float64)
    return -k / j, 1.0 + np.log(k / j)


def nls_tangents_ab(k, lo, hi):
    """Tangents of -log sigmoid at linspace(lo, hi, K) (K = 1: the knot lo), float64."""
    knots = lo + (hi - lo) * np.arange(k) / max(k - 1, 1)
    a = -1.0 / (1.0 + np.exp(knots))
    return a, np.logaddexp(0.0, -knots) - a * knots


def piecewise(a, b):
    return lambda z: np.max(np.asarray(z, np.float64)[..., None] * a + b, axis=-1)


def neg_log(z):
    return -np.log(np.asarray(z, np.float64))


def neg_log_sigmoid(z):
    return np.logaddexp(0.0, -np.asarray(z, np.float64))


def dual_objective(lam, x, eps, loss, lo, w=None):
    """lam eps + sum_i w_i max(l(x_i), l(lo) - lam (x_i - lo)), float64 (non-increasing convex l)."""
    x = np.asarray(x, np.float64)
    w = np.full(len(x), 1 / len(x)) if w is None else np.asarray(w, np.float64) / np.sum(w)
    return lam * eps + np.sum(w * np.maximum(loss(x), loss(lo) - lam * (x - lo)))


def numpy_greedy(x, eps, loss, lo, w=None):
    """The fractional knapsack in float64: sort ascending, move whole masses to lo while they fit."""
    x = np.asarray(x, np.float64)
    w = np.full(len(x), 1 / len(x)) if w is None else np.asarray(w, np.float64) / np.sum(w)
    order = np.argsort(x, kind="stable")
    cost = w[order] * (x[order] - lo)
    before = np.concatenate([[0.0], np.cumsum(cost)[:-1]])
    theta_s = np.where(cost > 0, np.clip((eps - before) / np.where(cost > 0, cost, 1), 0, 1), 0)
    theta = np.empty_like(theta_s)
    theta[order] = theta_s
    lx = loss(x)
    value = np.sum(w * (lx + theta * (loss(lo) - lx)))
    return value, np.sum(theta_s * cost), theta


N = 12  # one problem size almost everywhere: the jitted solver compiles once per (N, K, loss, dtype)


def close(v, ref, rtol):
    v, ref = float(v), float(ref)
    assert abs(v - ref) <= rtol * max(1.0, abs(ref)), (v, ref, abs(v - ref))


def prob_instances(rng, n, lo=0.0, hi=1.0):
    """(centers, eps) pairs in probability space: plain, ties, samples at lo and hi, skewed."""
    out = []
    plain = rng.uniform(lo, hi, n)
    ties = np.clip(np.round(rng.uniform(lo, hi, n), 1), lo, hi)
    ends = rng.uniform(lo, hi, n)
    ends[: max(1, n // 3)] = lo
    ends[-1] = hi
    skew = lo + (hi - lo) * rng.beta(0.5, 3.0, n)
    for x in (plain, ties, ends, skew):
        movable = np.mean(x - lo)
        for eps in (0.0, 0.05 * movable, 0.4 * movable, 0.9 * movable, movable + 0.1):
            out.append((x, float(eps)))  # python floats: one jit signature per shape
    return out


def check_against(r, ref, x, eps, loss, lo, rtol, w=None):
    """value, dual_value and the dual certificate (evaluated in numpy) all equal the oracle."""
    close(r.value, ref, rtol)
    close(r.dual_value, ref, rtol)
    close(dual_objective(float(r.dual), x, eps, loss, lo, w), ref, rtol)
    assert float(r.transport) <= eps * (1 + rtol) + 1e-12
    x = np.asarray(x, np.float64)
    w = np.full(len(x), 1 / len(x)) if w is None else np.asarray(w, np.float64) / np.sum(w)
    movable = np.sum(w * (x - lo))
    if eps >= movable * (1 + 1e-6):  # everything moves: closed form
        assert float(r.dual) == 0.0
        close(r.value, loss(lo), rtol)
        np.testing.assert_array_equal(np.asarray(r.moved)[(x > lo) & (w > 0)], 1.0)
    if eps == 0:
        close(r.value, np.sum(w * loss(x)), rtol)
        assert float(r.transport) == 0.0


# --------------------------------------------------------------------------- 1. exact values


def solve_batch(xs, epss, ks, weights=None, support=None, **kwargs):
    """worst_case for every K in ``ks`` on each problem (rows of ``xs``), all K inside one jitted
    program: the solver compiles once per K otherwise, which dominates this file's runtime.
    Returns {K: list of per-problem WorstCase (numpy leaves)}. The eager path is exercised by
    every other test."""
    xs = np.asarray(xs)
    b = xs.shape[0]
    ws = np.ones_like(xs) if weights is None else np.asarray(weights, xs.dtype)
    if support is None:
        support = (np.zeros(b, xs.dtype), np.ones(b, xs.dtype))
    lo, hi = (np.broadcast_to(np.asarray(s, xs.dtype), (b,)) for s in support)
    epss = np.asarray(epss, xs.dtype)

    @jax.jit
    def run(x, e, w, l, h):
        return {k: worst_case(x, e, weights=w, support=(l, h), num_tangents=k, **kwargs) for k in ks}

    outs = [jax.device_get(run(xs[i], epss[i], ws[i], lo[i], hi[i])) for i in range(b)]
    return {k: [o[k] for o in outs] for k in ks}


def test_tangents_match_paper_lp_float64(x64):
    ks = range(1, 11)
    rng = np.random.default_rng(100)
    insts = prob_instances(rng, N)
    xs, epss = np.stack([x for x, _ in insts]), [e for _, e in insts]
    results = solve_batch(xs, epss, ks)
    for k in ks:
        a, b = tangents_ab(k)
        loss = piecewise(a, b)
        for (x, eps), r in zip(insts, results[k]):
            assert r.value.dtype == jnp.float64
            check_against(r, paper_lp(x, eps, a, b, 0.0, 1.0), x, eps, loss, 0.0, 1e-7)


def test_tangents_match_paper_lp_float32():
    ks = (3, 7)
    rng = np.random.default_rng(200)
    insts = prob_instances(rng, N)
    xs = np.stack([x for x, _ in insts]).astype(np.float32)
    epss = np.array([e for _, e in insts], np.float32)
    results = solve_batch(xs, epss, ks)
    for k in ks:
        a, b = tangents_ab(k)
        loss = piecewise(a, b)
        for x32, eps32, r in zip(xs, epss, results[k]):
            assert r.value.dtype == jnp.float32
            x64, eps64 = x32.astype(np.float64), float(eps32)
            check_against(r, paper_lp(x64, eps64, a, b, 0.0, 1.0), x64, eps64, loss, 0.0, 1e-5)
    # the eager path in float32
    x32 = xs[3]
    r = worst_case(x32, float(epss[3]), num_tangents=7)
    a, b = tangents_ab(7)
    close(r.value, paper_lp(x32.astype(np.float64), float(epss[3]), a, b, 0.0, 1.0), 1e-5)


@pytest.mark.parametrize("k", [1, 6])
def test_single_sample_closed_form(x64, k):
    a, b = tangents_ab(k)
    loss = piecewise(a, b)
    for xi in (0.0, 0.1, 0.37, 1.0):
        for eps in (0.0, 0.02, 0.2, 5.0):
            r = worst_case([xi], eps, num_tangents=k)
            frac = 1.0 if xi == 0 else min(eps / xi, 1.0)
            expected = loss(xi) + (frac if xi > 0 else 0.0) * (loss(0.0) - loss(xi))
            close(r.value, expected, 1e-12)
            check_against(r, paper_lp([xi], eps, a, b, 0.0, 1.0), [xi], eps, loss, 0.0, 1e-7)


def test_neg_log_sigmoid_tangents_window_from_data(x64):
    ks = (1, 2, 5, 10)
    rng = np.random.default_rng(300)
    tau = 0.75
    xs, epss, los, his = [], [], [], []
    for trial in range(4):
        x = rng.normal(0.5, 2.0, N)
        if trial == 1:
            x = np.round(x)  # ties
        if trial == 2:
            x[:3] = x.min()
        wl, wh = margin_window(x, tau=tau)
        close(wl, x.min() - tau, 1e-15)
        close(wh, x.max() + tau, 1e-15)
        for eps in (0.0, 0.1, 0.8, float(np.mean(x - wl)) + 1.0):
            xs.append(x), epss.append(eps), los.append(float(wl)), his.append(float(wh))
    results = solve_batch(np.stack(xs), epss, ks, support=(los, his), loss="neg_log_sigmoid_tangents")
    for k in ks:
        for x, eps, lo, hi, r in zip(xs, epss, los, his, results[k]):
            a, b = nls_tangents_ab(k, lo, hi)
            check_against(r, paper_lp(x, eps, a, b, lo, hi), x, eps, piecewise(a, b), lo, 1e-7)
    # eager call with the window straight from margin_window
    x = xs[0]
    r = worst_case(x, 0.3, loss="neg_log_sigmoid_tangents", num_tangents=4, support=margin_window(x, tau=tau))
    a, b = nls_tangents_ab(4, los[0], his[0])
    close(r.value, paper_lp(x, 0.3, a, b, los[0], his[0]), 1e-7)


def _smooth_oracle(x, eps, loss, lo, hi, w=None):
    grid = np.unique(np.concatenate([x, [lo, hi], np.linspace(lo, hi, 41)]))
    primal = transport_lp(x, eps, loss, grid, w)
    dual, _ = ball_dual_lp(x, eps, loss, lo, hi, w)
    close(primal, dual, 1e-9)  # sandwich closed: the grid holds the optimal atoms
    return primal


@pytest.mark.parametrize("lo", [0.05, 0.3])
def test_neg_log_exact_float64(x64, lo):
    rng = np.random.default_rng(int(lo * 100))
    for x, eps in prob_instances(rng, N, lo=lo, hi=1.0):
        r = worst_case(x, eps, loss="neg_log", support=(lo, 1.0))
        check_against(r, _smooth_oracle(x, eps, neg_log, lo, 1.0), x, eps, neg_log, lo, 1e-7)


def test_neg_log_sigmoid_exact_float64(x64):
    rng = np.random.default_rng(7)
    for trial in range(5):
        x = rng.normal(0.0, 3.0, N)
        if trial == 1:
            x = np.round(x)
        if trial == 2:
            x[:3] = x.min()  # samples at the support lower end (tau = 0 below)
        tau = 0.0 if trial == 2 else 1.0
        lo, hi = float(x.min() - tau), float(x.max() + tau)
        if trial == 3:
            lo = -30.0  # wide window: chord distances beyond 20 (the direct branch)
        support = tuple(map(float, margin_window(x, tau=tau))) if trial != 3 else (lo, hi)
        for eps in (0.0, 0.05, 0.7, float(np.mean(x - lo) + 0.5)):
            r = worst_case(x, eps, loss="neg_log_sigmoid", support=support)
            ref = _smooth_oracle(x, eps, neg_log_sigmoid, lo, hi)
            check_against(r, ref, x, eps, neg_log_sigmoid, lo, 1e-7)


def test_exact_losses_float32():
    rng = np.random.default_rng(8)
    for x, eps in prob_instances(rng, N, lo=0.1, hi=1.0):
        x32 = x.astype(np.float32)
        x64 = x32.astype(np.float64)
        eps32 = float(np.float32(eps))
        r = worst_case(x32, eps32, loss="neg_log", support=(0.1, 1.0))
        lo = float(np.float32(0.1))
        check_against(r, _smooth_oracle(x64, eps32, neg_log, lo, 1.0), x64, eps32, neg_log, lo, 1e-5)
    for _ in range(3):
        x32 = rng.normal(0, 2, N).astype(np.float32)
        x64 = x32.astype(np.float64)
        lo, hi = float(x32.min()) - 1.0, float(x32.max()) + 1.0
        window = margin_window(x32)  # float32 arrays (default tau = 1)
        close(window[0], lo, 1e-7)
        for eps in (0.0, 0.3, 20.0):
            r = worst_case(x32, eps, loss="neg_log_sigmoid", support=window)
            ref = _smooth_oracle(x64, eps, neg_log_sigmoid, lo, hi)
            check_against(r, ref, x64, eps, neg_log_sigmoid, lo, 1e-5)


def test_nonuniform_weights(x64):
    rng = np.random.default_rng(9)
    k = 6
    a, b = tangents_ab(k)
    loss = piecewise(a, b)
    for x, eps in prob_instances(rng, N):
        w = rng.uniform(0, 3, N)
        w[rng.integers(N)] = 0.0  # a padding row
        r = worst_case(x, eps, num_tangents=k, weights=w)
        check_against(r, paper_lp(x, eps, a, b, 0.0, 1.0, w=w), x, eps, loss, 0.0, 1e-7, w=w)
        np.testing.assert_allclose(np.asarray(r.weights), w / w.sum(), rtol=1e-14)
    # smooth loss with weights
    x = rng.uniform(0.2, 1.0, N)
    w = rng.uniform(0, 1, N)
    for eps in (0.0, 0.1, 1.0):
        r = worst_case(x, eps, loss="neg_log", support=(0.2, 1.0), weights=w)
        ref = _smooth_oracle(x, eps, neg_log, 0.2, 1.0, w)
        check_against(r, ref, x, eps, neg_log, 0.2, 1e-7, w=w)


def test_group_size_blocks(x64):
    rng = np.random.default_rng(10)
    n, k = N, 3
    sizes = (1, 5, 16)  # 5: blocks of 5, 5 and a short last block of 2; 16: one block
    a, b = tangents_ab(k)
    loss = piecewise(a, b)
    xs, ws, epss = [], [], []
    for trial in range(3):
        x = rng.uniform(0, 1, n)
        w = rng.uniform(0.1, 2, n) if trial else np.ones(n)
        for eps in (0.0, 0.03, 0.2, 2.0):
            xs.append(x), ws.append(w), epss.append(eps)

    @jax.jit
    def run(x, w, e):
        return {g: worst_case(x, e, weights=w, num_tangents=k, group_size=g) for g in sizes}

    outs = [jax.device_get(run(x, w, e)) for x, w, e in zip(xs, ws, epss)]
    for g in sizes:
        for i, (x, w, eps) in enumerate(zip(xs, ws, epss)):
            r = outs[i][g]
            assert r.dual.shape == (-(-n // g),)
            ref = 0.0
            for start in range(0, n, g):
                blk = slice(start, start + g)
                ref += w[blk].sum() / w.sum() * paper_lp(x[blk], eps, a, b, 0.0, 1.0, w=w[blk])
            close(r.value, ref, 1e-7)
            close(r.dual_value, ref, 1e-7)
            assert float(r.transport) <= eps + 1e-12
            if g == 1:  # each sample alone: move min(eps / x, 1) of it
                frac = np.minimum(eps / np.where(x > 0, x, 1), 1.0)
                closed = np.sum(w / w.sum() * (loss(x) + frac * (loss(0.0) - loss(x))))
                close(r.value, closed, 1e-12)
            if g >= n:
                close(r.value, paper_lp(x, eps, a, b, 0.0, 1.0, w=w), 1e-7)
    # the eager path (uneven last block, non-uniform weights)
    r = worst_case(xs[5], epss[5], num_tangents=k, group_size=5, weights=ws[5])
    close(r.value, outs[5][5].value, 1e-12)
    assert r.dual.shape == (3,)


def test_per_entry_matches_paper_lp(x64):
    ks = (1, 6)
    rng = np.random.default_rng(400)
    insts = prob_instances(rng, N)
    ws = [rng.uniform(0.2, 2.0, N) if i % 2 else np.ones(N) for i in range(len(insts))]
    results = solve_batch(np.stack([x for x, _ in insts]), [e for _, e in insts], ks, weights=ws,
                          variant="per_entry")
    for k in ks:
        a, b = tangents_ab(k)
        for (x, eps), w, r in zip(insts, ws, results[k]):
            ref = paper_lp(x, eps, a, b, 0.0, 1.0, w=w, per_entry=True)
            close(r.value, ref, 1e-7)
            close(r.dual_value, ref, 1e-7)
            assert float(r.transport) <= eps + 1e-12
            s, shift = r.authors_columns()
            assert float(np.max(np.abs(np.asarray(s) * np.asarray(shift)))) <= eps + 1e-12  # |q_ik| <= eps
            np.testing.assert_allclose(np.sum(np.asarray(s), axis=1), 1.0, atol=1e-12)


def test_per_entry_margin_tangents_and_groups(x64):
    rng = np.random.default_rng(11)
    k = 4
    x = rng.normal(0, 2, N)
    lo, hi = float(x.min() - 1), float(x.max() + 1)
    a, b = nls_tangents_ab(k, lo, hi)
    for eps in (0.05, 0.5, 5.0):
        r = worst_case(x, eps, loss="neg_log_sigmoid_tangents", num_tangents=k, support=(lo, hi),
                       variant="per_entry")
        close(r.value, paper_lp(x, eps, a, b, lo, hi, per_entry=True), 1e-7)
    k, n, g = 3, N, 5
    a, b = tangents_ab(k)
    x = rng.uniform(0, 1, n)
    for eps in (0.02, 0.2):
        r = worst_case(x, eps, num_tangents=k, group_size=g, variant="per_entry")
        ref = sum(
            len(x[s:s + g]) / n * paper_lp(x[s:s + g], eps, a, b, 0.0, 1.0, per_entry=True)
            for s in range(0, n, g)
        )
        close(r.value, ref, 1e-7)


# --------------------------------------------------------------------------- 2. dual certificate


def test_dual_is_marginal_chord_slope_and_zero_when_everything_moves(x64):
    k = 6
    a, b = tangents_ab(k)
    loss = piecewise(a, b)
    x = np.array([0.05, 0.1, 0.3, 0.5, 0.8, 0.9])
    # budget covers the two lowest samples fully and half of the third: price = chord slope of 0.3
    eps = (0.05 + 0.1 + 0.5 * 0.3) / 6
    r = worst_case(x, eps, num_tangents=k)
    chord = (loss(0.0) - loss(0.3)) / 0.3
    close(r.dual, chord, 1e-12)
    np.testing.assert_allclose(np.asarray(r.moved), [1, 1, 0.5, 0, 0, 0], atol=1e-12)
    ref = paper_lp(x, eps, a, b, 0.0, 1.0)
    close(r.dual_value, ref, 1e-9)
    close(dual_objective(chord, x, eps, loss, 0.0), ref, 1e-9)
    for eps in (float(np.mean(x)), float(np.mean(x)) + 1e-3, 10.0):
        r = worst_case(x, eps, num_tangents=k)
        close(r.value, 1 + math.log(k), 1e-12)  # everything at lo: l(0) = 1 + log K
        close(r.dual_value, 1 + math.log(k), 1e-12)
        if eps > np.mean(x):  # (at equality any price in [0, chord of the last sample] is optimal)
            assert float(r.dual) == 0.0
            np.testing.assert_array_equal(np.asarray(r.moved), 1.0)


# --------------------------------------------------------------------------- 3. tie class


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tie_class_chord_slope_exactly_k(dtype):
    """With K tangents every center <= 2 ln2 / K lies on the steepest tangent: chord slope == K."""
    ks = list(range(1, 11)) + [49]  # K = 7 (float32) and 49 (float64): fl(1 / fl(1/K)) != K
    with jax.enable_x64(dtype == "float64"):
        dt = np.dtype(dtype)
        rng = np.random.default_rng(12)
        inside, above = [], []
        for k in ks:
            edge = 2 * LN2 / k
            top = dt.type(min(edge, 1.0))
            if float(top) > edge:
                top = np.nextafter(top, dt.type(0))
            xs = np.concatenate([np.linspace(0, float(top), 200), rng.uniform(0, float(top), 200),
                                 [top, np.nextafter(top, dt.type(0))]]).astype(dt)
            assert np.all(xs.astype(np.float64) <= edge)
            inside.append(xs)
            above.append(np.linspace(min(edge * 1.01, 1.0), 1.0, 50).astype(dt))

        @jax.jit
        def chords(v):  # every K in one small compiled program
            losses = [make_loss("tangents", k, dtype=dt) for k in ks]
            return [loss.slopes[0] for loss in losses], [
                loss.chord_slope(v[i], jnp.zeros((), dt)) for i, loss in enumerate(losses)]

        steepest, chord_all = chords(jnp.asarray(np.concatenate([np.stack(inside), np.stack(above)], axis=1)))
        for i, k in enumerate(ks):
            assert float(steepest[i]) == -k
            c = np.asarray(chord_all[i])
            assert c.dtype == dt
            c_in, c_above = c[:402], c[402:]
            bad = c_in != k
            assert not np.any(bad), (k, inside[i][bad][:5], c_in[bad][:5])
            assert np.all(c_above <= k)  # never steeper than the class
            if 2 * LN2 / k * 1.01 < 1.0:
                assert np.all(c_above < k)  # beyond it, strictly flatter


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", [6, 7])
def test_tie_class_moves_lowest_prefix(dtype, k):
    with jax.enable_x64(dtype == "float64"):
        dt = np.dtype(dtype)
        rng = np.random.default_rng(13 + k)
        edge = 2 * LN2 / k
        x = np.concatenate([rng.uniform(0, edge, N - 4), rng.uniform(edge, 1.0, 2), [0.0, 0.0]])
        x = rng.permutation(x).astype(dt)
        x64 = x.astype(np.float64)
        a, b = tangents_ab(k)
        loss = piecewise(a, b)
        tol = 1e-5 if dt == np.float32 else 1e-7
        for frac in (0.1, 0.3, 0.6):
            eps = float(dt.type(frac * np.mean(x64 * (x64 <= edge))))  # runs out inside the tie class
            r = worst_case(x, eps, num_tangents=k)
            moved = np.asarray(r.moved, np.float64)
            pos = x64 > 0  # samples already at lo have nothing to move
            order = np.argsort(x64[pos], kind="stable")
            ms = moved[pos][order]
            assert np.all(np.diff(ms) <= 0), "moved must be a prefix in ascending-center order"
            assert np.sum((ms > 0) & (ms < 1)) <= 1
            _, _, theta = numpy_greedy(x64, eps, loss, 0.0)
            np.testing.assert_allclose(moved[pos], theta[pos], atol=100 * tol)
            assert float(r.dual) == k  # the marginal sample is in the tie class: price exactly K
            check_against(r, paper_lp(x64, eps, a, b, 0.0, 1.0), x64, eps, loss, 0.0, tol)


# --------------------------------------------------------------------------- 4. float32 at scale


def test_float32_million_no_drift():
    n, k = 1_000_000, 6
    rng = np.random.default_rng(14)
    x32 = rng.beta(2.0, 2.0, n).astype(np.float32)
    x32[:1000] = 0.0
    x32[1000:400_000] = np.round(x32[1000:400_000], 3)  # many ties
    x64 = x32.astype(np.float64)
    a, b = tangents_ab(k)
    loss = piecewise(a, b)
    for eps in (0.01, float(np.float32(np.mean(x64) * 0.999))):
        r = worst_case(jnp.asarray(x32), eps, num_tangents=k)
        assert r.value.dtype == jnp.float32
        eps64 = float(np.float32(eps))
        value, transport, _ = numpy_greedy(x64, eps64, loss, 0.0)
        close(r.value, value, 1e-6)
        close(r.transport, transport, 1e-6)
        assert float(r.transport) <= eps64 * (1 + 1e-6)
        close(r.dual_value, value, 1e-6)


# --------------------------------------------------------------------------- 5. transformations


def test_jit_and_vmap(x64):
    k = 6
    a, b = tangents_ab(k)
    rng = np.random.default_rng(15)
    xs = rng.uniform(0, 1, (6, N))
    xs[1] = np.round(xs[1], 1)
    xs[2, :4] = 0.0
    epss = [0.0, 0.05, 0.1, 0.2, 0.4, 1.0]
    refs = [paper_lp(x, e, a, b, 0.0, 1.0) for x, e in zip(xs, epss)]

    jitted = jax.jit(lambda x, e: worst_case(x, e, num_tangents=k).value)
    batched = jax.vmap(lambda x, e: worst_case(x, e, num_tangents=k))(jnp.asarray(xs), jnp.asarray(epss))
    assert batched.value.shape == (6,)
    for i in range(6):
        close(jitted(xs[i], epss[i]), refs[i], 1e-7)
        close(batched.value[i], refs[i], 1e-7)
        close(batched.dual_value[i], refs[i], 1e-7)
        single = worst_case(xs[i], epss[i], num_tangents=k)
        np.testing.assert_allclose(np.asarray(batched.moved[i]), np.asarray(single.moved), atol=1e-12)
        close(batched.value[i], single.value, 1e-12)
    # traced support (margin space, from the data inside the transformation), vmapped over problems
    zs = rng.normal(0, 2, (3, N))
    out = jax.vmap(lambda z: worst_case(z, 0.3, loss="neg_log_sigmoid", support=margin_window(z)).value)(
        jnp.asarray(zs))
    for i in range(3):
        lo, hi = zs[i].min() - 1, zs[i].max() + 1
        close(out[i], _smooth_oracle(zs[i], 0.3, neg_log_sigmoid, lo, hi), 1e-7)


def test_sharded_centers_match_unsharded():
    """Centers and weights sharded over an 8-device mesh (``jax.make_mesh``: Explicit axes in
    recent JAX; Auto-axis meshes are what ``sgpo_step`` uses, covered in test_step.py)."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(16)
    n = 64
    x = np.round(rng.uniform(0, 1, n), 2).astype(np.float32)
    w = rng.uniform(0, 1, n).astype(np.float32)
    k = 6
    a, b = tangents_ab(k)
    xs, ws = (jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, w))
    assert len(xs.sharding.device_set) == 8
    for eps in (0.0, 0.02, 0.1, 1.0):
        ref = paper_lp(x.astype(np.float64), eps, a, b, 0.0, 1.0, w=w.astype(np.float64))
        plain = worst_case(x, eps, num_tangents=k, weights=w)
        sharded = worst_case(xs, eps, num_tangents=k, weights=ws)
        for r in (plain, sharded):
            close(r.value, ref, 1e-5)
            close(r.dual_value, ref, 1e-5)
        close(sharded.value, plain.value, 1e-6)
        close(sharded.transport, plain.transport, 1e-6)
        np.testing.assert_allclose(np.asarray(sharded.moved), np.asarray(plain.moved), atol=1e-6)
    # the entropic follower on sharded centers (16: shares its compile with the float32 test)
    x16 = jax.device_put(x[:16], NamedSharding(mesh, P("data")))
    smooth = entropic_worst_case(x16, 0.05, regularization=1e-2)
    close(smooth.value, entropic_worst_case(x[:16], 0.05, regularization=1e-2).value, 1e-5)
    assert float(smooth.value) <= paper_lp(x[:16].astype(np.float64), 0.05, a, b, 0.0, 1.0) + 1e-5


# --------------------------------------------------------------------------- 6. certificates, atoms


def _w1_numpy(xa, wa, xb, wb):
    """1-D Wasserstein-1 distance as the integral of |F_a - F_b| (float64)."""
    pts = np.concatenate([xa, xb])
    order = np.argsort(pts, kind="stable")
    signed = np.concatenate([wa, -wb])[order]
    cdf_gap = np.cumsum(signed)[:-1]
    return float(np.sum(np.abs(cdf_gap) * np.diff(pts[order])))


@pytest.mark.parametrize("loss_name", ["tangents", "neg_log_sigmoid_tangents", "neg_log", "neg_log_sigmoid"])
def test_atoms_w1_and_authors_columns(x64, loss_name):
    rng = np.random.default_rng(17)
    k = 4 if loss_name == "neg_log_sigmoid_tangents" else 6
    n = N
    if loss_name in ("tangents", "neg_log"):
        lo, hi = (0.0, 1.0) if loss_name == "tangents" else (0.05, 1.0)
        x = rng.uniform(lo, hi, n)
        x[0] = lo
    else:
        x = rng.normal(0, 2, n)
        lo, hi = float(x.min() - 1.0), float(x.max() + 1.0)
    support = margin_window(x) if loss_name == "neg_log_sigmoid_tangents" else (lo, hi)
    w = rng.uniform(0.2, 1.0, n)
    wn = w / w.sum()
    if loss_name == "tangents":
        a, b = tangents_ab(k)
        loss = piecewise(a, b)
    elif loss_name == "neg_log_sigmoid_tangents":
        a, b = nls_tangents_ab(k, lo, hi)
        loss = piecewise(a, b)
    else:
        loss = neg_log if loss_name == "neg_log" else neg_log_sigmoid
    for eps in (0.0, 0.02, 0.15, 10.0):
        r = worst_case(x, eps, loss=loss_name, num_tangents=k, support=support, weights=w)
        ref = (paper_lp(x, eps, a, b, lo, hi, w=w) if loss_name.endswith("tangents")
               else _smooth_oracle(x, eps, loss, lo, hi, w))
        close(r.value, ref, 1e-7)

        shift, mass = (np.asarray(v, np.float64) for v in r.atoms())
        pos = x[:, None] - shift
        assert np.all(mass >= 0) and np.allclose(mass.sum(1), 1, atol=1e-14)
        assert np.all((pos >= lo - 1e-12) & (pos <= hi + 1e-12))
        close(np.sum(wn[:, None] * mass * loss(pos)), ref, 1e-7)  # E_Q[l] by hand

        per_sample = np.sum(mass * shift, axis=1)
        cert = w1_certificate(r)
        w1 = float(cert.w1)
        close(cert.expected_loss, ref, 1e-7)
        assert bool(cert.within_budget) and bool(cert.matches_value)
        w1_np = _w1_numpy(x, wn, pos.ravel(), (wn[:, None] * mass).ravel())
        close(w1, w1_np, 1e-9)
        close(w1, np.sum(wn * per_sample), 1e-9)  # all mass moves the same way: W1 = transport
        assert w1 <= eps + 1e-6

        if loss_name.endswith("tangents"):
            s, sh = (np.asarray(v, np.float64) for v in r.authors_columns())
            assert s.shape == sh.shape == (n, k)
            assert np.all(s >= 0)
            np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-14)
            pieces = x[:, None] - sh
            assert np.all((pieces >= lo - 1e-12) & (pieces <= hi + 1e-12))
            sample_loss = np.sum(s * (a * pieces + b), axis=1)  # sum_k s_ik ell_k(xi - shift_ik)
            close(np.sum(wn * sample_loss), ref, 1e-7)
            np.testing.assert_allclose(np.sum(s * sh, axis=1), per_sample, atol=1e-12)
            assert np.sum(wn * np.sum(s * sh, axis=1)) <= eps + 1e-12
        else:
            with pytest.raises(ValueError, match="no tangent pieces"):
                r.authors_columns()


def test_w1_certificate_float32():
    rng = np.random.default_rng(18)
    x = rng.uniform(0, 1, N).astype(np.float32)
    for eps in (0.01, 0.1, 0.6):
        r = worst_case(x, eps)
        shift, mass = (np.asarray(v, np.float64) for v in r.atoms())
        wn = np.full(N, 1 / N)
        x64 = x.astype(np.float64)
        w1_np = _w1_numpy(x64, wn, (x64[:, None] - shift).ravel(), (wn[:, None] * mass).ravel())
        cert = w1_certificate(r)
        assert float(cert.w1) <= eps + 1e-6 and bool(cert.within_budget) and bool(cert.matches_value)
        close(cert.w1, w1_np, 1e-5)
        close(cert.expected_loss, r.value, 1e-5)


# --------------------------------------------------------------------------- 6b. atoms realize value


def _atom_instances(rng, loss_name):
    """(x, eps, lo, hi, w) for one loss: plain, ties, samples at the support ends, skewed; eps = 0,
    small, binding, exactly everything and more than everything (every edge of the greedies);
    uniform and non-uniform weights alternate."""
    out = []
    if loss_name in ("tangents", "neg_log"):
        lo, hi = (0.0, 1.0) if loss_name == "tangents" else (0.05, 1.0)
        insts = [(x, eps, lo, hi) for x, eps in prob_instances(rng, N, lo=lo, hi=hi)]
        x = rng.uniform(lo, hi, N)
        insts.append((x, float(np.mean(x - lo)), lo, hi))  # the budget moves everything exactly
    else:
        insts = []
        for trial in range(4):
            x = rng.normal(0.5, 2.0, N)
            if trial == 1:
                x = np.round(x)  # ties
            if trial == 3:
                x[:4] = x[4]  # a tie class of 5
            tau = 0.0 if trial == 2 else 1.0  # tau = 0: samples at both window ends
            lo, hi = float(x.min() - tau), float(x.max() + tau)
            movable = float(np.mean(x - lo))
            for eps in (0.0, 0.05 * movable, 0.4 * movable, movable, movable + 0.5):
                insts.append((x, eps, lo, hi))
    for i, (x, eps, lo, hi) in enumerate(insts):
        out.append((x, eps, lo, hi, rng.uniform(0.2, 2.0, N) if i % 2 else np.ones(N)))
    return out


def _oracle_loss(loss_name, k, lo, hi):
    """The loss in float64 numpy, and (a, b) for the tangent losses."""
    if loss_name == "tangents":
        a, b = tangents_ab(k)
    elif loss_name == "neg_log_sigmoid_tangents":
        a, b = nls_tangents_ab(k, lo, hi)
    else:
        return (neg_log if loss_name == "neg_log" else neg_log_sigmoid), None
    return piecewise(a, b), (a, b)


def _leader_mean(x, shift, mass, wn, loss_name, k, lo, hi):
    """The leader's own objective (sgpo_loss) at policy margins whose centers are ``x``."""
    space = "probability" if loss_name in ("tangents", "neg_log") else "margin"
    h = np.log(x) - np.log1p(-x) if space == "probability" else x  # sigmoid(logit x) = x to 1 ulp
    zeros = np.zeros_like(x)
    terms, _ = leader_losses.sgpo_loss(h, zeros, zeros, zeros, shift, mass * wn[:, None], beta=1.0,
                                       space=space, loss=loss_name, num_tangents=k, support=(lo, hi))
    return float(terms.mean)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_atoms_expected_loss_is_value_and_lp_optimum(x64, variant, loss_name):
    """sum_ij w_i mass_ij l(xi_i - shift_ij), with l the loss itself (the max over tangents for the
    tangent losses, as the leader evaluates it), equals `value` and the LP oracle's optimum.

    Tolerances: 1e-12 relative between the atoms' expected loss and `value` (the atoms are a
    closed-form rearrangement of the solution: the only rounding is the level-set inversion
    (y - b_k) / a_k and the tangents' evaluation, a few ulps of |a| <= 10 and |b| <= 1 + log 10,
    summed over N = 12); 1e-7 relative against HiGHS (run at 1e-10 feasibility tolerances; the
    rest of this file uses 1e-7 for the same LPs)."""
    if variant == "per_entry" and loss_name not in ("tangents", "neg_log_sigmoid_tangents"):
        with pytest.raises(ValueError, match="per_entry"):
            worst_case([0.5], 0.1, loss=loss_name, support=(0.05, 1.0), variant=variant)
        return
    rng = np.random.default_rng(LOSSES.index(loss_name) * 10 + VARIANTS.index(variant))
    insts = _atom_instances(rng, loss_name)
    ks = {"tangents": (1, 6), "neg_log_sigmoid_tangents": (2, 5)}.get(loss_name, (6,))
    results = solve_batch(np.stack([i[0] for i in insts]), [i[1] for i in insts], ks,
                          weights=[i[4] for i in insts], support=([i[2] for i in insts], [i[3] for i in insts]),
                          loss=loss_name, variant=variant)
    worst_gap = 0.0
    for k in ks:
        for (x, eps, lo, hi, w), r in zip(insts, results[k]):
            loss, ab = _oracle_loss(loss_name, k, lo, hi)
            ref = (paper_lp(x, eps, *ab, lo, hi, w=w, per_entry=variant == "per_entry") if ab
                   else _smooth_oracle(x, eps, loss, lo, hi, w))
            shift, mass = (np.asarray(v, np.float64) for v in r.atoms())
            j = k + 1 if variant == "per_entry" else 2
            assert shift.shape == mass.shape == (N, j)
            wn = w / w.sum()
            pos = x[:, None] - shift
            assert np.all(mass >= 0) and np.allclose(mass.sum(1), 1, atol=1e-14)
            assert np.all(shift >= 0) and np.all(pos >= lo - 1e-12)  # in [lo, x_i]
            expected = float(np.sum(wn[:, None] * mass * loss(pos)))
            worst_gap = max(worst_gap, abs(expected - float(r.value)))
            close(expected, r.value, 1e-12)
            close(expected, ref, 1e-7)
            moved = np.sum(wn[:, None] * mass * shift)  # the atoms' transport (= their W1)
            assert moved <= float(r.transport) * (1 + 1e-12) + 1e-15 and moved <= eps + 1e-12
            if variant == "per_entry":
                assert np.max(mass * shift) <= eps + 1e-12  # each piece carries at most eps
            else:
                close(moved, r.transport, 1e-12)
            if 0 < x.min() and x.max() < 1 or loss_name.startswith("neg_log_sigmoid"):
                close(_leader_mean(x, shift, mass, wn, loss_name, k, lo, hi), r.value, 1e-12)
    assert worst_gap <= 1e-12


def test_per_entry_atoms_float32_and_groups(x64):
    """float32 solves (atoms within 1e-5 of value, as the other float32 tests) and grouped
    per_entry solves (each block its own program) realize `value` too."""
    rng = np.random.default_rng(33)
    k = 6
    a, b = tangents_ab(k)
    loss = piecewise(a, b)
    for eps in (0.01, 0.1, 0.5):
        x = rng.uniform(0, 1, N)
        x[:3] = np.round(x[:3], 1)
        r = worst_case(x.astype(np.float32), eps, num_tangents=k, variant="per_entry")
        shift, mass = (np.asarray(v, np.float64) for v in r.atoms())
        x32 = np.asarray(r.centers, np.float64)
        close(np.mean(np.sum(mass * loss(x32[:, None] - shift), 1)), r.value, 1e-5)
        close(r.value, paper_lp(x32, float(np.float32(eps)), a, b, 0.0, 1.0, per_entry=True), 1e-5)
        cert = w1_certificate(r)
        assert bool(cert.within_budget) and bool(cert.matches_value)
        rg = worst_case(x, eps, num_tangents=k, group_size=5, variant="per_entry")
        shift, mass = (np.asarray(v, np.float64) for v in rg.atoms())
        close(np.mean(np.sum(mass * loss(x[:, None] - shift), 1)), rg.value, 1e-12)
        ref = sum(len(x[s:s + 5]) / N * paper_lp(x[s:s + 5], eps, a, b, 0.0, 1.0, per_entry=True)
                  for s in range(0, N, 5))
        close(rg.value, ref, 1e-7)


def test_per_entry_old_atoms_overstate_value(x64):
    """Regression for issue #14: all moved mass at `lower`, scored with the max over tangents,
    overstates the per_entry value (the program credits piece k only ell_k(lo)); the atoms do not."""
    x = np.linspace(0.3, 0.9, N)
    r = worst_case(x, 0.1, num_tangents=6, variant="per_entry")
    a, b = tangents_ab(6)
    loss = piecewise(a, b)
    naive = np.mean((1 - np.asarray(r.moved)) * loss(x) + np.asarray(r.moved) * loss(0.0))
    assert naive - float(r.value) > 0.01
    shift, mass = (np.asarray(v) for v in r.atoms())
    close(np.mean(np.sum(mass * loss(x[:, None] - shift), 1)), r.value, 1e-12)
    assert np.any((mass[:, 1:] > 0) & (shift[:, 1:] < x[:, None]))  # some atoms sit above lower


def test_w1_certificate_fields_and_tolerance(x64):
    import sgpo_jax

    assert sgpo_jax.w1_certificate is w1_certificate
    rng = np.random.default_rng(19)
    x = rng.uniform(0, 1, N)
    wn = np.full(N, 1 / N)
    for variant in VARIANTS:
        r = worst_case(x, 0.05, num_tangents=6, variant=variant)
        cert = w1_certificate(r)
        assert isinstance(cert, W1Certificate)
        shift, mass = (np.asarray(v, np.float64) for v in r.atoms())
        w1_np = _w1_numpy(x, wn, (x[:, None] - shift).ravel(), (wn[:, None] * mass).ravel())
        close(cert.w1, w1_np, 1e-12)
        close(cert.expected_loss, r.value, 1e-12)
        assert bool(cert.within_budget) and bool(cert.matches_value)
        if variant == "ball":  # all moved mass goes to one point: W1 is `transport` by construction
            close(cert.w1, r.transport, 1e-12)
        else:  # per-piece atoms sit above lower: they move less than the program's transport
            assert float(cert.w1) < float(r.transport) - 1e-6
    # the tolerance is the slack of the <= eps check (absolute) and of expected_loss == value
    r = worst_case(x, 0.05, num_tangents=6)
    tight = r.replace(epsilon=r.epsilon - 1e-9)  # the atoms now overshoot the radius by 1e-9
    assert not bool(w1_certificate(tight, tol=0.0).within_budget)
    assert bool(w1_certificate(tight, tol=1e-8).within_budget)
    off = r.replace(value=r.value + 1e-6)
    assert not bool(w1_certificate(off).matches_value)
    assert bool(w1_certificate(off, tol=1e-5).matches_value)
    jitted = jax.jit(lambda c: w1_certificate(worst_case(c, 0.05)))(x)
    close(jitted.expected_loss, r.value, 1e-12)


# --------------------------------------------------------------------------- 7. entropic follower


@pytest.mark.parametrize("loss_name", ["tangents", "neg_log_sigmoid"])
def test_entropic_converges_to_exact(x64, loss_name):
    rng = np.random.default_rng(19)
    if loss_name == "tangents":
        x, lo, hi = rng.uniform(0, 1, N), 0.0, 1.0
        a, b = tangents_ab(4)
        loss = piecewise(a, b)
    else:
        x = rng.normal(0, 2, N)
        lo, hi = float(x.min() - 1), float(x.max() + 1)
        loss = neg_log_sigmoid
    w = rng.uniform(0.5, 1.5, N)
    for eps in (0.03, 0.15, 50.0):
        exact = (paper_lp(x, eps, a, b, lo, hi, w=w) if loss_name == "tangents"
                 else _smooth_oracle(x, eps, loss, lo, hi, w))
        gaps = []
        for reg in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
            s = entropic_worst_case(x, eps, regularization=reg, loss=loss_name, num_tangents=4,
                                    support=(lo, hi), weights=w)
            plan, grid = np.asarray(s.plan), np.asarray(s.grid)
            np.testing.assert_allclose(plan.sum(1), w / w.sum(), atol=1e-12)
            assert np.all(plan >= 0)
            close(s.value, np.sum(plan * loss(grid)[None, :]), 1e-12)  # E_pi[l] by hand
            transport = np.sum(plan * np.abs(x[:, None] - grid[None, :]))
            assert transport <= eps + 1e-9 and float(s.transport) <= eps + 1e-9
            assert float(s.value) <= exact + 1e-9  # a feasible point of the ball
            gaps.append(exact - float(s.value))
        assert all(g2 <= g1 + 1e-10 for g1, g2 in zip(gaps, gaps[1:])), gaps
        assert gaps[3] < 1e-6 and gaps[4] < 1e-9, gaps  # regularization 1e-4 and 1e-5


@pytest.mark.parametrize("loss_name,support", [("tangents", (0.0, 1.0)), ("neg_log_sigmoid", (-4.0, 4.0))])
def test_entropic_gradient_matches_finite_differences(x64, loss_name, support):
    rng = np.random.default_rng(20)
    x = rng.uniform(0.05, 1.0, N) if loss_name != "neg_log_sigmoid" else rng.uniform(-3, 3, N)
    w = rng.uniform(0.5, 1.5, N)

    def value(c, eps):
        return entropic_worst_case(c, eps, regularization=1e-2, loss=loss_name, num_tangents=4,
                                   support=support, weights=w).value

    for eps in (0.05, 100.0):  # binding budget, and everything free
        grad = np.asarray(jax.grad(value)(jnp.asarray(x), eps))
        assert np.all(np.isfinite(grad))
        h = 1e-6
        fd = np.array([(float(value(x + h * e, eps)) - float(value(x - h * e, eps))) / (2 * h)
                       for e in np.eye(len(x))])
        np.testing.assert_allclose(grad, fd, atol=1e-6 * max(1.0, np.max(np.abs(fd))))
    if loss_name == "tangents":  # derivative in epsilon (through the price's implicit budget)
        g_eps = float(jax.grad(value, argnums=1)(jnp.asarray(x), 0.05))
        fd_eps = (float(value(x, 0.05 + 1e-6)) - float(value(x, 0.05 - 1e-6))) / 2e-6
        close(g_eps, fd_eps, 1e-5)


def test_entropic_float32_grad_finite():
    x = np.random.default_rng(21).uniform(0, 1, 16).astype(np.float32)  # 16: shared with the sharding test
    for eps in (0.0, 0.05, 5.0):
        g = jax.grad(lambda c: entropic_worst_case(c, eps, regularization=1e-2).value)(jnp.asarray(x))
        assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))
        s = entropic_worst_case(x, eps, regularization=1e-3)
        a, b = tangents_ab(6)
        assert float(s.value) <= paper_lp(x.astype(np.float64), eps, a, b, 0.0, 1.0) + 1e-5
        assert float(s.transport) <= eps * (1 + 1e-5) + 1e-7


# --------------------------------------------------------------------------- 8. validation


@pytest.mark.parametrize("kwargs,match", [
    (dict(centers=[0.1, np.nan]), r"centers must be finite; centers\[1\] = nan"),
    (dict(centers=[np.inf, 0.2]), r"centers must be finite; centers\[0\] = inf"),
    (dict(centers=[0.1, 1.5]), r"centers\[1\] = 1.5 lies outside the support \[0.0, 1.0\]"),
    (dict(centers=[-0.2, 0.5]), r"outside the support"),
    (dict(centers=[1.0, 3.0], loss="neg_log_sigmoid", support=(-1.0, 2.0)), r"margin_window"),
    (dict(epsilon=-0.1), r"epsilon must be a finite scalar >= 0"),
    (dict(epsilon=np.nan), r"epsilon must be a finite scalar >= 0"),
    (dict(centers=[]), r"centers is empty"),
    (dict(centers=np.zeros((2, 3))), r"centers must have shape \[N\]"),
    (dict(loss="neg_log", support=(0.0, 1.0)), r"'neg_log'.*lower end > 0.*p_min"),
    (dict(loss="neg_log"), r"lower end > 0"),
    (dict(loss="hinge"), r"unknown follower loss 'hinge'"),
    (dict(num_tangents=0), r"num_tangents must be a positive int"),
    (dict(loss="neg_log", support=(0.05, 1.0), variant="per_entry"), r"per_entry.*tangent"),
    (dict(loss="neg_log_sigmoid", support=(-1.0, 1.0), variant="per_entry"), r"per_entry"),
    (dict(variant="box"), r"variant must be one of"),
    (dict(group_size=0), r"group_size must be a positive int"),
    (dict(group_size=-2), r"group_size must be a positive int"),
    (dict(group_size=2.5), r"group_size must be a positive int"),
    (dict(weights=[1.0, -0.5, 1.0]), r"weights must be finite and >= 0; weights\[1\] = -0.5"),
    (dict(weights=[0.0, 0.0, 0.0]), r"weights sum to 0"),
    (dict(weights=[1.0, 1.0]), r"weights shape"),
    (dict(support=(1.0, 0.0)), r"support must be finite with lo < hi"),
    (dict(support=(-np.inf, 1.0)), r"support must be finite"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(centers=[0.1, 0.5, 0.9], epsilon=0.1)
    args.update(kwargs)
    centers, epsilon = args.pop("centers"), args.pop("epsilon")
    with pytest.raises(ValueError, match=match):
        worst_case(np.asarray(centers, np.float32), epsilon, **args)


def test_bad_input_raises_entropic_and_window():
    with pytest.raises(ValueError, match="centers must be finite"):
        entropic_worst_case([0.1, np.nan], 0.1)
    with pytest.raises(ValueError, match="outside the support"):
        entropic_worst_case([0.1, 2.0], 0.1)
    with pytest.raises(ValueError, match="regularization must be > 0"):
        entropic_worst_case([0.1, 0.2], 0.1, regularization=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        entropic_worst_case([], 0.1)
    with pytest.raises(ValueError, match="unknown follower loss"):
        entropic_worst_case([0.1], 0.1, loss="nope")
    with pytest.raises(ValueError, match="quantiles must satisfy"):
        margin_window([0.0, 1.0], quantiles=(0.9, 0.1))
    with pytest.raises(ValueError, match="tau must be >= 0"):
        margin_window([0.0, 1.0], tau=-1.0)


# --------------------------------------------------------------------------- 9. margin window


def test_margin_window():
    rng = np.random.default_rng(22)
    z = rng.normal(1.0, 3.0, N).astype(np.float32)
    lo, hi = margin_window(z, tau=0.5)
    close(lo, float(z.min()) - 0.5, 1e-7)
    close(hi, float(z.max()) + 0.5, 1e-7)
    lo, hi = margin_window(z)  # default tau = 1
    close(lo, float(z.min()) - 1.0, 1e-7)
    close(hi, float(z.max()) + 1.0, 1e-7)
    lo, hi = margin_window(z, tau=0.25, quantiles=(0.05, 0.9))
    z64 = z.astype(np.float64)
    close(lo, np.quantile(z64, 0.05) - 0.25, 1e-6)
    close(hi, np.quantile(z64, 0.9) + 0.25, 1e-6)
    lo, hi = margin_window(z, tau=0.0, quantiles=(0.0, 1.0))
    assert float(lo) == z.min() and float(hi) == z.max()
    # outliers beyond a quantile window are rejected until clipped into it
    lo, hi = margin_window(z, tau=0.1, quantiles=(0.2, 0.8))
    with pytest.raises(ValueError, match="outside the support"):
        worst_case(z, 0.1, loss="neg_log_sigmoid", support=(lo, hi))
    clipped = jnp.clip(z, lo, hi)
    r = worst_case(clipped, 0.1, loss="neg_log_sigmoid", support=(lo, hi))
    c64 = np.asarray(clipped, np.float64)
    ref = _smooth_oracle(c64, 0.1, neg_log_sigmoid, float(lo), float(hi))
    close(r.value, ref, 1e-5)
