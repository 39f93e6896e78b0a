"""Per-step metrics: ``metrics.jsonl`` and TensorBoard events in the workdir, and the run's
summary statistics read back from them."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable, Dict

import jax
import numpy as np

from sgpo_jax.console import say

__all__ = ["CLOSE_TIMEOUT_S", "FOLLOWER_METRICS", "MetricsLog", "close_within", "run_statistics"]

CLOSE_TIMEOUT_S = 30.0  # TensorBoard's writer may block in close() (seen: over 10 minutes after a Ctrl-C)


def close_within(close: Callable[[], None], timeout_s: float, what: str) -> bool:
    """Runs ``close()`` in a daemon thread and waits at most ``timeout_s`` seconds; returns whether
    it finished (if not, a line says so and the process may exit anyway: the thread is a daemon)."""
    thread = threading.Thread(target=close, name=f"close {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        say(f"{what} did not close within {timeout_s:g} s; its last events may be missing (metrics.jsonl is "
            "complete)")
        return False
    return True

FOLLOWER_METRICS = ("follower/value", "follower/dual", "follower/moved", "follower/transport")


class MetricsLog:
    """``metrics.jsonl`` (appended; one JSON object per step) and TensorBoard events, written by
    process 0 (the other processes' calls do nothing)."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        """Closes ``metrics.jsonl``, then the TensorBoard writer within :data:`CLOSE_TIMEOUT_S`."""
        if self.enabled:
            self._jsonl.close()
            close_within(self._tb.close, CLOSE_TIMEOUT_S, "the TensorBoard writer")


def run_statistics(metrics_path: Path, last_step: int) -> Dict[str, float]:
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
