"""Held-out preference evaluation (:mod:`sgpo_jax.eval.preference`, :mod:`sgpo_jax.data.holdout`):
the figures against a hand computation, the split's determinism and coverage, and a ``dpo`` run
that reports TRL's ``eval_*`` metrics with their intervals, checked against log-probs computed
in NumPy from the model's logits."""

import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sgpo_jax import runner
from sgpo_jax.config import validate
from sgpo_jax.data.holdout import held_out, split_indices
from sgpo_jax.data.pairs import load_pairs
from sgpo_jax.errors import ConfigError, DataError
from sgpo_jax.eval.preference import EVAL_METRICS, preference_metrics
from sgpo_jax.models import Decoder, from_pretrained, load_model

from tiny_run import ROOT, tiny, write_pairs, write_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    return write_tokenizer(root / "tokenizer"), write_pairs(root / "prefs.jsonl", 40), root


@pytest.fixture(autouse=True)
def _configs_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def t_interval(values):
    """Oracle: SciPy's Student t interval of the mean."""
    values = np.asarray(values, np.float64)
    return list(stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values)))


def wilson(k, n):
    """Oracle: SciPy's Wilson score interval (no continuity correction)."""
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [ci.low, ci.high]


def check_interval(figure, expected):
    # the t interval up to 31 pairs uses a 3-decimal table (relative error of the half-width < 3e-4);
    # Wilson is the same closed form as SciPy's, equal up to float64 rounding
    half = (expected[1] - expected[0]) / 2
    for got, want in zip(figure["ci95"], expected):
        assert got == pytest.approx(want, abs=3e-4 * half + 1e-12)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_preference_metrics_by_hand(loss_type, smoothing):
    rng = np.random.default_rng(3)
    n, beta = 23, 0.3
    pc, pr, rc, rr = (rng.normal(-20, 3, n) for _ in range(4))
    tokens = (rng.integers(1, 9, n).astype(float), rng.integers(1, 9, n).astype(float))
    pr[0], rr[0], pc[0], rc[0] = -5.0, -5.0, -7.0, -7.0  # a tie (margin 0) counts as wrong, as in TRL
    got = preference_metrics((pc, pr), (rc, rr), tokens, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":  # (r_w / n_w - r_l / n_l - 1 / (2 beta))^2
        loss = ((pc - rc) / tokens[0] - (pr - rr) / tokens[1] - 1 / (2 * beta)) ** 2
    else:  # cDPO: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
        logsig = lambda x: -np.log1p(np.exp(-x))
        loss = -(1 - smoothing) * logsig(beta * h) - smoothing * logsig(-beta * h)
    wins = int(np.sum(chosen > rejected))
    assert got["pairs"] == n and wins < n - 1
    assert got["eval_rewards/accuracies"]["value"] == wins / n
    check_interval(got["eval_rewards/accuracies"], wilson(wins, n))
    expected = {"eval_rewards/chosen": chosen, "eval_rewards/rejected": rejected,
                "eval_rewards/margins": chosen - rejected, "eval_logps/chosen": pc, "eval_logps/rejected": pr}
    for name, values in expected.items():
        # float64 throughout: equal up to summation order
        assert got[name]["value"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
        check_interval(got[name], t_interval(values))
    # the loss is computed in float32 as in the training step: relative 1e-5 bounds its rounding
    assert got["eval_loss"]["value"] == pytest.approx(loss.mean(), rel=1e-5)
    check_interval(got["eval_loss"], [v for v in t_interval(loss)])
    assert set(got) == {"pairs", "intervals", *EVAL_METRICS}


def test_split_is_deterministic_disjoint_and_complete():
    rows = np.array([0, 3, 4, 5, 9, 10, 11, 17, 20, 21, 30, 31, 32, 40, 41, 44, 47, 50, 51, 60])
    train, heldout = split_indices(rows, 0.25)
    assert len(heldout) == 5 and len(train) == 15  # round(0.25 * 20)
    assert sorted(np.concatenate([train, heldout]).tolist()) == list(range(20))  # disjoint, nothing lost
    assert list(train) == sorted(train) and list(heldout) == sorted(heldout)
    again = split_indices(rows.copy(), 0.25)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, heldout)))
    # the held-out rows are the five whose SHA-256 key is smallest (hand computation with hashlib)
    key = lambda r: int(hashlib.sha256(f"sgpo_jax.holdout:{r}".encode()).hexdigest()[:16], 16)
    assert set(rows[heldout]) == set(sorted(rows, key=key)[:5])
    # a row's side depends on the rows alone: removing a training row keeps the held-out rows
    fewer = np.delete(rows, train[0])
    assert set(fewer[split_indices(fewer, 5 / 19)[1]]) == set(rows[heldout])
    with pytest.raises(DataError, match="leaving none to train on"):
        split_indices(rows[:1], 0.5)


def test_held_out_pairs_cover_every_usable_pair(files):
    tokenizer_dir, data_file, root = files
    config = tiny(tokenizer_dir, data_file, train__mode="dpo", data__eval_fraction=0.2)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs, gaps = load_pairs(config.data, tokenizer)
    split = held_out(config, tokenizer, pairs, gaps)
    assert (len(split.train), len(split.eval), len(split.gaps)) == (32, 8, 32)
    assert sorted(np.concatenate([split.train.rows, split.eval.rows]).tolist()) == sorted(pairs.rows.tolist())
    assert not set(split.train.rows) & set(split.eval.rows)
    for part in (split.train, split.eval):  # each pair keeps its own tokens
        for k, row in enumerate(part.rows):
            i = int(np.flatnonzero(pairs.rows == row)[0])
            assert all(np.array_equal(a, b) for a, b in zip(part.token_ids(k), pairs.token_ids(i)))
    assert "held-out pairs: 8 of the 40 usable pairs" in split.line and "training on the other 32" in split.line
    other = write_pairs(root / "eval.jsonl", 6, seed=5)
    separate = held_out(tiny(tokenizer_dir, data_file, train__mode="dpo", data__eval_source=other), tokenizer,
                        pairs, gaps)
    assert separate.train is pairs and len(separate.eval) == 6 and f"6 from data.eval_source {other}" in separate.line


def test_held_out_settings_are_validated(files):
    tokenizer_dir, data_file, _ = files
    with pytest.raises(ConfigError) as err:
        validate(tiny(tokenizer_dir, data_file, data__eval_fraction=1.0, data__eval_source="x.jsonl",
                      train__eval_every=-1))
    message = str(err.value)
    assert "data.eval_fraction must be in [0, 1)" in message and "both set" in message
    assert "train.eval_every must be >= 0" in message
    with pytest.raises(ConfigError, match="apply to train.mode dpo and sgpo"):
        validate(tiny(tokenizer_dir, data_file, train__mode="ssapo", data__eval_fraction=0.1))


def numpy_logps(params, cfg, pairs):
    """Oracle: each pair's (chosen, rejected) log-prob, from the model's logits at float64 in NumPy."""
    forward = jax.jit(Decoder(cfg).apply)
    out = np.zeros((2, len(pairs)))
    for k in range(len(pairs)):
        prompt, *responses = pairs.token_ids(k)
        for side, response in enumerate(responses):
            ids = np.concatenate([prompt, response]).astype(np.int32)
            logits = np.asarray(forward(params, jnp.asarray(ids[None]))[0], np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            out[side, k] = sum(logp[t - 1, ids[t]] for t in range(len(prompt), len(ids)))
    return out


def test_dpo_run_reports_eval_metrics_with_intervals(files, tmp_path):
    """A dpo run with held-out pairs and eval.tasks: eval_* figures every 2 steps and at the end
    (metrics.jsonl, summary.json) against NumPy log-probs of the initial and exported policy, and
    the pass rate at the end (the plan lists it) against a recount of eval.json's responses."""
    from sgpo_jax.eval.instructions import instruction_pass_rate
    from sgpo_jax.ssapo.instructions import load_tasks, make_tasks

    tokenizer_dir, data_file, _ = files
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("".join(json.dumps(t.to_json()) + "\n" for t in make_tasks(4, seed=0)))
    config = tiny(tokenizer_dir, data_file, train__mode="dpo", train__max_steps=4, train__eval_every=2,
                  data__eval_fraction=0.25, checkpoint__every=100, eval__tasks=str(tasks_file),
                  eval__max_new_tokens=4, eval__batch_size=4)
    the_plan = runner.plan(config)
    assert the_plan.programs == ("train_step", "reference_logps", "eval_generate")
    assert the_plan.stages[1:4] == (
        "hold out data.eval_fraction=0.25 of the pairs (by a hash of the source row)",
        "reference log-probs (cached in workdir/cache) of the training and held-out pairs",
        "train: DPO steps with checkpoints every 100, held-out preference metrics (eval_*) every 2 steps and at "
        "the end")
    assert the_plan.stages[4] == f"evaluate the final policy on the held-out tasks (eval.tasks={tasks_file})"
    summary = runner.run(config, tmp_path / "run")
    tmp_path = tmp_path / "run"
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["step"] == summary["step"] == 4 and summary["eval_tasks"] == 4
    recount = instruction_pass_rate(load_tasks(tasks_file), evaluation["responses"])
    assert summary["pass_rate_prompt"] == recount["prompt_level_strict_acc"]
    expected = wilson(recount["num_instructions_passed"], recount["num_instructions"])
    # the same closed form as SciPy's: equal up to float64 rounding
    assert summary["pass_rate_instruction_ci95"] == pytest.approx(expected, abs=1e-12)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(set(EVAL_METRICS) & set(r)) == sorted(EVAL_METRICS) for r in rows] == [False, True, False, True]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["eval"] == summary["eval"] and summary["pairs"] == 30
    result = summary["eval"]
    assert result["step"] == 4 and result["pairs"] == 10 and "10 of the 40 usable pairs" in result["held_out"]
    for name in EVAL_METRICS:
        assert rows[-1][name] == result[name]["value"]
        lo, hi = result[name]["ci95"]
        assert lo <= result[name]["value"] <= hi

    # the oracle: the held-out pairs scored in NumPy by the initial (reference) and exported policy
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs, gaps = load_pairs(config.data, tokenizer)
    heldout = held_out(config, tokenizer, pairs, gaps).eval
    cfg, initial, _ = load_model(config.model)
    _, final, _ = from_pretrained(tmp_path / "export")
    pc, pr = numpy_logps(final, cfg, heldout)
    rc, rr = numpy_logps(initial, cfg, heldout)
    beta = config.train.beta
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    wins = int(np.sum(chosen > rejected))
    assert result["eval_rewards/accuracies"]["value"] == wins / 10
    check_interval(result["eval_rewards/accuracies"], wilson(wins, 10))
    # log-probs of ~10 tokens from float32 logits: 1e-4 absolute bounds the float32 forward's rounding
    for name, values in {"eval_rewards/margins": chosen - rejected, "eval_rewards/chosen": chosen,
                         "eval_logps/chosen": pc, "eval_logps/rejected": pr}.items():
        assert result[name]["value"] == pytest.approx(values.mean(), abs=1e-4)
    loss = np.log1p(np.exp(-(chosen - rejected)))
    assert result["eval_loss"]["value"] == pytest.approx(loss.mean(), abs=1e-4)
    assert not math.isnan(result["eval_loss"]["ci95"][0])



def test_lora_run_scores_the_held_out_pairs_with_its_adapters(files, tmp_path):
    """With LoRA the policy is the frozen base plus adapters and the reference the base: the
    held-out figures at the end match NumPy log-probs of the exported merged model against the
    base model."""
    tokenizer_dir, data_file, _ = files
    config = tiny(tokenizer_dir, data_file, train__mode="dpo", train__max_steps=2, checkpoint__every=100,
                  data__eval_fraction=0.1)
    config.model.lora.rank, config.model.lora.alpha = 4, 8.0
    result = runner.run(config, tmp_path)["eval"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs, gaps = load_pairs(config.data, tokenizer)
    heldout = held_out(config, tokenizer, pairs, gaps).eval
    cfg, base, _ = load_model(config.model)
    _, merged, _ = from_pretrained(tmp_path / "export")
    (pc, pr), (rc, rr) = numpy_logps(merged, cfg, heldout), numpy_logps(base, cfg, heldout)
    margins = config.train.beta * ((pc - rc) - (pr - rr))
    assert result["pairs"] == 4 and np.abs(margins).max() > 1e-3  # the adapters moved the policy
    # float32 forwards (adapters applied vs merged into the kernels): 1e-4 absolute bounds their rounding
    assert result["eval_rewards/margins"]["value"] == pytest.approx(margins.mean(), abs=1e-4)
    assert result["eval_logps/chosen"]["value"] == pytest.approx(pc.mean(), abs=1e-4)


def test_dry_run_reports_the_held_out_pairs_and_counts_steps_on_the_rest(files, tmp_path):
    tokenizer_dir, data_file, _ = files
    lines = runner.dry_run(tiny(tokenizer_dir, data_file, train__mode="dpo", data__eval_fraction=0.25), tmp_path)
    assert any(line.startswith("held-out pairs: 10 of the 40 usable pairs") for line in lines)
    assert "steps: 8 (4 per epoch, batch 8)" in lines  # 2 epochs of ceil(30 / 8) steps
