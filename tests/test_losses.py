"""Losses against hand computations, TRL's published DPO definition, and the follower."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgpo_jax.core import losses
from sgpo_jax.core.follower import worst_case


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_dpo_loss_hand_numbers():
    pc, pr, rc, rr = map(lambda v: jnp.asarray([v], jnp.float32), (-1.0, -2.0, -1.5, -1.8))
    # h = (-1 + 1.5) - (-2 + 1.8) = 0.7; beta h = 0.07
    expected = math.log(1 + math.exp(-0.07))
    got, metrics = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert float(got[0]) == pytest.approx(expected, rel=1e-6)
    smoothed, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert float(smoothed[0]) == pytest.approx(0.9 * expected + 0.1 * math.log(1 + math.exp(0.07)), rel=1e-6)
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.05, rel=1e-5)
    assert float(metrics["rewards/rejected"]) == pytest.approx(-0.02, rel=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.07, rel=1e-5)
    assert float(metrics["rewards/accuracies"]) == 1.0


def test_dpo_loss_matches_trl_definition():
    """TRL's DPOTrainer sigmoid loss, transcribed from its documentation:
    logits = (pi_c - pi_r) - (ref_c - ref_r);
    losses = -logsigmoid(beta*logits)*(1-ls) - logsigmoid(-beta*logits)*ls;
    chosen_rewards = beta*(pi_c - ref_c); rejected_rewards = beta*(pi_r - ref_r);
    rewards/accuracies = mean(chosen > rejected); rewards/margins = mean(chosen - rejected);
    logps/chosen = mean(pi_c)."""
    rng = np.random.default_rng(3)
    pc, pr, rc, rr = (rng.normal(-20, 5, 64) for _ in range(4))
    beta, ls = 0.05, 0.2
    logits = (pc - pr) - (rc - rr)
    trl_losses = -_logsigmoid(beta * logits) * (1 - ls) - _logsigmoid(-beta * logits) * ls
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    with jax.enable_x64(True):
        got, metrics = losses.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, label_smoothing=ls)
        np.testing.assert_allclose(np.asarray(got), trl_losses, rtol=1e-12)
        expected = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
        }
        for name, value in expected.items():
            assert float(metrics[name]) == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_metrics_ignore_padding_rows():
    pc = jnp.asarray([-1.0, -5.0, 100.0])
    pr = jnp.asarray([-2.0, -1.0, -100.0])
    zeros = jnp.zeros(3)
    _, metrics = losses.dpo_loss(pc, pr, zeros, zeros, beta=1.0, weights=jnp.asarray([1.0, 1.0, 0.0]))
    assert float(metrics["rewards/accuracies"]) == 0.5
    assert float(metrics["rewards/chosen"]) == pytest.approx(-3.0)


def test_sequence_logps_matches_naive_log_softmax():
    rng = np.random.default_rng(0)
    b, t, v = 3, 7, 13
    logits = rng.normal(0, 3, (b, t, v)).astype(np.float32)
    ids = rng.integers(0, v, (b, t))
    mask = (rng.random((b, t)) < 0.6).astype(np.int32)
    expected = np.zeros(b)
    for i in range(b):
        for pos in range(1, t):
            if mask[i, pos]:
                row = logits[i, pos - 1].astype(np.float64)
                expected[i] += row[ids[i, pos]] - np.log(np.exp(row - row.max()).sum()) - row.max()
    got = losses.sequence_logps(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space,loss", [("probability", "neg_log"), ("margin", "neg_log_sigmoid")])
def test_sgpo_equals_dpo_at_epsilon_zero(space, loss, x64):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(-10, 3, 16)) for _ in range(4))
    beta = 0.3
    centers = losses.preference_centers((pc - rc) - (pr - rr), beta=beta, space=space)
    support = (1e-9, 1.0) if space == "probability" else (float(centers.min()) - 1, float(centers.max()) + 1)
    shift, mass = worst_case(centers, 0.0, loss=loss, support=support).atoms()

    def sgpo(pc):
        terms, _ = losses.sgpo_loss(pc, pr, rc, rr, shift, mass, beta=beta, space=space, loss=loss, p_min=1e-300)
        return terms.mean

    def dpo(pc):
        per_pair, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta)
        return per_pair.mean()

    assert float(sgpo(pc)) == pytest.approx(float(dpo(pc)), rel=1e-12)
    np.testing.assert_allclose(np.asarray(jax.grad(sgpo)(pc)), np.asarray(jax.grad(dpo)(pc)), rtol=1e-10)


def _authors_tangent_loss(v, k_tangents):
    return max(-(k_tangents / k) * (v - k / k_tangents) - math.log(k / k_tangents) for k in range(1, k_tangents + 1))


def test_sgpo_loss_hand_example_tangents():
    beta = 0.5
    pc = jnp.asarray([0.0, 0.0])
    pr = jnp.asarray([-2.0, 1.0])  # h = 2, -1
    zeros = jnp.zeros(2)
    shift = jnp.asarray([[0.0, 0.3], [0.0, 0.0]])
    mass = jnp.asarray([[0.75, 0.25], [1.0, 0.0]])
    terms, metrics = losses.sgpo_loss(pc, pr, zeros, zeros, shift, mass, beta=beta, loss="tangents", num_tangents=4)
    p0, p1 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(0.5))
    expected = (0.75 * _authors_tangent_loss(p0, 4) + 0.25 * _authors_tangent_loss(p0 - 0.3, 4)
                + _authors_tangent_loss(p1, 4)) / 2
    assert float(terms.mean) == pytest.approx(expected, rel=1e-6)
    assert float(terms.mass) == pytest.approx(2.0)
    assert float(metrics["rewards/accuracies"]) == 0.5


@pytest.mark.parametrize("name, support", [("tangents", (0.0, 1.0)), ("neg_log_sigmoid_tangents", (-2.0, 3.0))])
def test_piecewise_loss_gradient_is_the_active_slope_under_jit(name, support):
    """d/dv max_k (a_k v + b_k) = a_k* for the active piece (hand computation in float64). The
    suite compiles at LLVM -O0 (conftest), where XLA fuses a_k v + b_k into a multiply-add in
    one fusion and not in another: a gradient through ``jnp.max`` (which divides by the count of
    entries equal to the max) was -inf there and made every SGPO step's gradient NaN."""
    from sgpo_jax.core.follower import make_loss

    ell = make_loss(name, 6, support, jnp.float32)
    a, b = np.asarray(ell.slopes, np.float64), np.asarray(ell.intercepts, np.float64)
    v = np.random.default_rng(0).uniform(support[0] - 0.2, support[1] + 0.2, (40, 3)).astype(np.float32)
    lines = v.astype(np.float64)[..., None] * a + b
    top = np.sort(lines, axis=-1)
    apart = top[..., -1] - top[..., -2] > 1e-4  # away from the kinks the derivative is one slope
    assert apart.mean() > 0.9
    grad = jax.jit(jax.grad(lambda v: jnp.sum(ell(v))))(jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(grad)[apart], a[np.argmax(lines, axis=-1)][apart], rtol=1e-6)
    # float32 pieces: a few ulps of the loss values (at most about 8) in the absolute tolerance
    np.testing.assert_allclose(np.asarray(jax.jit(lambda v: ell(v))(v)), top[..., -1], rtol=1e-6, atol=1e-5)


def test_sgpo_loss_accumulates_exactly_over_micro_batches(x64):
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(-10, 3, 12)) for _ in range(4))
    shift = jnp.asarray(np.stack([np.zeros(12), rng.uniform(0, 0.5, 12)], 1))
    raw = rng.uniform(0, 1, 12)
    mass = jnp.asarray(np.stack([1 - raw, raw], 1) * rng.integers(0, 2, 12)[:, None])  # some padding rows

    def terms(sl, pc_part):
        t, _ = losses.sgpo_loss(pc_part, pr[sl], rc[sl], rr[sl], shift[sl], mass[sl], beta=0.2, loss="tangents")
        return t

    full = lambda pc: terms(slice(None), pc).mean
    a, b = slice(0, 5), slice(5, 12)

    def accumulated(pc):
        ta, tb = terms(a, pc[a]), terms(b, pc[b])
        return (ta.total + tb.total) / (ta.mass + tb.mass)

    assert float(accumulated(pc)) == pytest.approx(float(full(pc)), rel=1e-13)
    np.testing.assert_allclose(np.asarray(jax.grad(accumulated)(pc)), np.asarray(jax.grad(full)(pc)), rtol=1e-12)


def test_sgpo_loss_holds_the_follower_fixed():
    pc, pr, rc, rr = (jnp.asarray([-3.0, -4.0]) for _ in range(4))

    def f(shift):
        t, _ = losses.sgpo_loss(pc, pr, rc, rr, shift, jnp.full((2, 2), 0.5), loss="tangents")
        return t.mean

    assert np.all(np.asarray(jax.grad(f)(jnp.full((2, 2), 0.1))) == 0)


def test_authors_weighted_loss_hand_numbers():
    beta = 0.1
    pc = jnp.asarray([1.0, 0.0])
    pr = jnp.asarray([-1.0, 0.0])
    zeros = jnp.zeros(2)
    s = jnp.asarray([[0.7, 0.3, 0.0], [0.5, 0.5, 0.0]])
    shift = jnp.asarray([[0.0, 0.4, 0.0], [0.0, 0.9, 0.0]])
    got = losses.authors_weighted_loss(pc, pr, zeros, zeros, s, shift, beta=beta)
    p0 = 1 / (1 + math.exp(-0.2))  # h = 2
    row0 = 0.7 * -math.log(p0) + 0.3 * -math.log(p0 - 0.4)
    row1 = 0.5 * -math.log(0.5) + 0.5 * -math.log(1e-6)  # 0.5 - 0.9 < 0 hits the floor
    assert float(got) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_preference_centers_rejects_unknown_space():
    with pytest.raises(ValueError, match="space must be one of"):
        losses.preference_centers(jnp.zeros(2), beta=0.1, space="logit")
