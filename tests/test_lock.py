"""The workdir lock: a second process stops at once naming the holder; a stale lock is taken
over with a line; the CLI exits 2 with one line."""

import json
import os
import socket
import subprocess
import sys

import pytest

from sgpo_jax.errors import WorkdirLocked
from sgpo_jax.training import lock as lock_lib

from tiny_run import ROOT


def test_a_second_process_on_a_locked_workdir_stops_at_once_with_exit_status_2(tmp_path):
    workdir = tmp_path / "run"
    with lock_lib.WorkdirLock(workdir):
        since = json.loads((workdir / "run.lock").read_text())["since"]
        out = subprocess.run([sys.executable, "-m", "sgpo_jax.train", "--config=configs/tiny.py",
                              f"--workdir={workdir}", "--config.data.source=unused.jsonl"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env={**os.environ, "SGPO_VERBOSE": ""})
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"error: {workdir} is in use by pid {os.getpid()} on {socket.gethostname()} (since {since}); wait for it "
        "to finish or use another --workdir"]
    assert (workdir / "run.lock").read_text() == ""  # released: empty
    with lock_lib.WorkdirLock(workdir):  # and free again
        pass


def test_a_lock_naming_a_live_process_on_this_host_refuses(tmp_path):
    """A file system without working flock: the file's live pid decides."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(),
                                                       "since": "2026-01-01 00:00:00"}))
        with pytest.raises(WorkdirLocked) as err:
            with lock_lib.WorkdirLock(tmp_path):
                pass
        assert str(err.value) == (f"{tmp_path} is in use by pid {child.pid} on {socket.gethostname()} (since "
                                  f"2026-01-01 00:00:00); wait for it to finish, or delete {tmp_path / 'run.lock'} "
                                  "if that process is not a run")
    finally:
        child.kill()
        child.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_line(tmp_path, monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now free
    assert not lock_lib.pid_alive(child.pid)
    host = socket.gethostname()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": child.pid, "host": host, "since": "yesterday"}))
    lines = []
    monkeypatch.setattr(lock_lib, "say", lines.append)
    with lock_lib.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert lines == [f"{tmp_path / 'run.lock'}: taking over the stale lock of pid {child.pid} on {host} (since "
                     "yesterday; that run ended without releasing it)"]
