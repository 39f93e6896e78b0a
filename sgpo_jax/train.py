r"""The command line: train a policy with DPO or SGPO, or run the SSAPO loop.

    python -m sgpo_jax.train --config=configs/llama.py --workdir=/ckpt/run1 \
        --config.train.mode=sgpo --config.sgpo.epsilon=0.01

``train.mode``: ``dpo`` / ``sgpo`` train once on ``data.source``
(:mod:`sgpo_jax.training.trainer`), ``ssapo`` runs the self-annotation loop
(:mod:`sgpo_jax.ssapo.pipeline`). Rerunning the same command with the same ``--workdir``
resumes exactly. Per step the workdir's ``metrics.jsonl`` and TensorBoard events get: loss,
TRL's reward metrics, grad norm, learning rate, tokens/s, and the follower's value, dual price
and moved mass. Run with ``--helpfull`` to list every flag; the config fields are documented in
``sgpo_jax/config.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import jax
from ml_collections import ConfigDict

from sgpo_jax.config import validate
from sgpo_jax.console import say
from sgpo_jax.data.batching import PairBatcher
from sgpo_jax.data.pairs import load_pairs
from sgpo_jax.errors import UserError
from sgpo_jax.models.llama import Decoder
from sgpo_jax.models.loading import export_policy, load_model
from sgpo_jax.models.lora import lora_config
from sgpo_jax.parallel import distributed
from sgpo_jax.parallel.mesh import make_mesh
from sgpo_jax.ssapo import pipeline
from sgpo_jax.training import memory
from sgpo_jax.training.checkpoint import latest_saved_step
from sgpo_jax.training.trainer import Preempted, fit

__all__ = ["cli", "dry_run", "main", "resume_point", "train", "user_error_lines"]

VERBOSE_ENV = "SGPO_VERBOSE"  # 1 = user errors keep their traceback (same as --verbose)


def resume_point(config: ConfigDict, workdir: Path) -> Optional[str]:
    """Where a run in ``workdir`` continues (stage, round, step, checkpoint), or None when it
    starts fresh."""
    if config.train.mode == "ssapo":
        return pipeline.resume_point(config, workdir)
    directory = config.checkpoint.directory or str(workdir / "checkpoints")
    step = latest_saved_step(directory)
    return None if step is None else f"training: continuing after step {step} (checkpoint {directory}/{step})"


def _announce(config: ConfigDict, workdir: Path) -> None:
    point = resume_point(config, workdir) if jax.process_index() == 0 else None
    say(f"resuming {workdir}: {point}" if point else f"starting fresh in {workdir}")


def train(config: ConfigDict, workdir: str | Path) -> Dict[str, Any]:
    """Validates the config, then runs (or resumes) training in ``workdir``; returns a summary
    dict (steps, last metrics, paths; also in ``workdir/summary.json``)."""
    validate(config)
    workdir = Path(workdir)
    _announce(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    if config.train.mode == "ssapo":
        return pipeline.run(config, workdir)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    cfg, params, tokenizer = load_model(config.model)
    pairs, gaps = load_pairs(config.data, tokenizer)
    try:
        result = fit(config, workdir, model=Decoder(cfg), params=params, pairs=pairs, mesh=mesh, gaps=gaps)
    except Preempted as stop:
        say(stop)
        summary = stop.summary
    else:
        summary = result.summary
    if config.export and not summary["preempted"]:
        summary["export"] = export_policy(workdir, cfg, result.params, tokenizer, adapters=result.adapters,
                                          lora=lora_config(config.model), base_model=config.model.source)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def dry_run(config: ConfigDict, workdir: str | Path) -> List[str]:
    """The checks a user runs before a long job, without compiling a step: the config, the model
    source, the data (read and tokenized, with the bad-row report), the memory plan, the number
    of steps, and what a rerun of this workdir would resume from. Returns the report's lines
    (also printed)."""
    validate(config)
    workdir = Path(workdir)
    lines = ["config: valid"]
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    cfg, _, tokenizer = load_model(config.model)
    lines.append(f"model: {config.model.source} ({memory.param_count(cfg) / 1e6:.1f}M parameters, "
                 f"{cfg.num_hidden_layers} layers)")
    data = ConfigDict(config.data.to_dict())
    t = config.train
    if t.mode == "ssapo":
        data.limit = 0
    pairs, _ = load_pairs(data, tokenizer)
    lines.append(f"data: {len(pairs)} usable pairs from {data.source}")
    if t.mode == "ssapo":
        s = config.ssapo
        seed = min(s.seed_size, len(pairs))
        lines.append(f"ssapo: seed {seed} pairs, {len(s.pool_sizes)} rounds of {tuple(s.pool_sizes)} prompts")
        lines.append(f"steps: round 0: {s.seed_epochs * -(-seed // t.batch_size)}; round t: about "
                     f"{t.epochs} x pairs / {t.batch_size} (prompts without two distinct samples are dropped)")
    else:
        per_epoch = PairBatcher(pairs, t.batch_size, buckets=tuple(config.data.buckets) or None, seed=t.seed,
                                process_index=jax.process_index(), process_count=jax.process_count()).steps_per_epoch
        total = t.max_steps if t.max_steps > 0 else t.epochs * per_epoch
        lines.append(f"steps: {total} ({per_epoch} per epoch, batch {t.batch_size})")
    plan = memory.plan_for_run(config, cfg, dict(mesh.shape))
    device_bytes = memory.device_memory_bytes()
    if device_bytes is None:
        fits = "device memory unknown (CPU)"
    else:
        verdict = "fits" if plan.total <= 0.92 * device_bytes else "does NOT fit"
        fits = f"{verdict} {memory.format_bytes(device_bytes)} per device"
    lines.append(f"memory plan per device ({fits}):")
    lines.extend("  " + line for line in str(plan).splitlines())
    point = resume_point(config, workdir)
    lines.append(f"rerun: {point}" if point else f"rerun: starts fresh in {workdir}")
    for line in lines:
        say(line)
    return lines


def user_error_lines(err: BaseException) -> List[str]:
    """The CLI's report of a user error: ``error: ...`` on one line, then at most one hint line."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    head, *items = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
    items = [item[2:] if item.startswith("- ") else item for item in items]  # a listed config problem each
    lines = [f"error: {head}" + (" " + "; ".join(items) if items else "")]
    hint = getattr(err, "hint", "")
    if hint:
        lines.append(f"hint: {hint}")
    return lines


def define_flags() -> None:
    """Registers the CLI's flags (once; :func:`cli` calls it)."""
    from absl import flags
    from ml_collections import config_flags

    if "workdir" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config", None,
        "Training config file (e.g. configs/llama.py); override fields with --config.group.field=value.")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, cache, export. "
                        "Rerun with the same workdir to resume.")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator (default: "
                        "SGPO_COORDINATOR, SLURM's first node, or TPU pod metadata). Unset with one process.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes (default: SGPO_NUM_PROCESSES, "
                         "SLURM_NTASKS, or TPU pod metadata).")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's id in [0, num_processes) (default: "
                         "SGPO_PROCESS_ID, SLURM_PROCID, or TPU pod metadata).")
    flags.DEFINE_list("local_device_ids", None, "Multi-host: the local accelerator ids this process drives (default: "
                      "all; SLURM with one task per GPU: SLURM_LOCALID).")
    flags.DEFINE_bool("dry_run", False, "Validate the config, read and tokenize the data, print the memory plan, the "
                      "number of steps and what a rerun would resume from; then exit without compiling.")
    flags.DEFINE_bool("verbose", False, f"Show the full traceback of user errors (bad config, data, checkpoint, "
                      f"model source, memory) instead of one line; also {VERBOSE_ENV}=1.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    """The CLI body (after :func:`define_flags` and absl's flag parsing): starts
    ``jax.distributed`` when the flags or the environment describe several processes (SLURM, TPU
    pod, ``SGPO_*`` variables; see :mod:`sgpo_jax.parallel.distributed`), before anything touches
    a device, then trains. Every process of a multi-host run runs this same command; process 0
    writes the metrics, caches and export, all write their checkpoint shards."""
    from absl import flags, logging

    del argv
    flag = flags.FLAGS
    if not flag["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax's and XLA's INFO lines off the console
    local_ids = flag.local_device_ids
    spec = distributed.initialize(coordinator_address=flag.coordinator_address, num_processes=flag.num_processes,
                                  process_id=flag.process_id,
                                  local_device_ids=[int(i) for i in local_ids] if local_ids else None)
    if spec.multi_process:
        say(f"jax.distributed: {jax.process_count()} processes ({spec.source}), {jax.device_count()} devices "
            f"({jax.local_device_count()} per process)")
    try:
        (dry_run if flag.dry_run else train)(flag.config, flag.workdir)
    except (UserError, FileNotFoundError) as err:
        if flag.verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            raise
        if jax.process_index() == 0:
            print("\n".join(user_error_lines(err)), file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """``python -m sgpo_jax.train``: flags, then :func:`main`."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
