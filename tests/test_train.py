"""The training CLI end to end on the tiny config: learning, exact resume, caching, failures."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (the CLI's dependency must import)

from sgpo_jax import runner
from sgpo_jax.errors import CheckpointError, DivergenceError
from sgpo_jax.models import from_pretrained
from sgpo_jax.training import trainer as trainer_lib
from sgpo_jax.training.metrics import MetricsLog

from tiny_run import ROOT, tiny, write_pairs, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "prefs.jsonl")


@pytest.fixture(autouse=True)
def _configs_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir):
    _, params, _ = from_pretrained(Path(workdir) / "export")
    return params


def test_sgpo_learns_and_exports(tokenizer_dir, data_file, tmp_path):
    summary = runner.run(tiny(tokenizer_dir, data_file), tmp_path)
    metrics = read_metrics(tmp_path)
    assert summary["step"] == summary["total_steps"] == 10  # 2 epochs of ceil(40 / 8) steps
    assert [m["step"] for m in metrics] == list(range(1, 11))
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < 0.7 * first["loss"]
    assert last["rewards/accuracies"] == 1.0
    for name in ("grad_norm", "learning_rate", "tokens_per_second", "follower/dual", "follower/moved",
                 "rewards/margins", "logps/chosen"):
        assert name in last
    assert abs(last["follower/transport"] - 0.05) < 1e-5
    assert list((tmp_path / "tensorboard").iterdir())
    exported = final_params(tmp_path)  # transformers layout, read back by our loader
    assert jax.tree.structure(exported) is not None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preempted_run_resumes_exactly(tokenizer_dir, data_file, tmp_path, monkeypatch, signum):
    """SIGTERM (or Ctrl-C) after step 4 (checkpoint saved on the spot), then the same command
    again: the final parameters equal an uninterrupted run's. The per-epoch follower is the
    stateful case: the resumed epoch must keep the atoms computed at its start."""
    config = tiny(tokenizer_dir, data_file, sgpo__follower="epoch", checkpoint__every=100)
    runner.run(config, tmp_path / "straight")

    write = MetricsLog.write

    def write_then_preempt(self, step, metrics):
        write(self, step, metrics)
        if step == 4:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsLog, "write", write_then_preempt)
    first = runner.run(config, tmp_path / "resumed")
    assert first["preempted"] and first["step"] == 4
    monkeypatch.setattr(MetricsLog, "write", write)
    second = runner.run(config, tmp_path / "resumed")
    assert not second["preempted"] and second["step"] == 10
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == list(range(1, 11))
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)


def test_crash_resumes_from_last_checkpoint_and_reuses_the_reference_cache(tokenizer_dir, data_file, tmp_path,
                                                                          monkeypatch):
    config = tiny(tokenizer_dir, data_file, checkpoint__every=3, train__mode="dpo")
    run = trainer_lib.run_step

    def crash_at_step_8(step_fn, state, batch, cfg):
        if int(state.step) == 7:
            raise RuntimeError("simulated crash")
        return run(step_fn, state, batch, cfg)

    monkeypatch.setattr(trainer_lib, "run_step", crash_at_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run(config, tmp_path)
    cache = list((tmp_path / "cache").glob("reference_logps_*.npz"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns

    calls = []
    pair_logps = trainer_lib.pair_logps
    monkeypatch.setattr(trainer_lib, "pair_logps", lambda *a, **k: calls.append(1) or pair_logps(*a, **k))
    monkeypatch.setattr(trainer_lib, "run_step", run)
    summary = runner.run(config, tmp_path)
    assert summary["step"] == 10 and not calls  # resumed from step 6, reference log-probs from the cache
    assert cache[0].stat().st_mtime_ns == stamp
    assert [m["step"] for m in read_metrics(tmp_path)][:7] == list(range(1, 8))

    longer = tiny(tokenizer_dir, data_file, data__max_length=40, train__mode="dpo")
    runner.run(longer, tmp_path / "other")
    assert calls  # a different length setting is a different key: recomputed


def test_non_finite_loss_stops_with_a_clear_message(tokenizer_dir, data_file, tmp_path, monkeypatch):
    config = tiny(tokenizer_dir, data_file, checkpoint__every=2)
    run = trainer_lib.run_step

    def poisoned(step_fn, state, batch, cfg):
        step = int(state.step)  # read before the step donates the state
        new_state, metrics = run(step_fn, state, batch, cfg)
        if step == 4:
            metrics = dict(metrics, loss=np.float32("nan"))
        return new_state, metrics

    monkeypatch.setattr(trainer_lib, "run_step", poisoned)
    with pytest.raises(DivergenceError) as err:
        runner.run(config, tmp_path)
    assert str(err.value) == (f"training diverged at step 5: non-finite loss; last finite checkpoint: step 4 in "
                              f"{tmp_path / 'checkpoints'}; likely cause: no warning sign in the steps before: check "
                              "the data of this batch and the compute dtype (model.dtype)")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]  # step 5 was not saved


def test_config_is_validated_up_front(tokenizer_dir, data_file, tmp_path):
    config = tiny(tokenizer_dir, data_file, train__batch_size=6, train__micro_batches=4,
                  data__max_prompt_length=64, sgpo__epsilon=-1.0)
    with pytest.raises(ValueError) as err:
        runner.run(config, tmp_path)
    message = str(err.value)
    assert "batch_size (6) must be a positive multiple of train.micro_batches (4)" in message
    assert "max_prompt_length (64) must be < data.max_length (48)" in message
    assert "epsilon must be >= 0" in message


def test_bad_rows_are_reported_with_file_and_row(tokenizer_dir, data_file, tmp_path):
    rows = Path(data_file).read_text().splitlines()
    broken = json.loads(rows[2])
    broken["rejected"] = broken["chosen"]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(rows[:2] + [json.dumps(broken)] + rows[3:]) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl.*row 2"):
        runner.run(tiny(tokenizer_dir, str(path)), tmp_path / "run")


def test_cli_help_explains_the_flags():
    out = subprocess.run([sys.executable, "-m", "sgpo_jax.train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode in (0, 1), out.stderr  # absl exits 1 after printing the usage
    assert "--config" in out.stdout and "--workdir" in out.stdout and "resume" in out.stdout


def test_out_of_memory_names_the_settings_to_reduce(tokenizer_dir, data_file):
    import types

    config = tiny(tokenizer_dir, data_file)

    def exhausted(state, batch):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.")

    batch = types.SimpleNamespace(chosen_ids=np.zeros((8, 48)))
    with pytest.raises(MemoryError, match=r"train\.batch_size \(8\).*train\.micro_batches.*data\.max_length \(48\)"
                                          r".*model\.remat.*mesh\.fsdp"):
        trainer_lib.run_step(exhausted, None, batch, config)
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through untouched
        trainer_lib.run_step(lambda s, b: (_ for _ in ()).throw(ValueError("unrelated")), None, batch, config)


def test_data_limit_uses_the_first_pairs_only(tokenizer_dir, data_file, tmp_path):
    summary = runner.run(tiny(tokenizer_dir, data_file, data__limit=16, train__epochs=1, train__mode="dpo",
                                   export=False), tmp_path)
    assert summary["total_steps"] == 2  # 16 pairs / 8 per step
    with pytest.raises(ValueError, match="data.limit must be >= 0"):
        runner.run(tiny(tokenizer_dir, data_file, data__limit=-1), tmp_path / "bad")


def test_checkpoints_go_to_checkpoint_directory_and_resume_from_there(tokenizer_dir, data_file, tmp_path):
    shared = tmp_path / "shared" / "run1"
    config = tiny(tokenizer_dir, data_file, train__max_steps=2, checkpoint__directory=str(shared), export=False)
    runner.run(config, tmp_path / "work")
    assert not (tmp_path / "work" / "checkpoints").exists()
    assert sorted(p.name for p in shared.iterdir() if p.name.isdigit()) == ["2"]
    config.train.max_steps = 3
    summary = runner.run(config, tmp_path / "work")
    assert summary["step"] == 3 and [m["step"] for m in read_metrics(tmp_path / "work")] == [1, 2, 3]


def test_resume_needs_the_same_number_of_data_shards(tokenizer_dir, data_file, tmp_path):
    """The pair order depends on data.shards (batch_size / S pairs of each shard per batch), so
    a checkpoint resumes only with its own number; the message says which."""
    config = tiny(tokenizer_dir, data_file, data__shards=2, train__max_steps=2, export=False)
    runner.run(config, tmp_path)
    config.train.max_steps, config.data.shards = 3, 0  # one process: one shard
    with pytest.raises(ValueError, match=r"other settings \(data.shards: 2 -> 1\)"):
        runner.run(config, tmp_path)
    with pytest.raises(ValueError, match=r"trained with 2 data shards and this run has 1 .*--config.data.shards=2"):
        runner.run(config, tmp_path, allow_config_change=True)
    config.data.shards = 2  # the allowed change above was recorded (1): back to 2 is a change again
    assert runner.run(config, tmp_path, allow_config_change=True)["step"] == 3
    with pytest.raises(ValueError, match=r"train.batch_size \(8\) must be a multiple of the number of data shards "
                                         r"\(3, data.shards=3\)"):
        runner.run(tiny(tokenizer_dir, data_file, data__shards=3), tmp_path / "bad")


def test_sigterm_during_the_reference_pass_keeps_the_finished_batches(tokenizer_dir, data_file, tmp_path, monkeypatch):
    """SIGTERM after 2 of the 5 reference batches: the rerun scores only the other 3, and the
    log-probs and the final parameters equal an uninterrupted run's."""
    config = tiny(tokenizer_dir, data_file, train__mode="dpo", export=True)
    runner.run(config, tmp_path / "straight")
    pair_logps = trainer_lib.pair_logps
    scored = []

    def counting(*args, should_stop=None, **kwargs):
        def stop():
            scored.append(1)
            if len(scored) == 2 and kill:
                os.kill(os.getpid(), signal.SIGTERM)
            return should_stop()
        return pair_logps(*args, should_stop=stop, **kwargs)

    monkeypatch.setattr(trainer_lib, "pair_logps", counting)
    kill = True
    first = runner.run(config, tmp_path / "resumed")
    assert first["preempted"] and first["reference_batches_done"] == 2 and len(scored) == 2
    assert not (tmp_path / "resumed" / "checkpoints").exists()
    kill, scored[:] = False, []
    second = runner.run(config, tmp_path / "resumed")
    assert not second["preempted"] and second["step"] == 10 and len(scored) == 3  # 5 batches of 8 pairs, 2 kept
    cache = lambda run: np.load(next((tmp_path / run / "cache").glob("reference_logps_*[0-9a-f].npz")))
    for name in ("chosen", "rejected"):
        np.testing.assert_array_equal(cache("resumed")[name], cache("straight")[name])  # the same batches, same ops
    assert not list((tmp_path / "resumed" / "cache").glob("*.partial.npz"))
    for x, y in zip(jax.tree.leaves(final_params(tmp_path / "straight")),
                    jax.tree.leaves(final_params(tmp_path / "resumed"))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)  # as the test above


def test_a_rerun_with_other_settings_refuses_listing_them(tokenizer_dir, data_file, tmp_path, monkeypatch):
    """The issue's case: a second run with another learning rate and seed used to resume the
    first run's checkpoint. Settings that change nothing (checkpoint.every) and a raised
    max_steps continue; the resume line says so."""
    config = tiny(tokenizer_dir, data_file, train__mode="dpo", train__max_steps=2, export=False)
    runner.run(config, tmp_path)
    other = tiny(tokenizer_dir, data_file, train__mode="dpo", train__max_steps=2, export=False,
                 train__learning_rate=0.1, train__seed=7)
    with pytest.raises(CheckpointError) as err:
        runner.run(other, tmp_path)
    assert str(err.value) == (f"{tmp_path} holds a run with other settings (train.learning_rate: 0.03 -> 0.1; "
                              "train.seed: 42 -> 7); its checkpoints would continue under the new ones")
    assert err.value.hint == "use a new --workdir, or pass --allow_config_change to continue anyway"
    lines = []
    monkeypatch.setattr(runner, "say", lines.append)
    longer = tiny(tokenizer_dir, data_file, train__mode="dpo", train__max_steps=3, export=False,
                  checkpoint__every=1)
    assert runner.run(longer, tmp_path)["step"] == 3
    assert lines[0] == (f"resuming {tmp_path}: training: continuing after step 2 (checkpoint {tmp_path}/checkpoints/2)"
                        "; train.max_steps raised 2 -> 3: continuing to the new length (the learning-rate schedule "
                        "spans it)")
    other.train.max_steps = 4
    assert runner.run(other, tmp_path, allow_config_change=True)["step"] == 4
    assert "settings changed as allowed (--allow_config_change): train.learning_rate: 0.03 -> 0.1; train.seed: " \
           "42 -> 7" in lines[-1]


def test_a_dead_or_exploding_run_stops_in_one_line_and_exports_nothing(tokenizer_dir, data_file, tmp_path):
    """The issue's lr = 1e6: the weights explode in the first step (it used to export a dead
    model with exit 0)."""
    config = tiny(tokenizer_dir, data_file, train__learning_rate=1e6)
    with pytest.raises(DivergenceError) as err:
        runner.run(config, tmp_path)
    message = str(err.value)
    assert message.startswith("training diverged at step 1: parameter norm ") and "x its start" in message
    assert message.endswith("(bound 100 x); last finite checkpoint: none (no checkpoint was saved); likely cause: "
                            "exploding updates: the parameter norm grew from " + message.split("x its start ")[1]
                            .split(" ")[0] + " to " + message.split("parameter norm ")[1].split(" ")[0]
                            + " by step 1 at train.learning_rate=1e+06")
    assert "lower --config.train.learning_rate (now 1e+06)" in err.value.hint
    assert not (tmp_path / "export").exists() and not list((tmp_path / "checkpoints").iterdir())


def test_export_refuses_a_non_finite_model(tmp_path):
    from sgpo_jax.models.llama import DecoderConfig
    from sgpo_jax.models.loading import export_policy

    params = {"embed": np.ones((4, 2), np.float32), "norm": np.asarray([1.0, np.nan], np.float32)}
    with pytest.raises(DivergenceError, match=r"not exporting to .*export: 1 parameters hold NaN or infinite values "
                                              r"\(first: \['norm'\]\)"):
        export_policy(tmp_path, DecoderConfig(vocab_size=4, hidden_size=2, intermediate_size=4, num_hidden_layers=1,
                                              num_attention_heads=1, num_key_value_heads=1, head_dim=2), params, None)
    assert not (tmp_path / "export").exists()
