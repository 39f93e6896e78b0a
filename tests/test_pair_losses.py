"""The train.loss_type losses (sigmoid/cDPO, robust, ipo, dr_dpo) against hand computations in
float64 NumPy, against TRL 1.16's DPOTrainer (losses and, through torch autograd, gradients with
respect to the sequence log-probs), and in the step: values, a finite-difference gradient of
Dr. DPO's closed form, and exact micro-batching."""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgpo_jax import runner
from sgpo_jax.core import losses, preference_losses
from sgpo_jax.core.step import SGPOConfig, TrainState, sgpo_step

from tiny_run import tiny, write_pairs, write_tokenizer
from toy import init_toy, random_batch

B = 7


def _softplus(x):
    return np.logaddexp(0.0, x)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(0, 3, B) - 20 for _ in range(4))
    chosen_tokens, rejected_tokens = rng.integers(1, 9, B), rng.integers(1, 9, B)
    return pc, pr, rc, rr, chosen_tokens, rejected_tokens


def _hand(loss_type, pc, pr, rc, rr, nc, nr, beta, ls):
    """Each loss written out from its paper / TRL's formula, float64."""
    h = (pc - rc) - (pr - rr)
    if loss_type in ("sigmoid", "dr_dpo"):
        return (1 - ls) * _softplus(-beta * h) + ls * _softplus(beta * h)
    if loss_type == "robust":
        return (-(1 - ls) * -_softplus(-beta * h) + ls * -_softplus(beta * h)) / (1 - 2 * ls)
    assert loss_type == "ipo"
    return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2


def _dr_dpo(per_pair, weights, beta_prime):
    """-b' log(sum w exp(-l / b') / sum w) and its weights, by direct exponentiation (the losses
    here are O(10), so no overflow)."""
    e = weights * np.exp(-per_pair / beta_prime)
    return -beta_prime * np.log(e.sum() / weights.sum()), e / e.sum()


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("robust", 0.3),
                                          ("ipo", 0.0), ("dr_dpo", 0.1)])
def test_per_pair_losses_match_hand_computation(loss_type, ls, x64):
    pc, pr, rc, rr, nc, nr = _inputs(1)
    beta = 0.3
    got, metrics = losses.pair_loss(*map(jnp.asarray, (pc, pr, rc, rr)), loss_type=loss_type, beta=beta,
                                    label_smoothing=ls, chosen_tokens=jnp.asarray(nc), rejected_tokens=jnp.asarray(nr))
    # float64 on both sides, O(1) losses: agreement to a few ulps
    np.testing.assert_allclose(np.asarray(got), _hand(loss_type, pc, pr, rc, rr, nc, nr, beta, ls), rtol=1e-12)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(np.mean((pc - rc) > (pr - rr)))


@pytest.mark.parametrize("beta_prime", [0.25, 1.0, 8.0])
def test_dr_dpo_coupling_matches_hand_computation(beta_prime, x64):
    rng = np.random.default_rng(2)
    per_pair = rng.uniform(0.1, 4.0, B)
    weights = np.array([1, 1, 0, 1, 1, 0, 1], float)  # two padding rows
    value, q = preference_losses.pair_loss("dr_dpo").couple(jnp.asarray(per_pair), jnp.asarray(weights),
                                                            temperature=beta_prime)
    want_value, want_q = _dr_dpo(per_pair, weights, beta_prime)
    # float64 logsumexp vs direct exponentiation of O(10) exponents: a few ulps
    assert float(value) == pytest.approx(want_value, rel=1e-12)
    np.testing.assert_allclose(np.asarray(q), want_q, rtol=1e-12, atol=1e-300)
    # q is the derivative of the value: central differences (step 1e-6, error O(1e-12)) agree to 1e-7
    fd = [(_dr_dpo(per_pair + 1e-6 * np.eye(B)[i], weights, beta_prime)[0]
           - _dr_dpo(per_pair - 1e-6 * np.eye(B)[i], weights, beta_prime)[0]) / 2e-6 for i in range(B)]
    np.testing.assert_allclose(np.asarray(q), fd, atol=1e-7)
    # between the smallest and the mean loss of the real pairs (soft minimum)
    real = per_pair[weights > 0]
    assert real.min() <= float(value) <= real.mean()


# ----------------------------------------------------------------------------- TRL 1.16 oracle


def _trl_loss_and_grads(loss_type, pc, pr, rc, rr, nc, nr, beta, ls):
    """TRL's DPOTrainer._compute_loss on a stand-in model that returns the given sequence
    log-probs (one completion position carries each sequence's log-prob, the rest are 0, so TRL's
    sum over positions gives it back); completion masks of nc / nr tokens. Returns the loss and
    its torch-autograd gradient with respect to the chosen and rejected log-probs."""
    torch = pytest.importorskip("torch")
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    from collections import defaultdict

    T = int(max(nc.max(), nr.max())) + 2
    completion = np.zeros((2 * B, T), np.int64)
    for row, n in enumerate(np.concatenate([nc, nr])):
        completion[row, T - n:] = 1
    seq = torch.tensor(np.concatenate([pc, pr]), dtype=torch.float64, requires_grad=True)
    first = torch.zeros(2 * B, T - 1, dtype=torch.float64)
    first[:, -1] = 1.0  # the last position is a completion token in every row

    def model(**kwargs):
        return types.SimpleNamespace(
            log_probs=seq[:, None] * first, entropy=torch.zeros(2 * B, T - 1, dtype=torch.float64),
            mean_logits=torch.zeros(2 * B, T - 1, dtype=torch.float64),
            is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool))

    model.training = True
    accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=ls,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": torch.tensor(completion),
              "ref_chosen_logps": torch.tensor(rc), "ref_rejected_logps": torch.tensor(rr)}
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    grad = seq.grad.numpy()
    return float(loss.detach()), grad[:B], grad[B:], trainer._metrics["train"]


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("robust", 0.0), ("robust", 0.2), ("ipo", 0.0)])
def test_losses_and_gradients_match_trl(loss_type, ls, x64):
    pc, pr, rc, rr, nc, nr = _inputs(3)
    beta = 0.2
    trl_loss, trl_gc, trl_gr, trl_metrics = _trl_loss_and_grads(loss_type, pc, pr, rc, rr, nc, nr, beta, ls)

    def mean_loss(c, r):
        per_pair, metrics = losses.pair_loss(c, r, jnp.asarray(rc), jnp.asarray(rr), loss_type=loss_type, beta=beta,
                                             label_smoothing=ls, chosen_tokens=jnp.asarray(nc),
                                             rejected_tokens=jnp.asarray(nr))
        return jnp.mean(per_pair), metrics

    (ours, metrics), (gc, gr) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(jnp.asarray(pc),
                                                                                            jnp.asarray(pr))
    # float64 in both libraries, same formula: agreement to rounding
    assert float(ours) == pytest.approx(trl_loss, rel=1e-12)
    np.testing.assert_allclose(np.asarray(gc), trl_gc, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(np.asarray(gr), trl_gr, rtol=1e-10, atol=1e-15)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        # TRL averages the 0/1 accuracies in float32 (.float()): 1e-7 there, float64 rounding elsewhere
        rel = 1e-7 if name == "rewards/accuracies" else 1e-12
        assert float(metrics[name]) == pytest.approx(trl_metrics[name][0], rel=rel, abs=1e-15), name


def test_trl_sigmoid_ignores_label_smoothing_and_ours_is_cdpo(x64):
    """TRL 1.16's "sigmoid" is plain DPO whatever label_smoothing says; our sigmoid with s > 0 is
    cDPO, i.e. the s-mixture of DPO on the pair and on the flipped pair (TRL's s = 0 loss both ways)."""
    pc, pr, rc, rr, nc, nr = _inputs(4)
    beta, s = 0.2, 0.25
    plain, *_ = _trl_loss_and_grads("sigmoid", pc, pr, rc, rr, nc, nr, beta, s)
    assert plain == pytest.approx(_trl_loss_and_grads("sigmoid", pc, pr, rc, rr, nc, nr, beta, 0.0)[0], rel=1e-14)
    flipped, *_ = _trl_loss_and_grads("sigmoid", pr, pc, rr, rc, nr, nc, beta, 0.0)
    ours, _ = losses.pair_loss(*map(jnp.asarray, (pc, pr, rc, rr)), loss_type="sigmoid", beta=beta,
                               label_smoothing=s)
    # means of O(1) float64 losses: rounding only
    assert float(jnp.mean(ours)) == pytest.approx((1 - s) * plain + s * flipped, rel=1e-12)


# ----------------------------------------------------------------------------- in the step


def _state(config, dtype=jnp.float64):
    model, params = init_toy(seed=0, dtype=dtype)
    return model, TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1.0), config=config,
                                    rng=jax.random.PRNGKey(0))


def _batch(pairs=12, pad_rows=3):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
                        random_batch(seed=8, pairs=pairs, pad_rows=pad_rows))


def _naive_logps(model, params, ids, attention, loss_mask):
    """Sequence log-probs ``[B]`` by NumPy log-softmax over each scored position (float64)."""
    logits = np.asarray(model.apply(params, ids, attention), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.asarray(ids)[:, 1:, None], -1)[..., 0]
    return ((picked - logz) * np.asarray(loss_mask)[:, 1:]).sum(1)


def _objective(config, model, params, batch):
    """The batch loss from scratch: naive log-probs, the hand formulas, the weighted mean (Dr.
    DPO: the closed form over the real pairs)."""
    pc = _naive_logps(model, params, batch.chosen_ids, batch.chosen_attention, batch.chosen_loss_mask)
    pr = _naive_logps(model, params, batch.rejected_ids, batch.rejected_attention, batch.rejected_loss_mask)
    nc = np.maximum(np.asarray(batch.chosen_loss_mask)[:, 1:].sum(1), 1)
    nr = np.maximum(np.asarray(batch.rejected_loss_mask)[:, 1:].sum(1), 1)
    w = np.asarray(batch.weight, np.float64)
    per_pair = _hand(config.loss_type, pc, pr, np.asarray(batch.ref_chosen_logps), np.asarray(batch.ref_rejected_logps),
                     nc, nr, config.beta, config.label_smoothing)
    if config.loss_type == "dr_dpo":
        return _dr_dpo(per_pair, w, config.dr_dpo_beta)[0]
    return float((w * per_pair).sum() / w.sum())


@pytest.mark.parametrize("loss_type,ls", [("robust", 0.2), ("ipo", 0.0), ("dr_dpo", 0.1)])
def test_step_loss_and_gradient_match_the_objective(loss_type, ls, x64):
    """SGD with lr 1 moves the parameters by minus the gradient: its projections on random
    directions equal central differences of the objective recomputed from scratch (for Dr. DPO
    the closed form -b' log mean exp(-l / b'), not the step's fixed-weight pre-pass)."""
    config = SGPOConfig(mode="dpo", beta=0.7, loss_type=loss_type, label_smoothing=ls, dr_dpo_beta=0.5)
    model, state = _state(config)
    batch = _batch(pairs=10, pad_rows=2)
    new_state, metrics = jax.jit(sgpo_step)(state, batch)
    # float64 model and oracle: rounding only
    assert float(metrics["loss"]) == pytest.approx(_objective(config, model, state.params, batch), rel=1e-9)
    grads = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    rng = np.random.default_rng(0)
    for _ in range(2):
        direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), state.params)
        step = 1e-5
        plus = jax.tree.map(lambda p, d: p + step * d, state.params, direction)
        minus = jax.tree.map(lambda p, d: p - step * d, state.params, direction)
        fd = (_objective(config, model, plus, batch) - _objective(config, model, minus, batch)) / (2 * step)
        got = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        # central differences with step 1e-5 in float64: truncation ~1e-10, cancellation ~1e-11 relative
        assert got == pytest.approx(fd, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("loss_type", ["ipo", "dr_dpo"])
def test_micro_batches_give_the_one_batch_update(loss_type, x64):
    """4 micro-batches (padding rows unevenly spread) give the one-batch update; Dr. DPO's
    coupling sees all 12 pairs either way, so its weights are not per micro-batch."""
    config = SGPOConfig(mode="dpo", beta=0.7, loss_type=loss_type, dr_dpo_beta=0.3)
    batch = _batch()
    a_state, a_metrics = jax.jit(sgpo_step)(_state(config)[1], batch)
    b_state, b_metrics = jax.jit(sgpo_step)(_state(dataclasses.replace(config, micro_batches=4))[1], batch)
    # float64, same arithmetic up to summation order
    for name, value in a_metrics.items():
        assert float(b_metrics[name]) == pytest.approx(float(value), rel=1e-12, abs=1e-14), name
    for a, b in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-14)
    if loss_type == "dr_dpo":  # averaging per-micro-batch Dr. DPO losses would be a different loss
        model, state = _state(config)
        parts = [_objective(config, model, state.params, jax.tree.map(lambda x: x[i:i + 3], batch))
                 for i in range(0, 12, 3) if np.asarray(batch.weight)[i:i + 3].sum() > 0]
        assert abs(np.mean(parts) - float(a_metrics["loss"])) > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="hinge"), "loss_type must be one of"),
    (dict(loss_type="ipo", label_smoothing=0.1), "does not use label_smoothing"),
    (dict(loss_type="dr_dpo", dr_dpo_beta=0.0), "dr_dpo_beta must be > 0"),
    (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGPOConfig(mode="dpo", **kwargs)


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_tokenizer(root / "tokenizer"), write_pairs(root / "prefs.jsonl", 24)


@pytest.mark.parametrize("loss_type,settings", [
    ("sigmoid", dict(train__label_smoothing=0.1)),
    ("robust", dict(train__label_smoothing=0.2)),
    ("ipo", {}),
    ("dr_dpo", dict(train__batch_size=16, train__micro_batches=2, train__dr_dpo_beta=0.5)),
])
def test_each_loss_type_trains_from_the_config(loss_type, settings, tiny_files, tmp_path):
    """configs/tiny.py in train.mode=dpo, 4 steps. At step 1 the policy is its reference (h = 0
    for every pair), where every loss has a closed form: log 2 for sigmoid / cDPO, rDPO and Dr. DPO
    (all pairs equal), (1 / (2 beta))^2 for IPO. Then the loss falls and the margins grow."""
    config = tiny(*tiny_files, train__mode="dpo", train__loss_type=loss_type, train__max_steps=4,
                  checkpoint__every=100, export=False, **settings)
    runner.run(config, tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 5))
    beta = config.train.beta
    at_reference = (1 / (2 * beta)) ** 2 if loss_type == "ipo" else np.log(2)
    # the reference log-probs come from a separate float32 forward pass: h = 0 up to ~1e-6
    assert metrics[0]["loss"] == pytest.approx(at_reference, abs=1e-4)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[-1]["rewards/margins"] > 0


def test_loss_type_is_validated_up_front(tiny_files, tmp_path):
    with pytest.raises(ValueError) as err:
        runner.run(tiny(*tiny_files, train__mode="sgpo", train__loss_type="ipo", train__label_smoothing=0.1),
                        tmp_path)
    message = str(err.value)
    assert "train.loss_type='ipo' applies to train.mode=dpo" in message
    assert "loss_type 'ipo' does not use label_smoothing" in message
