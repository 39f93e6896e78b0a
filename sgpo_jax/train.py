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
from pathlib import Path
from typing import Any, Dict

import jax
from ml_collections import ConfigDict

from sgpo_jax.config import validate
from sgpo_jax.console import say
from sgpo_jax.data.pairs import load_pairs
from sgpo_jax.models.llama import Decoder
from sgpo_jax.models.loading import export_policy, load_model
from sgpo_jax.parallel import distributed
from sgpo_jax.parallel.mesh import make_mesh
from sgpo_jax.ssapo import pipeline
from sgpo_jax.training.trainer import Preempted, fit

__all__ = ["cli", "main", "train"]


def train(config: ConfigDict, workdir: str | Path) -> Dict[str, Any]:
    """Validates the config, then runs (or resumes) training in ``workdir``; returns a summary
    dict (steps, last metrics, paths; also in ``workdir/summary.json``)."""
    validate(config)
    workdir = Path(workdir)
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
        summary["export"] = export_policy(workdir, cfg, result.params, tokenizer)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def define_flags() -> None:
    """Registers the CLI's flags (once; :func:`cli` calls it)."""
    from absl import flags
    from ml_collections import config_flags

    if "workdir" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config", None, "Training config file (e.g. configs/llama.py); override fields with --config.group.field=value.")
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
    train(flag.config, flag.workdir)


def cli() -> None:
    """``python -m sgpo_jax.train``: flags, then :func:`main`."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
