r"""The command line: train a policy with DPO or SGPO, or run the SSAPO loop.

    python -m sgpo_jax.train --config=configs/llama.py --workdir=/ckpt/run1 \
        --config.train.mode=sgpo --config.sgpo.epsilon=0.01

This module holds the flags and the error formatting; the run itself is
:func:`sgpo_jax.runner.run` (``--dry_run``: :func:`sgpo_jax.runner.dry_run`). ``train.mode``:
``dpo`` / ``sgpo`` train once on ``data.source`` (:mod:`sgpo_jax.training.trainer`), ``ssapo``
runs the self-annotation loop (:mod:`sgpo_jax.ssapo.pipeline`). Rerunning the same command
with the same ``--workdir`` resumes exactly. Per step the workdir's ``metrics.jsonl`` and
TensorBoard events get: loss, TRL's reward metrics, grad norm, learning rate, tokens/s, and the
follower's value, dual price and moved mass. Run with ``--helpfull`` to list every flag; the
config fields are documented in ``sgpo_jax/config.py``.

Safety: one run per workdir (``workdir/run.lock``; a second process stops at once with exit
status 2). A rerun must have the first run's result-changing settings (``workdir/settings.json``;
else it refuses, listing them: pass ``--allow_config_change`` to continue anyway); raising
``train.max_steps`` or ``train.epochs`` continues the run. Checkpoints carry sha256 checksums:
a damaged one is moved aside and the run resumes from the newest sound one. A diverged or dead
run stops with one line (exit status 2) and nothing non-finite is saved or exported.

Exit status: 0 finished; 2 a user error (one ``error:`` line); 75 (EX_TEMPFAIL) stopped by
SIGTERM or Ctrl-C after saving (a checkpoint, or the finished batches of the reference pass):
rerun the same command to resume; 130 a second Ctrl-C (exits at once, keeping what was saved).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import jax

from sgpo_jax import runner
from sgpo_jax.config import check_keys
from sgpo_jax.console import say
from sgpo_jax.errors import UserError
from sgpo_jax.parallel import distributed

__all__ = ["EXIT_PREEMPTED", "cli", "define_flags", "main", "parse_flags", "user_error_lines"]

VERBOSE_ENV = "SGPO_VERBOSE"  # 1 = user errors keep their traceback (same as --verbose)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM / Ctrl-C after saving; rerun to resume


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
    flags.DEFINE_bool("allow_config_change", False, "Resume a workdir although result-changing settings differ "
                      "from its run's (workdir/settings.json; without it such a rerun refuses, listing them).")
    flags.DEFINE_bool("verbose", False, f"Show the full traceback of user errors (bad config, data, checkpoint, "
                      f"model source, memory) instead of one line; also {VERBOSE_ENV}=1.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    """The CLI body (after :func:`define_flags` and absl's flag parsing): starts
    ``jax.distributed`` when the flags or the environment describe several processes (SLURM, TPU
    pod, ``SGPO_*`` variables; see :mod:`sgpo_jax.parallel.distributed`), before anything touches
    a device, then trains. Every process of a multi-host run runs this same command; process 0
    writes the metrics, caches and export, all write their checkpoint shards. Exits with
    :data:`EXIT_PREEMPTED` (75) when a signal stopped the run after saving, 2 on a user error."""
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
        if flag.dry_run:
            runner.dry_run(flag.config, flag.workdir)
        elif runner.run(flag.config, flag.workdir, allow_config_change=flag.allow_config_change).get("preempted"):
            sys.exit(EXIT_PREEMPTED)
    except (UserError, FileNotFoundError) as err:
        if flag.verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            raise
        if jax.process_index() == 0:
            print("\n".join(user_error_lines(err)), file=sys.stderr)
        sys.exit(2)


def parse_flags(argv: List[str]) -> List[str]:
    """absl's flag parsing (``app.run``'s ``flags_parser``), with a flag error or an unknown
    ``--config.*`` key reported as a user error: one ``error: ...`` line, exit status 2 (the
    traceback with ``--verbose`` or ``SGPO_VERBOSE=1``)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError) as err:
        problem = _flag_problem(argv, err)
        if problem is None or "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            raise
        print("\n".join(user_error_lines(problem)), file=sys.stderr)
        sys.exit(2)


def _flag_problem(argv: List[str], err: Exception) -> Optional[UserError]:
    """The user error behind a failed flag parse: a bad flag value, or (ml_collections'
    ``KeyError``/``AttributeError``) an override naming no config field; None if neither."""
    from absl import flags
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    if isinstance(err, flags.Error):
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        text = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"  # e.g. a config file's exception
        return UserError(text, hint="--helpfull lists the flags" if len(lines) == 1 else
                         f"{VERBOSE_ENV}=1 shows the whole message")
    paths = [arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1]
             for i, arg in enumerate(argv) if arg.startswith("--config=") or (arg == "--config" and i + 1 < len(argv))]
    keys = [arg[len("--config."):].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    if not paths:
        return None
    try:
        check_keys(ConfigFileFlagParser("config").parse(paths[-1]), keys)
    except UserError as problem:
        return problem
    return None


def cli() -> None:
    """``python -m sgpo_jax.train``: flags, then :func:`main`."""
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
