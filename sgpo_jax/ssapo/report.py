"""What an SSAPO run reports: the per-round table (``summary.md``) and the plots (``plots/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from sgpo_jax.config import sgpo_config
from sgpo_jax.core.follow import follow

__all__ = ["plots", "round_table"]


def round_table(rounds: Sequence[Dict[str, Any]], initial: Optional[Dict[str, Any]] = None) -> str:
    """The per-round summary as a markdown table: ``initial`` (the
    :func:`sgpo_jax.eval.instructions.eval_fields` of the initial model) is its first row; below the
    table, which rounds' pass rates differ from the initial model's beyond noise."""
    head = ("| round | pairs | mean reward gap | follower dual | moved mass | loss | reward acc | "
            "pass rate (prompt) [95% CI] | pass rate (instr.) [95% CI] | vs initial (prompt) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, spec=".4f": "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)

    def rate(r, key):
        if r.get(key) is None:
            return "-"
        lo, hi = r[key + "_ci95"]
        return f"{r[key]:.3f} [{lo:.2f}, {hi:.2f}]"

    def versus(r):
        c = r.get("vs_initial")
        return "-" if c is None else f"{c['change']:+.3f} (+{c['gained']}/-{c['lost']}, p={c['p_value']:.2f})"

    rows = ([{"round": "initial", **initial}] if initial else []) + list(rounds)
    for r in rows:
        lines.append(f"| {r['round']} | {fmt(r.get('pairs'), 'd')} | {fmt(r.get('mean_gap'))} | "
                     f"{fmt(r.get('follower_dual'))} | {fmt(r.get('follower_moved'))} | {fmt(r.get('loss'))} | "
                     f"{fmt(r.get('accuracy'), '.3f')} | {rate(r, 'pass_rate_prompt')} | "
                     f"{rate(r, 'pass_rate_instruction')} | {versus(r)} |")
    compared = [r for r in rounds if r.get("vs_initial") is not None]
    if compared:
        tasks = compared[0]["eval_tasks"]
        differ = [str(r["round"]) for r in compared if r["vs_initial"]["significant"]]
        verdict = (f"Round(s) {', '.join(differ)} differ from the initial model at p < 0.05" if differ else
                   "No round differs from the initial model at p < 0.05: every change is within noise")
        lines += ["", f"Pass rates: the verifiable-instruction pass rate (IFEval-style, strict) on {tasks} held-out "
                      "tasks with 95% Wilson intervals; vs initial: the change of the prompt-level rate on the same "
                      f"tasks (+gained/-lost prompts) and the exact McNemar test's p. {verdict}."]
    return "\n".join(lines)


def plots(directory: Path, rounds: Sequence[Dict[str, Any]], gap_sets: Dict[int, np.ndarray], config: ConfigDict,
           initial: Optional[Dict[str, Any]]) -> List[str]:
    """``reward_gaps_round_t.png`` (the annotated centers and the follower's worst case) and
    ``eval.png`` (the held-out pass rates per round with their 95% intervals; ``initial``: the
    :func:`sgpo_jax.eval.instructions.eval_fields` of the initial model); returns the paths
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    sg = config.sgpo
    for round_index, gaps in sorted(gap_sets.items()):
        f = follow(jnp.asarray(gaps), sgpo_config(config, mode="sgpo"), scale=sg.annotation_scale)
        centers = np.asarray(f.centers, np.float64)
        shift, mass = (np.asarray(a, np.float64) for a in (f.shift, f.mass))
        positions = (centers[:, None] - shift).ravel()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        keep = mass.ravel() > 0
        lo, hi = min(centers.min(), positions[keep].min()), max(centers.max(), positions[keep].max())
        bins = np.linspace(lo - 1e-3, hi + 1e-3, 41)
        ax.hist(centers, bins=bins, alpha=0.6, log=True, label="annotated pairs (empirical)")
        ax.hist(positions[keep], bins=bins, weights=mass.ravel()[keep], histtype="step", linewidth=2, log=True,
                label=f"worst case, eps={sg.epsilon:g} (moved {float(f.metrics['follower/moved']):.3f})")
        ax.set_xlabel(f"center sigmoid({sg.annotation_scale:g} x reward gap)")
        ax.set_ylabel("pairs")
        ax.set_title(f"round {round_index}: {len(gaps)} pairs, mean gap {gaps.mean():.3f}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"reward_gaps_round_{round_index}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    evals = ([("initial", initial)] if initial else []) + [
        (str(r["round"]), r) for r in rounds if r.get("pass_rate_prompt") is not None]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(len(evals))
        for key, style, offset, label in (("pass_rate_prompt", "o-", -0.05, "prompt-level"),
                                          ("pass_rate_instruction", "s--", 0.05, "instruction-level")):
            rate = np.array([e[key] for _, e in evals])
            ci = np.array([e[key + "_ci95"] for _, e in evals])
            ax.errorbar(x + offset, rate, yerr=[rate - ci[:, 0], ci[:, 1] - rate], fmt=style, capsize=3,
                        label=f"{label} (95% CI)")
        ax.set_xticks(x, [name for name, _ in evals])
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
