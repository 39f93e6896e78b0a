"""Checkpoints with orbax: periodic, final and on-preemption saves; exact, resharding resume.

A checkpoint holds the training state's arrays (``step``, ``params``, ``opt_state``, ``rng``) and a
JSON ``meta`` dict (data position, settings fingerprint, anything the loop needs to continue
exactly). Restoring takes a *target* state whose arrays carry the shardings wanted now, so a run
saved on one mesh (or host count) resumes on another: orbax reads each shard where it belongs.

Multi-host: every process constructs the :class:`Checkpointer` on the same *shared* directory
(a network file system path mounted at the same place on every host, or ``gs://bucket/path``
with tensorstore's GCS driver) and calls :meth:`~Checkpointer.save` / :meth:`~Checkpointer.restore`
at the same steps: each process writes (and reads) only the shards its devices hold, process 0
writes the metadata and commits the step. Local paths are made absolute (orbax's OCDBT
format needs that once several processes write); ``gs:/bucket`` (what ``pathlib.Path`` makes
of ``gs://bucket``) is read as ``gs://bucket``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "PreemptionGuard", "checkpoint_path", "latest_saved_step", "state_arrays"]


def state_arrays(state: Any) -> Dict[str, Any]:
    """The savable part of a :class:`sgpo_jax.core.step.TrainState` (no functions, no config)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def checkpoint_path(directory: str | Path) -> str:
    """``directory`` as orbax needs it: URLs (``gs://``, ``s3://``, also when ``pathlib`` collapsed
    the ``//``) kept as URLs, local paths made absolute."""
    text = os.fspath(directory)
    match = re.match(r"^([a-z][a-z0-9+.-]*):/+(.*)$", text)
    if match and match.group(1) not in ("file",) and len(match.group(1)) > 1:  # "C:/..." is a path
        return f"{match.group(1)}://{match.group(2)}"
    if match and match.group(1) == "file":
        text = "/" + match.group(2)
    return os.path.abspath(os.path.expanduser(text))


def _abstract(tree: Any) -> Any:
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def latest_saved_step(directory: str | Path) -> Optional[int]:
    """The newest committed step under ``directory`` without creating anything there (a local
    directory's numbered step folders; a URL asks orbax), or None."""
    path = checkpoint_path(directory)
    if "://" in path:
        manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
        return manager.latest_step()
    if not os.path.isdir(path):
        return None
    steps = [int(name) for name in os.listdir(path) if name.isdigit() and os.path.isdir(os.path.join(path, name))]
    return max(steps) if steps else None


class Checkpointer:
    """Orbax ``CheckpointManager`` over ``directory`` (local path or ``gs://``; see the module
    docstring for several hosts).

    ``save_every`` steps (plus whatever ``save(..., force=True)`` asks), keeping the newest
    ``max_to_keep``. Saves are asynchronous; :meth:`wait` blocks until they are on disk.
    """

    def __init__(self, directory: str | Path, *, save_every: int, max_to_keep: Optional[int] = 3,
                 async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = checkpoint_path(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: Dict[str, Any], *, force: bool = False) -> bool:
        """Saves at ``step`` if it is a multiple of ``save_every`` or ``force``; returns whether it did."""
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state_arrays(state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, target_state: Any, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
        """Restores ``step`` (default: latest) into the structure, dtypes and shardings of
        ``target_state``; returns ``(state, meta)``.

        The saved run's mesh and process count do not matter: every array is read from the
        stored global array into ``target_state``'s sharding (each process reading the slices
        its devices hold), so e.g. a run saved by 2 hosts on ``(data=2, fsdp=2, tensor=2)``
        resumes on one host with ``fsdp=8``. The structure and shapes must match (same model
        and optimizer); a mismatch raises orbax's error naming the tree path."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(state_arrays(target_state))), meta=ocp.args.JsonRestore()
            ),
        )
        arrays = restored["state"]
        state = target_state.replace(
            step=arrays["step"], params=arrays["params"], opt_state=arrays["opt_state"], rng=arrays["rng"]
        )
        return state, dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionGuard:
    """Context manager: while active, SIGTERM (preemption notice) sets :attr:`requested` instead
    of killing the process, so the loop can save and exit cleanly. The previous handler is
    restored on exit. Only installable from the main thread (elsewhere it just never fires)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
