r"""The SSAPO loop (``train.mode="ssapo"``): seed DPO, then rounds of generate -> judge ->
follower -> leader update, resumable at every stage.

Stages, each a file or directory in the workdir (a stage whose output exists is not redone;
killed at any moment, the same command continues where it stopped):

* ``split.json``: which rows of ``data.source`` form the seed (``ssapo.seed_size``; random, or
  farthest-point sampling on the initial model's last-layer last-token hidden states of the
  prompts with cosine distance, ``ssapo.seed_selection="fps"`` (classic max-min) or ``"fps_sum"``
  (the authors' sum of distances)), which seed labels are flipped (``ssapo.seed_label_noise``),
  and the prompts of each round's pool (``ssapo.pool_sizes``; from ``ssapo.prompts`` or, when that
  is empty, the prompts of the rows left after the seed, as the authors split UltraFeedback).
* ``eval_initial.json``: the held-out verifiable-instruction pass rate of the initial model.
* ``round_0/``: ``seed.jsonl`` (the seed pairs with flipped labels applied), ``train/`` (DPO from
  the initial model, ``ssapo.seed_epochs`` at ``ssapo.seed_learning_rate``), ``eval.json``.
* ``round_t/`` (t = 1..T): ``generations/batch_XXXXX.jsonl`` (``ssapo.generation_batch_size``
  prompts each, written atomically: a rerun skips finished batches and keeps every generated
  pair), ``pairs.jsonl`` (chosen/rejected with ``chosen_reward``/``rejected_reward``, the implicit
  reward :math:`\log\pi_{t-1}(y|x) - \log\pi_0(y|x)` of the current policy against the initial
  model), ``train/`` (``train.epochs`` of ``ssapo.round_mode`` from :math:`\pi_{t-1}` with the
  reference :math:`\pi_{t-1}` (``ssapo.reference="previous"``, the authors') or :math:`\pi_0`
  (``"initial"``); the follower per ``sgpo.follower``, the authors' being ``"annotation"``:
  centers :math:`\sigma(0.1\,\Delta r)` of the annotated reward gaps), ``eval.json``.
* ``summary.json``, ``summary.md`` (the per-round table) and ``plots/`` (reward-gap histogram
  with the worst-case distribution per round, eval metric per round).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from ml_collections import ConfigDict

from sgpo_jax.config import replaced
from sgpo_jax.console import say
from sgpo_jax.data.loading import load_preferences
from sgpo_jax.data.pairs import load_pairs
from sgpo_jax.data.split import make_split, seed_rows_jsonl
from sgpo_jax.errors import UserError
from sgpo_jax.eval.instructions import TaskEvaluator, eval_fields, export_alpaca_eval, pass_rate_text, task_evaluator
from sgpo_jax.models.llama import Decoder
from sgpo_jax.parallel import sharding
from sgpo_jax.ssapo import annotate as annotate_lib
from sgpo_jax.ssapo.report import plots, round_table
from sgpo_jax.training.checkpoint import latest_saved_step
from sgpo_jax.training.trainer import Preempted, fit
from sgpo_jax.training.workdir import as_seen_by_process_0, read_json, read_jsonl, write_json, write_jsonl, write_text

__all__ = ["LoopResult", "report", "resume_point", "round_checkpoints", "run"]


def _seed_for(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts`` (stable across runs and hosts)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------- stages


def _evaluate(path: Path, evaluator: Optional[TaskEvaluator], params: Any, step: int, generator: str):
    """Held-out pass rate (cached in ``path``); also writes the generations in AlpacaEval's format."""
    if evaluator is None:
        return None
    done = read_json(path)
    if done is not None:
        return done
    result = evaluator.evaluate(params, step)
    if jax.process_index() == 0:
        export_alpaca_eval([t.prompt for t in evaluator.tasks], result["responses"], generator,
                           path.with_name(path.stem + "_alpaca_eval.json"))
    write_json(path, result)  # every process: it waits for the write
    return result


def _annotate_round(config: ConfigDict, directory: Path, round_index: int, prompts: Sequence[str], model: Decoder,
                    policy: Any, initial: Any, tokenizer) -> Tuple[Path, Dict[str, Any]]:
    """Generation + self-annotation of one round's pool, batch by batch: each finished batch is
    written atomically to ``generations/``, and a rerun starts at the first missing batch (batch
    ``i`` draws only from ``(seed, i)``, so the rows equal an uninterrupted run's)."""
    s = config.ssapo
    out, stats_path = directory / "pairs.jsonl", directory / "annotation.json"
    size = s.generation_batch_size
    batch_file = lambda b: directory / "generations" / f"batch_{b:05d}.jsonl"
    num_batches = -(-len(prompts) // size)

    def progress():
        if out.exists() and stats_path.exists():
            return json.loads(stats_path.read_text()), num_batches
        done = 0
        while done < num_batches and batch_file(done).exists():
            done += 1
        return None, done

    stats, done = as_seen_by_process_0(progress)
    if stats is not None:
        return out, stats
    if done:
        say(f"round {round_index}: {done} of {num_batches} generation batches already done, continuing")
    if done < num_batches:
        annotate_lib.annotate(
            model, policy, initial, tokenizer, list(prompts), num_samples=s.num_samples, temperature=s.temperature,
            top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
            max_prompt_length=config.data.max_prompt_length, batch_size=size,
            seed=_seed_for(config.train.seed, round_index), strategy=s.strategy, beta=s.judge_beta or None,
            logps_chunk=config.model.logps_chunk, share_prompt=bool(config.data.prefix_sharing), start_batch=done,
            on_batch=lambda b, rows, dropped: write_jsonl(batch_file(b), rows + [{"dropped": d} for d in dropped]))
    rows, dropped = [], {}
    for b in range(num_batches):
        for row in read_jsonl(batch_file(b)):
            if "dropped" in row:
                reason = row["dropped"]["reason"]
                dropped[reason] = dropped.get(reason, 0) + 1
            else:
                rows.append(row)
    if not rows:
        raise UserError(f"round {round_index}: no prompt gave two distinct non-empty samples ({dropped})",
                        "raise --config.ssapo.temperature or --config.ssapo.max_new_tokens")
    gaps = np.array([r["chosen_reward"] - r["rejected_reward"] for r in rows])
    stats = {"prompts": len(prompts), "pairs": len(rows), "dropped": sum(dropped.values()), "drop_reasons": dropped,
             "mean_gap": float(gaps.mean())}
    if dropped:
        say(f"round {round_index}: {stats['dropped']} of {len(prompts)} prompts dropped: {dropped}")
    write_jsonl(out, rows)
    write_json(stats_path, stats)
    return out, stats


def _round_config(config: ConfigDict, round_index: int, *, epochs: int, learning_rate: float) -> ConfigDict:
    changes = {"train.epochs": epochs, "train.learning_rate": learning_rate, "train.max_steps": -1}
    if config.checkpoint.directory:
        changes["checkpoint.directory"] = round_checkpoints(config, Path(), round_index)
    return replaced(config, **changes)


def resume_point(config: ConfigDict, workdir: Path) -> Optional[str]:
    """Where a run in ``workdir`` continues, in words (stage, round, step, checkpoint), or None
    when it starts fresh. Reads the workdir only (process 0's view)."""
    if not (workdir / "split.json").exists():
        return None
    rounds = len(config.ssapo.pool_sizes) + 1
    if (workdir / "summary.md").exists():
        return f"finished: all {rounds} rounds are done (summary.md); nothing left to run"
    for t in range(rounds):
        directory = workdir / f"round_{t}"
        done = (directory / "eval.json") if config.eval.tasks else (workdir / f"round_{t + 1}")
        if done.exists():
            continue
        checkpoints = round_checkpoints(config, workdir, t)
        step = latest_saved_step(checkpoints)
        if step is not None:
            return f"round {t}: continuing after step {step} (checkpoint {checkpoints}/{step})"
        if t > 0 and not (directory / "pairs.jsonl").exists():
            batches = len(list((directory / "generations").glob("batch_*.jsonl")))
            size = config.ssapo.generation_batch_size
            total = -(-len(json.loads((workdir / "split.json").read_text())["pools"][t - 1]) // size)
            return f"round {t}: generation, {batches} of {total} batches already done"
        return f"round {t}: training from step 0"
    return f"round {rounds - 1}: evaluation and summary"


def round_checkpoints(config: ConfigDict, workdir: Path, round_index: int) -> str:
    """Round ``round_index``'s checkpoint directory."""
    directory = config.checkpoint.directory
    if directory:
        return f"{directory.rstrip('/')}/round_{round_index}"
    return str(workdir / f"round_{round_index}" / "train" / "checkpoints")


@dataclasses.dataclass
class LoopResult:
    """What the loop hands back to :func:`sgpo_jax.runner.run`: the final ``policy``, the
    ``summary`` (``preempted``, ``workdir``, ``rounds``, ``initial_eval``) and, for
    :func:`report`, the annotated reward gaps of each round ``[pairs_t]`` and the initial
    model's evaluation fields."""

    policy: Any
    summary: Dict[str, Any]
    gap_sets: Dict[int, np.ndarray]


def run(config: ConfigDict, workdir: Path, *, mesh, model: Decoder, initial: Any, tokenizer) -> LoopResult:
    """Runs (or resumes) the SSAPO loop in ``workdir`` from the ``initial`` policy: the stages up
    to the last round's evaluation (the runner exports the policy, then calls :func:`report`).
    Raises :class:`~sgpo_jax.training.trainer.Preempted` (with the finished rounds as its
    summary) after a SIGTERM."""
    s = config.ssapo
    initial = sharding.shard_params(initial, mesh)
    evaluator = task_evaluator(config, model, tokenizer)

    d = config.data
    dataset = load_preferences(d.source, split=d.split, prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                               rejected_column=d.rejected_column, score_columns=tuple(d.score_columns))
    split_path = workdir / "split.json"
    split = read_json(split_path)
    if split is None:
        usable, _ = load_pairs(replaced(config, **{"data.limit": 0}).data, tokenizer)
        split = make_split(config, dataset, np.sort(usable.rows), model, initial, tokenizer)
        write_json(split_path, split)
    say(f"ssapo: seed {len(split['seed_rows'])} pairs ({sum(split['flipped'])} labels flipped), "
          f"pools {[len(p) for p in split['pools']]}")

    initial_eval = _evaluate(workdir / "eval_initial.json", evaluator, initial, 0, "initial")
    initial_fields = eval_fields(initial_eval) if initial_eval else None
    if initial_fields:
        say(f"initial model: {pass_rate_text(initial_fields)}")

    rounds: List[Dict[str, Any]] = []
    gap_sets: Dict[int, np.ndarray] = {}
    round_data = replaced(config, **{"data.limit": 0, "data.on_bad_row": "skip"}).data
    policy = initial
    sources: List[str] = []
    try:
        for t in range(len(split["pools"]) + 1):
            directory = workdir / f"round_{t}"
            row: Dict[str, Any] = {"round": t}
            if t == 0:
                seed_file = directory / "seed.jsonl"
                if not as_seen_by_process_0(seed_file.exists):
                    write_jsonl(seed_file, seed_rows_jsonl(dataset, split))
                pairs, gaps = load_pairs(round_data, tokenizer, str(seed_file))
                round_config = _round_config(config, 0, epochs=s.seed_epochs,
                                             learning_rate=s.seed_learning_rate or config.train.learning_rate)
                result = fit(round_config, directory / "train", model=model, params=initial, pairs=pairs, mesh=mesh,
                             mode="dpo", desc="round 0 (seed DPO)")
            else:
                out, stats = _annotate_round(config, directory, t, split["pools"][t - 1], model, policy, initial,
                                             tokenizer)
                sources = (sources if s.reuse_data else []) + [str(out)]
                pairs, gaps = load_pairs(round_data, tokenizer, ",".join(sources))
                gap_sets[t] = gaps[~np.isnan(gaps)]
                reference = policy if s.reference == "previous" else initial
                round_config = _round_config(config, t, epochs=config.train.epochs,
                                             learning_rate=config.train.learning_rate)
                result = fit(round_config, directory / "train", model=model, params=policy, pairs=pairs, mesh=mesh,
                             reference_params=reference, gaps=gaps, mode=s.round_mode, desc=f"round {t} (SSAPO)")
                row.update(mean_gap=stats["mean_gap"], dropped=stats["dropped"])
            policy = result.params
            stats = result.summary
            row.update(pairs=stats["pairs"], loss=stats.get("mean_loss"), accuracy=stats.get("mean_accuracy"),
                       follower_dual=stats.get("follower/dual"), follower_moved=stats.get("follower/moved"))
            evaluation = _evaluate(directory / "eval.json", evaluator, policy, stats["step"], f"round_{t}")
            if evaluation:
                row.update(eval_fields(evaluation, initial_eval))
                say(f"after round {t}: {pass_rate_text(row)}")
            rounds.append(row)
    except Preempted as stop:
        raise Preempted(str(stop), {"preempted": True, "workdir": str(workdir), "rounds": rounds}) from None
    summary = {"preempted": False, "workdir": str(workdir), "rounds": rounds, "initial_eval": initial_fields}
    return LoopResult(policy=policy, summary=summary, gap_sets=gap_sets)


def report(config: ConfigDict, workdir: Path, loop: LoopResult) -> Optional[List[str]]:
    """The loop's last stage: ``summary.md`` (the per-round table, also printed) and the plots
    (``workdir/plots``; their paths are returned on process 0, None elsewhere)."""
    rounds, initial_fields = loop.summary["rounds"], loop.summary["initial_eval"]
    paths = None
    if jax.process_index() == 0:
        paths = plots(workdir / "plots", rounds, loop.gap_sets, config, initial_fields)
    table = round_table(rounds, initial_fields)
    write_text(workdir / "summary.md", table + "\n")
    say(table)
    return paths
