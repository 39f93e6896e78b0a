"""A one-minute CPU demo of DPO vs SGPO under label noise, on a synthetic preference task.

Responses are short token strings; a response's true quality is (#good tokens - #bad tokens).
Training pairs are labelled by quality and a fraction of the labels is flipped; a tiny causal
LM (:class:`PrefixMeanLM`) is trained from its initialization (also the reference) with the
jitted :func:`sgpo_jax.sgpo_step`, once as DPO and once as SGPO with the exact follower inside
the step. The demo reports held-out preference accuracy on clean labels (implicit reward
margin > 0) and the follower's statistics.

    python -m sgpo_jax.demo --noise=0,0.25 --epsilon=0.05

It checks the step alone in a minute; the SSAPO loop on a real model is
``python -m sgpo_jax.train --config=configs/smollm2.py`` (README).
"""

from __future__ import annotations

import time
from typing import Dict, List

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgpo_jax.console import say
from sgpo_jax.core.losses import sequence_logps
from sgpo_jax.core.step import PreferenceBatch, SGPOConfig, TrainState, sgpo_step


class PrefixMeanLM(nn.Module):
    """Token embedding plus the running mean of the unpadded prefix, then a linear head:
    causal, respects the attention mask, ``vocab * (2 * dim + 1) + dim`` parameters."""

    vocab: int = 32
    dim: int = 16

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        emb = nn.Embed(self.vocab, self.dim)(input_ids)
        m = attention_mask[..., None].astype(emb.dtype)
        prefix = jnp.cumsum(emb * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1)
        return nn.Dense(self.vocab)(jnp.tanh(emb + prefix))


def make_pairs(rng: np.random.Generator, n: int, *, vocab: int, prompt: int, response: int, noise: float):
    """Random prompts and two random responses each; chosen = higher quality, then a fraction
    ``noise`` of the labels flipped. Returns (ids_a, ids_b, clean_label_a_better, noisy_label)."""
    good = np.arange(1, vocab // 4)
    bad = np.arange(vocab // 4, vocab // 2)

    def quality(resp):
        return np.isin(resp, good).sum(1) - np.isin(resp, bad).sum(1)

    prompts = rng.integers(1, vocab, (n, prompt))
    a = rng.integers(1, vocab, (n, response))
    b = rng.integers(1, vocab, (n, response))
    tie = quality(a) == quality(b)
    b[tie, 0] = good[0]  # break ties so every pair has a clean label
    a[tie, 0] = bad[0]
    clean = quality(a) > quality(b)
    flip = rng.random(n) < noise
    return np.concatenate([prompts, a], 1), np.concatenate([prompts, b], 1), clean, clean ^ flip


def run(mode: str, epsilon: float, noise: float, steps: int, seed: int) -> Dict[str, float]:
    vocab, prompt, response, pairs = 32, 4, 6, 64
    rng = np.random.default_rng(seed)
    ids_a, ids_b, _, label = make_pairs(rng, 512, vocab=vocab, prompt=prompt, response=response, noise=noise)
    test_a, test_b, test_clean, _ = make_pairs(rng, 512, vocab=vocab, prompt=prompt, response=response, noise=0.0)
    length = prompt + response
    attention = jnp.ones((pairs, length), jnp.int32)
    loss_mask = jnp.asarray(np.arange(length) >= prompt, jnp.int32)[None].repeat(pairs, 0)

    model = PrefixMeanLM(vocab)
    init = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))

    @jax.jit
    def logps(params, ids):
        mask = jnp.ones_like(ids)
        response = jnp.asarray(np.arange(length) >= prompt)[None] * mask
        return sequence_logps(model.apply(params, ids, mask), ids, response)

    chosen = np.where(label[:, None], ids_a, ids_b)
    rejected = np.where(label[:, None], ids_b, ids_a)
    ref_c, ref_r = np.asarray(logps(init, jnp.asarray(chosen))), np.asarray(logps(init, jnp.asarray(rejected)))
    config = SGPOConfig(mode=mode, beta=0.5, epsilon=epsilon)
    state = TrainState.create(apply_fn=model.apply, params=jax.tree.map(jnp.copy, init), tx=optax.adam(3e-2),
                              config=config, rng=jax.random.PRNGKey(seed))
    step = jax.jit(sgpo_step, donate_argnums=0)
    history: List[Dict[str, float]] = []
    for i in range(steps):
        sel = rng.choice(len(chosen), pairs, replace=False)
        batch = PreferenceBatch(
            chosen_ids=jnp.asarray(chosen[sel]), chosen_attention=attention, chosen_loss_mask=loss_mask,
            rejected_ids=jnp.asarray(rejected[sel]), rejected_attention=attention, rejected_loss_mask=loss_mask,
            ref_chosen_logps=jnp.asarray(ref_c[sel]), ref_rejected_logps=jnp.asarray(ref_r[sel]),
            weight=jnp.ones(pairs),
        )
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})

    def reward(ids):
        return np.asarray(logps(state.params, jnp.asarray(ids))) - np.asarray(logps(init, jnp.asarray(ids)))

    accuracy = float(np.mean((reward(test_a) > reward(test_b)) == test_clean))
    last = {k: float(np.mean([h[k] for h in history[-10:]])) for k in history[-1]}
    return {"heldout_accuracy": accuracy, **last}


def main(noise: List[float], epsilon: float, steps: int, seed: int) -> None:
    """Runs DPO and SGPO at each label-noise level and prints one table row per run."""
    for value in noise:
        if not 0 <= value < 0.5:
            raise ValueError(f"--noise values must be in [0, 0.5), got {value}")
    say(f"{'mode':6} {'eps':>6} {'noise':>6} {'held-out acc':>13} {'loss':>7} {'moved':>7} {'dual':>7} {'time':>6}")
    for value in noise:
        for mode, eps in (("dpo", 0.0), ("sgpo", epsilon)):
            start = time.perf_counter()
            out = run(mode, eps, value, steps, seed)
            say(f"{mode:6} {eps:6.3f} {value:6.2f} {out['heldout_accuracy']:13.3f} {out['loss']:7.4f} "
                f"{out.get('follower/moved', 0.0):7.4f} {out.get('follower/dual', 0.0):7.3f} "
                f"{time.perf_counter() - start:5.1f}s")


def cli() -> None:
    """``python -m sgpo_jax.demo``: absl flags, then :func:`main`."""
    from absl import app, flags

    flags.DEFINE_list("noise", ["0.0", "0.25"], "label-flip fractions, each in [0, 0.5)")
    flags.DEFINE_float("epsilon", 0.05, "SGPO Wasserstein radius")
    flags.DEFINE_integer("steps", 150, "optimizer steps per run (64 pairs each)")
    flags.DEFINE_integer("seed", 0, "initialization and data seed")
    f = flags.FLAGS
    app.run(lambda argv: main([float(v) for v in f.noise], f.epsilon, f.steps, f.seed))


if __name__ == "__main__":
    cli()
