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

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from ml_collections import ConfigDict

from sgpo_jax import annotate as annotate_lib
from sgpo_jax import eval as eval_lib
from sgpo_jax import distributed, sharding
from sgpo_jax.data import load_preferences
from sgpo_jax.data import split as split_lib
from sgpo_jax.data.tokenize import encode_prompts
from sgpo_jax.instructions import ASSETS_DIR, load_tasks
from sgpo_jax.models import Decoder

__all__ = ["config_problems", "run", "round_table"]

SELECTIONS = ("random", "fps", "fps_sum")
STRATEGIES = ("best_worst", "max_chosen")
REFERENCES = ("previous", "initial")
PROMPT_ACC, INSTRUCTION_ACC = "prompt_level_strict_acc", "instruction_level_strict_acc"


def config_problems(config: ConfigDict) -> List[str]:
    """The ``ssapo`` and ``eval`` settings' problems (empty when valid)."""
    s, problems = config.ssapo, []
    if not config.data.source:
        problems.append("data.source is empty: ssapo needs labeled seed pairs (a .json/.jsonl/.parquet file "
                        "or hub dataset)")
    if s.seed_size < 1:
        problems.append(f"ssapo.seed_size must be >= 1, got {s.seed_size}")
    if any(size < 1 for size in s.pool_sizes):
        problems.append(f"ssapo.pool_sizes must all be >= 1, got {tuple(s.pool_sizes)}")
    if s.seed_selection not in SELECTIONS:
        problems.append(f"ssapo.seed_selection must be one of {SELECTIONS}, got {s.seed_selection!r}")
    if not 0 <= s.seed_label_noise <= 1:
        problems.append(f"ssapo.seed_label_noise must be in [0, 1], got {s.seed_label_noise}")
    if s.strategy not in STRATEGIES:
        problems.append(f"ssapo.strategy must be one of {STRATEGIES}, got {s.strategy!r}")
    if s.reference not in REFERENCES:
        problems.append(f"ssapo.reference must be one of {REFERENCES}, got {s.reference!r}")
    if s.round_mode not in ("dpo", "sgpo"):
        problems.append(f"ssapo.round_mode must be 'dpo' or 'sgpo', got {s.round_mode!r}")
    if s.num_samples < 2:
        problems.append(f"ssapo.num_samples must be >= 2 (a pair needs two samples), got {s.num_samples}")
    if s.max_new_tokens < 1 or s.generation_batch_size < 1:
        problems.append("ssapo.max_new_tokens and ssapo.generation_batch_size must be >= 1")
    if s.seed_epochs < 1:
        problems.append(f"ssapo.seed_epochs must be >= 1, got {s.seed_epochs}")
    if config.eval.tasks and config.eval.tasks != "heldout" and not Path(config.eval.tasks).is_file():
        problems.append(f"eval.tasks: {config.eval.tasks}: no such file ('heldout' = the bundled tasks, '' = no eval)")
    if s.prompts and not Path(s.prompts).is_file():
        problems.append(f"ssapo.prompts: {s.prompts}: no such file")
    return problems


# ----------------------------------------------------------------------------------- files


def _write_text(path: Path, text: str) -> None:
    """Process 0 writes ``text`` atomically (a killed run leaves either the old file or the new
    one); every process calls it and returns once the file is written, so any host may read it
    next (the workdir is shared)."""
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    distributed.sync(f"wrote {path}")


def _as_seen_by_process_0(fn: Callable[[], Any]) -> Any:
    """``fn()`` evaluated on process 0 (e.g. which stages the workdir already holds), on every
    process: all of them then take the same branch, also where another host's view of the
    shared workdir lags."""
    return distributed.broadcast_object(fn() if jax.process_index() == 0 else None)


def _read_json(path: Path) -> Optional[Any]:
    """The JSON at ``path`` as process 0 reads it, or None where it does not exist."""
    return _as_seen_by_process_0(lambda: json.loads(path.read_text()) if path.exists() else None)


def _say(message: str) -> None:
    """Progress for the console, printed once (by process 0)."""
    if jax.process_index() == 0:
        print(message)


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(value, indent=2))


def _write_jsonl(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _seed_for(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts`` (stable across runs and hosts)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------- split


def _pool_prompts(config: ConfigDict) -> Optional[List[str]]:
    """The prompts of ``ssapo.prompts`` (a JSONL/JSON file with a ``prompt`` field), or None."""
    path = config.ssapo.prompts
    if not path:
        return None
    rows = _read_jsonl(Path(path)) if path.endswith(".jsonl") else json.loads(Path(path).read_text())
    prompts = []
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}: row {i}: field 'prompt' is missing or not a non-empty string")
        prompts.append(row["prompt"])
    return prompts


def make_split(config: ConfigDict, dataset, usable_rows: np.ndarray, model: Decoder, params: Any,
               tokenizer) -> Dict[str, Any]:
    """The seed rows, flipped rows and per-round prompt pools (see the module docstring)."""
    s, seed = config.ssapo, config.train.seed
    pool_prompts = _pool_prompts(config)
    embeddings = None
    if s.seed_selection != "random":
        conversations = [dataset[int(r)]["prompt"] for r in usable_rows]
        ids, mask = encode_prompts(tokenizer, conversations, max_prompt_length=config.data.max_prompt_length)
        embeddings = split_lib.last_token_hidden(model, params, ids, mask, batch_size=config.train.reference_batch_size)
    seed_pools = () if pool_prompts is not None else tuple(s.pool_sizes)
    seed_idx, pools, _ = split_lib.split_prompts(len(usable_rows), s.seed_size, seed_pools, seed=seed,
                                                 selection=s.seed_selection, embeddings=embeddings)
    seed_rows = usable_rows[np.asarray(seed_idx)]
    if pool_prompts is None:  # the conversations of the rows left after the seed, labels dropped
        prompts = [[dataset[int(usable_rows[i])]["prompt"] for i in pool] for pool in pools]
    else:
        _, pools, _ = split_lib.split_prompts(len(pool_prompts), 0, tuple(s.pool_sizes), seed=seed)
        prompts = [[pool_prompts[i] for i in pool] for pool in pools]
    flipped = split_lib.flip_labels(len(seed_rows), s.seed_label_noise, seed)
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


# ----------------------------------------------------------------------------------- stages


def _evaluate(config: ConfigDict, path: Path, model: Decoder, params: Any, tokenizer, tasks, generator: str):
    """Held-out pass rate (cached in ``path``); also writes the generations in AlpacaEval's format."""
    if not tasks:
        return None
    done = _read_json(path)
    if done is not None:
        return done
    e = config.eval
    result = eval_lib.evaluate_heldout(model, params, tokenizer, tasks, max_new_tokens=e.max_new_tokens,
                                       batch_size=e.batch_size, max_prompt_length=config.data.max_prompt_length,
                                       seed=config.train.seed)
    if jax.process_index() == 0:
        eval_lib.export_alpaca_eval([t.prompt for t in tasks], result["responses"], generator,
                                    path.with_name(path.stem + "_alpaca_eval.json"))
    _write_json(path, result)  # every process: it waits for the write
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

    stats, done = _as_seen_by_process_0(progress)
    if stats is not None:
        return out, stats
    if done:
        _say(f"round {round_index}: {done} of {num_batches} generation batches already done, continuing")
    if done < num_batches:
        annotate_lib.annotate(
            model, policy, initial, tokenizer, list(prompts), num_samples=s.num_samples, temperature=s.temperature,
            top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
            max_prompt_length=config.data.max_prompt_length, batch_size=size,
            seed=_seed_for(config.train.seed, round_index), strategy=s.strategy, beta=s.judge_beta or None,
            logps_chunk=config.model.logps_chunk, start_batch=done,
            on_batch=lambda b, rows, dropped: _write_jsonl(batch_file(b), rows + [{"dropped": d} for d in dropped]))
    rows, dropped = [], {}
    for b in range(num_batches):
        for row in _read_jsonl(batch_file(b)):
            if "dropped" in row:
                reason = row["dropped"]["reason"]
                dropped[reason] = dropped.get(reason, 0) + 1
            else:
                rows.append(row)
    if not rows:
        raise RuntimeError(f"round {round_index}: no prompt gave two distinct non-empty samples ({dropped}); "
                           "raise ssapo.temperature or ssapo.max_new_tokens")
    gaps = np.array([r["chosen_reward"] - r["rejected_reward"] for r in rows])
    stats = {"prompts": len(prompts), "pairs": len(rows), "dropped": sum(dropped.values()), "drop_reasons": dropped,
             "mean_gap": float(gaps.mean())}
    if dropped:
        _say(f"round {round_index}: {stats['dropped']} of {len(prompts)} prompts dropped: {dropped}")
    _write_jsonl(out, rows)
    _write_json(stats_path, stats)
    return out, stats


def round_table(rounds: Sequence[Dict[str, Any]]) -> str:
    """The per-round summary as a markdown table."""
    head = ("| round | pairs | mean reward gap | follower dual | moved mass | loss | reward acc | "
            "pass rate (prompt) | pass rate (instr.) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, spec=".4f": "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)
    for r in rounds:
        lines.append(f"| {r['round']} | {fmt(r.get('pairs'), 'd')} | {fmt(r.get('mean_gap'))} | "
                     f"{fmt(r.get('follower_dual'))} | {fmt(r.get('follower_moved'))} | {fmt(r.get('loss'))} | "
                     f"{fmt(r.get('accuracy'), '.3f')} | {fmt(r.get('pass_rate_prompt'), '.3f')} | "
                     f"{fmt(r.get('pass_rate_instruction'), '.3f')} |")
    return "\n".join(lines)


def _plots(directory: Path, rounds: Sequence[Dict[str, Any]], gap_sets: Dict[int, np.ndarray], config: ConfigDict,
           initial_eval: Optional[Dict[str, Any]]) -> List[str]:
    """``reward_gaps_round_t.png`` (the annotated centers and the follower's worst case) and
    ``eval.png`` (the held-out pass rates per round); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sgpo_jax.follower import worst_case

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    sg = config.sgpo
    for round_index, gaps in sorted(gap_sets.items()):
        centers = 1.0 / (1.0 + np.exp(-sg.annotation_scale * gaps))
        wc = worst_case(centers, sg.epsilon, loss=sg.loss if sg.space == "probability" else "tangents",
                        num_tangents=sg.num_tangents)
        shift, mass = (np.asarray(a, np.float64) for a in wc.atoms())
        positions = (centers[:, None] - shift).ravel()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        keep = mass.ravel() > 0
        lo, hi = min(centers.min(), positions[keep].min()), max(centers.max(), positions[keep].max())
        bins = np.linspace(lo - 1e-3, hi + 1e-3, 41)
        ax.hist(centers, bins=bins, alpha=0.6, log=True, label="annotated pairs (empirical)")
        ax.hist(positions[keep], bins=bins, weights=mass.ravel()[keep], histtype="step", linewidth=2, log=True,
                label=f"worst case, eps={sg.epsilon:g} (moved {float(np.mean(np.asarray(wc.moved))):.3f})")
        ax.set_xlabel(f"center sigmoid({sg.annotation_scale:g} x reward gap)")
        ax.set_ylabel("pairs")
        ax.set_title(f"round {round_index}: {len(gaps)} pairs, mean gap {gaps.mean():.3f}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"reward_gaps_round_{round_index}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    evals = ([("initial", {"pass_rate_prompt": initial_eval[PROMPT_ACC],
                            "pass_rate_instruction": initial_eval[INSTRUCTION_ACC]})] if initial_eval else []) + [
        (str(r["round"]), r) for r in rounds if r.get("pass_rate_prompt") is not None]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [name for name, _ in evals]
        ax.plot(labels, [e["pass_rate_prompt"] for _, e in evals], "o-", label="prompt-level")
        ax.plot(labels, [e["pass_rate_instruction"] for _, e in evals], "s--", label="instruction-level")
        ax.set_xlabel("after round")
        ax.set_ylabel("held-out pass rate")
        ax.set_ylim(0, 1)
        ax.legend()
        fig.tight_layout()
        path = directory / "eval.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


def _round_config(config: ConfigDict, round_index: int, *, epochs: int, learning_rate: float) -> ConfigDict:
    c = ConfigDict(config.to_dict())
    c.train.epochs, c.train.learning_rate, c.train.max_steps = epochs, learning_rate, -1
    if c.checkpoint.directory:
        c.checkpoint.directory = f"{c.checkpoint.directory.rstrip('/')}/round_{round_index}"
    return c


def run(config: ConfigDict, workdir: Path) -> Dict[str, Any]:
    """Runs (or resumes) the SSAPO loop in ``workdir``; returns the summary (also in
    ``workdir/summary.json``, with the table in ``summary.md``)."""
    from sgpo_jax.train import Preempted, export_policy, fit, load_model, load_pairs

    s = config.ssapo
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    cfg, initial, tokenizer = load_model(config.model)
    model = Decoder(cfg)
    initial = sharding.shard_params(initial, mesh)
    tasks = []
    if config.eval.tasks:
        tasks = load_tasks(ASSETS_DIR / "heldout.jsonl" if config.eval.tasks == "heldout" else config.eval.tasks)
        tasks = tasks[: config.eval.limit or None]

    d = config.data
    dataset = load_preferences(d.source, split=d.split, prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                               rejected_column=d.rejected_column)
    split_path = workdir / "split.json"
    split = _read_json(split_path)
    if split is None:
        seed_data = ConfigDict(d.to_dict())
        seed_data.limit = 0
        usable, _ = load_pairs(seed_data, tokenizer)
        split = make_split(config, dataset, np.sort(usable.rows), model, initial, tokenizer)
        _write_json(split_path, split)
    _say(f"ssapo: seed {len(split['seed_rows'])} pairs ({sum(split['flipped'])} labels flipped), "
          f"pools {[len(p) for p in split['pools']]}")

    initial_eval = _evaluate(config, workdir / "eval_initial.json", model, initial, tokenizer, tasks, "initial")
    if initial_eval:
        _say(f"initial model: held-out pass rate {initial_eval[PROMPT_ACC]:.3f} (prompt), "
              f"{initial_eval[INSTRUCTION_ACC]:.3f} (instruction)")

    rounds: List[Dict[str, Any]] = []
    gap_sets: Dict[int, np.ndarray] = {}
    round_data = ConfigDict(d.to_dict())
    round_data.limit, round_data.on_bad_row = 0, "skip"
    policy = initial
    sources: List[str] = []
    try:
        for t in range(len(split["pools"]) + 1):
            directory = workdir / f"round_{t}"
            row: Dict[str, Any] = {"round": t}
            if t == 0:
                seed_file = directory / "seed.jsonl"
                if not _as_seen_by_process_0(seed_file.exists):
                    _write_jsonl(seed_file, seed_rows_jsonl(dataset, split))
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
            evaluation = _evaluate(config, directory / "eval.json", model, policy, tokenizer, tasks, f"round_{t}")
            if evaluation:
                row.update(pass_rate_prompt=evaluation[PROMPT_ACC], pass_rate_instruction=evaluation[INSTRUCTION_ACC])
                _say(f"after round {t}: held-out pass rate {evaluation[PROMPT_ACC]:.3f} (prompt), "
                      f"{evaluation[INSTRUCTION_ACC]:.3f} (instruction)")
            rounds.append(row)
    except Preempted as stop:
        _say(str(stop))
        return {"preempted": True, "workdir": str(workdir), "rounds": rounds}

    table = round_table(rounds)
    summary: Dict[str, Any] = {"preempted": False, "workdir": str(workdir), "rounds": rounds, "initial_eval": (
        {"pass_rate_prompt": initial_eval[PROMPT_ACC], "pass_rate_instruction": initial_eval[INSTRUCTION_ACC]}
        if initial_eval else None)}
    if config.export:
        summary["export"] = export_policy(workdir, cfg, policy, tokenizer)  # every process (a collective)
    if jax.process_index() == 0:
        summary["plots"] = _plots(workdir / "plots", rounds, gap_sets, config, initial_eval)
    _write_text(workdir / "summary.md", table + "\n")
    _write_json(workdir / "summary.json", summary)
    _say(table)
    return summary
