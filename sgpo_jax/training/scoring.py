"""Forward-only passes over all pairs (reference log-probs, the epoch follower's margins) and
their on-disk cache keys. A reference pass stopped by a signal keeps its finished batches in
``workdir/cache/reference_logps_<key>.partial.npz``; the rerun scores only the rest."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from tqdm.auto import tqdm

from sgpo_jax.core.step import PreferenceBatch
from sgpo_jax.data.batching import preference_batch
from sgpo_jax.models.logps import chosen_rejected_logps
from sgpo_jax.parallel import distributed, sharding
from sgpo_jax.training.workdir import as_seen_by_process_0, cached_arrays

__all__ = ["PassStopped", "cache_key", "cached_reference", "pair_logps", "scoring_program", "weights_fingerprint"]


class PassStopped(Exception):
    """:func:`pair_logps` stopped early (``should_stop``): ``chosen``, ``rejected`` ``[N]`` hold
    the scores of the first ``done`` batches (NaN elsewhere), on every process."""

    def __init__(self, chosen: np.ndarray, rejected: np.ndarray, done: int):
        super().__init__(f"stopped after {done} batches")
        self.chosen, self.rejected, self.done = chosen, rejected, done


@jax.jit
def _moments(leaves: List[Array]) -> List[Array]:
    """``[sum, sum of squares, position-weighted sum]`` of each leaf, ``[3]`` float32 each; jitted
    once per tree layout."""
    def moments(x):
        flat = x.reshape(-1).astype(jnp.float32)
        ramp = jnp.arange(flat.shape[0], dtype=jnp.float32) / max(flat.shape[0], 1)
        return jnp.stack([jnp.sum(flat), jnp.sum(flat * flat), jnp.sum(flat * ramp)])

    return [moments(x) for x in leaves]


def weights_fingerprint(params: Any) -> str:
    """A hash of every parameter's path, shape, dtype and three on-device moments (sum, sum of
    squares, a position-weighted sum): any changed weight changes it, and it costs one pass over
    the weights instead of copying them to the host."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    values = jax.device_get(_moments([x for _, x in leaves]))
    digest = hashlib.sha256()
    for (path, x), v in zip(leaves, values):
        digest.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}{np.asarray(v).tobytes().hex()}".encode())
    return digest.hexdigest()[:16]


def cache_key(reference_params: Any, data_fingerprint: str) -> str:
    """The key of per-pair caches: the reference weights and the tokenized data."""
    return hashlib.sha256(f"{weights_fingerprint(reference_params)}{data_fingerprint}".encode()).hexdigest()[:16]


def _gather_hosts(chosen: np.ndarray, rejected: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Every host's scored rows on every host (NaN where no host scored); a collective."""
    if jax.process_count() == 1:
        return chosen, rejected
    hosts = distributed.allgather_host(np.stack([chosen, rejected]))  # [P, 2, N]; NaN where not scored
    scored = np.where(np.isnan(hosts), -np.inf, hosts).max(axis=0)
    chosen, rejected = np.where(np.isinf(scored), np.nan, scored)
    return chosen, rejected


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
               mesh, desc: str, resume: Optional[PassStopped] = None,
               should_stop: Optional[Callable[[], bool]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Forward-only ``(chosen_logps [N], rejected_logps [N])`` over batches that cover every pair
    (``batch["index"]`` says which; -1 = padding), sharded over the mesh's data axes.

    ``resume``: an earlier pass over the same batches that stopped; its ``done`` batches are kept
    and skipped. ``should_stop()`` is asked after every batch (on every process: a collective
    when several run); when true on any process, :class:`PassStopped` is raised with what is
    done."""
    forward = scoring_program(logps_fn, mesh)

    # Each host reads back only the rows its own devices hold (its batch rows, global rows
    # [p * b, (p + 1) * b)); one all-gather at the end gives every host every pair's scores.
    chosen = np.full(num_pairs, np.nan, np.float64)
    rejected = np.full(num_pairs, np.nan, np.float64)
    done = 0
    if resume is not None:
        chosen, rejected, done = resume.chosen.copy(), resume.rejected.copy(), resume.done
        batches = itertools.islice(batches, done, None)
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0,
                      initial=done):
        device = sharding.place_local_rows(preference_batch(batch), mesh)
        c, r = forward(params, device)
        first = jax.process_index() * len(batch["index"])
        for out, values in ((chosen, c), (rejected, r)):
            rows, local = distributed.local_rows(values)
            keep = (rows >= first) & (rows < first + len(batch["index"]))
            index = batch["index"][rows[keep] - first]
            out[index[index >= 0]] = local[keep][index >= 0]
        done += 1
        if should_stop is not None and distributed.any_process(should_stop()):
            raise PassStopped(*_gather_hosts(chosen, rejected), done)
    chosen, rejected = _gather_hosts(chosen, rejected)
    missing = np.flatnonzero(np.isnan(chosen))
    if missing.size:
        raise RuntimeError(f"{desc}: {missing.size} pairs were not scored (first: row {missing[0]})")
    return chosen, rejected


def cached_reference(workdir: Path, key: str,
                     compute: Callable[[Optional[PassStopped]], Tuple[np.ndarray, np.ndarray]],
                     batching: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """The reference log-probs ``(chosen [N], rejected [N])`` from ``workdir/cache`` or
    ``compute(resume)``, ``resume`` being the finished batches of a stopped earlier pass (or
    None). When ``compute`` raises :class:`PassStopped`, process 0 saves what it holds to
    ``reference_logps_<key><batching>.partial.npz`` (atomically) and the exception propagates;
    ``batching`` names how the pass cuts the pairs into batches (the kept batches are counted)."""
    path = Path(workdir) / "cache" / f"reference_logps_{key}.npz"
    partial_path = path.with_name(f"reference_logps_{key}{batching}.partial.npz")

    def arrays():
        def load():
            if not partial_path.exists():
                return None
            with np.load(partial_path) as f:
                return PassStopped(f["chosen"], f["rejected"], int(f["done"]))

        try:
            chosen, rejected = compute(as_seen_by_process_0(load))
        except PassStopped as stop:
            if jax.process_index() == 0:
                partial_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = partial_path.with_suffix(".tmp.npz")
                np.savez(tmp, chosen=stop.chosen, rejected=stop.rejected, done=np.asarray(stop.done))
                os.replace(tmp, partial_path)
            raise
        return {"chosen": chosen, "rejected": rejected}

    cached = cached_arrays(path, arrays)
    if jax.process_index() == 0 and partial_path.exists():
        partial_path.unlink()
    return cached["chosen"], cached["rejected"]
