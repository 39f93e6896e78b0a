"""Per-step metrics: ``metrics.jsonl`` and TensorBoard events in the workdir, and the run's
summary statistics read back from them.

A run stopped mid-write (kill -9, power loss) can leave a torn last line in ``metrics.jsonl``: it
is dropped, with a line on the console naming the file, before the log is appended to again
(:func:`repair_metrics`) and when it is read (:func:`read_metrics`). Any other line that is not
a step's JSON object is an error naming the file and line: nothing else is skipped."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np

from sgpo_jax.console import say
from sgpo_jax.errors import CheckpointError

__all__ = ["CLOSE_TIMEOUT_S", "FOLLOWER_METRICS", "MetricsLog", "close_within", "read_metrics", "repair_metrics",
           "run_statistics"]

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

            repair_metrics(Path(workdir) / "metrics.jsonl")
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
    for row in read_metrics(metrics_path):
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


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The records of ``metrics.jsonl``, in file order; a torn last line is dropped with a line
    saying so.

    Raises:
      CheckpointError: naming the file and line, for a line before the last that is not a step's
        JSON object (an object with an integer ``"step"``).
    """
    lines, torn = _parse(path, path.read_bytes())
    if torn is not None:
        say(_dropped(path, torn))
    return [record for _, record in lines]


def repair_metrics(path: Path) -> None:
    """Prepares ``metrics.jsonl`` for appending: drops a torn last line (saying so), and ends a
    complete last line that lacks its newline, so that the next record starts on a line of its
    own. Raises :class:`CheckpointError` as :func:`read_metrics` does."""
    if not path.exists():
        return
    data = path.read_bytes()
    _, torn = _parse(path, data)
    if torn is not None:
        say(_dropped(path, torn))
        with open(path, "r+b") as f:
            f.truncate(torn[1])
    elif data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")


def _parse(path: Path, data: bytes) -> Tuple[List[Tuple[int, Dict[str, Any]]], Optional[Tuple[int, int, bytes]]]:
    """``([(line number, record)], torn)``: ``torn`` is ``(line number, byte offset, text)`` of an
    unparseable last line, else None."""
    records, offset, torn = [], 0, None
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if line.strip():
            record, problem = _record(line)
            if problem is None:
                records.append((i + 1, record))
            elif i == last:
                torn = (i + 1, offset, line)
            else:
                raise CheckpointError(
                    f"{path}, line {i + 1}: {problem}; only a torn last line (a run stopped mid-write) is "
                    "dropped", hint="fix or delete that line: metrics.jsonl feeds only the summary statistics")
        offset += len(line) + 1
    return records, torn


def _record(line: bytes) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """``(record, None)`` for a step's JSON object, else ``(None, why not)``."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte {err.start + 1} of the line)"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg}: column {err.colno})"
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return None, "not a JSON object with an integer 'step'"
    return record, None


def _dropped(path: Path, torn: Tuple[int, int, bytes]) -> str:
    number, _, text = torn
    shown = text[:60].decode("utf-8", "replace") + ("..." if len(text) > 60 else "")
    return f"metrics: dropped the torn last line {number} of {path} (a run stopped mid-write): {shown!r}"
