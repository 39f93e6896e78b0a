"""sgpo_jax.integrations.tunix on a tiny nnx model: with eps = 0 and the exact margin loss the
SGPO loss and its gradients equal tunix's own dpo_loss_fn (an independent implementation); with
eps > 0 the loss equals the worst-case value from the LP oracle; a trainer that accumulates
gradients over micro-batches is refused. Skipped where google-tunix is not installed."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

dpo_trainer = pytest.importorskip("tunix.sft.dpo.dpo_trainer")
from flax import nnx  # noqa: E402
from tunix.rl import common  # noqa: E402

from sgpo_jax.core.step import SGPOConfig  # noqa: E402
from sgpo_jax.integrations.tunix import sgpo_loss_fn, use_sgpo  # noqa: E402

from lp_oracle import transport_lp  # noqa: E402

VOCAB, DIM, B, P, C = 13, 8, 6, 3, 4


class PrefixMean(nnx.Module):
    """logits_t = W mean(embed(x_<=t)) + b over the attended positions: tunix's model call."""

    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.out = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, tokens, positions=None, attention_mask=None, cache=None):
        x = self.embed(tokens)
        m = attention_mask.astype(x.dtype)
        return self.out((m @ x) / jnp.maximum(m.sum(-1, keepdims=True), 1)), None


def _example(model, ref):
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, VOCAB, (2 * B, P)))
    prompt = jnp.concatenate([prompt[:B], prompt[:B]])
    completion = jnp.asarray(rng.integers(1, VOCAB, (2 * B, C)))
    cmask = jnp.asarray((np.arange(C)[None, :] < rng.integers(2, C + 1, (2 * B, 1))).astype(np.int32))
    ids = jnp.concatenate([prompt, completion], axis=1)
    mask = jnp.concatenate([jnp.ones_like(prompt), cmask], axis=1)
    attention = common.make_causal_attn_mask(mask)
    positions = common.build_positions_from_mask(mask)
    rc, rr = dpo_trainer.compute_logps(ref, ids, positions, attention, C, cmask)
    return dpo_trainer.TrainExample(input_ids=ids, positions=positions, attention_mask=attention,
                                    ref_chosen_logps=rc, ref_rejected_logps=rr, completion_mask=cmask,
                                    logits_to_keep=C)


def _loss_and_grads(fn, model, example):
    (loss, aux), grads = nnx.value_and_grad(fn, has_aux=True)(model, example)
    return float(loss), aux, jax.tree.leaves(nnx.state(grads))


def test_eps_zero_exact_loss_is_tunix_dpo():
    model, ref = PrefixMean(1), PrefixMean(2)
    example = _example(model, ref)
    beta = 0.5
    config = SGPOConfig(mode="sgpo", beta=beta, space="margin", loss="neg_log_sigmoid", epsilon=0.0)
    ours, aux, g_ours = _loss_and_grads(lambda m, e: sgpo_loss_fn(m, e, config=config), model, example)
    theirs, their_aux, g_theirs = _loss_and_grads(
        lambda m, e: dpo_trainer.dpo_loss_fn(m, e, beta=beta), model, example)
    # float32, B = 6 O(1) losses: 1e-6 relative
    assert ours == pytest.approx(theirs, rel=1e-6)
    for a, b in zip(g_ours, g_theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for name in ("rewards/margin", "rewards/accuracy", "log_probs/chosen"):
        assert float(aux[name]) == pytest.approx(float(their_aux[name]), rel=1e-6, abs=1e-7), name


def test_loss_is_the_worst_case_value_of_the_lp():
    """eps > 0, consistent tangent game: the leader loss at the current policy is E_Q[loss] at the
    worst case, i.e. the value of the transport LP (HiGHS) on the batch's centers."""
    model, ref = PrefixMean(1), PrefixMean(2)
    example = _example(model, ref)
    config = SGPOConfig(mode="sgpo", beta=0.5, epsilon=0.05)
    loss, aux, _ = _loss_and_grads(lambda m, e: sgpo_loss_fn(m, e, config=config), model, example)
    pc, pr = dpo_trainer.compute_logps(model, example.input_ids, example.positions, example.attention_mask, C,
                                       example.completion_mask)
    h = np.asarray((pc - example.ref_chosen_logps) - (pr - example.ref_rejected_logps), np.float64)
    centers = 1 / (1 + np.exp(-0.5 * h))
    tangents = lambda v: np.max([-(6 / k) * (v - k / 6) - np.log(k / 6) for k in range(1, 7)], axis=0)
    # the worst case sits at the support's lower end and at the centers: that grid holds the optimum
    want = transport_lp(centers, 0.05, tangents, np.concatenate([[0.0], centers]))
    # float32 follower and leader loss vs a float64 LP: 1e-5
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert float(aux["follower/transport"]) == pytest.approx(0.05, abs=1e-6)


def test_a_trainer_that_splits_the_batch_is_refused():
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(gradient_accumulation_steps=4))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        use_sgpo(trainer, SGPOConfig(mode="sgpo"))
