"""The pure step: finite differences of independently written objectives, sharding, padding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgpo_jax import sgpo_step
from sgpo_jax.core.follower import worst_case
from sgpo_jax.core.step import SGPOConfig, TrainState, make_sgpo_step
from sgpo_jax.parallel import sharding

from toy import init_toy, random_batch


def _state(config, lr=1e-2, tx=None, dtype=jnp.float32, seed=0):
    model, params = init_toy(seed=seed, dtype=dtype)
    return model, TrainState.create(
        apply_fn=model.apply, params=params, tx=tx or optax.adam(lr), config=config,
        rng=jax.random.PRNGKey(0),
    )


def _naive_logps(model, params, ids, attention, loss_mask):
    """Sequence log-probs by an explicit loop over positions in float64 numpy."""
    logits = np.asarray(model.apply(params, ids, attention), np.float64)
    ids, loss_mask = np.asarray(ids), np.asarray(loss_mask)
    out = np.zeros(ids.shape[0])
    for i in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if loss_mask[i, t]:
                row = logits[i, t - 1]
                out[i] += row[ids[i, t]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
    return out


def _margins(model, params, batch):
    pc = _naive_logps(model, params, batch.chosen_ids, batch.chosen_attention, batch.chosen_loss_mask)
    pr = _naive_logps(model, params, batch.rejected_ids, batch.rejected_attention, batch.rejected_loss_mask)
    return (pc - np.asarray(batch.ref_chosen_logps)) - (pr - np.asarray(batch.ref_rejected_logps))


def _fd_gradient(objective, params, probes):
    """Central differences of ``objective`` along random directions: [(direction, slope)]."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(probes):
        direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
        h = 1e-5
        plus = jax.tree.map(lambda p, d: p + h * d, params, direction)
        minus = jax.tree.map(lambda p, d: p - h * d, params, direction)
        out.append((direction, (objective(plus) - objective(minus)) / (2 * h)))
    return out


def _dot(a, b):
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("mode", ["dpo", "sgpo"])
def test_step_gradient_matches_finite_differences(mode, x64):
    """SGD with lr 1 moves the parameters by minus the gradient. The objective is recomputed
    here from scratch: naive log-probs, DPO by formula, or the SGPO leader objective
    sum m * -log sigmoid(beta h - d) / sum m with the follower atoms frozen at the start."""
    beta, eps = 0.7, 0.05
    config = SGPOConfig(mode=mode, beta=beta, space="margin", loss="neg_log_sigmoid", epsilon=eps, window_tau=0.5)
    model, state = _state(config, tx=optax.sgd(1.0), dtype=jnp.float64)
    batch = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
                         random_batch(seed=4, pairs=10, pad_rows=2))
    weight = np.asarray(batch.weight)
    h0 = _margins(model, state.params, batch)
    if mode == "sgpo":
        xi = beta * h0
        real = weight > 0
        window = (xi[real].min() - 0.5, xi[real].max() + 0.5)
        wc = worst_case(np.clip(xi, *window), eps, loss="neg_log_sigmoid", support=window, weights=weight)
        shift, mass = (np.asarray(a) for a in wc.atoms())
        mass = mass * weight[:, None]
        assert np.asarray(wc.moved).max() > 0  # the adversary is active

    def objective(params):
        h = _margins(model, params, batch)
        if mode == "dpo":
            return float(np.sum(weight * np.logaddexp(0, -beta * h)) / weight.sum())
        v = beta * h[:, None] - shift
        return float(np.sum(mass * np.logaddexp(0, -v)) / mass.sum())

    new_state, metrics = jax.jit(sgpo_step)(state, batch)
    assert float(metrics["loss"]) == pytest.approx(objective(state.params), rel=1e-10)
    step_grad = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    for direction, slope in _fd_gradient(objective, state.params, probes=3):
        assert _dot(step_grad, direction) == pytest.approx(slope, rel=1e-6, abs=1e-9)


def test_single_forward_step_matches_finite_differences_in_probability_space(x64):
    """The default game (probability space, K = 6 tangents) with an active follower: the one-
    forward step's gradient equals central differences of the leader objective written here,
    sum_ij m_ij * max_k tangent_k(sigmoid(beta h_i) - d_ij) / sum m_ij, atoms frozen at the start."""
    beta, eps, k = 0.7, 0.05, 6
    config = SGPOConfig(mode="sgpo", beta=beta, epsilon=eps, num_tangents=k)
    model, state = _state(config, tx=optax.sgd(1.0), dtype=jnp.float64)
    batch = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
                         random_batch(seed=9, pairs=10, pad_rows=2))
    weight = np.asarray(batch.weight)
    wc = worst_case(1 / (1 + np.exp(-beta * _margins(model, state.params, batch))), eps, num_tangents=k,
                    weights=weight)
    shift, mass = (np.asarray(a) for a in wc.atoms())
    mass = mass * weight[:, None]
    assert np.asarray(wc.moved).max() > 0  # the adversary is active
    knots = np.arange(1, k + 1) / k

    def objective(params):
        v = 1 / (1 + np.exp(-beta * _margins(model, params, batch)))[:, None] - shift
        ell = np.max(-(v[..., None] - knots) / knots - np.log(knots), axis=-1)
        return float(np.sum(mass * ell) / mass.sum())

    new_state, metrics = jax.jit(sgpo_step)(state, batch)
    assert float(metrics["loss"]) == pytest.approx(objective(state.params), rel=1e-10)
    step_grad = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    for direction, slope in _fd_gradient(objective, state.params, probes=3):
        assert _dot(step_grad, direction) == pytest.approx(slope, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("micro_batches, forwards", [(1, 1), (2, 2)])
def test_policy_forwards_per_step(micro_batches, forwards):
    """With the in-step follower and one micro-batch the policy is traced (and runs) once; with
    micro-batches once for the margins and once for the accumulation."""
    model, params = init_toy()
    traces = []

    def apply_fn(*args):
        traces.append(1)
        return model.apply(*args)

    state = TrainState.create(apply_fn=apply_fn, params=params, tx=optax.sgd(1e-2), rng=jax.random.PRNGKey(0),
                              config=SGPOConfig(mode="sgpo", epsilon=0.05, micro_batches=micro_batches))
    jax.jit(sgpo_step).lower(state, random_batch(seed=1, pairs=8))
    assert len(traces) == forwards


def test_loss_decreases_on_a_toy_problem():
    """Chosen responses repeat token 3, rejected ones token 5; SGPO learns to prefer 3."""
    config = SGPOConfig(mode="sgpo", beta=0.5, epsilon=0.02)
    model, state = _state(config, lr=5e-2)
    batch = random_batch(seed=1, pairs=16)
    prompt = 3
    ci = np.asarray(batch.chosen_ids).copy()
    ri = np.asarray(batch.rejected_ids).copy()
    ci[:, prompt:] = 3
    ri[:, prompt:] = 5
    batch = batch.replace(chosen_ids=jnp.asarray(ci), rejected_ids=jnp.asarray(ri),
                          ref_chosen_logps=jnp.full(16, -8.0), ref_rejected_logps=jnp.full(16, -8.0))
    step = jax.jit(sgpo_step)
    losses_seen = []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses_seen.append(float(metrics["loss"]))
    assert losses_seen[-1] < 0.5 * losses_seen[0]
    assert float(metrics["rewards/accuracies"]) == 1.0


@pytest.mark.parametrize("config", [
    SGPOConfig(mode="dpo"),
    SGPOConfig(mode="sgpo", epsilon=0.05),
    SGPOConfig(mode="sgpo", space="margin", loss="neg_log_sigmoid_tangents", epsilon=0.1),
], ids=["dpo", "sgpo-probability", "sgpo-margin-tangents"])
def test_sharded_step_matches_unsharded(config):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    _, state = _state(config)
    batch = random_batch(seed=2, pairs=16, pad_rows=3)
    reference_state, reference_metrics = jax.jit(sgpo_step)(state, batch)
    _, fresh = _state(config)
    sharded = make_sgpo_step(mesh, fresh)
    got_state, got_metrics = sharded(fresh, sharding.place_rows(mesh, batch)[0])
    assert got_state.params["params"]["Embed_0"]["embedding"].sharding.is_fully_replicated
    for name, value in reference_metrics.items():
        assert float(got_metrics[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    for a, b in zip(jax.tree.leaves(reference_state.params), jax.tree.leaves(got_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_padding_rows_change_nothing():
    config = SGPOConfig(mode="sgpo", epsilon=0.05)
    _, state = _state(config)
    batch = random_batch(seed=3, pairs=8, pad_rows=3)
    real = jax.tree.map(lambda x: x[:5], batch)
    a_state, a_metrics = jax.jit(sgpo_step)(state, batch)
    b_state, b_metrics = jax.jit(sgpo_step)(state, real)
    for name in ("loss", "follower/value", "follower/dual", "rewards/margins"):
        assert float(a_metrics[name]) == pytest.approx(float(b_metrics[name]), rel=1e-6), name
    for a, b in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_precomputed_atoms_give_the_in_step_update():
    """Atoms computed outside (per round) and fed in the batch reproduce the in-step follower."""
    config = SGPOConfig(mode="sgpo", epsilon=0.05, beta=0.3)
    model, state = _state(config)
    batch = random_batch(seed=5, pairs=8)
    h = _margins(model, state.params, batch)
    centers = 1 / (1 + np.exp(-0.3 * h))
    shift, mass = worst_case(centers.astype(np.float32), 0.05).atoms()
    with_atoms = batch.replace(atom_shift=shift, atom_mass=mass)
    a_state, a_metrics = jax.jit(sgpo_step)(state, batch)
    b_state, b_metrics = jax.jit(sgpo_step)(state, with_atoms)
    assert float(a_metrics["loss"]) == pytest.approx(float(b_metrics["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_in_step_follower_loss_equals_worst_case_value():
    """At the current parameters the leader loss is the follower's worst-case value, which we
    recompute from the hand-written tangent loss on the naive centers (epsilon = 0: the mean)."""
    config = SGPOConfig(mode="sgpo", epsilon=0.0, beta=0.4)
    model, state = _state(config)
    batch = random_batch(seed=6, pairs=8)
    p = 1 / (1 + np.exp(-0.4 * _margins(model, state.params, batch)))
    k = 6
    tangent = lambda v: max(-(k / j) * (v - j / k) - math.log(j / k) for j in range(1, k + 1))
    _, metrics = jax.jit(sgpo_step)(state, batch)
    assert float(metrics["loss"]) == pytest.approx(np.mean([tangent(v) for v in p]), rel=1e-5)
    assert float(metrics["follower/moved"]) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="ppo"), "mode must be one of"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(space="margin"), "does not suit space"),
    (dict(loss="neg_log"), "support lower end > 0"),
    (dict(epsilon=-1.0), "epsilon must be >= 0"),
    (dict(variant="box"), "variant must be one of"),
    (dict(num_tangents=0), "num_tangents"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGPOConfig(**kwargs)


@pytest.mark.parametrize("config", [
    SGPOConfig(mode="dpo", label_smoothing=0.1),
    SGPOConfig(mode="sgpo", epsilon=0.05),
    SGPOConfig(mode="sgpo", space="margin", loss="neg_log_sigmoid", epsilon=0.2),
], ids=["dpo", "sgpo-probability", "sgpo-margin"])
def test_micro_batches_give_the_one_batch_update(config, x64):
    """Accumulating 4 micro-batches (padding rows unevenly spread) equals one big batch; the
    in-step follower sees all 12 pairs either way."""
    import dataclasses

    batch = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
                         random_batch(seed=8, pairs=12, pad_rows=3))
    _, one = _state(config, tx=optax.sgd(1.0), dtype=jnp.float64)
    _, four = _state(dataclasses.replace(config, micro_batches=4), tx=optax.sgd(1.0), dtype=jnp.float64)
    a_state, a_metrics = jax.jit(sgpo_step)(one, batch)
    b_state, b_metrics = jax.jit(sgpo_step)(four, batch)
    for name, value in a_metrics.items():
        assert float(b_metrics[name]) == pytest.approx(float(value), rel=1e-12, abs=1e-14), name
    for a, b in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="not divisible into 5 micro-batches"):
        _, five = _state(dataclasses.replace(config, micro_batches=5))
        sgpo_step(five, random_batch(seed=8, pairs=12))


def test_grouped_follower_in_the_step_solves_each_group_alone():
    """sgpo.group_size=G: the in-step follower solves each block of G consecutive pairs as its
    own ball. Oracle: each block solved separately with the global follower (no grouping code),
    then the leader loss written out by hand from those atoms at the step's starting margins."""
    beta, eps, group = 0.5, 0.05, 4
    config = SGPOConfig(mode="sgpo", beta=beta, epsilon=eps, group_size=group)
    model, state = _state(config)
    batch = random_batch(seed=7, pairs=8, pad_rows=0)
    p = 1 / (1 + np.exp(-beta * _margins(model, state.params, batch)))
    values, loss_terms = [], []
    for start in range(0, 8, group):
        centers = p[start:start + group]
        wc = worst_case(centers, eps, loss="tangents", num_tangents=6)
        values.append(float(wc.value))
        shift, mass = (np.asarray(a, np.float64) for a in wc.atoms())
        tangents = lambda v: np.max([-(6 / k) * (v - k / 6) - np.log(k / 6) for k in range(1, 7)], axis=0)
        loss_terms.append(np.sum(mass * tangents(centers[:, None] - shift)))
    _, metrics = jax.jit(sgpo_step)(state, batch)
    # float32 step vs float64 oracle on 8 pairs of O(1) losses: 1e-5 covers float32 rounding
    np.testing.assert_allclose(float(metrics["follower/value"]), np.mean(values), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), np.sum(loss_terms) / 8, rtol=1e-5, atol=1e-5)
    ungrouped = SGPOConfig(mode="sgpo", beta=beta, epsilon=eps)
    _, global_metrics = jax.jit(sgpo_step)(_state(ungrouped)[1], batch)
    assert abs(float(global_metrics["follower/value"]) - np.mean(values)) > 1e-4  # grouping changes the answer


def test_authors_pairing_trains_on_their_columns():
    """preset "authors" (per_entry tangent follower, leader -log p): the step's loss is the
    authors' training loss (SGPO_NOTES section 4) written out by hand, the mean over pairs of
    sum_k s_ik * -log(max(p_i - q_ik / s_ik, 1e-6)), with (s, q/s) the follower's per-entry columns
    at the step's starting margins."""
    beta, eps = 0.5, 0.05
    config = SGPOConfig(mode="sgpo", beta=beta, epsilon=eps, loss="tangents", num_tangents=6,
                        leader_loss="neg_log", variant="per_entry")
    model, state = _state(config)
    batch = random_batch(seed=9, pairs=8, pad_rows=0)
    p = 1 / (1 + np.exp(-beta * _margins(model, state.params, batch)))
    s, shift = (np.asarray(a, np.float64)
                for a in worst_case(p, eps, loss="tangents", num_tangents=6, variant="per_entry").authors_columns())
    expected = np.mean(np.sum(s * -np.log(np.maximum(p[:, None] - shift, 1e-6)), axis=1))
    _, metrics = jax.jit(sgpo_step)(state, batch)
    # float32 step vs float64 oracle on 8 pairs of O(1) losses: 1e-5 covers float32 rounding
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5, atol=1e-5)
    shift_e, mass_e = (np.asarray(a, np.float64)
                       for a in worst_case(p, eps, loss="tangents", num_tangents=6, variant="per_entry").atoms())
    on_atoms = np.mean(np.sum(mass_e * -np.log(np.maximum(p[:, None] - shift_e, 1e-6)), axis=1))
    assert abs(on_atoms - expected) > 1e-3  # the exact atoms would give another loss
