"""Forward-only passes over all pairs (reference log-probs, the epoch follower's margins) and
their on-disk cache keys."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sgpo_jax.core.step import PreferenceBatch
from sgpo_jax.data.batching import preference_batch
from sgpo_jax.models.logps import chosen_rejected_logps
from sgpo_jax.parallel import distributed, sharding
from sgpo_jax.training.workdir import cached_arrays

__all__ = ["cache_key", "cached_reference", "pair_logps", "scoring_program", "weights_fingerprint"]


def weights_fingerprint(params: Any) -> str:
    """A hash of every parameter's path, shape, dtype and three on-device moments (sum, sum of
    squares, a position-weighted sum): any changed weight changes it, and it costs one pass over
    the weights instead of copying them to the host."""
    def moments(x):
        flat = x.reshape(-1).astype(jnp.float32)
        ramp = jnp.arange(flat.shape[0], dtype=jnp.float32) / max(flat.shape[0], 1)
        return jnp.stack([jnp.sum(flat), jnp.sum(flat * flat), jnp.sum(flat * ramp)])

    leaves = jax.tree_util.tree_leaves_with_path(params)
    values = jax.device_get(jax.jit(lambda ls: [moments(x) for x in ls])([x for _, x in leaves]))
    digest = hashlib.sha256()
    for (path, x), v in zip(leaves, values):
        digest.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}{np.asarray(v).tobytes().hex()}".encode())
    return digest.hexdigest()[:16]


def cache_key(reference_params: Any, data_fingerprint: str) -> str:
    """The key of per-pair caches: the reference weights and the tokenized data."""
    return hashlib.sha256(f"{weights_fingerprint(reference_params)}{data_fingerprint}".encode()).hexdigest()[:16]


def scoring_program(logps_fn, mesh):
    """The jitted forward-only pass of :func:`pair_logps`: ``(params, PreferenceBatch) ->
    (chosen_logps [B], rejected_logps [B])``, outputs split over the mesh's data axes, traced under
    the mesh's activation sharding (so fused attention kernels run per device block)."""
    data_sharding = sharding.batch_sharding(mesh)

    def logps(params, b: PreferenceBatch):
        with sharding.activation_sharding(mesh):
            return chosen_rejected_logps(logps_fn, params, b)

    return jax.jit(logps, out_shardings=(data_sharding, data_sharding))


def pair_logps(logps_fn, params, batches: Iterator[Dict[str, np.ndarray]], num_pairs: int, *,
               mesh, desc: str) -> Tuple[np.ndarray, np.ndarray]:
    """Forward-only ``(chosen_logps [N], rejected_logps [N])`` over batches that cover every pair
    (``batch["index"]`` says which; -1 = padding), sharded over the mesh's data axes."""
    forward = scoring_program(logps_fn, mesh)

    # Each host reads back only the rows its own devices hold (its batch rows, global rows
    # [p * b, (p + 1) * b)); one all-gather at the end gives every host every pair's scores.
    chosen = np.full(num_pairs, np.nan, np.float64)
    rejected = np.full(num_pairs, np.nan, np.float64)
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0):
        device = sharding.place_local_rows(preference_batch(batch), mesh)
        c, r = forward(params, device)
        first = jax.process_index() * len(batch["index"])
        for out, values in ((chosen, c), (rejected, r)):
            rows, local = distributed.local_rows(values)
            keep = (rows >= first) & (rows < first + len(batch["index"]))
            index = batch["index"][rows[keep] - first]
            out[index[index >= 0]] = local[keep][index >= 0]
    if jax.process_count() > 1:
        hosts = distributed.allgather_host(np.stack([chosen, rejected]))  # [P, 2, N]; NaN where not scored
        scored = np.where(np.isnan(hosts), -np.inf, hosts).max(axis=0)
        chosen, rejected = np.where(np.isinf(scored), np.nan, scored)
    missing = np.flatnonzero(np.isnan(chosen))
    if missing.size:
        raise RuntimeError(f"{desc}: {missing.size} pairs were not scored (first: row {missing[0]})")
    return chosen, rejected


def cached_reference(workdir: Path, key: str, compute: Callable[[], Tuple[np.ndarray, np.ndarray]]
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """The reference log-probs ``(chosen [N], rejected [N])`` from ``workdir/cache`` or ``compute()``."""
    def arrays():
        chosen, rejected = compute()
        return {"chosen": chosen, "rejected": rejected}

    cached = cached_arrays(Path(workdir) / "cache" / f"reference_logps_{key}.npz", arrays)
    return cached["chosen"], cached["rejected"]
