"""Chunked sequence log-probs: equal to the naive ``sequence_logps(logits)`` (values and gradients),
and much less temporary memory under ``value_and_grad`` (XLA's compiled memory analysis)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgpo_jax.core.losses import sequence_logps
from sgpo_jax.models import (
    Decoder,
    DecoderConfig,
    chunked_sequence_logps,
    decoder_logps_fn,
    output_head,
    params_to_hf_state_dict,
)

from toy import random_params

B, T, H, V = 3, 12, 16, 37  # 11 scored positions: chunk sizes 1 and 11 divide them, 3, 4, 5 do not


def random_inputs(seed=0, tied=False, batch=B, length=T):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, H)).astype(np.float32)
    head = rng.normal(size=(V, H) if tied else (H, V)).astype(np.float32)
    ids = rng.integers(0, V, (batch, length)).astype(np.int32)
    loss_mask = (rng.random((batch, length)) < 0.7).astype(np.int32)
    loss_mask[-1] = 0  # one row scores nothing
    return jnp.asarray(hidden), jnp.asarray(head), ids, loss_mask


def naive_from_hidden(hidden, head, ids, loss_mask, tied):
    logits = hidden @ (head.T if tied else head)
    return sequence_logps(logits, ids, loss_mask)


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def small_cfg(**overrides):
    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    fields.update(overrides)
    return DecoderConfig(**fields)




def prompt_response_batch(vocab, batch=3, length=T, seed=0):
    """Right-padded rows: a prompt, then a scored response, then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    arange = np.arange(length)[None]
    real = np.array([length, 9, 6])[:batch, None]
    prompt = np.array([4, 3, 5])[:batch, None]
    attention_mask = (arange < real).astype(np.int32)
    loss_mask = ((arange >= prompt) & (arange < real)).astype(np.int32)
    return ids, attention_mask, loss_mask


# ----------------------------------------------------------------------------------------------
# chunked_sequence_logps on given hidden states
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, chunk_size, tied", [
    ("custom_vjp", 1, False), ("custom_vjp", 4, False), ("custom_vjp", 4, True), ("custom_vjp", 11, True),
    ("custom_vjp", 64, False), ("checkpoint", 3, False), ("checkpoint", 11, True),
], ids=lambda v: {False: "untied", True: "tied"}.get(v, str(v)) if isinstance(v, bool) else str(v))
def test_chunked_equals_naive_values_and_grads(method, chunk_size, tied):
    hidden, head, ids, loss_mask = random_inputs(tied=tied)
    chunked = jax.jit(lambda h, w: chunked_sequence_logps(h, w, ids, loss_mask, chunk_size=chunk_size, tied=tied,
                                                          method=method))
    naive = jax.jit(lambda h, w: naive_from_hidden(h, w, ids, loss_mask, tied))
    expected = naive(hidden, head)
    assert np.abs(expected).max() > 10.0 and expected[-1] == 0  # not vacuous; the unscored row is 0
    got = chunked(hidden, head)
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    cotangent = jnp.asarray([1.0, -0.5, 2.0])  # a non-uniform weighting of the rows
    grads = jax.jit(jax.grad(lambda h, w: jnp.sum(cotangent * chunked(h, w)), argnums=(0, 1)))(hidden, head)
    expected_grads = jax.jit(jax.grad(lambda h, w: jnp.sum(cotangent * naive(h, w)), argnums=(0, 1)))(hidden, head)
    assert_tree_close(grads, expected_grads)
    # Only positions 0..T-2 feed a prediction: the last hidden state gets no gradient.
    assert np.all(np.asarray(grads[0])[:, -1] == 0)


def test_checkpoint_method_supports_forward_mode():
    hidden, head, ids, loss_mask = random_inputs()
    tangent = jnp.asarray(np.random.default_rng(1).normal(size=hidden.shape).astype(np.float32))
    _, got = jax.jvp(lambda h: chunked_sequence_logps(h, head, ids, loss_mask, chunk_size=4, method="checkpoint"),
                     (hidden,), (tangent,))
    _, expected = jax.jvp(lambda h: naive_from_hidden(h, head, ids, loss_mask, False), (hidden,), (tangent,))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_short_sequences_and_float64(x64):
    hidden, head, ids, loss_mask = random_inputs()
    np.testing.assert_array_equal(chunked_sequence_logps(hidden[:, :1], head, ids[:, :1], loss_mask[:, :1]),
                                  np.zeros(B))
    np.testing.assert_allclose(jax.jit(chunked_sequence_logps)(hidden[:, :2], head, ids[:, :2], loss_mask[:, :2]),
                               naive_from_hidden(hidden[:, :2], head, ids[:, :2], loss_mask[:, :2], False),
                               rtol=1e-5)
    h64, w64 = hidden.astype(jnp.float64), head.astype(jnp.float64)
    got, grads = jax.jit(jax.value_and_grad(
        lambda h, w: jnp.sum(chunked_sequence_logps(h, w, ids, loss_mask, chunk_size=5)), argnums=(0, 1)))(h64, w64)
    expected, expected_grads = jax.jit(jax.value_and_grad(
        lambda h, w: jnp.sum(naive_from_hidden(h, w, ids, loss_mask, False)), argnums=(0, 1)))(h64, w64)
    assert got.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in grads)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert_tree_close(grads, expected_grads, rtol=1e-10, atol=1e-12)


def test_bfloat16_operands_accumulate_in_float32():
    hidden, head, ids, loss_mask = random_inputs()
    hb, wb = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    got = chunked_sequence_logps(hb, wb, ids, loss_mask, chunk_size=4)
    assert got.dtype == jnp.float32
    # The same bfloat16 operands, multiplied exactly in float32.
    expected = naive_from_hidden(hb.astype(jnp.float32), wb.astype(jnp.float32), ids, loss_mask, False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_bad_arguments_raise():
    hidden, head, ids, loss_mask = random_inputs()
    with pytest.raises(ValueError, match="hidden"):
        chunked_sequence_logps(hidden[0], head, ids, loss_mask)
    with pytest.raises(ValueError, match="loss_mask"):
        chunked_sequence_logps(hidden, head, ids, loss_mask[:, 1:])
    with pytest.raises(ValueError, match=r"head must be \[V, H\]"):
        chunked_sequence_logps(hidden, head, ids, loss_mask, tied=True)
    with pytest.raises(ValueError, match=r"head must be \[H, V\]"):
        chunked_sequence_logps(hidden, head.T, ids, loss_mask)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_sequence_logps(hidden, head, ids, loss_mask, chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        chunked_sequence_logps(hidden, head, ids, loss_mask, method="scan")


# ----------------------------------------------------------------------------------------------
# Decoder integration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_return_hidden_and_output_head_reproduce_logits(tied):
    cfg = small_cfg(tie_word_embeddings=tied)
    model = Decoder(cfg)
    ids, attention_mask, _ = prompt_response_batch(cfg.vocab_size)
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    init_hidden = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 2), jnp.int32), return_hidden=True),
                                 jax.random.PRNGKey(0))
    assert jax.tree.structure(init_hidden) == jax.tree.structure(init)  # the head's params exist either way
    params = random_params(cfg)
    logits, hidden = jax.jit(lambda p: (model.apply(p, ids, attention_mask),
                                        model.apply(p, ids, attention_mask, return_hidden=True)))(params)
    head = output_head(params, cfg)
    assert hidden.shape == (*ids.shape, cfg.hidden_size) and head.shape == ((97, 32) if tied else (32, 97))
    np.testing.assert_allclose(hidden @ (head.T if tied else head), logits, atol=1e-5, rtol=1e-5)
    assert output_head(params["params"], cfg) is head


@pytest.mark.parametrize("chunk_size, tied", [(3, False), (11, True)], ids=["chunk3-untied", "chunk11-tied"])
def test_decoder_logps_fn_equals_naive(chunk_size, tied):
    cfg = small_cfg(tie_word_embeddings=tied)
    model = Decoder(cfg)
    params = random_params(cfg)
    ids, attention_mask, loss_mask = prompt_response_batch(cfg.vocab_size)
    weights = jnp.asarray([1.0, -2.0, 0.5])  # a non-uniform weighting of the rows

    def value_and_grad(fn):
        def loss(p):
            logps = fn(p, ids, attention_mask, loss_mask)
            return jnp.sum(weights * logps), logps
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    def naive_fn(p, i, a, m):
        return sequence_logps(model.apply(p, i, a), i, m)

    (_, logps), grads = value_and_grad(decoder_logps_fn(model, chunk_size=chunk_size))
    (_, expected), expected_grads = value_and_grad(naive_fn)
    assert np.abs(expected).max() > 5.0
    np.testing.assert_allclose(logps, expected, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
    assert_tree_close(params_to_hf_state_dict(grads, cfg), params_to_hf_state_dict(expected_grads, cfg))


def left_and_right_padded_batch(vocab, seed=1):
    """Five rows of T = 12 whose scored spans are at most 8 tokens: prompt 4 + response 8
    (unpadded); prompt 2 + response 5, right-padded; 3 padding slots, prompt 3 + response 6;
    prompt 5 + response 7 (its window is clamped to end at T); prompt 7, right-padded, no response."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (5, T)).astype(np.int32)
    arange = np.arange(T)[None]
    start = np.array([0, 0, 3, 0, 0])[:, None]  # first real token
    prompt_end = np.array([4, 2, 6, 5, 7])[:, None]  # first response token
    end = np.array([12, 7, 12, 12, 7])[:, None]  # one past the last real token
    attention_mask = ((arange >= start) & (arange < end)).astype(np.int32)
    loss_mask = ((arange >= prompt_end) & (arange < end)).astype(np.int32)
    return ids, attention_mask, loss_mask


@pytest.mark.parametrize("response_length, tied", [(8, False), (9, True), (7, False), (11, False), (40, True)],
                         ids=["W8", "W9-tied", "W7-too-short", "W11-full", "W40-full"])
def test_decoder_logps_fn_response_window_equals_naive(response_length, tied):
    """Values and gradients equal the full-logits oracle: windows of 8 and 9 tokens cover every
    row's scored span, 7 does not (the batch is scored on all positions), 11 = T - 1 and 40 are
    the full computation."""
    cfg = small_cfg(tie_word_embeddings=tied)
    model = Decoder(cfg)
    params = random_params(cfg)
    ids, attention_mask, loss_mask = left_and_right_padded_batch(cfg.vocab_size)
    weights = jnp.asarray([1.0, -2.0, 0.5, 1.5, 3.0])

    def value_and_grad(fn):
        def loss(p):
            logps = fn(p, ids, attention_mask, loss_mask)
            return jnp.sum(weights * logps), logps
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, logps), grads = value_and_grad(decoder_logps_fn(model, chunk_size=3, response_length=response_length))
    (_, expected), expected_grads = value_and_grad(lambda p, i, a, m: sequence_logps(model.apply(p, i, a), i, m))
    assert np.abs(expected).max() > 5.0 and expected[-1] == 0
    np.testing.assert_allclose(logps, expected, rtol=1e-5)
    assert_tree_close(params_to_hf_state_dict(grads, cfg), params_to_hf_state_dict(expected_grads, cfg))


def test_response_window_starts_and_fit():
    """Windows start one before the first scored token, clamped to end at T; the fit check."""
    from sgpo_jax.models.logps import _response_window

    _, _, loss_mask = left_and_right_padded_batch(97)
    start, fits = _response_window(jnp.asarray(loss_mask), 9)  # 8 scored tokens per window
    np.testing.assert_array_equal(start, [3, 1, 3, 3, 0])  # row 2: 5, clamped to T - 9 = 3
    assert bool(fits)
    assert not bool(_response_window(jnp.asarray(loss_mask), 8)[1])  # row 0 scores 8 tokens
    with pytest.raises(ValueError, match="response_length"):
        decoder_logps_fn(Decoder(small_cfg()), response_length=0)


def test_decoder_logps_fn_with_scan_remat_and_bfloat16():
    cfg = small_cfg(scan_layers=True, remat=True, tie_word_embeddings=True)
    params = random_params(cfg)
    ids, attention_mask, loss_mask = prompt_response_batch(cfg.vocab_size)
    bf16 = dataclasses.replace(cfg, dtype=jnp.bfloat16)

    @jax.jit
    def run(p):
        naive = sequence_logps(Decoder(cfg).apply(p, ids, attention_mask), ids, loss_mask)
        inner = decoder_logps_fn(Decoder(cfg), chunk_size=4)(p["params"], ids, attention_mask, loss_mask)
        low = decoder_logps_fn(Decoder(bf16), chunk_size=4, method="checkpoint")(p, ids, attention_mask, loss_mask)
        return naive, inner, low

    expected, got, low = run(params)
    np.testing.assert_allclose(got, expected, rtol=1e-5)  # also: variables["params"] alone is accepted
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, expected, rtol=0.05)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def test_chunked_value_and_grad_needs_much_less_temporary_memory():
    """V = 32000, T = 256, B = 4: float32 logits alone are 131 MB; XLA's buffer assignment for the
    naive value_and_grad needs several such buffers, the chunked one a few ``[B, 64, V]`` chunks."""
    batch, length, vocab, chunk = 4, 256, 32000, 64
    cfg = small_cfg(vocab_size=vocab, num_hidden_layers=1)
    model = Decoder(cfg)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def temp_bytes(logps_fn):
        loss = lambda p, i, a, m: jnp.sum(logps_fn(p, i, a, m))  # noqa: E731
        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens, tokens, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    naive_bytes = temp_bytes(lambda p, i, a, m: sequence_logps(model.apply(p, i, a), i, m))
    logits_bytes = 4 * batch * length * vocab
    assert naive_bytes >= 2 * logits_bytes  # the naive path holds (at least) logits and their cotangent
    for method in ("custom_vjp", "checkpoint"):
        chunked_bytes = temp_bytes(decoder_logps_fn(model, chunk_size=chunk, method=method))
        assert chunked_bytes < 0.3 * naive_bytes, (method, chunked_bytes, naive_bytes)
        assert chunked_bytes < logits_bytes, (method, chunked_bytes, logits_bytes)
