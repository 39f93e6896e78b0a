"""The SSAPO loop end to end on the tiny config: stages, resume at any stage, summary and plots."""

import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from sgpo_jax import runner
from sgpo_jax.data import load_preferences
from sgpo_jax.data.split import make_split, seed_rows_jsonl
from sgpo_jax.models import Decoder, from_pretrained, load_model
from sgpo_jax.ssapo import annotate as annotate_lib
from sgpo_jax.ssapo.instructions import load_tasks
from sgpo_jax.training.metrics import MetricsLog

from tiny_run import ssapo_config, write_ssapo_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_ssapo_files(tmp_path_factory.mktemp("ssapo"))


def export_params(workdir):
    return from_pretrained(Path(workdir) / "export")[1]


def test_resumes_at_every_stage_without_redoing_work(files, tmp_path, monkeypatch):
    """A straight run vs a run killed inside round 1's generation (after its first batch) and
    preempted inside round 2's training: the rerun continues, never regenerates a finished batch,
    and ends with the same pairs and the same final policy."""
    config = ssapo_config(files, ssapo__pool_sizes=(16, 16), ssapo__generation_batch_size=8)
    generated = []  # (round seed, batch index) of every batch written
    annotate = annotate_lib.annotate

    def recording_annotate(*args, die_at=None, **kwargs):
        on_batch = kwargs["on_batch"]

        def record(index, rows, dropped):
            if (kwargs["seed"], index) == die_at:
                raise KeyboardInterrupt("killed")
            on_batch(index, rows, dropped)
            generated.append((kwargs["seed"], index))

        return annotate(*args, **{**kwargs, "on_batch": record})

    monkeypatch.setattr(annotate_lib, "annotate", recording_annotate)
    runner.run(config, tmp_path / "straight")
    assert len(generated) == 4 and len(set(generated)) == 4  # 2 rounds x 2 batches of 8 prompts
    straight_batches = list(generated)

    generated.clear()
    monkeypatch.setattr(annotate_lib, "annotate",
                        lambda *a, **k: recording_annotate(*a, die_at=straight_batches[1], **k))
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, tmp_path / "resumed")
    assert generated == straight_batches[:1]
    assert len(list((tmp_path / "resumed" / "round_1" / "generations").glob("batch_*.jsonl"))) == 1

    write = MetricsLog.write

    def preempt_in_round_2(self, step, metrics):
        write(self, step, metrics)
        if "round_2" in self._jsonl.name and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(annotate_lib, "annotate", recording_annotate)
    monkeypatch.setattr(MetricsLog, "write", preempt_in_round_2)
    generated.clear()
    first = runner.run(config, tmp_path / "resumed")
    assert first["preempted"]
    assert generated == straight_batches[1:]  # round 1 batch 1, round 2 batches 0-1
    monkeypatch.setattr(MetricsLog, "write", write)
    generated.clear()
    second = runner.run(config, tmp_path / "resumed")
    assert not second["preempted"] and generated == []  # nothing regenerated after the preemption

    for t in (1, 2):
        a = (tmp_path / "straight" / f"round_{t}" / "pairs.jsonl").read_text()
        b = (tmp_path / "resumed" / f"round_{t}" / "pairs.jsonl").read_text()
        assert a == b
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "round_2" / "train" / "metrics.jsonl").open()]
    assert steps == [1, 2]  # step 1, preempted and saved; step 2 after the rerun
    for x, y in zip(jax.tree.leaves(export_params(tmp_path / "straight")),
                    jax.tree.leaves(export_params(tmp_path / "resumed"))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)
    assert [r["round"] for r in second["rounds"]] == [0, 1, 2]
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["rounds"] == second["rounds"]


def test_summary_rows_match_the_files_they_summarize(files, tmp_path):
    config = ssapo_config(files, ssapo__pool_sizes=(8,))
    summary = runner.run(config, tmp_path)
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    pairs = [json.loads(l) for l in (tmp_path / "round_1" / "pairs.jsonl").open()]
    gaps = np.array([p["chosen_reward"] - p["rejected_reward"] for p in pairs])
    assert rounds[1]["pairs"] == len(pairs) and rounds[1]["pairs"] + rounds[1]["dropped"] == 8
    assert rounds[1]["mean_gap"] == pytest.approx(gaps.mean(), rel=1e-9)
    assert np.all(gaps >= 0)  # chosen = the higher implicit reward
    assert rounds[0]["pairs"] == 16 and rounds[0]["follower_dual"] is None  # seed round: DPO
    assert rounds[1]["follower_dual"] is not None and 0 <= rounds[1]["follower_moved"] <= 1
    tasks = load_tasks(files["tasks"])
    for name in ("eval_initial.json", "round_0/eval.json", "round_1/eval.json"):
        result = json.loads((tmp_path / name).read_text())
        passed = [t.passed(r) for t, r in zip(tasks, result["responses"])]
        met = [ok for t, r in zip(tasks, result["responses"]) for ok in t.results(r)]
        assert result["prompt_level_strict_acc"] == pytest.approx(np.mean(passed))
        assert result["instruction_level_strict_acc"] == pytest.approx(np.mean(met))
        assert len(result["responses"]) == 4
    assert rounds[1]["pass_rate_prompt"] == pytest.approx(np.mean(passed))
    initial = json.loads((tmp_path / "eval_initial.json").read_text())
    before = [t.passed(r) for t, r in zip(tasks, initial["responses"])]
    gained = sum(a and not b for a, b in zip(passed, before))
    lost = sum(b and not a for a, b in zip(passed, before))
    change = rounds[1]["vs_initial"]
    assert (change["gained"], change["lost"]) == (gained, lost)
    assert change["change"] == pytest.approx((gained - lost) / 4)
    alpaca = json.loads((tmp_path / "round_1" / "eval_alpaca_eval.json").read_text())
    assert len(alpaca) == 4 and set(alpaca[0]) >= {"instruction", "output", "generator"}
    for png in ("plots/reward_gaps_round_1.png", "plots/eval.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[2].startswith("| initial |") and len(table) == 3 + len(rounds) + 2  # header, rows, note
    assert "4 held-out tasks" in table[-1]


def test_seed_split_flips_exactly_the_requested_labels(files, tmp_path):
    config = ssapo_config(files, ssapo__seed_label_noise=0.25)
    dataset = load_preferences(files["data"])
    split = make_split(config, dataset, np.arange(len(dataset)), None, None, None)
    assert len(split["seed_rows"]) == 16 and len(set(split["seed_rows"])) == 16
    assert sum(split["flipped"]) == 4 and [len(p) for p in split["pools"]] == [8, 8]
    source = [json.loads(l) for l in Path(files["data"]).open()]
    for row, flipped in zip(seed_rows_jsonl(dataset, split), split["flipped"]):
        original = source[row["source_row"]]
        expect = (original["rejected"], original["chosen"]) if flipped else (original["chosen"], original["rejected"])
        assert (row["chosen"], row["rejected"]) == expect
    config.ssapo.prompts = ""  # the pools come from the rows left after the seed, as conversations
    split = make_split(config, dataset, np.arange(len(dataset)), None, None, None)
    pool_texts = [conversation[-1]["content"] for pool in split["pools"] for conversation in pool]
    rest = [source[r]["prompt"] for r in range(len(source)) if r not in set(split["seed_rows"])]
    assert len(pool_texts) == 16 and set(pool_texts) <= set(rest)


def test_ssapo_settings_are_validated(files, tmp_path):
    config = ssapo_config(files, ssapo__seed_selection="kmeans", ssapo__num_samples=1, ssapo__reference="sft")
    with pytest.raises(ValueError) as err:
        runner.run(config, tmp_path)
    for field in ("ssapo.seed_selection", "ssapo.num_samples", "ssapo.reference"):
        assert field in str(err.value)


def test_farthest_point_seed_selection_uses_the_initial_models_prompt_states(files):
    """fps seeds: the max-min farthest points of the prompts' last-token hidden states, computed
    here independently in NumPy (cosine distance, start at the split's first permuted row)."""
    from sgpo_jax.data import split as split_lib
    from sgpo_jax.data.tokenize import encode_prompts

    config = ssapo_config(files, ssapo__seed_selection="fps", ssapo__seed_size=6)
    cfg, params, tokenizer = load_model(config.model)
    model = Decoder(cfg)
    dataset = load_preferences(files["data"])
    split = make_split(config, dataset, np.arange(len(dataset)), model, params, tokenizer)
    ids, mask = encode_prompts(tokenizer, dataset["prompt"], max_prompt_length=config.data.max_prompt_length)
    hidden = np.asarray(model.apply(params, ids, mask, return_hidden=True), np.float64)
    last = hidden[:, -1]  # left padding: every row's last real token is the last column
    unit = last / np.linalg.norm(last, axis=1, keepdims=True)
    random_seed = split_lib.split_prompts(len(dataset), 6, (), seed=config.train.seed)[0]
    chosen = [int(random_seed[0])]
    while len(chosen) < 6:
        distance = 1 - unit @ unit[chosen].T
        chosen.append(int(np.argmax(distance.min(axis=1))))
    assert split["seed_rows"] == chosen
