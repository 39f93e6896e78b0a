"""A tiny causal LM, random decoder parameters and random preference batches for tests."""

import jax
import jax.numpy as jnp
import numpy as np

from sgpo_jax.core.step import PreferenceBatch
from sgpo_jax.demo import PrefixMeanLM
from sgpo_jax.models.llama import Decoder


def init_toy(seed=0, vocab=11, dim=8, dtype=jnp.float32):
    model = PrefixMeanLM(vocab, dim)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    return model, params


def random_params(cfg, seed=0, scale=0.2):
    """O(1) random :class:`Decoder` params (``scale`` times a standard normal) so that logits are
    O(1) and the comparisons are not vacuous."""
    shapes = jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])


def random_batch(seed=0, pairs=8, prompt=3, response=4, vocab=11, ref_scale=1.0, pad_rows=0):
    """Random pairs: prompt tokens then response tokens, right padding on some rows."""
    rng = np.random.default_rng(seed)
    t = prompt + response

    def side():
        ids = rng.integers(1, vocab, size=(pairs, t))
        lengths = rng.integers(prompt + 1, t + 1, size=pairs)
        attention = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
        ids = ids * attention
        loss_mask = attention * (np.arange(t)[None, :] >= prompt)
        return jnp.asarray(ids, jnp.int32), jnp.asarray(attention), jnp.asarray(loss_mask, jnp.int32)

    ci, ca, cl = side()
    ri, ra, rl = side()
    weight = np.ones(pairs, np.float32)
    if pad_rows:
        weight[-pad_rows:] = 0
    return PreferenceBatch(
        chosen_ids=ci, chosen_attention=ca, chosen_loss_mask=cl,
        rejected_ids=ri, rejected_attention=ra, rejected_loss_mask=rl,
        ref_chosen_logps=jnp.asarray(rng.normal(-8, ref_scale, pairs), jnp.float32),
        ref_rejected_logps=jnp.asarray(rng.normal(-8, ref_scale, pairs), jnp.float32),
        weight=jnp.asarray(weight),
    )
