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

Verification: after orbax commits a step, process 0 records the sha256 of every file of a local
step directory in ``<step>/checksums.sha256`` (``sha256sum -c`` reads it); restore checks them.
A step that is empty, misses a file, fails its checksums, cannot be read (when unrecorded) or
holds non-finite values is moved aside to ``<step>.corrupt`` with one line saying so, and the
next older step is tried. Orbax 0.12 has no checksums of its own; ``gs://`` directories rely on
its commit protocol only. :meth:`Checkpointer.save` refuses a state with a non-finite value
(:class:`NonFiniteState`), so every step written is finite.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax import Array

from sgpo_jax.console import say
from sgpo_jax.parallel import distributed

__all__ = ["CHECKSUMS", "Checkpointer", "NonFiniteState", "Preempted", "PreemptionGuard", "all_finite",
           "checkpoint_path", "latest_saved_step", "set_aside", "state_arrays", "verify_step", "write_checksums"]

CHECKSUMS = "checksums.sha256"  # in each local step directory: "<sha256>  <relative path>" per file


class NonFiniteState(Exception):
    """:meth:`Checkpointer.save` was given a state with a NaN or infinite value (never written)."""


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; the run kept what it had (a checkpoint, the finished batches of
    a forward pass) and stopped (``summary`` as :func:`sgpo_jax.training.trainer.fit`'s).
    Rerunning the same command resumes it."""

    def __init__(self, message: str, summary: Dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@jax.jit
def _leaves_finite(leaves: List[Array]) -> Array:
    """One reduction over all leaves, jitted once per tree layout (not once per checkpoint)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (one jitted reduction on device)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return True
    return bool(_leaves_finite(leaves))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(step_dir: Path) -> List[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: str | Path) -> None:
    """Records the sha256 of every file under ``step_dir`` in ``step_dir/checksums.sha256``
    (written atomically; files hashed in parallel threads)."""
    step_dir = Path(step_dir)
    names = _files(step_dir)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        digests = list(pool.map(lambda name: _sha256(step_dir / name), names))
    tmp = step_dir / (CHECKSUMS + ".tmp")
    tmp.write_text("".join(f"{d}  {name}\n" for d, name in zip(digests, names)))
    os.replace(tmp, step_dir / CHECKSUMS)


def verify_step(step_dir: str | Path) -> Tuple[Optional[str], bool]:
    """``(problem, recorded)`` of a local step directory: ``problem`` is None when it is sound
    (every recorded file present with its sha256) or says what is wrong (empty, a file missing or
    changed); ``recorded`` says whether checksums were recorded (a step committed just before
    its run was killed has none: it can only be checked by reading it)."""
    step_dir = Path(step_dir)
    names = _files(step_dir)
    if not names:
        return "empty step directory", False
    record = step_dir / CHECKSUMS
    if not record.exists():
        return None, False
    expected = dict(reversed(line.split("  ", 1)) for line in record.read_text().splitlines() if line.strip())
    for name, digest in sorted(expected.items()):
        if not (step_dir / name).is_file():
            return f"file {name} is missing", True
        if _sha256(step_dir / name) != digest:
            return f"file {name} does not match its recorded sha256 (changed or truncated)", True
    return None, True


def set_aside(step_dir: str | Path) -> Path:
    """Renames ``step_dir`` to ``<step_dir>.corrupt`` (``.corrupt2``, ... when taken); returns the
    new path. Orbax ignores the non-numeric name, and nothing is deleted."""
    step_dir = Path(step_dir)
    target, n = step_dir.with_name(step_dir.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}.corrupt{n}")
    os.replace(step_dir, target)
    return target


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
    steps = [int(name) for name in os.listdir(path) if name.isdigit() and os.path.isdir(os.path.join(path, name))
             and os.listdir(os.path.join(path, name))]  # an empty step directory is no checkpoint
    return max(steps) if steps else None


class Checkpointer:
    """Orbax ``CheckpointManager`` over ``directory`` (local path or ``gs://``; see the module
    docstring for several hosts and for verification).

    ``save_every`` steps (plus whatever ``save(..., force=True)`` asks), keeping the newest
    ``max_to_keep``. Saves are asynchronous; :meth:`wait` blocks until they are on disk (with
    their checksums recorded). :attr:`set_aside` lists ``(step, reason, new path)`` of the steps
    :meth:`restore` skipped.
    """

    def __init__(self, directory: str | Path, *, save_every: int, max_to_keep: Optional[int] = 3,
                 async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = checkpoint_path(directory)
        self.save_every = save_every
        self.local = "://" not in self.directory
        self.set_aside: List[Tuple[int, str, str]] = []
        self._saved: set = set()
        self._recorded: set = set()
        self._record_lock = threading.Lock()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._record_checksums) if async_save else None,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def _record_checksums(self) -> None:
        """Writes the checksums of the steps this run committed (process 0, local directories);
        called by orbax after each commit and by :meth:`wait`. A step's numbered directory
        appears only once orbax committed it (it writes to a temporary name and renames)."""
        if not self.local or jax.process_index() != 0:
            return
        with self._record_lock:
            for step in sorted(self._saved - self._recorded):
                step_dir = Path(self.directory) / str(step)
                if step_dir.is_dir():
                    write_checksums(step_dir)
                    self._recorded.add(step)

    def save(self, step: int, state: Any, meta: Dict[str, Any], *, force: bool = False) -> bool:
        """Saves at ``step`` if it is a multiple of ``save_every`` or ``force``; returns whether it
        did. Raises :class:`NonFiniteState` (writing nothing) when a parameter, optimizer moment or
        other array holds a NaN or an infinity."""
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        arrays = state_arrays(state)
        if not all_finite(arrays):
            raise NonFiniteState(f"step {step}: the state holds a non-finite value; not saved")
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        if saved:
            with self._record_lock:
                self._saved.add(step)
            if not self._manager.is_saving_in_progress():
                self._record_checksums()  # a synchronous save: committed already
        return saved

    def _set_aside(self, step: int, reason: str) -> None:
        path = Path(self.directory) / str(step)
        moved = str(set_aside(path)) if jax.process_index() == 0 else ""
        distributed.sync(f"set aside checkpoint {step}")
        self._manager.reload()
        older = [s for s in self._manager.all_steps() if s < step]
        then = f"falling back to step {max(older)}" if older else "no older checkpoint: starting from step 0"
        say(f"checkpoint {path}: {reason}; moved aside to {Path(moved).name}, {then}")
        self.set_aside.append((step, reason, moved))

    def restore(self, target_state: Any, step: Optional[int] = None) -> Optional[Tuple[Any, Dict[str, Any]]]:
        """Restores ``step`` (default: the newest sound one) into the structure, dtypes and
        shardings of ``target_state``; returns ``(state, meta)``, or None when no step is sound.

        Each candidate is verified first (see the module docstring); a bad one is moved aside
        with one line naming it and the next older one is tried. A recorded step that reads
        with an error raises it (the files are as written: the model or optimizer differs).

        The saved run's mesh and process count do not matter: every array is read from the
        stored global array into ``target_state``'s sharding (each process reading the slices
        its devices hold), so e.g. a run saved by 2 hosts on ``(data=2, fsdp=2, tensor=2)``
        resumes on one host with ``fsdp=8``. The structure and shapes must match (same model
        and optimizer); a mismatch raises orbax's error naming the tree path."""
        steps = set(self._manager.all_steps())
        if self.local and os.path.isdir(self.directory):  # orbax does not list an empty step directory
            steps |= {int(name) for name in os.listdir(self.directory)
                      if name.isdigit() and os.path.isdir(os.path.join(self.directory, name))}
        candidates = sorted(steps, reverse=True) if step is None else [step]
        for candidate in candidates:
            problem, recorded = None, False
            if self.local:
                problem, recorded = distributed.broadcast_object(
                    verify_step(Path(self.directory) / str(candidate)) if jax.process_index() == 0 else None)
            if problem:
                self._set_aside(candidate, problem)
                continue
            try:
                restored = self._manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_abstract(state_arrays(target_state))),
                        meta=ocp.args.JsonRestore()),
                )
            except Exception as err:  # orbax and tensorstore raise many types for a damaged file
                if recorded or not self.local:
                    raise
                first = (str(err).strip().splitlines() or [""])[0][:200]
                self._set_aside(candidate, f"unreadable without a checksum record ({type(err).__name__}: {first})")
                continue
            arrays = restored["state"]
            if not all_finite(arrays):
                self._set_aside(candidate, "holds non-finite values")
                continue
            state = target_state.replace(
                step=arrays["step"], params=arrays["params"], opt_state=arrays["opt_state"], rng=arrays["rng"]
            )
            return state, dict(restored["meta"])
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._record_checksums()

    def close(self) -> None:
        self.wait()
        self._manager.close()


class PreemptionGuard:
    """Context manager: while active, SIGTERM (a preemption notice) and a first SIGINT (Ctrl-C) set
    :attr:`requested` (and :attr:`signal_name`) instead of killing the process, so the loop can
    save and exit cleanly; a second SIGINT exits at once with status 130 (128 + SIGINT), keeping
    only what is already on disk. The previous handlers are restored on exit. Only installable
    from the main thread (elsewhere it just never fires)."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            os.write(2, b"\nsecond interrupt: exiting at once\n")
            os._exit(128 + signal.SIGINT)
        if signum == signal.SIGINT:
            os.write(2, b"\ninterrupt: saving a checkpoint after this step (Ctrl-C again to exit at once)\n")
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
