"""Training a policy on tokenized pairs: set-up, restore, the per-epoch follower, the step
loop, preemption and checkpoints.

:func:`fit` is the whole run as a function; :class:`Trainer` is the same run in its stages.
The run: the policy and the reference are sharded over the mesh by name rules -> the reference
log-probs in one forward-only pass (cached in ``workdir/cache``, keyed by the reference weights
and the tokenized data) -> optimizer steps of the jitted, sharded
:func:`sgpo_jax.core.step.sgpo_step` -> checkpoints (every ``checkpoint.every`` steps, at the end
and on SIGTERM). Rerunning with the same workdir resumes exactly where the last checkpoint
stopped (parameters, optimizer, data order, RNG, the epoch's follower atoms).

SIGTERM or Ctrl-C (:class:`~sgpo_jax.training.checkpoint.PreemptionGuard`) during the steps
saves a checkpoint after the current step; during the reference pass it keeps the finished
batches. Either way :class:`Preempted` is raised. Every step is checked for divergence
(:mod:`sgpo_jax.training.divergence`): a non-finite, dead or exploding run stops with one
:class:`~sgpo_jax.errors.DivergenceError` line, and no non-finite state is ever saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from sgpo_jax.config import follower_of, sgpo_config
from sgpo_jax.console import say
from sgpo_jax.core.follow import follow
from sgpo_jax.core.step import TrainState, make_sgpo_step
from sgpo_jax.data.batching import PairBatcher, ordered_batches, preference_batch
from sgpo_jax.data.packing import pack_batch
from sgpo_jax.data.tokenize import TokenizedPairs
from sgpo_jax.errors import CheckpointError, DataError, DeviceMemoryError, DivergenceError
from sgpo_jax.models import lora as lora_lib
from sgpo_jax.models.llama import Decoder
from sgpo_jax.models.logps import decoder_logps_fn
from sgpo_jax.parallel import distributed, sharding
from sgpo_jax.parallel.mesh import BATCH_AXES, batch_split
from sgpo_jax.training import memory
from sgpo_jax.training.checkpoint import Checkpointer, NonFiniteState, Preempted, PreemptionGuard
from sgpo_jax.training.divergence import DivergenceMonitor
from sgpo_jax.training.metrics import FOLLOWER_METRICS, MetricsLog, run_statistics
from sgpo_jax.training.scoring import PassStopped, cache_key, cached_reference, pair_logps
from sgpo_jax.training.workdir import cached_arrays

__all__ = ["FitResult", "Preempted", "Trainer", "fit", "make_optimizer", "run_step", "total_steps"]


def total_steps(train_config: ConfigDict, steps_per_epoch: int) -> int:
    """The run's optimizer steps: ``train.max_steps`` when set (> 0), else ``train.epochs`` epochs."""
    t = train_config
    return t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch


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


def run_step(step_fn, state, batch, config: ConfigDict):
    """One step; an out-of-memory error becomes a MemoryError naming the settings that reduce memory."""
    try:
        return step_fn(state, batch)
    except Exception as err:  # XlaRuntimeError has no stable import path across jax versions
        if "RESOURCE_EXHAUSTED" not in str(err) and "Out of memory" not in str(err):
            raise
        raise DeviceMemoryError(
            f"out of device memory at batch shape {batch.chosen_ids.shape}: reduce train.batch_size "
            f"({config.train.batch_size}) or raise train.micro_batches ({config.train.micro_batches}), lower "
            f"data.max_length ({config.data.max_length}), set model.remat=True ({config.model.remat}), "
            f"use model.dtype=bfloat16 ({config.model.dtype}), or shard more with mesh.fsdp / mesh.tensor "
            f"({dict(config.mesh)})"
        ) from err


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the final policy parameters (sharded like the state) and the run
    summary (steps, last step's metrics, the epochs' follower metrics, mean loss, workdir). With
    ``model.lora``, ``params`` are the base with the adapters merged in and ``adapters`` the
    trained adapters themselves (:mod:`sgpo_jax.models.lora`); else ``adapters`` is None."""

    params: Any
    summary: Dict[str, Any]
    adapters: Any = None


class Trainer:
    """One training run in ``workdir`` (see :func:`fit` for the arguments).

    Stages: ``__init__`` (memory check, sharding, cached reference log-probs, optimizer, state,
    the jitted step), :meth:`restore` (the latest checkpoint, if any), :meth:`epoch_atoms` (the
    follower's atoms of an epoch, when it does not run inside the step) and :meth:`run` (the
    step loop with checkpoints and preemption). ``guard``: an active
    :class:`~sgpo_jax.training.checkpoint.PreemptionGuard` covering the reference pass too (as
    :func:`fit` does); without one, only :meth:`run` is guarded."""

    def __init__(self, config: ConfigDict, workdir: str | Path, *, model: Decoder, params: Any,
                 pairs: TokenizedPairs, mesh, reference_params: Any = None, gaps: Optional[np.ndarray] = None,
                 mode: Optional[str] = None, desc: str = "train", guard: Optional[PreemptionGuard] = None,
                 evaluator: Any = None):
        self.config, self.workdir, self.pairs, self.mesh, self.desc = config, Path(workdir), pairs, mesh, desc
        self.guard, self.evaluator = guard, evaluator
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sgpo = sgpo_config(config, mode)
        self.follower, self.gaps = follower_of(config), gaps
        t = config.train
        if self.sgpo.mode == "sgpo" and self.follower == "annotation" and (gaps is None or np.isnan(gaps).any()):
            raise DataError("sgpo.follower='annotation' needs chosen_reward and rejected_reward for every pair "
                            "(self-annotated data, e.g. from train.mode=ssapo) or the data.score_columns pair",
                            "name the score columns with --config.data.score_columns, "
                            "or set --config.sgpo.follower=step")
        self.logps_fn = decoder_logps_fn(model, chunk_size=config.model.logps_chunk)
        self.lora = lora_lib.lora_config(config.model)
        self.buckets = tuple(config.data.buckets) or None
        self.batcher = PairBatcher(pairs, t.batch_size, buckets=self.buckets, seed=t.seed, **self._hosts())
        self.steps_per_epoch = self.batcher.steps_per_epoch
        self.total_steps = total_steps(t, self.steps_per_epoch)

        memory.check(memory.plan_for_run(config, model.cfg, dict(mesh.shape)), memory.device_memory_bytes())
        same_reference = reference_params is None or reference_params is params
        params = sharding.shard_params(params, mesh)
        reference = params if same_reference else sharding.shard_params(reference_params, mesh)
        frozen, self.policy_logps_fn = None, self.logps_fn
        if self.lora is None:
            params = jax.tree.map(jnp.copy, params)  # the step donates its params; the caller's arrays stay valid
        else:  # adapters train on the frozen base (the caller's arrays: the step neither donates nor copies them);
            # the reference is the base, adapters off
            frozen, params = lora_lib.frozen_and_adapters(params, model, self.lora, jax.random.PRNGKey(t.seed))
            params = sharding.shard_params(params, mesh)
            self.policy_logps_fn = lora_lib.lora_logps_fn(model, self.lora, chunk_size=config.model.logps_chunk)
            if self.lora.quantize and same_reference:  # QLoRA: the policy at init is the quantized base, so is
                reference = (frozen, jax.tree.map(jnp.zeros_like, params))  # the reference
        self.key = cache_key(reference, pairs.fingerprint())
        reference_fn = self.policy_logps_fn if isinstance(reference, tuple) else self.logps_fn
        batching = f"_b{t.reference_batch_size}_{'-'.join(map(str, self.buckets or ()))}_p{jax.process_count()}"
        try:
            self.reference_logps = cached_reference(self.workdir, self.key, lambda resume: pair_logps(
                reference_fn, reference, self._reference_batches(), len(pairs), mesh=mesh,
                desc="reference log-probs", resume=resume, should_stop=lambda: bool(guard and guard.requested)),
                batching=batching)
        except PassStopped as stop:
            raise Preempted(f"{guard.signal_name}: kept {stop.done} finished batches of the reference pass in "
                            f"{self.workdir / 'cache'}; rerun the same command to resume",
                            {"step": 0, "preempted": True, "workdir": str(self.workdir), "pairs": len(pairs),
                             "reference_batches_done": stop.done}) from None
        if evaluator is not None:  # the held-out pairs' reference log-probs, with the same function and weights
            evaluator.start(self.workdir, reference_fn, reference, self.policy_logps_fn)

        self.tx, self.schedule = make_optimizer(t, self.total_steps)
        state = TrainState.create(apply_fn=model.apply, params=params, tx=self.tx, config=self.sgpo,
                                  rng=jax.random.PRNGKey(t.seed), logps_fn=self.policy_logps_fn, frozen=frozen)
        state_sharding = sharding.param_sharding(state, mesh)
        self.state = jax.device_put(state, state_sharding)
        self.step_fn = make_sgpo_step(mesh, self.state, batch_axes=BATCH_AXES, state_sharding=state_sharding)
        self.directory = config.checkpoint.directory or self.workdir / "checkpoints"
        self.checkpointer = Checkpointer(self.directory, save_every=config.checkpoint.every,
                                         max_to_keep=config.checkpoint.keep)
        self.param_norm = jax.jit(optax.tree.norm)
        self.meta = {"data_fingerprint": pairs.fingerprint(), "steps_per_epoch": self.steps_per_epoch,
                     "data_shards": pairs.num_shards, "start_param_norm": float(self.param_norm(self.state.params))}
        self.step = 0

    def _hosts(self) -> Dict[str, int]:
        return dict(process_index=jax.process_index(), process_count=jax.process_count())

    def _reference_batches(self):
        return map(self._layout, ordered_batches(self.pairs, self.config.train.reference_batch_size,
                                                 buckets=self.buckets, **self._hosts()))

    def _layout(self, batch: Dict[str, np.ndarray], groups: int = 1) -> Dict[str, np.ndarray]:
        """The batch as :func:`~sgpo_jax.data.packing.pack_batch` lays it out under
        ``data.prefix_sharing`` / ``data.packing_budget`` (the same pairs and weights), in
        ``groups`` groups of rows (the step's micro-batches), else itself."""
        d = self.config.data
        if not (d.prefix_sharing or d.packing_budget):
            return batch
        if jax.process_count() > 1:
            raise DataError("data.prefix_sharing and data.packing_budget run on one process only (packed rows "
                            "index the slots of one host's batch)", "set both off for multi-host runs")
        _, ways = batch_split(self.mesh)
        return pack_batch(batch, share_prompt=bool(d.prefix_sharing), budget=d.packing_budget or None,
                          buckets=self.buckets or (), pad_id=self.pairs.pad_id, row_multiple=ways, groups=groups)

    def restore(self) -> int:
        """Restores the latest checkpoint, if any; returns the step the run continues from."""
        if self.checkpointer.latest_step() is None:
            return self.step
        restored = self.checkpointer.restore(self.state)
        if restored is None:  # every step was bad and is set aside (each named in a line)
            return self.step
        self.state, saved = restored
        self.meta["start_param_norm"] = saved.get("start_param_norm", self.meta["start_param_norm"])
        pairs, workdir = self.pairs, self.workdir
        if saved.get("data_shards", 1) != pairs.num_shards:
            raise CheckpointError(
                f"{workdir}: the checkpoint was trained with {saved.get('data_shards', 1)} data shards and this run "
                f"has "
                f"{pairs.num_shards} (data.shards={self.config.data.shards}, {jax.process_count()} processes); the "
                f"pair order depends on it: rerun with --config.data.shards={saved.get('data_shards', 1)}")
        if saved.get("data_fingerprint") != self.meta["data_fingerprint"]:
            raise CheckpointError(f"{workdir}: the checkpoint was trained on other data or length settings; "
                             "use a new --workdir")
        self.step = int(saved["step"])
        if self.step < self.total_steps:
            say(f"{self.desc}: resuming from step {self.step} of {self.total_steps}")
        return self.step

    def epoch_atoms(self, epoch: int):
        """``((shift, mass) [N, J], support or None, metrics)``: the exact follower on all pairs,
        once per epoch, on the self-annotation reward gaps (``sgpo.follower="annotation"``, scale
        ``sgpo.annotation_scale``) or on the policy's margins at the epoch's start (``"epoch"``,
        scale ``train.beta``). Saved in the workdir, so a run resumed mid-epoch keeps the atoms
        it started with."""
        path = self.workdir / "cache" / f"follower_{self.key}_{self.follower}_epoch{epoch}.npz"
        if self.follower == "annotation":
            margins_fn, scale = (lambda: self.gaps), self.config.sgpo.annotation_scale
        else:
            def margins_fn():
                ref = self.reference_logps
                state = self.state
                weights = state.params if state.frozen is None else (state.frozen, state.params)
                policy = pair_logps(self.policy_logps_fn, weights, self._reference_batches(), len(self.pairs),
                                    mesh=self.mesh, desc=f"follower scores, epoch {epoch}")
                return (policy[0] - ref[0]) - (policy[1] - ref[1])

            scale = self.sgpo.beta

        def compute():
            f = follow(jnp.asarray(margins_fn()), self.sgpo, scale=scale)
            margin = self.sgpo.space == "margin"
            return {"shift": np.asarray(f.shift), "mass": np.asarray(f.mass),
                    "metrics": np.asarray([f.metrics[k] for k in FOLLOWER_METRICS], np.float64),
                    "support": np.asarray(f.support if margin else (), np.float64)}

        saved = cached_arrays(path, compute)
        support = tuple(float(v) for v in saved["support"]) if saved["support"].size else None
        return (saved["shift"], saved["mass"]), support, dict(zip(FOLLOWER_METRICS, map(float, saved["metrics"])))

    def _diverged(self, step: int, problem: str, monitor: DivergenceMonitor) -> DivergenceError:
        cause, hint = monitor.cause(step)
        saved = self.checkpointer.latest_step()
        where = (f"step {saved} in {self.directory}" if saved is not None
                 else "none (no checkpoint was saved)")
        if saved is not None and monitor.zero_since is not None and saved >= monitor.zero_since:
            where += f" (saved after the gradients vanished at step {monitor.zero_since})"
        return DivergenceError(f"training diverged at step {step}: {problem}; last finite checkpoint: {where}; "
                               f"likely cause: {cause}", hint)

    def _save(self, step: int, state, monitor: DivergenceMonitor, *, force: bool = False) -> None:
        try:
            self.checkpointer.save(step, state, {**self.meta, "step": step}, force=force)
        except NonFiniteState:
            raise self._diverged(step, "non-finite parameters or optimizer state (not saved)", monitor) from None

    def run(self) -> FitResult:
        """The step loop from :attr:`step` to the end (or a SIGTERM / Ctrl-C); always waits for
        the checkpoint writes. Raises :class:`Preempted` after a signal (the state is saved) and
        :class:`~sgpo_jax.errors.DivergenceError` when the run diverges (nothing non-finite is
        saved)."""
        log = MetricsLog(self.workdir)
        last: Dict[str, float] = {}
        follower_cache: Dict[int, Any] = {}
        preempted = False
        total, per_epoch, ref = self.total_steps, self.steps_per_epoch, self.reference_logps
        step, state, checkpointer = self.step, self.state, self.checkpointer
        monitor = DivergenceMonitor(self.meta["start_param_norm"], learning_rate=self.config.train.learning_rate,
                                    resumed_at=step, set_aside=tuple((s, r) for s, r, _ in checkpointer.set_aside))
        guarded = contextlib.nullcontext(self.guard) if self.guard is not None else PreemptionGuard()
        try:
            with guarded as guard, tqdm(total=total, initial=step, desc=self.desc, unit="step") as bar:
                while step < total:
                    epoch, in_epoch = divmod(step, per_epoch)
                    atoms = support = None
                    epoch_metrics: Dict[str, float] = {}
                    if self.sgpo.mode == "sgpo" and self.follower != "step":
                        if epoch not in follower_cache:
                            self.state = state
                            follower_cache = {epoch: self.epoch_atoms(epoch)}
                        atoms, support, epoch_metrics = follower_cache[epoch]
                    for batch in self.batcher.epoch(epoch, start_step=in_epoch):
                        begin = time.perf_counter()
                        host_batch = preference_batch(self._layout(batch, self.config.train.micro_batches), ref,
                                                      atoms, support)
                        device_batch = sharding.place_local_rows(host_batch, self.mesh)
                        state, metrics = run_step(self.step_fn, state, device_batch, self.config)
                        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        step += 1
                        problem = monitor.check(step, metrics, float(self.param_norm(state.params)))
                        if problem:
                            raise self._diverged(step, problem, monitor)
                        tokens = int(np.sum(batch["chosen_attention"]) + np.sum(batch["rejected_attention"]))
                        metrics.update(epoch_metrics)
                        metrics["learning_rate"] = float(self.schedule(step - 1))
                        metrics["tokens_per_second"] = tokens * jax.process_count() / (time.perf_counter() - begin)
                        metrics["epoch"] = epoch + (in_epoch + 1) / per_epoch
                        in_epoch += 1
                        if self.evaluator is not None:
                            metrics.update(self.evaluator.at_step(state, step, total))
                        log.write(step, metrics)
                        last = metrics
                        bar.update(1)
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                        if distributed.any_process(guard.requested):  # a signal on any host stops all
                            self._save(step, state, monitor, force=True)
                            preempted = True
                            break
                        self._save(step, state, monitor)
                        if step >= total:
                            break
                    if preempted:
                        break
            self._save(step, state, monitor, force=True)
        finally:
            checkpointer.close()  # waits for in-flight saves, also when a step failed
            log.close()
        self.step, self.state = step, state
        summary = {"step": step, "total_steps": total, "preempted": preempted, "metrics": last,
                   "workdir": str(self.workdir), "pairs": len(self.pairs),
                   **distributed.broadcast_object(run_statistics(self.workdir / "metrics.jsonl", step))}
        if preempted:
            name = guard.signal_name or "a signal on another process"
            raise Preempted(f"{name}: saved step {step} in {self.workdir}; rerun the same command to resume", summary)
        if self.evaluator is not None:
            summary["eval"] = self.evaluator.at_end(state, step)
        if self.lora is None:
            return FitResult(params=state.params, summary=summary)
        return FitResult(params=lora_lib.merge(state.frozen, state.params, self.lora), summary=summary,
                         adapters=state.params)


def fit(config: ConfigDict, workdir: str | Path, *, model: Decoder, params: Any, pairs: TokenizedPairs,
        mesh, reference_params: Any = None, gaps: Optional[np.ndarray] = None, mode: Optional[str] = None,
        desc: str = "train", evaluator: Any = None) -> FitResult:
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
      evaluator: the held-out evaluation (:class:`sgpo_jax.eval.preference.PreferenceEvaluator`):
        started with the run's reference, its figures join the step's metrics every
        ``train.eval_every`` steps and at the last step, and the summary's ``eval`` holds the
        last one with its intervals.
    """
    with PreemptionGuard() as guard:
        trainer = Trainer(config, workdir, model=model, params=params, pairs=pairs, mesh=mesh,
                          reference_params=reference_params, gaps=gaps, mode=mode, desc=desc, guard=guard,
                          evaluator=evaluator)
        trainer.restore()
        return trainer.run()
