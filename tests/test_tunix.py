"""sgpo_jax.integrations.tunix on a tiny nnx model: with eps = 0 and the exact margin loss the
SGPO loss and its gradients equal tunix's own dpo_loss_fn (an independent implementation); with
eps > 0 the loss equals the worst-case value from the LP oracle; one step of tunix's own jitted
DPOTrainer train step after use_sgpo gives the loss and gradients of sgpo_step on the same
batch, model and reference log-probs; a trainer that accumulates gradients over micro-batches is
refused. Skipped where google-tunix is not installed."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

dpo_trainer = pytest.importorskip("tunix.sft.dpo.dpo_trainer")
from flax import nnx  # noqa: E402
from tunix.rl import common  # noqa: E402

from sgpo_jax.core.step import PreferenceBatch, SGPOConfig, TrainState, sgpo_step  # noqa: E402
from sgpo_jax.integrations.tunix import sgpo_loss_fn, use_sgpo  # noqa: E402
from sgpo_jax.models import Decoder, DecoderConfig  # noqa: E402

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


DECODER = Decoder(DecoderConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8, initializer_range=0.3))


class TunixDecoder(nnx.Module):
    """Our (linen) Decoder behind tunix's model call: its params as nnx.Params, the padding mask
    read off tunix's [B, T, T] causal mask (its diagonal), tunix's positions passed through."""

    def __init__(self, params):
        self.params = nnx.data(jax.tree.map(nnx.Param, params))

    def __call__(self, tokens, positions=None, attention_mask=None, cache=None):
        params = jax.tree.map(lambda v: v[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable))
        return DECODER.apply(params, tokens, jnp.diagonal(attention_mask, axis1=1, axis2=2), positions), None


def _keep_gradient():
    """An optax transformation whose state is the last gradient it was given (update: -gradient)."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, state, params=None: (jax.tree.map(jnp.negative, g), g))


def _flat(tree):
    """{'a/b/c': array} with the leading 'params' levels dropped (nnx nests them once more)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        while keys[0] == "params":
            keys = keys[1:]
        out["/".join(keys)] = np.asarray(leaf)
    return out


def test_tunix_train_step_equals_sgpo_step_on_the_same_batch():
    """tunix's own jitted DPOTrainer step (use_sgpo, eps > 0, the consistent game) and sgpo_step
    on one batch: left-padded prompts, ragged completions, our Decoder on both sides with the
    same weights, the reference log-probs tunix computed, the same SGPOConfig."""
    rng = np.random.default_rng(3)
    prompt_mask = (np.arange(P)[None] >= P - rng.integers(1, P + 1, (B, 1))).astype(np.int32)
    prompt = rng.integers(1, VOCAB, (B, P)) * prompt_mask
    masks = [(np.arange(C)[None] < rng.integers(1, C + 1, (B, 1))).astype(np.int32) for _ in range(2)]
    chosen, rejected = (rng.integers(1, VOCAB, (B, C)) * m for m in masks)
    shapes = jax.eval_shape(DECODER.init, jax.random.PRNGKey(0), jnp.zeros((1, P + C), jnp.int32))
    params, ref_params = (jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
                          for _ in range(2))  # O(1) logits, no compilation
    config = SGPOConfig(mode="sgpo", beta=0.5, epsilon=0.05)

    trainer = dpo_trainer.DPOTrainer(TunixDecoder(params), TunixDecoder(ref_params), _keep_gradient(),
                                     dpo_trainer.DPOTrainingConfig(eval_every_n_steps=1, max_steps=1, beta=0.5))
    use_sgpo(trainer, config)
    example = trainer._prepare_inputs(dpo_trainer.TrainingInput(
        prompt_ids=jnp.asarray(prompt), prompt_mask=jnp.asarray(prompt_mask), chosen_ids=jnp.asarray(chosen),
        chosen_mask=jnp.asarray(masks[0]), rejected_ids=jnp.asarray(rejected), rejected_mask=jnp.asarray(masks[1])))
    train_step, _ = trainer.jit_train_and_eval_step()
    their_loss, their_aux, their_norm = train_step(example)
    theirs = _flat(nnx.to_pure_dict(nnx.state(trainer.optimizer.opt_state)))

    def rows(completion, mask):  # [prompt, completion] rows: ids, attention, scored tokens
        return [jnp.asarray(np.concatenate(x, 1)) for x in ((prompt, completion), (prompt_mask, mask),
                                                            (0 * prompt_mask, mask))]

    (ci, ca, cl), (ri, ra, rl) = rows(chosen, masks[0]), rows(rejected, masks[1])
    batch = PreferenceBatch(
        chosen_ids=ci, chosen_attention=ca, chosen_loss_mask=cl, rejected_ids=ri, rejected_attention=ra,
        rejected_loss_mask=rl, ref_chosen_logps=example.ref_chosen_logps,
        ref_rejected_logps=example.ref_rejected_logps, weight=jnp.ones(B))
    state = TrainState.create(apply_fn=DECODER.apply, params=params, tx=_keep_gradient(), config=config,
                              rng=jax.random.PRNGKey(0))
    state, metrics = jax.jit(sgpo_step)(state, batch)
    ours = _flat(state.opt_state)

    # float32 on both sides; the log-probs differ only in how they are reduced (tunix's
    # selective_log_softmax vs our sequence_logps): agreement to a few float32 ulps of O(1) values
    assert float(metrics["follower/moved"]) > 0.01  # the worst case is not the empirical batch
    assert float(their_loss) == pytest.approx(float(metrics["loss"]), rel=1e-6)
    assert float(their_norm) == pytest.approx(float(metrics["grad_norm"]), rel=1e-5)
    assert sorted(theirs) == sorted(ours)
    for name in ours:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for name, our_name in (("rewards/margin", "rewards/margins"), ("follower/dual", "follower/dual")):
        assert float(their_aux[name]) == pytest.approx(float(metrics[our_name]), rel=1e-5, abs=1e-6), name


def test_a_trainer_that_splits_the_batch_is_refused():
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(gradient_accumulation_steps=4))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        use_sgpo(trainer, SGPOConfig(mode="sgpo"))
