"""Verified checkpoints: checksums recorded on save (checked with coreutils' sha256sum), a damaged,
truncated or empty newest step moved aside with one line and the run resumed from the step
before, ending with the parameters of an uninterrupted run; non-finite states never saved."""

import os
import shutil
import subprocess
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgpo_jax import runner
from sgpo_jax.models import from_pretrained
from sgpo_jax.training import checkpoint as checkpoint_lib
from sgpo_jax.training import trainer as trainer_lib

from tiny_run import ROOT, tiny, write_pairs, write_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return dict(tokenizer=write_tokenizer(root / "tokenizer"), data=write_pairs(root / "prefs.jsonl"))


@pytest.fixture(autouse=True)
def _configs_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def config_of(files):
    return tiny(files["tokenizer"], files["data"], train__mode="dpo", checkpoint__every=2)


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """The uninterrupted run (10 steps): the oracle every resumed run must equal."""
    workdir = tmp_path_factory.mktemp("straight")
    runner.run(config_of(files), workdir)
    return workdir


@pytest.fixture(scope="module")
def crashed(files, tmp_path_factory):
    """The same run crashed in step 7: checkpoints 2, 4 and 6 on disk."""
    workdir = tmp_path_factory.mktemp("crashed")
    run = trainer_lib.run_step

    def crash_at_step_7(step_fn, state, batch, cfg):
        if int(state.step) == 6:
            raise RuntimeError("simulated crash")
        return run(step_fn, state, batch, cfg)

    trainer_lib.run_step = crash_at_step_7
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            runner.run(config_of(files), workdir)
    finally:
        trainer_lib.run_step = run
    return workdir


def final_params(workdir):
    return jax.tree.leaves(from_pretrained(Path(workdir) / "export")[1])


def test_every_step_records_checksums_that_sha256sum_accepts(crashed):
    directory = crashed / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["2", "4", "6"]
    for step in ("2", "4", "6"):
        lines = (directory / step / checkpoint_lib.CHECKSUMS).read_text().splitlines()
        assert len(lines) >= 3  # orbax's metadata, the state's and the meta's files
        out = subprocess.run(["sha256sum", "--check", "--strict", checkpoint_lib.CHECKSUMS], cwd=directory / step,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint_lib.CHECKSUMS),
               key=lambda p: p.stat().st_size)


def random_bytes(step_dir):
    path = largest_file(step_dir)
    with open(path, "r+b") as f:  # 4 KiB of random bytes in the middle, as in the issue
        f.seek(path.stat().st_size // 4)
        f.write(np.random.default_rng(0).bytes(min(4096, path.stat().st_size // 2)))
    return f"file {path.relative_to(step_dir)} does not match its recorded sha256 (changed or truncated)"


def truncated(step_dir):
    path = largest_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)
    return f"file {path.relative_to(step_dir)} does not match its recorded sha256 (changed or truncated)"


def emptied(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()
    return "empty step directory"


@pytest.mark.parametrize("damage", [random_bytes, truncated, emptied])
def test_a_bad_newest_checkpoint_is_set_aside_and_the_run_ends_as_an_uninterrupted_one(
        files, straight, crashed, tmp_path, monkeypatch, damage):
    workdir = tmp_path / "run"
    shutil.copytree(crashed, workdir)
    step6 = workdir / "checkpoints" / "6"
    reason = damage(step6)
    lines = []
    monkeypatch.setattr(checkpoint_lib, "say", lines.append)
    summary = runner.run(config_of(files), workdir)
    assert lines == [f"checkpoint {step6}: {reason}; moved aside to 6.corrupt, falling back to step 4"]
    assert (workdir / "checkpoints" / "6.corrupt").is_dir()  # kept, not deleted
    assert summary["step"] == 10
    for x, y in zip(final_params(straight), final_params(workdir)):
        # the same float32 ops in the same order; 1e-6 leaves room for XLA's CPU thread scheduling
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)


def test_a_non_finite_state_is_never_saved(tmp_path):
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, save_every=1, async_save=False)
    params = {"w": jnp.asarray([1.0, np.inf])}
    state = types.SimpleNamespace(step=jnp.asarray(3), params=params, opt_state={"mu": jnp.zeros(2)},
                                  rng=jax.random.PRNGKey(0))
    with pytest.raises(checkpoint_lib.NonFiniteState, match="step 3: the state holds a non-finite value"):
        checkpointer.save(3, state, {"step": 3})
    state.params = {"w": jnp.asarray([1.0, 2.0])}
    state.opt_state = {"mu": jnp.asarray([np.nan, 0.0])}  # the optimizer state counts too
    with pytest.raises(checkpoint_lib.NonFiniteState):
        checkpointer.save(3, state, {"step": 3})
    checkpointer.close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("3")]
