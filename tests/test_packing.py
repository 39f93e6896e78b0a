"""Prefix sharing and packing: packed rows give the log-probs, gradients and steps of the unpacked
batch. The oracle is the naive per-row computation (``sequence_logps`` of the decoder's full logits
on each chosen and rejected row alone), which never sees a segment id or a shared prompt."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgpo_jax import console, runner
from sgpo_jax.core.losses import sequence_logps
from sgpo_jax.core.step import SGPOConfig, TrainState, sgpo_step
from sgpo_jax.data.batching import preference_batch
from sgpo_jax.data.packing import pack_batch, row_length
from sgpo_jax.models import Decoder, DecoderConfig, attention, decoder_logps_fn
from sgpo_jax.models.llama import segment_mask
from sgpo_jax.models.logps import chosen_rejected_logps

from tiny_run import ROOT, tiny, write_pairs, write_tokenizer
from toy import random_params

VOCAB = 61
# (prompt, chosen, rejected) lengths; pair 3 is a padding row of the batcher (index -1)
LENGTHS = [(5, 4, 7), (2, 6, 3), (7, 1, 5), None, (1, 3, 3)]

# float32 tolerances: packed and unpacked rows run the same math on the same visible keys, but
# softmax sums over different numbers of masked keys and matmuls of other shapes (XLA:CPU may
# block and order the sums differently); each of ~11 summed token log-probs of O(5) carries a
# few ulps (1e-6 relative) per op through 2 layers.
ATOL, RTOL = 2e-4, 2e-5


def small_cfg(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_block=4)
    fields.update(overrides)
    return DecoderConfig(**fields)




def batch_dict(left: bool, length=16, seed=0):
    """A PairBatcher-style dict (one prompt per pair), left- or right-padded to ``length``."""
    rng = np.random.default_rng(seed)
    b = len(LENGTHS)
    out = {}
    texts = [None if n is None else [rng.integers(1, VOCAB, k) for k in n] for n in LENGTHS]
    for side, which in (("chosen", 1), ("rejected", 2)):
        ids = np.zeros((b, length), np.int32)
        attention = np.zeros((b, length), np.int32)
        loss = np.zeros((b, length), np.int32)
        for row, t in enumerate(texts):
            if t is None:
                attention[row, 0] = 1
                continue
            tokens = np.concatenate([t[0], t[which]])
            start = length - len(tokens) if left else 0
            ids[row, start:start + len(tokens)] = tokens
            attention[row, start:start + len(tokens)] = 1
            loss[row, start + len(t[0]):start + len(tokens)] = 1
        out.update({f"{side}_ids": ids, f"{side}_attention": attention, f"{side}_loss_mask": loss})
    out["index"] = np.array([0, 1, 2, -1, 3], np.int32)
    out["weight"] = (out["index"] >= 0).astype(np.float32)
    return out


def naive_logps(model, params, batch):
    """``(chosen [B], rejected [B])``: each row alone through the full logits."""
    def side(name):
        ids = jnp.asarray(batch[f"{name}_ids"])
        logits = model.apply(params, ids, jnp.asarray(batch[f"{name}_attention"]))
        return sequence_logps(logits, ids, jnp.asarray(batch[f"{name}_loss_mask"]))
    return side("chosen"), side("rejected")


LAYOUTS = {"shared": dict(share_prompt=True), "shared_packed": dict(share_prompt=True, budget=40),
           "packed": dict(share_prompt=False, budget=24)}
# (config overrides, left padding, layouts): every config and padding side, each layout twice
CASES = {"gqa": ({}, False, ("shared", "packed")),
         "window_left": (dict(sliding_window=3), True, ("shared", "packed")),
         "scan_remat": (dict(scan_layers=True, remat=True), True, ("shared_packed",)),
         "tied_mha_window": (dict(tie_word_embeddings=True, num_key_value_heads=4, sliding_window=5), False,
                             ("shared",))}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_logps_and_gradients_equal_the_unpacked_rows(case):
    overrides, left, layouts = CASES[case]
    cfg = small_cfg(**overrides)
    model = Decoder(cfg)
    params = random_params(cfg, scale=0.3)
    batch = batch_dict(left)
    logps_fn = decoder_logps_fn(model, chunk_size=4)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, len(LENGTHS))), jnp.float32)

    def logps_and_grad(fn):  # one compiled program: the log-probs and the gradient of a weighted sum
        def objective(p):
            chosen, rejected = fn(p)
            return jnp.sum(weights[0] * chosen + weights[1] * rejected), (chosen, rejected)
        (_, logps), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
        return logps, grad

    want, grad_want = logps_and_grad(lambda p: naive_logps(model, p, batch))
    for layout in layouts:
        packed = preference_batch(pack_batch(batch, **LAYOUTS[layout])).packed
        got, grad_got = logps_and_grad(lambda p: logps_fn.packed(p, packed))
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL, err_msg=layout)
        assert np.all(np.asarray(got[0])[[0, 1, 2, 4]] < -1.0) and float(got[0][3]) == 0.0  # non-vacuous; padding
        for g, w in zip(jax.tree.leaves(grad_got), jax.tree.leaves(grad_want)):
            # gradients: sums over ~60 tokens of O(1) terms, same float32 reasoning as ATOL
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=5e-4, err_msg=layout)
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad_want)) > 0.1  # not vacuous


def test_the_shared_layout_by_hand():
    """Pair 0 (prompt 5, chosen 4, rejected 7) shared in one row: positions restart, branches, chains."""
    out = pack_batch(batch_dict(False), share_prompt=True)
    t = out["packed_ids"].shape[1]
    assert t == 16 and out["packed_ids"].shape[0] == len(LENGTHS)  # the longest shared pair is 5+4+7
    np.testing.assert_array_equal(out["packed_positions"][0], list(range(9)) + list(range(5, 12)))
    np.testing.assert_array_equal(out["packed_branch_ids"][0], [0] * 5 + [1] * 4 + [2] * 7)
    np.testing.assert_array_equal(out["packed_chosen_index"][0][:5], [4, 5, 6, 7, 8])
    np.testing.assert_array_equal(out["packed_rejected_index"][0][:8], [4, 9, 10, 11, 12, 13, 14, 15])
    np.testing.assert_array_equal(out["packed_rejected_mask"][0], [0] + [1] * 7)  # chains: 8 = longest + 1
    assert not out["packed_segment_ids"][3].any() and not out["packed_chosen_mask"][3].any()  # padding pair
    first_row = [jnp.asarray(out[f"packed_{name}"][:1]) for name in ("segment_ids", "branch_ids", "positions")]
    mask = np.asarray(segment_mask(*first_row, None))[0]
    assert mask[9, :5].all() and not mask[9, 5:9].any() and mask[9, 9]  # first rejected: prompt + itself
    assert mask[8, :9].all() and not mask[8, 9:].any()  # last chosen: prompt + chosen
    assert not mask[:, 16:].any()


def test_packing_fills_rows_and_keeps_pairs_apart():
    out = pack_batch(batch_dict(False), share_prompt=True, budget=20)
    seg = out["packed_segment_ids"]
    # shared lengths 16, 11, 13, 7; first-fit decreasing into 20 slots: [16], [13, 7], [11]; 3 rows -> 4
    assert seg.shape == (4, 20)
    np.testing.assert_array_equal((seg > 0).sum(axis=1), [16, 20, 11, 0])
    np.testing.assert_array_equal(seg[1], [1] * 13 + [2] * 7)
    np.testing.assert_array_equal(out["packed_positions"][1, 13:], [0, 1, 2, 3, 1, 2, 3])  # pair 4: 1 + 3 + 3
    with pytest.raises(ValueError, match="does not fit the packing budget"):
        pack_batch(batch_dict(False), share_prompt=True, budget=15)
    bad = batch_dict(False)
    bad["rejected_ids"][0, 0] += 1
    with pytest.raises(ValueError, match="pair 0: chosen and rejected hold different prompts"):
        pack_batch(bad, share_prompt=True)
    assert row_length(17, (16, 32)) == 32 and row_length(33, (16, 32)) == 64


def test_attention_kernel_fallback_says_once(monkeypatch):
    """An explicit fused kernel cannot express the shared mask: the einsum runs, said once."""
    cfg = small_cfg()
    model = Decoder(cfg)
    params = random_params(cfg, scale=0.3)
    packed = preference_batch(pack_batch(batch_dict(False), share_prompt=True)).packed
    want = decoder_logps_fn(model).packed(params, packed)
    monkeypatch.setattr(attention, "_CPU_STANDIN", True)  # cuDNN "runs" on CPU (tests/test_attention.py)
    lines = []  # the console's handler keeps the stdout it found first, so capture at say()
    monkeypatch.setattr(console, "say", lines.append)
    cudnn = Decoder(small_cfg(attention="cudnn"))
    got = decoder_logps_fn(cudnn).packed(params, packed)
    decoder_logps_fn(cudnn).packed(params, packed)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))  # the same einsum program
    assert sum("using 'xla' instead of 'cudnn' for packed or prefix-shared rows" in line for line in lines) == 1


def test_packed_rows_without_sharing_run_splash_on_their_segment_ids(monkeypatch):
    """Packing alone: splash (Pallas interpret mode on CPU, as in tests/test_attention.py) takes the
    rows' segment ids, its local mask in slots being the sliding window in positions; the
    log-probs equal the einsum's (the backward kernels take the same mask and segment ids; their
    gradients are checked in tests/test_attention.py). Shared rows still fall back to the einsum."""
    monkeypatch.setattr(attention, "_CPU_STANDIN", True)
    calls = []
    real_splash = attention._attend_splash_local
    monkeypatch.setattr(attention, "_attend_splash_local", lambda *a: calls.append(1) or real_splash(*a))
    cfg = small_cfg(sliding_window=3)
    params = random_params(cfg, scale=0.3)
    packed = preference_batch(pack_batch(batch_dict(False), share_prompt=False, budget=128)).packed
    assert packed.branch_ids is None and packed.ids.shape == (1, 128)  # splash's block: 128 slots

    def logps(attention_kernel):
        logps_fn = decoder_logps_fn(Decoder(dataclasses.replace(cfg, attention=attention_kernel)), chunk_size=4)
        return np.asarray(jax.jit(logps_fn.packed)(params, packed))

    want, got = logps("xla"), logps("splash")
    assert len(calls) == 2  # both layers ran splash
    # the float32 reasons at ATOL; key padding alone as segment ids (sequences seeing each other)
    # would move them by O(1)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.all(want[:, [0, 1, 2, 4]] < -1.0)  # not vacuous
    shared = preference_batch(pack_batch(batch_dict(False), share_prompt=True, budget=128)).packed
    jax.eval_shape(decoder_logps_fn(Decoder(dataclasses.replace(cfg, attention="splash"))).packed, params, shared)
    assert len(calls) == 2  # branches: the einsum (traced only)


def test_a_step_on_shared_rows_equals_the_unpacked_step():
    """DPO on shared rows, one micro-batch; SGPO on shared and packed rows is the micro-batched test's."""
    mode, layout = "dpo", "shared"
    cfg = small_cfg()
    model = Decoder(cfg)
    params = random_params(cfg, scale=0.3)
    batch = batch_dict(False)
    ref = (np.linspace(-30, -20, 4), np.linspace(-25, -28, 4))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1.0),
                              config=SGPOConfig(mode=mode, epsilon=0.1, beta=0.5), rng=jax.random.PRNGKey(0),
                              logps_fn=decoder_logps_fn(model, chunk_size=4))
    plain = preference_batch(batch, ref)
    packed = preference_batch(pack_batch(batch, **LAYOUTS[layout]), ref)
    assert packed.packed is not None and plain.packed is None
    np.testing.assert_array_equal(packed.weight, plain.weight)
    np.testing.assert_array_equal(packed.ref_chosen_logps, plain.ref_chosen_logps)
    step = jax.jit(sgpo_step)
    a_state, a = step(state, plain)
    b_state, b = step(state, packed)
    # same float32 reasoning as ATOL; loss and follower values are O(1)
    for name in a:
        np.testing.assert_allclose(float(b[name]), float(a[name]), rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(a["grad_norm"]) > 1e-3
    for x, y, p in zip(jax.tree.leaves(b_state.params), jax.tree.leaves(a_state.params), jax.tree.leaves(params)):
        # with sgd(1.0), params - new params is the gradient
        np.testing.assert_allclose(np.asarray(p - x), np.asarray(p - y), rtol=1e-4, atol=1e-5)
    assert np.allclose(np.asarray(chosen_rejected_logps(state.logps_fn, params, packed)[1]),
                       np.asarray(chosen_rejected_logps(state.logps_fn, params, plain)[1]), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="laid out in 1 group\\(s\\) of rows cannot be split into 5 micro-batches"):
        sgpo_step(state.replace(config=SGPOConfig(mode=mode, micro_batches=5)), packed)


def test_micro_batched_packed_steps_equal_the_unpacked_micro_batched_step():
    """Six pairs (the batch plus a copy of pair 0) in 2 micro-batches: each group packed into its
    own rows (shared and packed), and the step (the in-step follower seeing the whole batch, a
    forward pass then one value_and_grad per micro-batch) equals the unpacked micro-batched one."""
    mode, layout = "sgpo", "shared_packed"
    cfg = small_cfg()
    model = Decoder(cfg)
    params = random_params(cfg, scale=0.3)
    batch = {k: np.concatenate([v, v[:1]]) for k, v in batch_dict(False).items()}
    ref = (np.linspace(-30, -20, 4), np.linspace(-25, -28, 4))
    config = SGPOConfig(mode=mode, epsilon=0.1, beta=0.5, micro_batches=2)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1.0), config=config,
                              rng=jax.random.PRNGKey(0), logps_fn=decoder_logps_fn(model, chunk_size=4))
    grouped = pack_batch(batch, **LAYOUTS[layout], groups=2)
    rows = grouped["packed_segment_ids"].shape[0] // 2
    for g, pairs in enumerate(([0, 1, 2], [4, 5])):  # group g's chains lie in its own rows
        for side in ("chosen", "rejected"):
            slots = grouped[f"packed_{side}_index"][pairs][grouped[f"packed_{side}_mask"][pairs] > 0]
            assert np.all(slots // grouped["packed_ids"].shape[1] // rows == g), (g, side)
    step = jax.jit(sgpo_step)
    a_state, a = step(state, preference_batch(batch, ref))
    b_state, b = step(state, preference_batch(grouped, ref))
    for name in a:  # same float32 reasoning as ATOL; loss and follower values are O(1)
        np.testing.assert_allclose(float(b[name]), float(a[name]), rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(a["grad_norm"]) > 1e-3
    for x, y, p in zip(jax.tree.leaves(b_state.params), jax.tree.leaves(a_state.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(p - x), np.asarray(p - y), rtol=1e-4, atol=1e-5)  # the gradients
    atoms = (np.zeros((4, 2)), np.full((4, 2), 0.5))  # precomputed atoms (the epoch follower) keep the layout
    assert preference_batch(grouped, ref, atoms).packed.groups == 2
    # the whole grouped batch still scores right in one pass (the reference and follower passes)
    whole = chosen_rejected_logps(state.logps_fn, params, preference_batch(grouped, ref))
    np.testing.assert_allclose(np.asarray(whole[0]), np.asarray(naive_logps(model, params, batch)[0]), rtol=RTOL,
                               atol=ATOL)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer")), write_pairs(tmp_path_factory.mktemp("d") / "p.jsonl")


def test_training_runs_with_sharing_and_packing_match_the_default_run(tiny_files, tmp_path, monkeypatch):
    """The run's cached reference pass, epoch follower and steps all take the packed layout (the
    packed run also splits its steps into 2 micro-batches, each its own group of packed rows)."""
    monkeypatch.syspath_prepend(str(ROOT))
    runs = {}
    # DPO: at step 1 the policy is the reference, so every margin is 0 up to rounding, and the
    # follower's choice among those ties would follow the rounding of each layout
    for name, extra in (("plain", {}), ("shared_packed", dict(data__prefix_sharing=True, data__packing_budget=128,
                                                              train__micro_batches=2))):
        runner.run(tiny(*tiny_files, data__limit=16, train__epochs=1, train__mode="dpo", export=False, **extra),
                   tmp_path / name)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["plain"]) == 2 and runs["plain"][1]["loss"] < runs["plain"][0]["loss"] - 0.05
    for name in ("shared_packed",):
        for got, want in zip(runs[name], runs["plain"]):
            for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
                # float32 rounding of a different layout (see ATOL), through one update of the tiny model
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), (name, key)
    with pytest.raises(ValueError, match="data.packing_budget \\(50\\) must be 0 \\(off\\) or >= 96"):
        runner.run(tiny(*tiny_files, data__prefix_sharing=True, data__packing_budget=50), tmp_path / "bad")
    with_lora = tiny(*tiny_files, data__prefix_sharing=True)
    with_lora.model.lora.rank = 4
    with pytest.raises(ValueError, match=r"data.prefix_sharing and data.packing_budget do not run with LoRA yet"):
        runner.run(with_lora, tmp_path / "bad_lora")
