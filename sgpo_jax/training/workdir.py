"""The run directory shared by every host: process 0 decides, writes atomically and tells the
others.

With several processes every one of them must take the same branch (a stage that runs
collectives cannot be skipped on one host only), so what the workdir holds is read on process
0 and broadcast (another host's view of a shared disk may lag, or be a different disk); writes
are atomic (a killed run leaves the old file or the new one, never half of one) and every
process returns only once the file is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from sgpo_jax.parallel import distributed

__all__ = ["as_seen_by_process_0", "cached_arrays", "read_json", "read_jsonl", "write_file", "write_json",
           "write_jsonl", "write_text"]


def write_text(path: Path, text: str) -> None:
    """Process 0 writes ``text`` atomically; every process calls it and returns once the file is
    written, so any host may read it next."""
    if jax.process_index() == 0:
        write_file(path, text)
    distributed.sync(f"wrote {path}")


def write_file(path: Path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically from this process alone: a killed writer
    leaves the old file or the new one, never half of one; parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2))


def write_jsonl(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The rows of a JSONL file (this process's view; blank lines skipped)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def as_seen_by_process_0(fn: Callable[[], Any]) -> Any:
    """``fn()`` evaluated on process 0 (e.g. which stages the workdir already holds), on every
    process."""
    return distributed.broadcast_object(fn() if jax.process_index() == 0 else None)


def read_json(path: Path) -> Optional[Any]:
    """The JSON at ``path`` as process 0 reads it, or None where it does not exist."""
    return as_seen_by_process_0(lambda: json.loads(path.read_text()) if path.exists() else None)


def cached_arrays(path: Path, compute: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """The arrays saved at ``path`` (an ``.npz``), or ``compute()`` saved there by process 0.
    ``compute`` may run collectives: every process computes when process 0 found no file."""
    loaded = as_seen_by_process_0(lambda: _load_npz(path) if path.exists() else None)
    if loaded:
        return loaded
    arrays = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return arrays


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path) as f:
        return {name: f[name] for name in f.files}
