"""What an SSAPO run reports: the per-round table (``summary.md``) and the plots (``plots/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from sgpo_jax.config import sgpo_config
from sgpo_jax.core.follow import follow
from sgpo_jax.ssapo.eval import INSTRUCTION_ACC, PROMPT_ACC

__all__ = ["plots", "round_table"]


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


def plots(directory: Path, rounds: Sequence[Dict[str, Any]], gap_sets: Dict[int, np.ndarray], config: ConfigDict,
           initial_eval: Optional[Dict[str, Any]]) -> List[str]:
    """``reward_gaps_round_t.png`` (the annotated centers and the follower's worst case) and
    ``eval.png`` (the held-out pass rates per round); returns the paths written."""
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
