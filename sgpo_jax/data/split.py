r"""Splitting a prompt set into the SSAPO seed, per-round prompt pools and a rest, with random or
farthest-point (diverse) seed selection, and seeded label noise.

The authors shuffle UltraFeedback with a fixed seed and take 2K seed pairs (gold labels kept), then
prompt pools of 8K / 20K / 30K for rounds 1-3 (labels dropped); the rest is held out. Their
alternative seed selection is farthest-point sampling (FPS) on the SFT model's last-layer hidden
state at the prompt's last token, with cosine distance :math:`d(u, v) = 1 - u \cdot v / (|u| |v|)`::

    ids, mask = encode_prompts(tokenizer, prompts, max_prompt_length=1024)       # left-padded
    emb = last_token_hidden(model, sft_params, ids, mask, batch_size=64)         # [N, D]
    seed_idx, pools, rest = split_prompts(len(prompts), 2000, [8000, 20000, 30000], seed=42,
                                          selection="fps", embeddings=emb)
    flipped = flip_labels(len(seed_idx), 0.2, seed=0)   # seed_label_noise: swap chosen/rejected there
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sgpo_jax.data.batching import default_buckets
from sgpo_jax.data.tokenize import encode_prompts
from sgpo_jax.parallel import distributed, sharding

Array = jax.Array

__all__ = ["FPS_VARIANTS", "SELECTIONS", "farthest_point_sampling", "flip_labels", "last_token_hidden",
           "make_split", "pool_prompts", "seed_rows_jsonl", "split_prompts"]

FPS_VARIANTS = ("maxmin", "sum")
SELECTIONS = ("random", "fps", "fps_sum")


@functools.partial(jax.jit, static_argnames=("model",))
def _last_hidden(model: Any, params: Any, ids: Array, mask: Array) -> Array:
    hidden = model.apply(params, ids, mask, return_hidden=True)  # [b, T, D]
    t = ids.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)  # the last real position of each row
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def last_token_hidden(model: Any, params: Any, ids: Any, mask: Any, *, batch_size: int) -> Array:
    """The final (normed) hidden state at each row's last real token, ``[N, D]`` float32.

    This is the last entry of transformers' ``output_hidden_states`` (after the final norm) at the
    last non-padding position, left or right padding alike. Batches of ``batch_size`` rows run
    through one jitted forward pass (``return_hidden=True``, no output head); each batch keeps only
    a window of columns holding all its real tokens, of a length from
    :func:`~sgpo_jax.data.default_buckets` (padding columns change nothing, positions count real
    tokens), and the last batch is filled up with copies of its first row, so few shapes compile.

    Args:
      model: a :class:`~sgpo_jax.models.Decoder` (anything with ``apply(params, ids, mask,
        return_hidden=True)``).
      params: its variables ``{"params": ...}``.
      ids: ``[N, T]`` int token ids (ids at padding must be valid).
      mask: ``[N, T]``, 1 on real tokens; every row needs one.
      batch_size: rows per forward pass.

    Returns a NumPy array ``[N, D]``, the same on every host: with parameters on a multi-device
    mesh each batch's rows are split over its batch axes (and hosts), then gathered.
    """
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"ids and mask must be [N, T] of one shape, got {ids.shape} and {mask.shape}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    real = mask > 0
    empty = np.flatnonzero(~real.any(axis=1))
    if empty.size:
        raise ValueError(f"{empty.size} rows have no real token (mask all 0), e.g. rows {empty[:10].tolist()}")
    variables = params if set(params) == {"params"} else {"params": params}
    mesh = sharding.mesh_of(variables)
    n, t = ids.shape
    buckets = default_buckets(t)
    out = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        columns = np.flatnonzero(real[rows].any(axis=0))
        lo, hi = columns[0], columns[-1]
        width = min(x for x in buckets if x >= hi - lo + 1)
        lo = min(lo, t - width)  # a window [lo, lo + width) inside [0, T) covering every real token
        window = slice(lo, lo + width)
        hidden = _last_hidden(model, variables, *sharding.place_rows(
            mesh, ids[rows, window].astype(np.int32), mask[rows, window].astype(np.int32)))
        out.append(distributed.to_host(hidden)[:min(batch_size, n - start)])
    return np.concatenate(out, axis=0)


@functools.partial(jax.jit, static_argnames=("k", "variant"))
def _fps(embeddings: Array, start: Array, k: int, variant: str) -> Array:
    x = embeddings.astype(jnp.float32)
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    u = x / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)

    def distance_to(i):
        return 1.0 - u @ u[i]  # [N]

    selected = jnp.zeros((k,), jnp.int32).at[0].set(start)
    taken = jnp.zeros((x.shape[0],), bool).at[start].set(True)

    def body(step, state):
        selected, score, taken = state
        nxt = jnp.argmax(jnp.where(taken, -jnp.inf, score)).astype(jnp.int32)
        d = distance_to(nxt)
        score = jnp.minimum(score, d) if variant == "maxmin" else score + d
        return selected.at[step].set(nxt), score, taken.at[nxt].set(True)

    selected, _, _ = jax.lax.fori_loop(1, k, body, (selected, distance_to(start), taken))
    return selected


def farthest_point_sampling(embeddings: Any, k: int, *, variant: str = "maxmin", start: int = 0) -> Array:
    r"""``k`` diverse rows of ``embeddings`` under cosine distance, greedily, on device.

    With :math:`S` the rows selected so far (first ``start``) and
    :math:`d(i, j) = 1 - \cos(e_i, e_j)`, the next row is the unselected :math:`i` maximizing

    * ``"maxmin"`` (classic FPS): :math:`\min_{j \in S} d(i, j)`, the distance to the nearest
      selected row;
    * ``"sum"`` (the SSAPO authors' variant): :math:`\sum_{j \in S} d(i, j)`.

    Ties go to the lowest index. A ``jax.lax.fori_loop`` of ``k - 1`` steps, each one matrix-vector
    product ``O(N D)``; memory ``O(N D)`` (no ``N x N`` matrix). Distances in float32. A zero row
    has distance 1 to every row.

    Args:
      embeddings: ``[N, D]`` floats.
      k: rows to select, ``1 <= k <= N``.
      variant: one of :data:`FPS_VARIANTS`.
      start: the first selected row.

    Returns int32 ``[k]`` distinct row indices in selection order (``[0] == start``).
    """
    embeddings = jnp.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if variant not in FPS_VARIANTS:
        raise ValueError(f"variant must be one of {FPS_VARIANTS}, got {variant!r}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, N={n}], got {k!r}")
    if not isinstance(start, (int, np.integer)) or not 0 <= start < n:
        raise ValueError(f"start must be an int in [0, N={n}), got {start!r}")
    return _fps(embeddings, jnp.int32(start), int(k), variant)


def split_prompts(n: int, seed_size: int, pool_sizes: Sequence[int], *, seed: int, selection: str = "random",
                  embeddings: Optional[Any] = None) -> Tuple[np.ndarray, List[np.ndarray], np.ndarray]:
    """Disjoint seed, per-round pools and rest of ``n`` prompts, deterministic in ``seed``.

    With ``perm = np.random.default_rng(seed).permutation(n)``:

    * ``"random"``: the seed is ``perm[:seed_size]``;
    * ``"fps"`` / ``"fps_sum"``: the seed is :func:`farthest_point_sampling` of ``embeddings``
      (variant ``"maxmin"`` / ``"sum"``) with ``k = seed_size``, starting at ``perm[0]``;

    then the pools take the remaining indices in ``perm`` order, consecutively, and the rest is
    what is left (in ``perm`` order; may be empty).

    Args:
      n: the number of prompts.
      seed_size: seed prompts (labelled pairs), ``>= 0``.
      pool_sizes: prompts per self-annotation round, each ``>= 0``.
      seed: the shuffling seed (the authors: 42).
      selection: one of :data:`SELECTIONS`.
      embeddings: ``[n, D]`` (e.g. :func:`last_token_hidden`), required for FPS.

    Returns ``(seed_idx, pools, rest_idx)``, int64 arrays; together a permutation of ``range(n)``.

    Raises ``ValueError`` naming the sizes when ``n`` is too small, or on bad arguments.
    """
    pool_sizes = [int(s) for s in pool_sizes]
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if n < 0 or seed_size < 0 or any(s < 0 for s in pool_sizes):
        raise ValueError(f"sizes must be >= 0, got n={n}, seed_size={seed_size}, pool_sizes={pool_sizes}")
    needed = seed_size + sum(pool_sizes)
    if needed > n:
        raise ValueError(f"seed_size {seed_size} + pool_sizes {pool_sizes} = {needed} prompts, but n = {n}")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    if selection == "random":
        seed_idx, remaining = perm[:seed_size], perm[seed_size:]
    else:
        if embeddings is None:
            raise ValueError(f"selection {selection!r} needs embeddings [n, D] (e.g. last_token_hidden)")
        if np.ndim(embeddings) != 2 or np.shape(embeddings)[0] != n:
            raise ValueError(f"embeddings must have shape [n={n}, D], got {tuple(np.shape(embeddings))}")
        if seed_size == 0:
            seed_idx = np.zeros(0, np.int64)
        else:
            variant = "maxmin" if selection == "fps" else "sum"
            seed_idx = np.asarray(farthest_point_sampling(embeddings, seed_size, variant=variant,
                                                          start=int(perm[0]))).astype(np.int64)
        remaining = perm[~np.isin(perm, seed_idx)]
    bounds = np.cumsum([0] + pool_sizes)
    pools = [remaining[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return seed_idx, pools, remaining[bounds[-1]:]


def flip_labels(num_pairs: int, fraction: float, seed: int) -> np.ndarray:
    """bool ``[num_pairs]`` with exactly ``floor(fraction * num_pairs + 0.5)`` True entries (round half
    up) at positions drawn without replacement by ``np.random.default_rng(seed)``: the pairs whose
    chosen and rejected are swapped to inject label noise into the seed data."""
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    count = int(np.floor(fraction * num_pairs + 0.5))
    flipped = np.zeros(num_pairs, bool)
    flipped[np.random.default_rng(seed).choice(num_pairs, size=count, replace=False)] = True
    return flipped


# ----------------------------------------------------------------------------------- a run's split


def pool_prompts(config: Any) -> Optional[List[str]]:
    """The prompts of ``ssapo.prompts`` (a JSONL/JSON file with a ``prompt`` field), or None."""
    path = config.ssapo.prompts
    if not path:
        return None
    text = Path(path).read_text(encoding="utf-8")
    rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl")
            else json.loads(text))
    prompts = []
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}: row {i}: field 'prompt' is missing or not a non-empty string")
        prompts.append(row["prompt"])
    return prompts


def make_split(config: Any, dataset, usable_rows: np.ndarray, model: Any, params: Any,
               tokenizer) -> Dict[str, Any]:
    """The SSAPO split of a run: ``{"seed_rows", "flipped", "pools", "selection"}``.

    ``ssapo.seed_size`` rows of ``usable_rows`` (rows of ``dataset`` that tokenize) form the seed,
    chosen at random or by farthest-point sampling (``ssapo.seed_selection``) on the initial
    model's last-layer last-token hidden states of their prompts; ``ssapo.seed_label_noise`` of
    their labels are flipped; the per-round prompt pools (``ssapo.pool_sizes``) come from
    ``ssapo.prompts`` or, when that is empty, from the rows left after the seed (labels dropped),
    as the authors split UltraFeedback."""
    s, seed = config.ssapo, config.train.seed
    pool_prompts_ = pool_prompts(config)
    embeddings = None
    if s.seed_selection != "random":
        conversations = [dataset[int(r)]["prompt"] for r in usable_rows]
        ids, mask = encode_prompts(tokenizer, conversations, max_prompt_length=config.data.max_prompt_length)
        embeddings = last_token_hidden(model, params, ids, mask, batch_size=config.train.reference_batch_size)
    seed_pools = () if pool_prompts_ is not None else tuple(s.pool_sizes)
    seed_idx, pools, _ = split_prompts(len(usable_rows), s.seed_size, seed_pools, seed=seed,
                                                 selection=s.seed_selection, embeddings=embeddings)
    seed_rows = usable_rows[np.asarray(seed_idx)]
    if pool_prompts_ is None:  # the conversations of the rows left after the seed, labels dropped
        prompts = [[dataset[int(usable_rows[i])]["prompt"] for i in pool] for pool in pools]
    else:
        _, pools, _ = split_prompts(len(pool_prompts_), 0, tuple(s.pool_sizes), seed=seed)
        prompts = [[pool_prompts_[i] for i in pool] for pool in pools]
    flipped = flip_labels(len(seed_rows), s.seed_label_noise, seed)
    return {"seed_rows": [int(r) for r in seed_rows], "flipped": [bool(f) for f in flipped],
            "pools": prompts, "selection": s.seed_selection}


def seed_rows_jsonl(dataset, split: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The seed pairs as JSONL rows (conversational prompts), chosen and rejected swapped where
    the split flipped the label."""
    rows = []
    for row, flip in zip(split["seed_rows"], split["flipped"]):
        item = dataset[row]
        chosen, rejected = (item["rejected"], item["chosen"]) if flip else (item["chosen"], item["rejected"])
        rows.append({"prompt": item["prompt"], "chosen": chosen, "rejected": rejected, "source_row": row,
                     "flipped": flip})
    return rows
