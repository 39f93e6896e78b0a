r"""Train a policy with DPO or SGPO on a fixed preference dataset.

    python -m sgpo_jax.train --config=configs/llama.py --workdir=/ckpt/run1 \
        --config.train.mode=sgpo --config.sgpo.epsilon=0.01

The run: load the model (GGUF, Hugging Face directory or hub name, or a random config) ->
load, normalize and tokenize the preference data -> reference log-probs in one forward-only
pass (cached on disk in the workdir, keyed by the reference weights, the tokenized data and the
length settings) -> optimizer steps of the jitted, sharded :func:`sgpo_jax.sgpo_step` ->
checkpoints (every ``checkpoint.every`` steps, at the end and on SIGTERM) -> export of the final
policy in the Hugging Face layout. Rerunning the same command with the same ``--workdir``
resumes exactly where the last checkpoint stopped (parameters, optimizer, data order, RNG).

Per step the workdir's ``metrics.jsonl`` and TensorBoard events get: loss, TRL's reward metrics,
grad norm, learning rate, tokens/s, and the follower's value, dual price and moved mass.
Run with ``--helpfull`` to list every flag; the config fields are documented in
``sgpo_jax/config.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from sgpo_jax import distributed, memory, sharding
from sgpo_jax.checkpoint import Checkpointer, PreemptionGuard
from sgpo_jax.data import (BadRowReport, PairBatcher, TokenizedPairs, held_shards, load_preferences, ordered_batches,
                           tokenize_preferences)
from sgpo_jax.follower import worst_case, margin_window
from sgpo_jax.losses import preference_centers
from sgpo_jax.models import Decoder, DecoderConfig, decoder_logps_fn, from_pretrained, load_gguf, save_pretrained
from sgpo_jax.models import smollm2_gguf_path
from sgpo_jax.step import PreferenceBatch, SGPOConfig, TrainState, make_sgpo_step

__all__ = ["load_model", "data_shards", "load_pairs", "make_optimizer", "pair_logps", "weights_fingerprint", "fit", "FitResult",
           "Preempted", "export_policy", "train", "main"]

_TOKEN_FIELDS = ("chosen_ids", "chosen_attention", "chosen_loss_mask",
                 "rejected_ids", "rejected_attention", "rejected_loss_mask", "weight")


# ----------------------------------------------------------------------------------- model


def load_model(model_config: ConfigDict) -> Tuple[DecoderConfig, Dict[str, Any], Any]:
    """``(DecoderConfig, variables, tokenizer)`` from ``model.source`` (see sgpo_jax/config.py)."""
    overrides = dict(remat=model_config.remat, scan_layers=model_config.scan_layers)
    dtype, param_dtype = jnp.dtype(model_config.dtype), jnp.dtype(model_config.param_dtype)
    source = model_config.source
    tokenizer = _load_tokenizer(model_config.tokenizer) if model_config.tokenizer else None
    if source.startswith("gguf:"):
        path = smollm2_gguf_path() if source == "gguf:smollm2" else Path(source[len("gguf:"):])
        cfg, params, gguf_tokenizer = load_gguf(path, dtype=dtype, param_dtype=param_dtype, **overrides)
        return cfg, params, tokenizer or gguf_tokenizer
    if source == "random":
        if tokenizer is None:
            raise ValueError("model.source='random' needs model.tokenizer (a directory, hub name or 'gguf:...')")
        cfg = DecoderConfig(vocab_size=len(tokenizer), dtype=dtype, param_dtype=param_dtype,
                            **dict(model_config.random), **overrides)
        ids = jnp.zeros((1, 2), jnp.int32)
        return cfg, Decoder(cfg).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)), tokenizer
    cfg, params, _ = from_pretrained(source, dtype=dtype, param_dtype=param_dtype, **overrides)
    return cfg, params, tokenizer or _load_tokenizer(source)


def _load_tokenizer(name: str):
    if name.startswith("gguf:"):
        path = smollm2_gguf_path() if name == "gguf:smollm2" else Path(name[len("gguf:"):])
        return load_gguf(path)[2]
    import transformers

    return transformers.AutoTokenizer.from_pretrained(name)


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


# ----------------------------------------------------------------------------------- optimizer


def make_optimizer(train_config: ConfigDict, total_steps: int) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine decay to 0, global-norm clipping, and weight decay on
    matrices only (embeddings and kernels; never norms or biases)."""
    warmup = int(round(train_config.warmup_ratio * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train_config.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(train_config.max_grad_norm),
        optax.adamw(schedule, weight_decay=train_config.weight_decay, mask=decay_mask),
    )
    return tx, schedule


# ----------------------------------------------------------------------------------- forward passes


def _device_batch(batch: Dict[str, np.ndarray], ref: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                  atoms: Optional[Tuple[np.ndarray, np.ndarray]] = None, support=None) -> PreferenceBatch:
    index = batch["index"]
    real = index >= 0
    take = lambda values: np.where(real, values[np.maximum(index, 0)], 0).astype(np.float32)
    zeros = np.zeros(index.shape, np.float32)
    fields = {name: batch[name] for name in _TOKEN_FIELDS}
    extra = {}
    if atoms is not None:
        shift, mass = atoms
        extra = dict(atom_shift=np.where(real[:, None], shift[np.maximum(index, 0)], 0).astype(np.float32),
                     atom_mass=np.where(real[:, None], mass[np.maximum(index, 0)], 0).astype(np.float32))
        if support is not None:
            extra["support"] = np.tile(np.asarray(support, np.float32), (index.shape[0], 1))
    return PreferenceBatch(
        **fields,
        ref_chosen_logps=take(ref[0]) if ref is not None else zeros,
        ref_rejected_logps=take(ref[1]) if ref is not None else zeros,
        **extra,
    )


def _global(batch: PreferenceBatch, data_sharding) -> PreferenceBatch:
    """This host's rows -> global arrays split over the mesh's data axes (all hosts together):
    host ``p``'s ``b`` rows become global rows ``[p * b, (p + 1) * b)`` (checked: a mesh whose
    batch axes do not split the hosts apart raises instead of mixing the hosts' rows)."""
    distributed.check_batch_layout(data_sharding, batch.weight.shape[0] * jax.process_count())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, np.asarray(x)), batch)


def _run_step(step_fn, state, batch, config: ConfigDict):
    """One step; an out-of-memory error names the settings that reduce memory."""
    try:
        return step_fn(state, batch)
    except Exception as err:  # XlaRuntimeError has no stable import path across jax versions
        if "RESOURCE_EXHAUSTED" not in str(err) and "Out of memory" not in str(err):
            raise
        raise MemoryError(
            f"out of device memory at batch shape {batch.chosen_ids.shape}: reduce train.batch_size "
            f"({config.train.batch_size}) or raise train.micro_batches ({config.train.micro_batches}), lower "
            f"data.max_length ({config.data.max_length}), set model.remat=True ({config.model.remat}), "
            f"use model.dtype=bfloat16 ({config.model.dtype}), or shard more with mesh.fsdp / mesh.tensor "
            f"({dict(config.mesh)})"
        ) from err


def pair_logps(logps_fn, params, batches: Iterator[Dict[str, np.ndarray]], num_pairs: int, *,
               mesh, desc: str) -> Tuple[np.ndarray, np.ndarray]:
    """Forward-only ``(chosen_logps [N], rejected_logps [N])`` over batches that cover every pair
    (``batch["index"]`` says which; -1 = padding), sharded over the mesh's data axes."""
    from tqdm.auto import tqdm

    data_sharding = sharding.batch_sharding(mesh)

    def logps(params, b: PreferenceBatch):
        ids = jnp.concatenate([b.chosen_ids, b.rejected_ids])
        att = jnp.concatenate([b.chosen_attention, b.rejected_attention])
        mask = jnp.concatenate([b.chosen_loss_mask, b.rejected_loss_mask])
        out = logps_fn(params, ids, att, mask)
        return out[: b.chosen_ids.shape[0]], out[b.chosen_ids.shape[0]:]

    forward = jax.jit(logps, out_shardings=(data_sharding, data_sharding))

    # Each host reads back only the rows its own devices hold (its batch rows, global rows
    # [p * b, (p + 1) * b)); one all-gather at the end gives every host every pair's scores.
    chosen = np.full(num_pairs, np.nan, np.float64)
    rejected = np.full(num_pairs, np.nan, np.float64)
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0):
        device = _global(_device_batch(batch), data_sharding)
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


def _cached_arrays(path: Path, compute: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """The arrays saved at ``path`` (an ``.npz``), or ``compute()`` saved there by process 0.

    With several processes all of them must take the same branch (``compute`` runs collectives),
    so process 0 decides from what it sees and, when it read the file, sends the arrays to the
    others (whose view of the workdir may lag, or be a different disk)."""
    loaded = None
    if jax.process_index() == 0 and path.exists():
        with np.load(path) as f:
            loaded = {name: f[name] for name in f.files}
    loaded = distributed.broadcast_object(loaded)
    if loaded:
        return loaded
    arrays = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return arrays


def _cached_reference(workdir: Path, key: str, compute) -> Tuple[np.ndarray, np.ndarray]:
    """The reference log-probs ``(chosen [N], rejected [N])`` from ``workdir/cache`` or ``compute()``."""
    def arrays():
        chosen, rejected = compute()
        return {"chosen": chosen, "rejected": rejected}

    cached = _cached_arrays(workdir / "cache" / f"reference_logps_{key}.npz", arrays)
    return cached["chosen"], cached["rejected"]


FOLLOWER_METRICS = ("follower/value", "follower/dual", "follower/moved", "follower/transport")


def _cached_epoch_follower(path: Path, sgpo: SGPOConfig, margins_fn, beta: float):
    """Exact follower on all pairs, once per epoch: atoms ``[N, 2]``, the window (margin space)
    and metrics. ``margins_fn() -> [N]`` gives the margins the centers are built from (the
    policy's at the start of the epoch, or the self-annotation reward gaps) and ``beta`` their
    scale. Saved in the workdir, so a run resumed mid-epoch keeps the atoms it started with."""
    def compute():
        centers = np.asarray(preference_centers(jnp.asarray(margins_fn()), beta=beta, space=sgpo.space))
        support = sgpo.support
        if sgpo.space == "margin":
            support = tuple(float(v) for v in margin_window(centers, tau=sgpo.window_tau))
        wc = worst_case(centers, sgpo.epsilon, loss=sgpo.loss, num_tangents=sgpo.num_tangents,
                        support=support, variant=sgpo.variant)
        shift, mass = (np.asarray(a) for a in wc.atoms())
        metrics = [wc.value, wc.dual, np.mean(np.asarray(wc.moved)), wc.transport]
        return {"shift": shift, "mass": mass, "metrics": np.asarray(metrics, np.float64),
                "support": np.asarray(support if sgpo.space == "margin" else (), np.float64)}

    f = _cached_arrays(path, compute)
    support = tuple(float(v) for v in f["support"]) if f["support"].size else None
    return (f["shift"], f["mass"]), support, dict(zip(FOLLOWER_METRICS, map(float, f["metrics"])))


# ----------------------------------------------------------------------------------- logging


class _MetricsLog:
    """``metrics.jsonl`` (appended; one JSON object per step) and TensorBoard events."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(workdir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


# ----------------------------------------------------------------------------------- the run


def _sgpo_config(config: ConfigDict, mode: Optional[str] = None) -> SGPOConfig:
    t, s = config.train, config.sgpo
    return SGPOConfig(
        mode=mode or t.mode, beta=t.beta, label_smoothing=t.label_smoothing, space=s.space, loss=s.loss,
        leader_loss=s.leader_loss or None, num_tangents=s.num_tangents, epsilon=s.epsilon,
        window_tau=s.window_tau, variant=s.variant, micro_batches=t.micro_batches,
    )


FOLLOWERS = ("step", "epoch", "annotation")


def validate(config: ConfigDict) -> None:
    """Checks the config up front; raises ValueError listing every problem."""
    problems = []
    t, d = config.train, config.data
    if t.mode not in ("dpo", "sgpo", "ssapo"):
        problems.append(f"train.mode must be 'dpo', 'sgpo' or 'ssapo', got {t.mode!r}")
    if not config.data.source and t.mode != "ssapo":
        problems.append("data.source is empty: give a hub dataset name or local .json/.jsonl/.parquet file")
    if t.batch_size < 1 or t.batch_size % t.micro_batches:
        problems.append(f"train.batch_size ({t.batch_size}) must be a positive multiple of train.micro_batches ({t.micro_batches})")
    if t.epochs < 1 and t.max_steps < 1:
        problems.append("train.epochs or train.max_steps must be >= 1")
    if not t.learning_rate > 0:
        problems.append(f"train.learning_rate must be > 0, got {t.learning_rate}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if d.limit < 0:
        problems.append(f"data.limit must be >= 0 (0 = every pair), got {d.limit}")
    if d.shards < 0:
        problems.append(f"data.shards must be >= 0 (0 = one per process), got {d.shards}")
    else:
        shards = data_shards(d)
        for name in ("batch_size", "reference_batch_size"):
            size = t[name]
            if size < 1 or size % shards or size % jax.process_count():
                problems.append(f"train.{name} ({size}) must be a multiple of the number of data shards ({shards}, "
                                f"data.shards={d.shards}) and of the process count ({jax.process_count()})")
    if d.max_prompt_length >= d.max_length:
        problems.append(f"data.max_prompt_length ({d.max_prompt_length}) must be < data.max_length ({d.max_length})")
    if config.sgpo.follower not in FOLLOWERS:
        problems.append(f"sgpo.follower must be one of {FOLLOWERS}, got {config.sgpo.follower!r}")
    if not config.sgpo.annotation_scale > 0:
        problems.append(f"sgpo.annotation_scale must be > 0, got {config.sgpo.annotation_scale}")
    if config.checkpoint.every < 1:
        problems.append(f"checkpoint.every must be >= 1, got {config.checkpoint.every}")
    if t.mode == "ssapo":
        from sgpo_jax import pipeline

        problems.extend(pipeline.config_problems(config))
    try:
        _sgpo_config(config, mode="sgpo" if t.mode == "ssapo" else None)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


def data_shards(data_config: ConfigDict) -> int:
    """The number of data shards: ``data.shards``, or one per process when it is 0."""
    return int(data_config.shards) or jax.process_count()


def load_pairs(data_config: ConfigDict, tokenizer, source: Optional[str] = None) -> Tuple[TokenizedPairs, np.ndarray]:
    """Loads, normalizes and tokenizes ``source`` (default ``data.source``; comma-separated files
    are concatenated) with the ``data`` settings, keeping the first ``data.limit`` usable pairs.

    Each process loads and tokenizes only the data shards it feeds (:func:`data_shards` shards,
    rows ``s, s + S, ...`` in shard ``s``; :func:`sgpo_jax.data.held_shards`), then the processes
    exchange the pairs' lengths and source rows (:meth:`TokenizedPairs.from_shards`); a failure
    on one process (a bad row, a missing file) stops all of them with its message.

    Returns ``(pairs, gaps)``: ``gaps [N]`` float64 is ``chosen_reward - rejected_reward`` of each
    pair's source row where the source has those columns (self-annotated data), else NaN.
    Skipped bad rows (``data.on_bad_row="skip"``) are reported on the console (by process 0).
    """
    d = data_config
    source = source or d.source
    parts = [part for part in source.split(",") if part]
    shards = data_shards(d)

    def tokenize_held() -> Dict[int, Tuple[TokenizedPairs, BadRowReport]]:
        out = {}
        for s in held_shards(jax.process_index(), jax.process_count(), shards):
            dataset = load_preferences(parts if len(parts) > 1 else source, split=d.split,
                                       prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                                       rejected_column=d.rejected_column, shard=(s, shards) if shards > 1 else None)
            out[s] = tokenize_preferences(dataset, tokenizer, max_length=d.max_length,
                                          max_prompt_length=d.max_prompt_length, on_bad_row=d.on_bad_row,
                                          source_name=source, allow_empty=shards > 1)
        return out

    tokenized = distributed.fail_together(tokenize_held)
    reports: Dict[int, BadRowReport] = {}
    for host in distributed.allgather_objects({s: r for s, (_, r) in tokenized.items()}):
        reports.update(host)
    report = BadRowReport.merge([reports[s] for s in sorted(reports)], source)
    if report.skipped and jax.process_index() == 0:
        print(report)
    pairs = TokenizedPairs.from_shards({s: p for s, (p, _) in tokenized.items()}, shards,
                                       distributed.allgather_objects, limit=d.limit)
    return pairs, _reward_gaps(parts, d.split, pairs.rows)


def _reward_gaps(parts, split: str, rows: np.ndarray) -> np.ndarray:
    gaps = np.full(len(rows), np.nan)
    paths = [Path(p) for p in parts]
    if not all(p.is_file() and p.suffix.lower() in (".json", ".jsonl", ".parquet") for p in paths):
        return gaps
    import datasets

    builder = "parquet" if paths[0].suffix.lower() == ".parquet" else "json"
    raw = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split=split)
    if {"chosen_reward", "rejected_reward"} <= set(raw.column_names):
        chosen, rejected = (np.asarray(raw[c], np.float64) for c in ("chosen_reward", "rejected_reward"))
        gaps = chosen[rows] - rejected[rows]
    return gaps


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the final policy parameters (sharded like the state) and the run
    summary (steps, last step's metrics, the epochs' follower metrics, mean loss, workdir)."""

    params: Any
    summary: Dict[str, Any]


def fit(config: ConfigDict, workdir: str | Path, *, model: Decoder, params: Any, pairs: TokenizedPairs,
        mesh, reference_params: Any = None, gaps: Optional[np.ndarray] = None, mode: Optional[str] = None,
        desc: str = "train") -> FitResult:
    """Trains (or resumes, or returns a finished run of) ``params`` on ``pairs`` in ``workdir``.

    Args:
      config: the run config (``train``, ``sgpo``, ``checkpoint``, ``model.logps_chunk``).
      workdir: checkpoints, metrics, caches; rerunning with the same workdir resumes exactly.
      model, params: the policy at the start (also the reference unless ``reference_params``).
      pairs: the tokenized training pairs.
      mesh: the device mesh; ``params`` are sharded over it by name rules.
      reference_params: the reference policy (default: ``params``); its log-probs are computed
        once and cached in ``workdir/cache``, keyed by its weights and the tokenized data.
      gaps: ``[N]`` self-annotation reward gaps, needed by ``sgpo.follower="annotation"``
        (centers ``sigma(sgpo.annotation_scale * gap)``, the authors' per-round follower).
      mode: ``"dpo"`` or ``"sgpo"`` (default ``train.mode``).
      desc: the progress bar's label.
    """
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sgpo = _sgpo_config(config, mode)
    t, follower = config.train, config.sgpo.follower
    if sgpo.mode == "sgpo" and follower == "annotation" and (gaps is None or np.isnan(gaps).any()):
        raise ValueError("sgpo.follower='annotation' needs chosen_reward and rejected_reward for every pair "
                         "(self-annotated data, e.g. from train.mode=ssapo)")
    logps_fn = decoder_logps_fn(model, chunk_size=config.model.logps_chunk)
    buckets = tuple(config.data.buckets) or None
    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    batcher = PairBatcher(pairs, t.batch_size, buckets=buckets, seed=t.seed, **hosts)
    steps_per_epoch = batcher.steps_per_epoch
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch

    memory.check(memory.plan_for_run(config, model.cfg, dict(mesh.shape)), memory.device_memory_bytes())
    params = sharding.shard_params(params, mesh)
    reference = params if reference_params is None else sharding.shard_params(reference_params, mesh)
    params = jax.tree.map(jnp.copy, params)  # the step donates its state; the caller's arrays stay valid
    reference_batches = lambda: ordered_batches(pairs, t.reference_batch_size, buckets=buckets, **hosts)
    key = hashlib.sha256(f"{weights_fingerprint(reference)}{pairs.fingerprint()}".encode()).hexdigest()[:16]
    ref = _cached_reference(workdir, key, lambda: pair_logps(
        logps_fn, reference, reference_batches(), len(pairs), mesh=mesh, desc="reference log-probs"))
    del reference

    tx, schedule = make_optimizer(t, total_steps)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, config=sgpo,
                              rng=jax.random.PRNGKey(t.seed), logps_fn=logps_fn)
    state_sharding = sharding.param_sharding(state, mesh)
    state = jax.device_put(state, state_sharding)
    step_fn = make_sgpo_step(mesh, state, batch_axes=sharding.BATCH_AXES, state_sharding=state_sharding)

    def epoch_follower(epoch: int):
        path = workdir / "cache" / f"follower_{key}_{follower}_epoch{epoch}.npz"
        if follower == "annotation":
            return _cached_epoch_follower(path, sgpo, lambda: gaps, config.sgpo.annotation_scale)

        def margins():
            policy = pair_logps(logps_fn, state.params, reference_batches(), len(pairs), mesh=mesh,
                                desc=f"follower scores, epoch {epoch}")
            return (policy[0] - ref[0]) - (policy[1] - ref[1])

        return _cached_epoch_follower(path, sgpo, margins, sgpo.beta)

    directory = config.checkpoint.directory or workdir / "checkpoints"
    checkpointer = Checkpointer(directory, save_every=config.checkpoint.every,
                                max_to_keep=config.checkpoint.keep)
    meta = {"data_fingerprint": pairs.fingerprint(), "steps_per_epoch": steps_per_epoch,
            "data_shards": pairs.num_shards}
    start = 0
    if checkpointer.latest_step() is not None:
        state, saved = checkpointer.restore(state)
        if saved.get("data_shards", 1) != pairs.num_shards:
            raise ValueError(
                f"{workdir}: the checkpoint was trained with {saved.get('data_shards', 1)} data shards and this run has "
                f"{pairs.num_shards} (data.shards={config.data.shards}, {jax.process_count()} processes); the pair "
                f"order depends on it: rerun with --config.data.shards={saved.get('data_shards', 1)}")
        if saved.get("data_fingerprint") != meta["data_fingerprint"]:
            raise ValueError(f"{workdir}: the checkpoint was trained on other data or length settings; "
                             "use a new --workdir")
        start = int(saved["step"])
        if start < total_steps:
            print(f"{desc}: resuming from step {start} of {total_steps}")

    log = _MetricsLog(workdir)
    last: Dict[str, float] = {}
    follower_cache: Dict[int, Any] = {}
    preempted = False
    try:
        with PreemptionGuard() as guard, tqdm(total=total_steps, initial=start, desc=desc, unit="step") as bar:
            step = start
            while step < total_steps:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                atoms = support = None
                epoch_metrics: Dict[str, float] = {}
                if sgpo.mode == "sgpo" and follower != "step":
                    if epoch not in follower_cache:
                        follower_cache = {epoch: epoch_follower(epoch)}
                    atoms, support, epoch_metrics = follower_cache[epoch]
                for batch in batcher.epoch(epoch, start_step=in_epoch):
                    begin = time.perf_counter()
                    device_batch = _global(_device_batch(batch, ref, atoms, support), sharding.batch_sharding(mesh))
                    state, metrics = _run_step(step_fn, state, device_batch, config)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    step += 1
                    if not all(math.isfinite(v) for v in metrics.values()):
                        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
                        raise FloatingPointError(
                            f"non-finite {', '.join(bad)} at step {step} (epoch {epoch}); the run stopped and the "
                            f"last good checkpoint in {directory} is kept (step "
                            f"{checkpointer.latest_step()}); lower train.learning_rate or check the data"
                        )
                    tokens = int(np.sum(batch["chosen_attention"]) + np.sum(batch["rejected_attention"]))
                    metrics.update(epoch_metrics)
                    metrics["learning_rate"] = float(schedule(step - 1))
                    metrics["tokens_per_second"] = tokens * jax.process_count() / (time.perf_counter() - begin)
                    metrics["epoch"] = epoch + (in_epoch + 1) / steps_per_epoch
                    in_epoch += 1
                    log.write(step, metrics)
                    last = metrics
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                    if distributed.any_process(guard.requested):  # a SIGTERM on any host stops all
                        checkpointer.save(step, state, {**meta, "step": step}, force=True)
                        preempted = True
                        break
                    checkpointer.save(step, state, {**meta, "step": step})
                    if step >= total_steps:
                        break
                if preempted:
                    break
        checkpointer.save(step, state, {**meta, "step": step}, force=True)
    finally:
        checkpointer.close()  # waits for in-flight saves, also when a step failed
        log.close()
    summary = {"step": step, "total_steps": total_steps, "preempted": preempted, "metrics": last,
               "workdir": str(workdir), "pairs": len(pairs),
               **distributed.broadcast_object(_run_statistics(workdir / "metrics.jsonl", step))}
    if preempted:
        raise Preempted(f"SIGTERM: saved step {step} in {workdir}; rerun the same command to resume", summary)
    return FitResult(params=state.params, summary=summary)


class Preempted(Exception):
    """SIGTERM arrived; the run saved a checkpoint and stopped (``summary`` as :func:`fit`'s).
    Rerunning the same command resumes it."""

    def __init__(self, message: str, summary: Dict[str, Any]):
        super().__init__(message)
        self.summary = summary


def _run_statistics(metrics_path: Path, last_step: int) -> Dict[str, float]:
    """Mean loss and reward accuracy over the steps logged (the latest record of each step up to
    ``last_step``, so a resumed run counts each step once), and the follower metrics; ``{}``
    except on process 0, which writes the log."""
    if jax.process_index() != 0 or not metrics_path.exists():
        return {}
    records: Dict[int, Dict[str, float]] = {}
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if row["step"] <= last_step:
            records[row["step"]] = row
    if not records:
        return {}
    rows = list(records.values())
    stats = {"mean_loss": float(np.mean([r["loss"] for r in rows])),
             "mean_accuracy": float(np.mean([r["rewards/accuracies"] for r in rows]))}
    for name in ("follower/dual", "follower/moved", "follower/value"):
        values = [r[name] for r in rows if name in r]
        if values:
            stats[name] = float(np.mean(values))
    return stats


def export_policy(workdir: Path, cfg: DecoderConfig, params: Any, tokenizer) -> Optional[str]:
    """Writes the policy in the Hugging Face layout to ``workdir/export`` (process 0 only).
    Every process must call it: parameters sharded across hosts are gathered leaf by leaf first
    (a collective), then process 0 writes."""
    host_params = distributed.to_host(params)
    if jax.process_index() != 0:
        return None
    return str(save_pretrained(workdir / "export", cfg, host_params, tokenizer=tokenizer))


def train(config: ConfigDict, workdir: str | Path) -> Dict[str, Any]:
    """Runs (or resumes) training; returns a summary dict (steps, last metrics, paths).
    ``train.mode="ssapo"`` runs the self-annotation loop of :mod:`sgpo_jax.pipeline`."""
    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    if config.train.mode == "ssapo":
        from sgpo_jax import pipeline

        return pipeline.run(config, workdir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    cfg, params, tokenizer = load_model(config.model)
    pairs, gaps = load_pairs(config.data, tokenizer)
    try:
        result = fit(config, workdir, model=Decoder(cfg), params=params, pairs=pairs, mesh=mesh, gaps=gaps)
    except Preempted as stop:
        print(stop)
        summary = stop.summary
    else:
        summary = result.summary
    if config.export and not summary["preempted"]:
        summary["export"] = export_policy(workdir, cfg, result.params, tokenizer)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv) -> None:
    """The CLI: starts ``jax.distributed`` when the flags or the environment describe several
    processes (SLURM, TPU pod, ``SGPO_*`` variables; see :mod:`sgpo_jax.distributed`), before
    anything touches a device, then trains. Every process of a multi-host run runs this same
    command; process 0 writes the metrics, caches and export, all write their checkpoint shards."""
    from absl import flags, logging

    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax's and XLA's INFO lines off the console
    local_ids = flags.FLAGS["local_device_ids"].value if "local_device_ids" in flags.FLAGS else None
    spec = distributed.initialize(
        coordinator_address=flags.FLAGS["coordinator_address"].value if "coordinator_address" in flags.FLAGS else None,
        num_processes=flags.FLAGS["num_processes"].value if "num_processes" in flags.FLAGS else None,
        process_id=flags.FLAGS["process_id"].value if "process_id" in flags.FLAGS else None,
        local_device_ids=[int(i) for i in local_ids] if local_ids else None,
    )
    if spec.multi_process and jax.process_index() == 0:
        print(f"jax.distributed: {jax.process_count()} processes ({spec.source}), {jax.device_count()} devices "
              f"({jax.local_device_count()} per process)")
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Training config file (e.g. configs/llama.py); override fields with --config.group.field=value."
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, cache, export. "
                                   "Rerun with the same workdir to resume.")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator (default: "
                        "SGPO_COORDINATOR, SLURM's first node, or TPU pod metadata). Unset with one process.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes (default: SGPO_NUM_PROCESSES, "
                         "SLURM_NTASKS, or TPU pod metadata).")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's id in [0, num_processes) (default: "
                         "SGPO_PROCESS_ID, SLURM_PROCID, or TPU pod metadata).")
    flags.DEFINE_list("local_device_ids", None, "Multi-host: the local accelerator ids this process drives (default: "
                      "all; SLURM with one task per GPU: SLURM_LOCALID).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
