r"""bfloat16 end to end: float32 master weights, bfloat16 compute, against all-float32.

A tiny decoder (2 layers, hidden 64) with ``param_dtype=float32`` runs once with ``dtype=float32``
and once with ``dtype=bfloat16`` on the same parameters; the sequence log-probs of
``decoder_logps_fn`` (its head accumulates in float32) and the SGPO loss and gradients of
``sgpo_step`` (exact follower in the step) must agree.

Tolerances. bfloat16 keeps 8 significand bits: unit roundoff :math:`u = 2^{-8}`. Every matmul
input is rounded once to bfloat16 (relative error :math:`\le u`), accumulation is float32, so a
layer adds an independent relative error of order :math:`u` to the residual stream, and over
:math:`L` layers plus the embedding and head the errors add up like a random walk:
:math:`\sqrt{L + 2}\,u` relative. A sequence log-prob is a sum of :math:`R` per-token log-probs,
each off by that relative error times the logit spread, so we bound

* sequence log-probs: :math:`|\Delta \log p| \le 4 \sqrt{L + 2}\, u \cdot \sqrt{R} \cdot s` with
  :math:`s` the largest per-token :math:`|\log p|` (the per-token errors have random signs);
* the loss: relative :math:`4 \sqrt{L + 2}\, u` of its own value (it depends on the log-probs
  only through :math:`\beta \cdot` margins, :math:`\beta = 0.1`, which shrinks their error further);
* gradients (a backward pass doubles the depth): :math:`\|\Delta g\| / \|g\| \le 4 \sqrt{2 (L + 2)}\, u`,
  and every leaf's cosine with the float32 gradient above 0.99.

The step runs SGPO in margin space with the smooth ``neg_log_sigmoid`` loss and a small ball
(epsilon 0.01). No bound of order :math:`u` can hold for the gradient otherwise: the tangent
losses (the default ``"tangents"``) are piecewise linear, so the gradient jumps when bf16 moves an
atom across a knot; and with a large ball the exact follower moves mass between near-tied pairs,
a vertex switch of its LP for a margin change of order :math:`u` (measured on this model: 10-12%
relative gradient change with ``tangents`` at epsilon 0.01 or ``neg_log_sigmoid`` at epsilon 0.1,
against 1.5% here and 1% for DPO). The loss value is continuous in the margins, so it is also
checked with the default config.

The factor 4 is headroom over the measured errors (printed in the assertion messages); each bound
is still tight enough to catch a float32 accumulation silently done in bfloat16 (which would add
errors of order :math:`u \sqrt{V}` in the head's log-sum-exp, :math:`V = 256`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgpo_jax.core.step import PreferenceBatch, SGPOConfig, TrainState, sgpo_step
from sgpo_jax.models import Decoder, DecoderConfig, decoder_logps_fn

U = 2.0 ** -8  # bfloat16 unit roundoff
LAYERS, T, PAIRS, RESPONSE = 2, 32, 4, 16


def _cfg(dtype):
    return DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.05,
                         attention_block=8, dtype=dtype, param_dtype=jnp.float32)


def _batch(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 256, (2, PAIRS, T)).astype(np.int32)
    att = np.ones((2, PAIRS, T), np.int32)
    att[:, 0, -5:] = 0  # right padding on a row of each side
    att[:, 1, :3] = 0   # left padding on another
    loss = np.zeros_like(att)
    loss[:, :, T - RESPONSE:] = 1
    loss *= att
    return jnp.asarray(ids), jnp.asarray(att), jnp.asarray(loss)


def _setup():
    ids, att, loss = _batch(0)
    params = Decoder(_cfg(jnp.float32)).init(jax.random.PRNGKey(0), ids[0], att[0])
    return params, ids, att, loss


def test_bf16_sequence_logps_match_float32():
    params, ids, att, loss = _setup()
    rows = lambda x: x.reshape(-1, T)  # noqa: E731
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        fn = jax.jit(decoder_logps_fn(Decoder(_cfg(dtype)), chunk_size=8))
        out[dtype] = np.asarray(fn(params, rows(ids), rows(att), rows(loss)))
    assert out[jnp.bfloat16].dtype == np.float32  # accumulated in float32
    per_token = np.abs(out[jnp.float32]).max() / RESPONSE
    bound = 4 * math.sqrt(LAYERS + 2) * U * math.sqrt(RESPONSE) * per_token
    err = np.abs(out[jnp.bfloat16] - out[jnp.float32]).max()
    assert err <= bound, f"max |delta log p| = {err:.3g} > bound {bound:.3g} (float32 {out[jnp.float32]})"


def test_bf16_sgpo_loss_and_gradients_match_float32():
    params, ids, att, loss = _setup()
    ref_fn = jax.jit(decoder_logps_fn(Decoder(_cfg(jnp.float32)), chunk_size=8))
    ref_c = ref_fn(params, ids[0], att[0], loss[0]) + 0.3  # the policy slightly off the reference
    ref_r = ref_fn(params, ids[1], att[1], loss[1]) - 0.3
    batch = PreferenceBatch(chosen_ids=ids[0], chosen_attention=att[0], chosen_loss_mask=loss[0],
                            rejected_ids=ids[1], rejected_attention=att[1], rejected_loss_mask=loss[1],
                            ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, weight=jnp.ones(PAIRS, jnp.float32))
    default = SGPOConfig(mode="sgpo", beta=0.1, epsilon=0.01, num_tangents=6)
    config = SGPOConfig(mode="sgpo", beta=0.1, space="margin", loss="neg_log_sigmoid", epsilon=0.01, window_tau=0.5)
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = Decoder(_cfg(dtype))
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1.0), config=default,
                                  rng=jax.random.PRNGKey(0), logps_fn=decoder_logps_fn(model, chunk_size=8))
        losses[dtype] = float(jax.jit(sgpo_step)(state, batch)[1]["loss"])
    bound = 4 * math.sqrt(LAYERS + 2) * U * abs(losses[jnp.float32])
    assert abs(losses[jnp.bfloat16] - losses[jnp.float32]) <= bound, f"default-config loss {losses}, bound {bound:.3g}"
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = Decoder(_cfg(dtype))
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1.0), config=config,
                                  rng=jax.random.PRNGKey(0), logps_fn=decoder_logps_fn(model, chunk_size=8))
        new, metrics = jax.jit(sgpo_step)(state, batch)
        grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), params, new.params)
        results[dtype] = float(metrics["loss"]), grads
    (l32, g32), (l16, g16) = results[jnp.float32], results[jnp.bfloat16]
    loss_bound = 4 * math.sqrt(LAYERS + 2) * U * abs(l32)
    assert abs(l16 - l32) <= loss_bound, f"loss {l16} vs {l32}: |delta| {abs(l16 - l32):.3g} > {loss_bound:.3g}"
    flat32, flat16 = jax.tree.leaves(g32), jax.tree.leaves(g16)
    diff = math.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(flat16, flat32)))
    norm = math.sqrt(sum(np.sum(b ** 2) for b in flat32))
    grad_bound = 4 * math.sqrt(2 * (LAYERS + 2)) * U
    assert norm > 0 and diff / norm <= grad_bound, f"relative gradient error {diff / norm:.3g} > {grad_bound:.3g}"
    for path, a in jax.tree_util.tree_leaves_with_path(g16):
        b = dict(jax.tree_util.tree_leaves_with_path(g32))[path]
        cos = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos > 0.99, f"{jax.tree_util.keystr(path)}: cosine {cos:.4f}"
