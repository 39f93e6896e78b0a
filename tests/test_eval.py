"""Evaluation (:mod:`sgpo_jax.eval.instructions`, :mod:`sgpo_jax.eval.intervals`) against hand counts
and independent oracles: pass rates on
hand-made tasks and responses, greedy generation against step-by-step argmax of full forward
passes, the AlpacaEval / FastChat file schemas, and win rates with deterministic fake judges.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data import EOS, make_tokenizer

from sgpo_jax.data import tokenize_prompts
from sgpo_jax.eval.instructions import (
    INSTRUCTION_ACC,
    METRIC,
    PROMPT_ACC,
    eval_fields,
    evaluate_heldout,
    export_alpaca_eval,
    export_mt_bench_answers,
    generate_responses,
    instruction_pass_rate,
    pairwise_win_rate,
    pass_rate_text,
)
from sgpo_jax.eval.intervals import mean_interval, paired_change, t_quantile_975, wilson_interval
from sgpo_jax.models import Decoder, DecoderConfig
from sgpo_jax.ssapo.instructions import EndWith, IncludeKeywords, Lowercase, MaxWords, NoCommas, VerifiableTask
from sgpo_jax.ssapo.report import round_table

TOKENIZER = make_tokenizer()
CFG = DecoderConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.1)
MODEL = Decoder(CFG)


@pytest.fixture(scope="module")
def params():
    return jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))


def test_instruction_pass_rate_hand_count():
    tasks = [VerifiableTask("Describe the sea.", (MaxWords(5), NoCommas())),
             VerifiableTask("Greet me.", (Lowercase(),)),
             VerifiableTask("Give advice.", (IncludeKeywords(("calm",)), EndWith("Thanks for reading."))),
             VerifiableTask("Say something.", (NoCommas(),))]
    responses = ["Short and sweet.",           # both met
                 "Hello there",                # not lower case
                 "Stay calm, friend.",         # keyword met, ending not
                 "No commas here at all"]      # met
    result = instruction_pass_rate(tasks, responses)
    assert result["passed"] == [True, False, False, True]
    assert result["prompt_level_strict_acc"] == 2 / 4 and result["num_prompts_passed"] == 2
    assert result["instruction_level_strict_acc"] == 4 / 6
    assert (result["num_instructions"], result["num_instructions_passed"]) == (6, 4)
    assert result["per_constraint"] == {"end_with": {"acc": 0.0, "n": 1}, "include_keywords": {"acc": 1.0, "n": 1},
                                        "lowercase": {"acc": 0.0, "n": 1}, "max_words": {"acc": 1.0, "n": 1},
                                        "no_commas": {"acc": 1.0, "n": 2}}
    assert result["metric"] == METRIC == "verifiable-instruction pass rate (IFEval-style) on sgpo_jax's held-out tasks"
    assert result["num_tasks"] == result["num_prompts"] == 4
    assert (PROMPT_ACC, INSTRUCTION_ACC) == ("prompt_level_strict_acc", "instruction_level_strict_acc")
    np.testing.assert_allclose(result["prompt_level_ci95"], wilson_interval(2, 4), rtol=0, atol=0)
    np.testing.assert_allclose(result["instruction_level_ci95"], wilson_interval(4, 6), rtol=0, atol=0)
    lo, hi = result["prompt_level_ci95"]
    assert lo < 2 / 4 < hi
    json.dumps(result)  # the pipeline writes it as JSON
    blank = instruction_pass_rate(tasks, ["", " ", "\n", "\t"])  # blank responses fail everything
    assert blank["prompt_level_strict_acc"] == blank["instruction_level_strict_acc"] == 0.0
    assert blank["prompt_level_ci95"][0] == 0.0 and blank["prompt_level_ci95"][1] > 0.4
    with pytest.raises(ValueError, match="4 tasks but 3 responses"):
        instruction_pass_rate(tasks, responses[:3])


def test_wilson_interval_by_hand():
    # 10 of 32 by hand: p = 0.3125, z^2 = 3.8415, 1 + z^2/n = 1.12005,
    # center = (0.3125 + 0.060023) / 1.12005 = 0.332596,
    # half = 1.96 * sqrt(0.3125 * 0.6875 / 32 + 3.8415 / 4096) / 1.12005 = 1.96 * 0.087474 / 1.12005 = 0.153071
    lo, hi = wilson_interval(10, 32)
    assert abs(lo - 0.179525) < 1e-6 and abs(hi - 0.485667) < 1e-6
    # the same bounds as the roots of (1 + z^2/n) p^2 - (2 phat + z^2/n) p + phat^2 = 0
    z2, n, ph = 1.959963984540054 ** 2, 32, 10 / 32
    a, b, c = 1 + z2 / n, -(2 * ph + z2 / n), ph * ph
    roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    np.testing.assert_allclose((lo, hi), roots, rtol=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, m in ((10, 32), (0, 7), (7, 7), (1, 1), (50, 100), (87, 100)):
        ci = scipy_stats.binomtest(k, m).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose(wilson_interval(k, m), (ci.low, ci.high), rtol=1e-9, atol=1e-12)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(100, 100)[0] == pytest.approx(0.963, abs=5e-4)
    for bad in ((1, 0), (-1, 4), (5, 4)):
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(*bad)


_forward = jax.jit(MODEL.apply)


def greedy_oracle(params, prompt_ids, max_new_tokens, length=32):
    """Argmax of full forward passes over the unpadded sequence, one token at a time, stopping
    after EOS (the sequence is right-padded to one length: causal attention keeps its logits)."""
    seq = list(prompt_ids)
    for _ in range(max_new_tokens):
        ids = np.zeros((1, length), np.int32)
        ids[0, :len(seq)] = seq
        logits = np.asarray(_forward(params, jnp.asarray(ids))[0, len(seq) - 1], np.float64)
        seq.append(int(np.argmax(logits)))
        if seq[-1] == EOS:
            break
    return seq[len(prompt_ids):]


@pytest.mark.parametrize("gained,lost,same", [(0, 0, 5), (3, 1, 28), (9, 1, 22), (0, 7, 3), (12, 12, 8), (1, 0, 0)])
def test_paired_change_is_the_exact_mcnemar_test(gained, lost, same):
    """Oracle: SciPy's exact two-sided binomial test of the discordant prompts at p = 1/2."""
    from scipy.stats import binomtest

    before = [False] * gained + [True] * lost + [True, False] * (same // 2) + [True] * (same % 2)
    after = [True] * gained + [False] * lost + [True, False] * (same // 2) + [True] * (same % 2)
    result = paired_change(before, after)
    m = gained + lost
    expected = 1.0 if m == 0 else binomtest(gained, m, 0.5).pvalue
    # both are sums of a few binomial probabilities in float64: equal up to rounding
    assert result["p_value"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert (result["gained"], result["lost"]) == (gained, lost)
    assert result["change"] == pytest.approx((gained - lost) / len(before), abs=1e-15)
    assert result["significant"] == (expected < 0.05)


def test_paired_change_hand_values_and_bad_input():
    # 9 gained, 1 lost: p = 2 * (1 + 10) / 2**10 = 0.021484375
    assert paired_change([False] * 9 + [True], [True] * 9 + [False])["p_value"] == 22 / 1024
    with pytest.raises(ValueError, match="equally long"):
        paired_change([True], [True, False])
    with pytest.raises(ValueError, match="non-empty"):
        paired_change([], [])


@pytest.mark.parametrize("n", [2, 3, 5, 11, 31, 32, 40, 500])
def test_mean_interval_is_the_student_t_interval(n):
    """Oracle: SciPy's t quantile and NumPy's sample standard deviation. The table holds 3
    decimals (relative error < 3e-4); beyond 31 values the Cornish-Fisher series stands in (its
    truncation error is below 2e-8 from 31 degrees of freedom on; the bound 1e-7 leaves room for
    float64 rounding of the standard deviation)."""
    from scipy.stats import t

    values = np.random.default_rng(n).normal(0.7, 0.05, n)
    mean, half = mean_interval(list(values))
    expected = t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert half == pytest.approx(expected, rel=3e-4 if n <= 31 else 1e-7)


@pytest.mark.parametrize("df", [30, 31, 45, 100, 1000, 10 ** 6])
def test_t_quantile_975_against_scipy(df):
    """Oracle: SciPy's t quantile; the series' truncation error is below 2e-8 from 30 degrees of
    freedom on (1.5e-8 at 30), so 3e-8 bounds it with room for rounding."""
    from scipy.stats import t

    assert t_quantile_975(df) == pytest.approx(t.ppf(0.975, df), rel=3e-8)
    with pytest.raises(ValueError, match="df >= 30"):
        t_quantile_975(29)


def test_mean_interval_of_one_value_and_none():
    assert mean_interval([0.25])[0] == 0.25 and math.isnan(mean_interval([0.25])[1])
    # by hand: mean 2, sd 1, t(0.975, 2) = 4.303 -> 4.303 / sqrt(3)
    assert mean_interval([1.0, 2.0, 3.0]) == (2.0, pytest.approx(4.303 / math.sqrt(3), rel=1e-12))
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def _evaluation(passed, met, total):
    return {"prompt_level_strict_acc": sum(passed) / len(passed), "num_tasks": len(passed), "passed": passed,
            "prompt_level_ci95": list(wilson_interval(sum(passed), len(passed))),
            "instruction_level_strict_acc": met / total,
            "instruction_level_ci95": list(wilson_interval(met, total))}


def test_the_summary_never_calls_a_change_within_noise_a_gain():
    initial = _evaluation([True] * 10 + [False] * 22, 20, 44)
    small = _evaluation([True] * 12 + [False] * 20, 22, 44)  # +2 prompts: p = 0.5
    large = _evaluation([True] * 32, 44, 44)  # +22 prompts: p = 2 / 2**22
    rounds = [{"round": 1, **eval_fields(small, initial)}, {"round": 2, **eval_fields(large, initial)}]
    text = pass_rate_text(rounds[0])
    assert "within noise" in text and "gain" not in text and "McNemar p=0.50" in text
    assert "+0.062 (+2/-0 prompts" in text
    assert "0.375 [95% CI 0.229, 0.547] (prompt)" in text  # Wilson at 12 of 32, by hand: 0.2293, 0.5475
    assert "a significant gain" in pass_rate_text(rounds[1])
    table = round_table(rounds, eval_fields(initial)).splitlines()
    assert table[2].startswith("| initial |") and "| 0.312 [0.18, 0.49] |" in table[2]
    assert table[-1].endswith("Round(s) 2 differ from the initial model at p < 0.05.")
    assert round_table(rounds[:1], eval_fields(initial)).endswith("every change is within noise.")


def test_generate_responses_is_greedy_and_independent_of_batching(params):
    prompts = ["w1 w2 w3 w4 w5", "w6", "w7 w8"]
    kwargs = dict(max_new_tokens=5, max_prompt_length=16, progress=False)
    by_two = generate_responses(MODEL, params, TOKENIZER, prompts, batch_size=2, **kwargs)
    by_three = generate_responses(MODEL, params, TOKENIZER, prompts, batch_size=3, **kwargs)
    assert by_two == by_three and len(by_two) == 3
    ids, _ = tokenize_prompts(TOKENIZER, prompts, max_prompt_length=16)
    for prompt_ids, text in zip(ids, by_two):
        expected = greedy_oracle(params, prompt_ids, 5)
        assert text == TOKENIZER.decode(expected, skip_special_tokens=True)
    assert len(set(by_two)) > 1


def test_evaluate_heldout_scores_its_responses(params):
    result = evaluate_heldout(MODEL, params, TOKENIZER, max_new_tokens=2, batch_size=100, progress=False)
    assert result["num_prompts"] == len(result["responses"]) == len(result["prompts"]) == 100
    from sgpo_jax.ssapo.instructions import ASSETS_DIR, HELDOUT, load_tasks

    tasks = load_tasks(ASSETS_DIR / HELDOUT)
    assert result["prompts"] == [t.prompt for t in tasks]
    expected = instruction_pass_rate(tasks, result["responses"])
    assert {k: result[k] for k in expected} == expected


def test_export_alpaca_eval_schema(tmp_path):
    path = export_alpaca_eval(["Say hi.", "Name a fruit."], ["Hi!", "Apple – ünïcode"], "ssapo-r3",
                              tmp_path / "sub" / "outputs.json", dataset=["helpful_base", "oasst"])
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert rows == [
        {"instruction": "Say hi.", "output": "Hi!", "generator": "ssapo-r3", "dataset": "helpful_base"},
        {"instruction": "Name a fruit.", "output": "Apple – ünïcode", "generator": "ssapo-r3", "dataset": "oasst"},
    ]
    one = json.loads(export_alpaca_eval(["a"], ["b"], "g", tmp_path / "one.json").read_text())
    assert one == [{"instruction": "a", "output": "b", "generator": "g", "dataset": "alpaca_eval"}]
    with pytest.raises(ValueError, match="2 instructions but 1 outputs"):
        export_alpaca_eval(["a", "b"], ["c"], "g", tmp_path / "bad.json")


def test_export_mt_bench_answers_schema(tmp_path):
    path = export_mt_bench_answers([81, 82], [("first", "second"), ("a", "b")], "ssapo", tmp_path / "m.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [81, 82]
    assert lines[0]["choices"] == [{"index": 0, "turns": ["first", "second"]}]
    assert all(line["model_id"] == "ssapo" and isinstance(line["tstamp"], float) and line["answer_id"]
               for line in lines)


def longer_is_better(instruction, a, b):
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


def test_pairwise_win_rate_hand_count_with_ties_and_position_debiasing():
    instructions = ["x1", "x2", "x3", "x4"]
    outputs = ["aaa", "a", "bb", "cccc"]
    references = ["a", "aaa", "cc", "c"]
    result = pairwise_win_rate(instructions, outputs, references, longer_is_better)
    scores = [1.0, 0.0, 0.5, 1.0]
    assert result["scores"] == scores and result["n"] == 4
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == 2.5 / 4
    mean = 2.5 / 4
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / 3 / 4)
    assert math.isclose(result["standard_error"], se)

    def first_is_better(instruction, a, b):  # pure position bias
        return 1.0

    assert pairwise_win_rate(instructions, outputs, references, first_is_better)["win_rate"] == 0.5
    assert pairwise_win_rate(instructions, outputs, references, first_is_better, both_orders=False)["win_rate"] == 1.0

    calls = []

    def probabilistic(instruction, a, b):  # P(a better) = 0.8 when a is the model output, else 0.3
        calls.append((instruction, a, b))
        return 0.8 if a == "out" else 0.3

    result = pairwise_win_rate(["x"], ["out"], ["ref"], probabilistic)
    assert calls == [("x", "out", "ref"), ("x", "ref", "out")]
    assert math.isclose(result["win_rate"], 0.5 * (0.8 + 1 - 0.3)) and math.isnan(result["standard_error"])
    with pytest.raises(ValueError, match="probability"):
        pairwise_win_rate(["x"], ["a"], ["b"], lambda *args: 1.5)
    with pytest.raises(ValueError, match="probability"):
        pairwise_win_rate(["x"], ["a"], ["b"], lambda *args: float("nan"))
