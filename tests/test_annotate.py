"""Self-annotation (:mod:`sgpo_jax.ssapo.annotate`) and prompt encoding (:func:`sgpo_jax.data.encode_prompts`).

Oracles are independent of the code under test: prompt ids written by hand from the chat template
(and transformers' own ``apply_chat_template`` for SmolLM2); implicit rewards as float64 NumPy
log-softmax sums over full forward passes of each *unpadded* sequence; pair selection by hand
cases and by brute force over the samples; sampled tokens from :func:`sgpo_jax.ssapo.sampling.generate`
called directly with the documented per-batch key. The model is a tiny random decoder over the
word-level test tokenizer of ``test_data.py`` (``wK`` has id ``K + 8``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data import ASSISTANT, BOS, END, EOS, PAD, USER, make_tokenizer, w

from sgpo_jax.data import encode_prompts, left_pad, tokenize_prompts
from sgpo_jax.models import Decoder, DecoderConfig, decoder_logps_fn
from sgpo_jax.parallel import mesh as mesh_lib
from sgpo_jax.ssapo import annotate as annotate_lib
from sgpo_jax.ssapo.annotate import (
    DROP_EMPTY,
    DROP_IDENTICAL,
    annotate,
    batch_keys,
    identical_samples,
    implicit_rewards,
    sample_batches,
    select_pairs,
)
from sgpo_jax.ssapo.sampling import GenerationOutput, generate

TOKENIZER = make_tokenizer()
VOCAB = len(TOKENIZER)
CFG = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.1)
MODEL = Decoder(CFG)
PROMPTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14"]
# One setting for the end-to-end tests (one compilation): 3 batches of 2, the last filled up.
SETTINGS = dict(num_samples=3, temperature=1.0, max_new_tokens=6, max_prompt_length=16, batch_size=2)


@pytest.fixture(scope="module")
def policy():
    return jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))


@pytest.fixture(scope="module")
def ref():
    return jax.jit(MODEL.init)(jax.random.PRNGKey(1), jnp.zeros((1, 2), jnp.int32))


ORACLE_LENGTH = 32
_forward = jax.jit(MODEL.apply)


def oracle_logps(params, pairs):
    """float64 ``sum log p(response | prompt)`` per ``(prompt, response)``: NumPy log-softmax of the
    logits of one full forward pass over each sequence alone, right-padded with garbage and no
    attention mask (causal attention: later positions cannot change earlier logits)."""
    seqs = np.full((len(pairs), ORACLE_LENGTH), VOCAB - 1, np.int32)
    for i, (prompt, response) in enumerate(pairs):
        seq = np.concatenate([prompt, response])
        seqs[i, :len(seq)] = seq
    logits = np.asarray(_forward(params, jnp.asarray(seqs)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return np.array([sum(logp[i, len(prompt) + j - 1, tok] for j, tok in enumerate(response))
                     for i, (prompt, response) in enumerate(pairs)])


def oracle_rewards(policy, ref, pairs):
    return oracle_logps(policy, pairs) - oracle_logps(ref, pairs)


# ----------------------------------------------------------------------------------------------
# Prompt encoding
# ----------------------------------------------------------------------------------------------


def test_encode_prompts_applies_the_template_truncates_left_and_pads_left():
    conversation = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"},
                    {"role": "user", "content": "w3"}]
    ids, mask = encode_prompts(TOKENIZER, ["w1 w2 w3", "w7", conversation], max_prompt_length=9)
    expected = [
        [BOS, USER, *w(1, 2, 3), END, ASSISTANT],
        [BOS, USER, *w(7), END, ASSISTANT],
        [BOS, USER, *w(1), END, ASSISTANT, *w(2), END, USER, *w(3), END, ASSISTANT][-9:],  # left-truncated
    ]
    assert ids.shape == mask.shape == (3, 9) and ids.dtype == mask.dtype == np.int32
    for row, exp in enumerate(expected):
        pad = 9 - len(exp)
        assert ids[row].tolist() == [PAD] * pad + exp
        assert mask[row].tolist() == [0] * pad + [1] * len(exp)
    bucketed, bucket_mask = encode_prompts(TOKENIZER, ["w7"], max_prompt_length=9, pad_to=8)
    assert bucketed.tolist() == [[PAD] * 3 + [BOS, USER, *w(7), END, ASSISTANT]]
    assert bucket_mask.sum() == 5
    with pytest.raises(ValueError, match="shorter than the longest"):
        encode_prompts(TOKENIZER, ["w1 w2 w3"], max_prompt_length=9, pad_to=4)
    with pytest.raises(ValueError, match=r"empty prompts .*indices \[1\]"):
        tokenize_prompts(TOKENIZER, ["w1", "  "], max_prompt_length=9)


def test_encode_prompts_matches_transformers_chat_template_on_smollm2(smollm2_gguf):
    tokenizer = smollm2_gguf[2]
    questions = ["What is the capital of France?", "Hi"]
    ids, mask = encode_prompts(tokenizer, questions, max_prompt_length=64)
    for row, q in enumerate(questions):
        expected = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        assert ids[row][mask[row] == 1].tolist() == list(expected)
    assert mask.min() == 0  # the shorter prompt really is padded


# ----------------------------------------------------------------------------------------------
# Rewards and selection
# ----------------------------------------------------------------------------------------------


def test_implicit_rewards_equal_float64_log_softmax_sums_of_unpadded_sequences(policy, ref):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(8, VOCAB, size=k) for k in (5, 2, 7)]
    ids, mask = left_pad(prompts, PAD)
    n, t = 2, 5
    lengths = np.array([5, 1, 3, 5, 2, 4], np.int32)
    tokens = rng.integers(8, VOCAB, size=(len(prompts) * n, t)).astype(np.int32)
    tokens[np.arange(t)[None] >= lengths[:, None]] = -1  # an out-of-range pad id: must not be looked up
    output = GenerationOutput(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                              finished=jnp.asarray(lengths < t), prompt_index=jnp.repeat(jnp.arange(3), n))
    logps_fn = decoder_logps_fn(MODEL, chunk_size=4)
    # one program: unshared, prefix-shared (each prompt once, in one row with its samples), beta
    plain, shared, scaled = jax.jit(lambda p, r, o: [implicit_rewards(logps_fn, p, r, ids, mask, o, **kw) for kw in (
        {}, dict(share_prompt=True), dict(beta=0.5, share_prompt=True))])(policy, ref, output)
    expected = oracle_rewards(policy, ref, [(prompts[row // n], tokens[row, :lengths[row]])
                                            for row in range(len(tokens))]).reshape(3, n)
    assert plain.shape == shared.shape == (3, n)
    np.testing.assert_allclose(np.asarray(plain), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(shared), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(scaled), 0.5 * expected, rtol=1e-5, atol=1e-4)
    assert np.abs(expected).min() > 1e-2  # policy and reference really differ


def test_shared_prompt_rows_by_hand_and_with_a_sliding_window():
    """Two prompts (real lengths 2 and 3 of P = 3) with n = 2 samples of T = 2: the row layout
    written out; then a windowed model (the window counts RoPE positions, not slots) gives the
    unshared rewards with the prompt shared."""
    ids = jnp.asarray([[PAD, 11, 12], [13, 14, 15]], jnp.int32)
    mask = jnp.asarray([[0, 1, 1], [1, 1, 1]], jnp.int32)
    tokens = jnp.asarray([[21, 22], [23, 0], [24, 25], [26, 27]], jnp.int32)
    response = jnp.asarray([[1, 1], [1, 0], [1, 1], [1, 1]], bool)
    row_ids, positions, segments, branches, (index, chain_mask) = annotate_lib.shared_prompt_rows(
        ids, mask, tokens, response)
    assert np.asarray(row_ids).tolist() == [[PAD, 11, 12, 21, 22, 23, 0], [13, 14, 15, 24, 25, 26, 27]]
    assert np.asarray(positions).tolist() == [[0, 0, 1, 2, 3, 2, 3], [0, 1, 2, 3, 4, 3, 4]]
    assert np.asarray(segments).tolist() == [[0, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert np.asarray(branches).tolist() == [[0, 0, 0, 1, 1, 2, 2]] * 2
    assert np.asarray(index).tolist() == [[2, 3, 4], [2, 5, 6], [9, 10, 11], [9, 12, 13]]
    assert np.asarray(chain_mask).tolist() == [[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]]

    windowed = Decoder(dataclasses.replace(CFG, sliding_window=3))
    policy, ref = (jax.jit(windowed.init)(jax.random.PRNGKey(k), jnp.zeros((1, 2), jnp.int32)) for k in (2, 3))
    output = GenerationOutput(tokens=tokens, lengths=jnp.sum(response, axis=1), finished=jnp.zeros(4, bool),
                              prompt_index=jnp.repeat(jnp.arange(2), 2))
    logps_fn = decoder_logps_fn(windowed, chunk_size=2)
    shared, plain = jax.jit(lambda p, r: [implicit_rewards(logps_fn, p, r, ids, mask, output, share_prompt=share)
                                          for share in (True, False)])(policy, ref)
    # float32 both ways; the tolerance of tests/test_packing.py (other key layout, same visible keys)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(plain), rtol=2e-5, atol=2e-4)
    assert np.abs(np.asarray(plain)).min() > 1e-2  # not vacuous


def test_identical_samples_compares_tokens_up_to_each_length():
    tokens = jnp.asarray([[9, 9, 7], [9, 9, 5], [9, 9, 7], [4, 0, 0], [4, 1, 1], [4, 2, 2]], jnp.int32)
    lengths = jnp.asarray([3, 2, 3, 1, 1, 2])
    out = GenerationOutput(tokens=tokens, lengths=lengths, finished=jnp.ones(6, bool),
                           prompt_index=jnp.repeat(jnp.arange(2), 3))
    same = np.asarray(identical_samples(out, 3))
    np.testing.assert_array_equal(same[0], [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(same[1], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])  # past the length ignored


def test_select_pairs_hand_cases():
    rewards = jnp.asarray([[1., 3., 2.], [5., 5., 1.], [2., 2., 2.], [0., 4., 4.], [1., 9., 3.], [1., 2., 3.],
                           [7., np.nan, 1.]])
    eye = np.eye(3, dtype=bool)
    same = np.stack([eye] * 7)
    same[2] = True                              # all three identical
    same[3, 1, 2] = same[3, 2, 1] = True        # the two best identical
    valid = np.ones((7, 3), bool)
    valid[4, 1] = False                         # the best is empty
    valid[5, :2] = False                        # one valid sample only
    chosen, rejected, keep = select_pairs(rewards, jnp.asarray(same), valid=jnp.asarray(valid))
    assert np.asarray(chosen).tolist() == [1, 0, 0, 1, 2, 2, 0]
    assert np.asarray(keep).tolist() == [True, True, False, True, True, False, True]
    assert np.asarray(rejected).tolist() == [0, 2, 0, 0, 0, 2, 2]  # not kept: rejected == chosen
    with pytest.raises(ValueError, match="strategy"):
        select_pairs(rewards, jnp.asarray(same), strategy="worst")
    with pytest.raises(ValueError, match="needs rng"):
        select_pairs(rewards, jnp.asarray(same), strategy="max_chosen")


def test_max_chosen_rejects_a_uniformly_random_other_distinct_sample():
    b = 6000
    rewards = jnp.tile(jnp.asarray([[0., 1., 2., 3.]]), (b, 1))
    same = np.tile(np.eye(4, dtype=bool), (b, 1, 1))
    same[:, 3, 1] = same[:, 1, 3] = True  # sample 1 is a copy of the best: never rejected
    chosen, rejected, keep = select_pairs(rewards, jnp.asarray(same), strategy="max_chosen", rng=jax.random.key(0))
    assert np.all(np.asarray(chosen) == 3) and np.all(np.asarray(keep))
    freq = np.bincount(np.asarray(rejected), minlength=4) / b
    np.testing.assert_allclose(freq, [0.5, 0, 0.5, 0], atol=0.03)
    # best_worst on the same input: always the lowest reward
    assert np.all(np.asarray(select_pairs(rewards, jnp.asarray(same))[1]) == 0)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(policy, ref):
    batches = []
    rows = annotate(MODEL, policy, ref, TOKENIZER, PROMPTS, seed=3, progress=False,
                    on_batch=lambda i, r, d: batches.append((i, r, d)), **SETTINGS)
    assert isinstance(rows, list)
    return rows, rows.report, batches


def test_annotate_matches_generation_and_float64_rewards(policy, ref, full_run):
    rows, report, _ = full_run
    n, bs = SETTINGS["num_samples"], SETTINGS["batch_size"]
    ids_list, pad = tokenize_prompts(TOKENIZER, PROMPTS, max_prompt_length=16)
    by_prompt = {row["prompt_index"]: row for row in rows}
    checked = 0
    for batch in range(3):
        members = list(range(batch * bs, min(batch * bs + bs, len(PROMPTS))))
        seqs = [ids_list[i] for i in members]
        ids, mask = left_pad(seqs + [seqs[-1]] * (bs - len(seqs)), pad, length=16)
        out = generate(MODEL, policy, ids, mask, rng=batch_keys(3, batch)[0], max_new_tokens=6, temperature=1.0,
                       num_samples=n, eos_token_ids=(EOS,), pad_token_id=pad)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for j, p in enumerate(members):
            samples = [tokens[j * n + s, :lengths[j * n + s]] for s in range(n)]
            texts = [TOKENIZER.decode(s.tolist(), skip_special_tokens=True) for s in samples]
            rewards = oracle_rewards(policy, ref, [(ids_list[p], s) for s in samples])
            distinct = len({t.strip() for t in texts}) > 1 and all(t.strip() for t in texts)
            assert (p in by_prompt) == distinct
            if p not in by_prompt:
                continue
            row = by_prompt[p]
            c, r = row["chosen_sample"], row["rejected_sample"]
            assert row["prompt"] == PROMPTS[p] and row["batch"] == batch and row["num_samples"] == n
            assert row["chosen"] == texts[c] and row["rejected"] == texts[r] and texts[c].strip() != texts[r].strip()
            assert row["chosen_length"] == len(samples[c]) and row["rejected_length"] == len(samples[r])
            np.testing.assert_allclose([row["chosen_reward"], row["rejected_reward"]], rewards[[c, r]],
                                       rtol=1e-5, atol=1e-4)
            order = np.sort(rewards)
            if np.min(np.diff(order)) > 1e-3:  # selection is unambiguous at float32 precision
                assert c == int(np.argmax(rewards)) and r == int(np.argmin(rewards))
                checked += 1
    assert checked >= 3
    assert report.prompts == 5 and report.batches == 3 and report.rows == len(rows)


def test_annotate_is_deterministic_by_seed_and_resumes_by_batch(policy, ref, full_run):
    rows, report, batches = full_run
    assert [i for i, _, _ in batches] == [0, 1, 2]
    assert [r for _, batch_rows, _ in batches for r in batch_rows] == rows
    again = annotate(MODEL, policy, ref, TOKENIZER, PROMPTS, seed=3, progress=False, **SETTINGS)
    assert again == rows
    head = annotate(MODEL, policy, ref, TOKENIZER, PROMPTS[:4], seed=3, progress=False, **SETTINGS)
    tail = annotate(MODEL, policy, ref, TOKENIZER, PROMPTS, seed=3, start_batch=2, progress=False, **SETTINGS)
    tail_report = tail.report
    assert head + tail == rows
    assert tail_report.prompts == 1 and tail_report.start_batch == 2
    other = annotate(MODEL, policy, ref, TOKENIZER, PROMPTS, seed=4, progress=False, **SETTINGS)
    assert [(r["chosen"], r["rejected"]) for r in other] != [(r["chosen"], r["rejected"]) for r in rows]


def test_annotate_with_the_prompt_shared_keeps_the_same_pairs(policy, ref, full_run):
    """Prefix sharing in the judge (``share_prompt``, the pipeline's ``data.prefix_sharing``): the
    same samples, the same labels, rewards within float32 rounding of the unshared judge's."""
    rows, _, _ = full_run
    shared = annotate(MODEL, policy, ref, TOKENIZER, PROMPTS, seed=3, progress=False, share_prompt=True, **SETTINGS)
    rewards = ("chosen_reward", "rejected_reward")
    assert [{k: v for k, v in r.items() if k not in rewards} for r in shared] == \
        [{k: v for k, v in r.items() if k not in rewards} for r in rows]
    # the tolerance of the float64 oracle above: both judges are float32 of the same sums
    np.testing.assert_allclose([[r[k] for k in rewards] for r in shared], [[r[k] for k in rewards] for r in rows],
                               rtol=1e-5, atol=1e-4)


def test_dropped_prompts_are_reported_with_reasons(policy, ref, monkeypatch):
    settings = dict(SETTINGS, temperature=0.0, num_samples=2)
    # the handler goes on the module's logger itself: once the console has printed a line, the
    # "sgpo_jax" logger no longer propagates to the root logger, where caplog listens by default
    lines = []  # the report's console line, taken at say()
    monkeypatch.setattr(annotate_lib, "say", lambda message: lines.append(str(message)))
    rows = annotate(MODEL, policy, ref, TOKENIZER, PROMPTS, progress=False, **settings)
    report = rows.report
    assert rows == [] and report.dropped == {DROP_IDENTICAL: 5} and report.num_dropped == 5
    assert [i for i, _ in report.examples] == [0, 1, 2, 3, 4]
    assert len(lines) == 1 and "dropped 5" in lines[0] and DROP_IDENTICAL in lines[0]
    # A final norm of zeros makes every logit 0: greedy decoding emits token 0, the special <pad>,
    # which decodes to "": every sample is empty.
    blank = jax.tree.map(lambda x: x, policy)
    blank["params"]["norm"]["weight"] = jnp.zeros_like(blank["params"]["norm"]["weight"])
    dropped = []
    rows = annotate(MODEL, blank, ref, TOKENIZER, PROMPTS, progress=False,
                    on_batch=lambda i, r, d: dropped.extend(d), **settings)
    report = rows.report
    assert rows == [] and report.dropped == {DROP_EMPTY: 5}
    assert dropped[0] == {"prompt_index": 0, "batch": 0, "reason": DROP_EMPTY} and len(dropped) == 5
    assert "0 pairs" in str(report) and DROP_EMPTY in str(report)


def test_batch_keys_are_the_documented_fold_in_and_differ_across_batches_and_seeds():
    keys = [batch_keys(seed, i) for seed in (0, 1) for i in range(3)]
    expected = jax.random.split(jax.random.fold_in(jax.random.key(1), 2))
    for got, exp in zip(keys[5], expected):
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(exp))
    data = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for pair in keys for k in pair}
    assert len(data) == 12


def test_stop_strings_cut_texts_and_the_scored_tokens(policy):
    kwargs = dict(SETTINGS, seed=3, progress=False)
    plain = list(sample_batches(MODEL, policy, TOKENIZER, PROMPTS, **kwargs))
    stop = plain[0].texts[0].split()[2]  # the third word of the first sample
    cut = list(sample_batches(MODEL, policy, TOKENIZER, PROMPTS, stop_strings=[stop], **kwargs))
    hits = 0
    for before, after in zip(plain, cut):
        tokens = np.asarray(after.output.tokens)
        lengths, finished = np.asarray(after.output.lengths), np.asarray(after.output.finished)
        old_lengths = np.asarray(before.output.lengths)
        for r, (full, text) in enumerate(zip(before.texts, after.texts)):
            assert text == TOKENIZER.decode(tokens[r, :lengths[r]].tolist(), skip_special_tokens=True)
            if stop in full:
                hits += 1
                assert stop not in text and full.startswith(text) and lengths[r] < old_lengths[r] and finished[r]
            else:
                assert text == full and lengths[r] == old_lengths[r]
    assert hits >= 1


def test_bad_arguments_are_named(policy, ref):
    args = (MODEL, policy, ref, TOKENIZER, PROMPTS)
    with pytest.raises(ValueError, match="num_samples"):
        annotate(*args, **dict(SETTINGS, num_samples=1))
    with pytest.raises(ValueError, match="strategy"):
        annotate(*args, strategy="random", **SETTINGS)
    with pytest.raises(ValueError, match="start_batch"):
        annotate(*args, start_batch=-1, **SETTINGS)
    with pytest.raises(ValueError, match="not one string"):
        annotate(MODEL, policy, ref, TOKENIZER, "w1 w2", **SETTINGS)


def test_sharded_params_split_generation_and_scoring_over_the_mesh(policy, ref, full_run, monkeypatch):
    """With the params on a (data 2, fsdp 1, tensor 4) mesh, each batch's prompts are split over
    the data axis for generation and scoring, and the rows equal the single-device run's."""
    from sgpo_jax.parallel import sharding
    from sgpo_jax.ssapo import sampling as sampling_lib

    mesh = mesh_lib.make_mesh(2, 1, 4)
    specs = []
    real_generate = sampling_lib.generate

    def spy(model, params, prompt_ids, prompt_mask, **kwargs):
        specs.append(prompt_ids.sharding.spec)
        return real_generate(model, params, prompt_ids, prompt_mask, **kwargs)

    monkeypatch.setattr(sampling_lib, "generate", spy)
    rows = annotate(MODEL, sharding.shard_params(policy, mesh), sharding.shard_params(ref, mesh), TOKENIZER, PROMPTS,
                    seed=3, progress=False, **SETTINGS)
    assert specs == [jax.sharding.PartitionSpec(("data", "fsdp"))] * 3
    expected, _, _ = full_run
    assert [(r["prompt_index"], r["chosen"], r["rejected"]) for r in rows] == \
        [(r["prompt_index"], r["chosen"], r["rejected"]) for r in expected]
    np.testing.assert_allclose([[r["chosen_reward"], r["rejected_reward"]] for r in rows],
                               [[r["chosen_reward"], r["rejected_reward"]] for r in expected], rtol=1e-5, atol=1e-5)
