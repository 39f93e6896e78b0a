"""Seed / pool splits (:mod:`sgpo_jax.data.split`): farthest-point sampling against a brute-force
float64 oracle over SciPy's cosine distance matrix and a hand case, last-token hidden states against
unpadded full forward passes, split disjointness and sizes, exact label-flip counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from sgpo_jax.data import farthest_point_sampling, flip_labels, last_token_hidden, split_prompts
from sgpo_jax.models import Decoder, DecoderConfig
from sgpo_jax.parallel import mesh as mesh_lib
from sgpo_jax.parallel import sharding

CFG = DecoderConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=4, initializer_range=0.1)
MODEL = Decoder(CFG)


def fps_oracle(x, k, variant, start):
    """Greedy FPS by brute force over the full float64 cosine distance matrix; also returns the
    smallest gap between the best and second-best score over the steps (tie safety)."""
    d = cdist(x, x, metric="cosine")
    selected, gap = [start], np.inf
    while len(selected) < k:
        rest = [i for i in range(len(x)) if i not in selected]
        scores = [(d[i, selected].min() if variant == "maxmin" else d[i, selected].sum()) for i in rest]
        order = np.argsort(scores)[::-1]
        if len(rest) > 1:
            gap = min(gap, scores[order[0]] - scores[order[1]])
        selected.append(rest[order[0]])
    return selected, gap


@pytest.mark.parametrize("variant", ["maxmin", "sum"])
def test_fps_matches_brute_force(variant):
    x = np.random.default_rng(0).normal(size=(40, 6)) * np.random.default_rng(1).uniform(0.1, 10, size=(40, 1))
    expected, gap = fps_oracle(x, 12, variant, start=3)
    assert gap > 1e-4  # no near-ties that float32 could flip
    got = np.asarray(farthest_point_sampling(jnp.asarray(x, jnp.float32), 12, variant=variant, start=3))
    assert got.tolist() == expected and got.dtype == np.int32
    # the two variants really differ here
    other = "sum" if variant == "maxmin" else "maxmin"
    assert fps_oracle(x, 12, other, start=3)[0] != expected


def test_fps_hand_case_on_a_circle():
    angles = np.deg2rad([0, 10, 90, 180, 185])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1) * [[1], [2], [3], [0.5], [7]]  # scale is irrelevant
    assert np.asarray(farthest_point_sampling(x, 5, start=0)).tolist() == [0, 3, 2, 1, 4]
    assert np.asarray(farthest_point_sampling(x, 2, start=2)).tolist() == [2, 4]  # 185 deg: 95 deg away
    with pytest.raises(ValueError, match="k must be"):
        farthest_point_sampling(x, 6)
    with pytest.raises(ValueError, match="variant"):
        farthest_point_sampling(x, 2, variant="max")


def test_last_token_hidden_matches_unpadded_forward_for_left_and_right_padding():
    params = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    rng = np.random.default_rng(0)
    t = 100  # > 64: batches use a window of 64 columns where their tokens fit
    lengths = [3, 7, 1, 10, 5]
    seqs = [rng.integers(1, 40, size=n) for n in lengths]
    left = np.zeros((5, t), np.int32), np.zeros((5, t), np.int32)
    right = np.zeros((5, t), np.int32), np.zeros((5, t), np.int32)
    for i, s in enumerate(seqs):
        left[0][i, t - len(s):], left[1][i, t - len(s):] = s, 1
        right[0][i, :len(s)], right[1][i, :len(s)] = s, 1
    mixed = tuple(np.where((np.arange(5) % 2 == 0)[:, None], a, b) for a, b in zip(left, right))
    # Oracle: each sequence alone at the start of a row, no mask (causal attention: the garbage
    # after it cannot change its hidden states), read at its own last position.
    alone = np.full((5, 16), 39, np.int32)
    for i, s in enumerate(seqs):
        alone[i, :len(s)] = s
    hidden = np.asarray(jax.jit(lambda p, x: MODEL.apply(p, x, return_hidden=True))(params, alone))
    expected = hidden[np.arange(5), np.array(lengths) - 1]
    for ids, mask in (left, right, mixed):
        got = np.asarray(last_token_hidden(MODEL, params, ids, mask, batch_size=2))
        assert got.shape == (5, CFG.hidden_size)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Parameters on a mesh: batches of 4 rows split over the 4 data-parallel devices.
    sharded = sharding.shard_params(params, mesh_lib.make_mesh(2, 2, 2))
    got = last_token_hidden(MODEL, sharded, *mixed, batch_size=4)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no real token"):
        last_token_hidden(MODEL, params, left[0], np.zeros_like(left[1]), batch_size=2)


def check_partition(n, seed_idx, pools, rest, seed_size, pool_sizes):
    assert len(seed_idx) == seed_size and [len(p) for p in pools] == pool_sizes
    everything = np.concatenate([seed_idx, *pools, rest])
    assert sorted(everything.tolist()) == list(range(n))  # disjoint and complete


def test_random_split_is_a_seeded_permutation():
    n, sizes = 50, [10, 15]
    seed_idx, pools, rest = split_prompts(n, 5, sizes, seed=42)
    check_partition(n, seed_idx, pools, rest, 5, sizes)
    perm = np.random.default_rng(42).permutation(n)
    assert seed_idx.tolist() == perm[:5].tolist() and pools[1].tolist() == perm[15:30].tolist()
    assert rest.tolist() == perm[30:].tolist()
    again = split_prompts(n, 5, sizes, seed=42)
    assert all(np.array_equal(a, b) for a, b in zip([seed_idx, *pools, rest], [again[0], *again[1], again[2]]))
    assert not np.array_equal(split_prompts(n, 5, sizes, seed=43)[0], seed_idx)
    with pytest.raises(ValueError, match=r"seed_size 5 \+ pool_sizes \[10, 40\] = 55 prompts, but n = 50"):
        split_prompts(n, 5, [10, 40], seed=0)


@pytest.mark.parametrize("selection, variant", [("fps", "maxmin"), ("fps_sum", "sum")])
def test_fps_split_selects_the_seed_by_fps_and_pools_from_the_rest(selection, variant):
    n = 30
    emb = np.random.default_rng(5).normal(size=(n, 4))
    seed_idx, pools, rest = split_prompts(n, 6, [8, 8], seed=7, selection=selection, embeddings=emb)
    check_partition(n, seed_idx, pools, rest, 6, [8, 8])
    perm = np.random.default_rng(7).permutation(n)
    expected, gap = fps_oracle(emb, 6, variant, start=int(perm[0]))
    assert gap > 1e-4 and seed_idx.tolist() == expected
    remaining = [i for i in perm if i not in expected]
    assert pools[0].tolist() == remaining[:8] and rest.tolist() == remaining[16:]
    with pytest.raises(ValueError, match="needs embeddings"):
        split_prompts(n, 6, [8], seed=7, selection=selection)
    with pytest.raises(ValueError, match=r"shape \[n=30, D\]"):
        split_prompts(n, 6, [8], seed=7, selection=selection, embeddings=emb[:20])


@pytest.mark.parametrize("n, fraction, count", [(10, 0.25, 3), (200, 0.1, 20), (7, 0.0, 0), (7, 1.0, 7),
                                                (3, 0.5, 2), (0, 0.3, 0)])
def test_flip_labels_flips_exactly_the_rounded_count(n, fraction, count):
    flipped = flip_labels(n, fraction, seed=1)
    assert flipped.dtype == bool and flipped.shape == (n,) and flipped.sum() == count
    assert np.array_equal(flip_labels(n, fraction, seed=1), flipped)


def test_flip_labels_depends_on_the_seed_and_checks_the_fraction():
    assert not np.array_equal(flip_labels(100, 0.3, seed=1), flip_labels(100, 0.3, seed=2))
    with pytest.raises(ValueError, match="fraction"):
        flip_labels(10, 1.5, seed=0)
