r"""One run path: what a config executes (:func:`plan`), and :func:`run`, which executes it, or
only checks it (``dry_run=True``).

Every way of running the library goes through :func:`run`: the CLI (``python -m
sgpo_jax.train``), the SSAPO loop, the dry run, the tests' rehearsals. A run is

1. the config validated (every problem at once) and the devices checked against the mesh and
   the batch sizes, before anything is loaded;
2. the set-up every mode shares (:class:`Setup`): the device mesh, the model and its tokenizer;
3. the stages of :func:`plan`: for ``train.mode`` ``dpo``/``sgpo``, the training pairs (and the
   held-out pairs, :mod:`sgpo_jax.data.holdout`) -> cached reference log-probs -> optimizer steps
   (:func:`sgpo_jax.training.trainer.fit`, with the held-out preference metrics of
   :mod:`sgpo_jax.eval.preference`) -> the held-out pass rate (``eval.tasks``,
   :mod:`sgpo_jax.eval.instructions`); for ``ssapo``, the loop of :mod:`sgpo_jax.ssapo.pipeline`;
4. the export of the final policy (``workdir/export``) and ``summary.json``.

The compiled programs a run executes are named in :attr:`RunPlan.programs`; a stage whose
output the workdir already holds is not redone, so rerunning the same command resumes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import jax
from ml_collections import ConfigDict

from sgpo_jax.config import check_devices, replaced, validate
from sgpo_jax.console import say
from sgpo_jax.data.batching import PairBatcher
from sgpo_jax.data.holdout import held_out
from sgpo_jax.data.pairs import load_pairs
from sgpo_jax.errors import UserError
from sgpo_jax.eval.instructions import eval_fields, pass_rate_text, task_evaluator
from sgpo_jax.eval.preference import PreferenceEvaluator
from sgpo_jax.models.llama import Decoder, DecoderConfig
from sgpo_jax.models.loading import export_policy, load_model
from sgpo_jax.models.lora import lora_config
from sgpo_jax.parallel import distributed
from sgpo_jax.parallel.mesh import make_mesh
from sgpo_jax.ssapo import pipeline
from sgpo_jax.training import memory
from sgpo_jax.training.checkpoint import latest_saved_step
from sgpo_jax.training.fingerprint import check_settings
from sgpo_jax.training.lock import WorkdirLock
from sgpo_jax.training.trainer import FitResult, Preempted, fit, total_steps
from sgpo_jax.training.workdir import read_json, write_json, write_text

__all__ = ["PROGRAMS", "RunPlan", "Setup", "dry_run", "plan", "resume_point", "run", "setup"]

# The compiled programs a run can execute, and what each computes (sgpo_jax.aot compiles them for
# a target the host does not have).
PROGRAMS = {
    "train_step": "the jitted, sharded optimizer step (policy forward/backward, follower, update)",
    "reference_logps": "the forward-only log-probs of the reference policy (cached once per run or round)",
    "sample": "the sampler of the self-annotation: prefill, the samples' repeat and the decode loop",
    "eval_generate": "the held-out evaluation's greedy generation",
}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a config executes, in order: ``stages`` (in words) and the compiled ``programs``
    (keys of :data:`PROGRAMS`)."""

    mode: str
    stages: Tuple[str, ...]
    programs: Tuple[str, ...]

    def lines(self) -> List[str]:
        return ([f"plan: train.mode={self.mode}, {len(self.stages)} stages"]
                + [f"  {i + 1}. {stage}" for i, stage in enumerate(self.stages)]
                + [f"programs: {', '.join(self.programs)}"])


def plan(config: ConfigDict) -> RunPlan:
    """The stages and programs ``config`` runs (nothing is loaded)."""
    t, s = config.train, config.ssapo
    evaluate = bool(config.eval.tasks)
    if t.mode != "ssapo":
        d = config.data
        stages = ["load and tokenize the pairs of data.source"]
        if d.eval_source:
            stages.append(f"load and tokenize the held-out pairs of data.eval_source ({d.eval_source})")
        elif d.eval_fraction:
            stages.append(f"hold out data.eval_fraction={d.eval_fraction} of the pairs (by a hash of the source row)")
        held = bool(d.eval_source or d.eval_fraction)
        stages.append("reference log-probs (cached in workdir/cache)" + (" of the training and held-out pairs"
                                                                          if held else ""))
        stages.append(f"train: {t.mode.upper()} steps with checkpoints every {config.checkpoint.every}"
                      + (f", held-out preference metrics (eval_*) every {t.eval_every} steps and at the end"
                         if held and t.eval_every else ", held-out preference metrics (eval_*) at the end"
                         if held else ""))
        programs = ("train_step", "reference_logps")
        if evaluate:
            stages.append(f"evaluate the final policy on the held-out tasks (eval.tasks={config.eval.tasks})")
            programs += ("eval_generate",)
    else:
        stages = ["split: seed pairs and the rounds' prompt pools (split.json)"]
        if evaluate:
            stages.append("evaluate the initial model on the held-out tasks")
        stages.append("round 0: DPO on the seed pairs" + (", then evaluate" if evaluate else ""))
        for r in range(1, len(s.pool_sizes) + 1):
            stages.append(f"round {r}: generate {s.num_samples} samples for each of {s.pool_sizes[r - 1]} prompts, "
                          f"self-annotate, {s.round_mode.upper()} on the pairs" + (", evaluate" if evaluate else ""))
        programs = ("train_step", "reference_logps", "sample") + (("eval_generate",) if evaluate else ())
    if config.export:
        stages.append("export the final policy (workdir/export, Hugging Face layout)")
    stages.append("summary.json" + (", summary.md and plots/" if t.mode == "ssapo" else ""))
    return RunPlan(mode=t.mode, stages=tuple(stages), programs=programs)


@dataclasses.dataclass
class Setup:
    """What every mode builds first: the device mesh, the model (config, module, initial
    parameters) and the tokenizer."""

    mesh: Any
    cfg: DecoderConfig
    model: Decoder
    params: Any
    tokenizer: Any


def setup(config: ConfigDict) -> Setup:
    """The mesh (``mesh.*``) and the model and tokenizer (``model.*``)."""
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    cfg, params, tokenizer = load_model(config.model)
    return Setup(mesh=mesh, cfg=cfg, model=Decoder(cfg), params=params, tokenizer=tokenizer)


def resume_point(config: ConfigDict, workdir: Path) -> Optional[str]:
    """Where a run in ``workdir`` continues (stage, round, step, checkpoint), in words, or None
    when it starts fresh."""
    if config.train.mode == "ssapo":
        return pipeline.resume_point(config, workdir)
    directory = config.checkpoint.directory or str(workdir / "checkpoints")
    step = latest_saved_step(directory)
    return None if step is None else f"training: continuing after step {step} (checkpoint {directory}/{step})"


def run(config: ConfigDict, workdir: str | Path, *, allow_config_change: bool = False) -> Dict[str, Any]:
    """Runs (or resumes) ``config`` in ``workdir``; returns the summary (also in
    ``workdir/summary.json``): ``preempted``, ``workdir`` and, by mode, the steps and last
    metrics (``dpo``/``sgpo``) or the per-round rows (``ssapo``), and ``export``.

    The workdir is locked for the run (:class:`~sgpo_jax.training.lock.WorkdirLock`); a rerun
    must have the first run's result-changing settings (:mod:`sgpo_jax.training.fingerprint`)
    unless ``allow_config_change``. A SIGTERM or Ctrl-C saves and returns with
    ``preempted=True`` (nothing is exported); rerunning the same call continues."""
    validate(config)
    check_devices(config, jax.device_count(), jax.process_count())
    workdir = Path(workdir)
    with WorkdirLock(workdir):
        return _run(config, workdir, allow_config_change)


def _run(config: ConfigDict, workdir: Path, allow_config_change: bool) -> Dict[str, Any]:
    point = distributed.broadcast_object(resume_point(config, workdir) if jax.process_index() == 0 else None)
    notes = check_settings(config, workdir, resuming=point is not None, allow_change=allow_config_change)
    say(f"resuming {workdir}: {'; '.join([point] + notes)}" if point else f"starting fresh in {workdir}")
    write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    ready = setup(config)
    try:
        adapters = None
        if config.train.mode == "ssapo":
            loop = pipeline.run(config, workdir, mesh=ready.mesh, model=ready.model, initial=ready.params,
                                tokenizer=ready.tokenizer)
            policy, summary = loop.policy, loop.summary
        else:
            result = _train(config, workdir, ready)
            policy, summary, adapters = result.params, result.summary, result.adapters
    except Preempted as stop:
        say(stop)
        summary = stop.summary
    else:
        if config.export:  # every process (a collective); LoRA adapters also in PEFT's layout (dpo/sgpo)
            summary["export"] = export_policy(workdir, ready.cfg, policy, ready.tokenizer, adapters=adapters,
                                              lora=lora_config(config.model), base_model=config.model.source)
        if config.train.mode == "ssapo":
            summary["plots"] = pipeline.report(config, workdir, loop)
    write_json(workdir / "summary.json", summary)
    return summary


def _train(config: ConfigDict, workdir: Path, ready: Setup) -> FitResult:
    """``train.mode`` ``dpo``/``sgpo``: one training run on ``data.source``, evaluated on the
    held-out pairs (summary ``eval``) and at the end on ``eval.tasks`` (``workdir/eval.json``;
    the summary's ``pass_rate_*`` fields)."""
    pairs, gaps = load_pairs(config.data, ready.tokenizer)
    split = held_out(config, ready.tokenizer, pairs, gaps)
    evaluator = None
    if split.eval is not None:
        say(split.line)
        evaluator = PreferenceEvaluator(config, split.eval, mesh=ready.mesh, held_out=split.line)
    result = fit(config, workdir, model=ready.model, params=ready.params, pairs=split.train, mesh=ready.mesh,
                 gaps=split.gaps, evaluator=evaluator)
    tasks = task_evaluator(config, ready.model, ready.tokenizer)
    if tasks is not None:
        step, path = result.summary["step"], workdir / "eval.json"
        evaluation = read_json(path)
        if evaluation is None or evaluation.get("step") != step:
            evaluation = {"step": step, **tasks.evaluate(result.params, step)}
            write_json(path, evaluation)  # every process: it waits for the write
        result.summary.update(eval_fields(evaluation))
        say(f"final policy: {pass_rate_text(result.summary)}")
    return result


def dry_run(config: ConfigDict, workdir: str | Path) -> List[str]:
    """The checks a user runs before a long job, without compiling a step: the config, the plan,
    the model source, the data (read and tokenized, with the bad-row report), the memory plan,
    the number of steps, and what a rerun of this workdir would resume from. Returns the
    report's lines (also printed)."""
    validate(config)
    check_devices(config, jax.device_count(), jax.process_count())
    workdir = Path(workdir)
    the_plan = plan(config)
    lines = ["config: valid", *the_plan.lines()]
    ready = setup(config)
    lines.append(f"model: {config.model.source} ({memory.param_count(ready.cfg) / 1e6:.1f}M parameters, "
                 f"{ready.cfg.num_hidden_layers} layers)")
    t = config.train
    data = replaced(config, **{"data.limit": 0}).data if t.mode == "ssapo" else config.data
    pairs, gaps = load_pairs(data, ready.tokenizer)
    lines.append(f"data: {len(pairs)} usable pairs from {data.source}")
    if t.mode == "ssapo":
        s = config.ssapo
        seed = min(s.seed_size, len(pairs))
        lines.append(f"ssapo: seed {seed} pairs, {len(s.pool_sizes)} rounds of {tuple(s.pool_sizes)} prompts")
        lines.append(f"steps: round 0: {s.seed_epochs * -(-seed // t.batch_size)}; round t: about "
                     f"{t.epochs} x pairs / {t.batch_size} (prompts without two distinct samples are dropped)")
    else:
        split = held_out(config, ready.tokenizer, pairs, gaps)
        if split.line:
            lines.append(split.line)
        per_epoch = PairBatcher(split.train, t.batch_size, buckets=tuple(config.data.buckets) or None, seed=t.seed,
                                process_index=jax.process_index(), process_count=jax.process_count()).steps_per_epoch
        lines.append(f"steps: {total_steps(t, per_epoch)} ({per_epoch} per epoch, batch {t.batch_size})")
    memory_plan = memory.plan_for_run(config, ready.cfg, dict(ready.mesh.shape))
    lines.append(f"memory plan per device ({memory.verdict(memory_plan, memory.device_memory_bytes())}):")
    lines.extend("  " + line for line in str(memory_plan).splitlines())
    point = resume_point(config, workdir)
    try:
        notes = check_settings(config, workdir, resuming=point is not None, record=False)
    except UserError as err:
        notes = [f"REFUSED: {err}"]
    lines.append(f"rerun: {'; '.join([point] + notes)}" if point else f"rerun: starts fresh in {workdir}")
    for line in lines:
        say(line)
    return lines
