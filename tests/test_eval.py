"""Evaluation (:mod:`sgpo_jax.ssapo.eval`) against hand counts and independent oracles: pass rates on
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
from sgpo_jax.ssapo.eval import (
    evaluate_heldout,
    export_alpaca_eval,
    export_mt_bench_answers,
    generate_responses,
    instruction_pass_rate,
    pairwise_win_rate,
)
from sgpo_jax.ssapo.instructions import EndWith, IncludeKeywords, Lowercase, MaxWords, NoCommas, VerifiableTask
from sgpo_jax.models import Decoder, DecoderConfig

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
    with pytest.raises(ValueError, match="4 tasks but 3 responses"):
        instruction_pass_rate(tasks, responses[:3])


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
