"""One process per run directory: ``workdir/run.lock``.

The lock is an exclusive ``flock`` on ``workdir/run.lock`` held for the run's lifetime; the
file names the holder (``{"pid", "host", "since"}``) and is emptied on release. A second
process on a locked workdir stops at once with :class:`~sgpo_jax.errors.WorkdirLocked` naming
the holder's pid and host. A file that still names a holder although nobody holds the lock
(the holder was killed) is stale and taken over with a line saying so, unless it names a live
process on this host (a file system without working ``flock``: then the pid decides).

Multi-host: only process 0 takes the lock (the other processes belong to the same run); its
verdict is broadcast, so every process raises the same error.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

import jax

from sgpo_jax.console import say
from sgpo_jax.errors import WorkdirLocked
from sgpo_jax.parallel import distributed

__all__ = ["LOCK_FILE", "WorkdirLock", "pid_alive"]

LOCK_FILE = "run.lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "since": text[:60]}
    return holder if isinstance(holder, dict) else None


class WorkdirLock:
    """Context manager holding ``workdir/run.lock`` (see the module docstring)."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: Optional[int] = None

    def _acquire(self) -> Optional[str]:
        """Takes the lock; returns the refusal message, or None once held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        host = socket.gethostname()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or {}
            os.close(fd)
            return (f"{self.path.parent} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"(since {holder.get('since', '?')}); wait for it to finish or use another --workdir")
        holder = _holder(fd)
        if holder is not None:
            pid = holder.get("pid")
            if holder.get("host") == host and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
                os.close(fd)
                return (f"{self.path.parent} is in use by pid {pid} on {host} (since {holder.get('since', '?')}); "
                        f"wait for it to finish, or delete {self.path} if that process is not a run")
            say(f"{self.path}: taking over the stale lock of pid {pid} on {holder.get('host')} (since "
                f"{holder.get('since', '?')}; that run ended without releasing it)")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": host,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        return None

    def __enter__(self) -> "WorkdirLock":
        refusal = self._acquire() if jax.process_index() == 0 else None
        refusal = distributed.broadcast_object(refusal)
        if refusal:
            raise WorkdirLocked(refusal)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: nobody holds it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
