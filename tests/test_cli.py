"""What a user sees from ``python -m sgpo_jax.train``: one-line errors with exit status 2, the
traceback on request, the dry run, and the line saying where a rerun continues."""

import os
import subprocess
import sys

import pytest

from tiny_run import ROOT, write_pairs, write_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return dict(tokenizer=write_tokenizer(root / "tokenizer"), data=write_pairs(root / "prefs.jsonl", 16))


def run(files, workdir, *flags, env=None):
    cmd = [sys.executable, "-m", "sgpo_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.model.tokenizer={files['tokenizer']}", f"--config.data.source={files['data']}",
           "--config.train.epochs=1", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "SGPO_VERBOSE": "", **(env or {})})


def test_config_errors_are_one_line_with_exit_status_2(files, tmp_path):
    out = run(files, tmp_path, "--config.train.learning_rate=-1", "--config.sgpo.follower=nope")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines == ["error: invalid config: train.learning_rate must be > 0, got -1.0; sgpo.follower must be '' "
                     "(by mode) or one of ('step', 'epoch', 'annotation'), got 'nope'"], out.stderr
    assert not (tmp_path / "config.json").exists()  # nothing was started


def test_verbose_keeps_the_traceback(files, tmp_path):
    out = run(files, tmp_path, "--config.train.learning_rate=-1", env={"SGPO_VERBOSE": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_missing_data_file_names_it(files, tmp_path):
    out = run(files, tmp_path, f"--config.data.source={tmp_path / 'nowhere.jsonl'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    first = out.stderr.strip().splitlines()[0]
    assert first.startswith("error: ") and "nowhere.jsonl" in first, out.stderr


def test_dry_run_reports_and_compiles_nothing(files, tmp_path):
    out = run(files, tmp_path, "--dry_run")
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "config: valid" in text
    assert "data: 16 usable pairs" in text
    assert "steps: 2 (2 per epoch, batch 8)" in text  # ceil(16 / 8) steps, 1 epoch
    assert "memory plan per device" in text
    assert f"rerun: starts fresh in {tmp_path}" in text
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_an_unknown_config_key_names_the_closest_one(files, tmp_path):
    out = run(files, tmp_path, "--config.sgpo.epsilonn=0.1")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: unknown config key sgpo.epsilonn (--config.sgpo.epsilonn): did you mean sgpo.epsilon?"], out.stderr


def test_the_dry_run_refuses_a_mesh_the_devices_cannot_form(files, tmp_path):
    out = run(files, tmp_path, "--dry_run", "--config.mesh.data=3")  # 8 devices (conftest's XLA_FLAGS)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: the devices do not fit the config: mesh.data=3, mesh.fsdp=1, mesh.tensor=1: data*fsdp*tensor = "
        "3*1*1 = 3 but there are 8 devices"], out.stderr
    assert "config: valid" not in out.stdout and not (tmp_path / "config.json").exists()


def test_an_interrupted_run_saves_and_exits_75_then_resumes(files, tmp_path):
    """Ctrl-C (SIGINT) after step 1: the CLI saves step 1 and exits with EX_TEMPFAIL (75), so a
    scheduler tells it from a finished run; the rerun says where it continues (after step 1, from
    which checkpoint) and does."""
    hook = ("import os, signal, sys\n"
            "from sgpo_jax.training.metrics import MetricsLog\n"
            "write = MetricsLog.write\n"
            "def interrupt(self, step, metrics):\n"
            "    write(self, step, metrics)\n"
            "    if step == 1:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "MetricsLog.write = interrupt\n"
            "from sgpo_jax.train import cli\n"
            "sys.argv = ['sgpo_jax.train'] + sys.argv[1:]\n"
            "cli()\n")
    flags = [f"--workdir={tmp_path}", "--config=configs/tiny.py", f"--config.model.tokenizer={files['tokenizer']}",
             f"--config.data.source={files['data']}", "--config.train.epochs=1", "--config.checkpoint.every=100"]
    out = subprocess.run([sys.executable, "-c", hook, *flags], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "SGPO_VERBOSE": ""})
    assert out.returncode == 75, out.stderr[-3000:]
    assert f"starting fresh in {tmp_path}" in out.stdout
    assert f"SIGINT: saved step 1 in {tmp_path}; rerun the same command to resume" in out.stdout
    assert "Traceback" not in out.stderr
    second = run(files, tmp_path, "--config.checkpoint.every=100")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (f"resuming {tmp_path}: training: continuing after step 1 (checkpoint {tmp_path}/checkpoints/1)"
            in second.stdout), second.stdout
