r"""Evaluation: verifiable-instruction pass rates, batched generation, exports for AlpacaEval and
MT-Bench, and pairwise win rates with a pluggable judge.

**Offline (bundled held-out tasks).** :func:`evaluate_heldout` generates greedy answers to the
held-out verifiable tasks (``sgpo_jax/assets/heldout.jsonl``, 100 tasks) and reports the
*verifiable-instruction pass rate (IFEval-style) on sgpo_jax's held-out tasks*
(:func:`instruction_pass_rate`): the fraction of prompts whose every constraint is met and the
fraction of all constraints met, each with a 95% confidence interval and the number of tasks
scored. This is **not IFEval**: the tasks are this repository's own (15 constraint types, 1-2 per
task, everyday instructions), and its checkers differ from IFEval's in the ways listed in
:mod:`sgpo_jax.ssapo.instructions`; the numbers are comparable across runs of this library only,
not with published IFEval scores. With 100 tasks the prompt-level interval at a 50% pass rate is
[0.40, 0.60], so differences of a few points between rounds are within noise.

**AlpacaEval 2.0** (the paper's headline metric: 805 instructions, GPT-4 Turbo judge, length-
controlled win rate against GPT-4 Turbo's answers). Generate answers to the official instructions
and export them with :func:`export_alpaca_eval`, then judge with the official package::

    import datasets
    eval_set = datasets.load_dataset("tatsu-lab/alpaca_eval", "alpaca_eval", trust_remote_code=True)["eval"]
    outputs = generate_responses(model, params, tokenizer, eval_set["instruction"], max_new_tokens=2048,
                                 batch_size=32, max_prompt_length=1024)
    export_alpaca_eval(eval_set["instruction"], outputs, "ssapo-round3", "alpaca_outputs.json",
                       dataset=eval_set["dataset"])
    # shell (needs OPENAI_API_KEY):  alpaca_eval --model_outputs alpaca_outputs.json
    #   (default annotator weighted_alpaca_eval_gpt4_turbo; reports LC win rate and win rate)

**MT-Bench** (80 two-turn questions, GPT-4 grades 1-10) runs in FastChat's ``llm_judge``. The
second turn is generated with the first answer in context, as a message list::

    qs = [json.loads(l) for l in open("fastchat/llm_judge/data/mt_bench/question.jsonl")]
    first = generate_responses(model, params, tok, [q["turns"][0] for q in qs], **kw)
    second = generate_responses(model, params, tok, [
        [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a},
         {"role": "user", "content": q["turns"][1]}] for q, a in zip(qs, first)], **kw)
    export_mt_bench_answers([q["question_id"] for q in qs], list(zip(first, second)), "ssapo-round3",
                            "fastchat/llm_judge/data/mt_bench/model_answer/ssapo-round3.jsonl")
    # then: python gen_judgment.py --model-list ssapo-round3 && python show_result.py

(FastChat samples MT-Bench answers at category-dependent temperatures, 0.7 by default and
0 for math/reasoning/coding; pass ``temperature`` accordingly, or report greedy decoding.)

**Pairwise win rates with any judge.** :func:`pairwise_win_rate` takes
``judge(instruction, output_a, output_b) -> P(a is better)`` and debiases position by judging
both orders. An LLM judge is a function that formats a comparison prompt, asks a model and maps
its answer to a probability, e.g. with an OpenAI-compatible client::

    def gpt4_judge(instruction, a, b):
        prompt = (f"Which response follows the instruction better?\n\nInstruction: {instruction}\n\n"
                  f"Response A: {a}\n\nResponse B: {b}\n\nAnswer with one letter, A or B.")
        reply = client.chat.completions.create(model="gpt-4-turbo", max_tokens=1, logprobs=True, top_logprobs=5,
                                               messages=[{"role": "user", "content": prompt}])
        top = {t.token.strip(): math.exp(t.logprob) for t in reply.choices[0].logprobs.content[0].top_logprobs}
        pa, pb = top.get("A", 0.0), top.get("B", 0.0)
        return pa / (pa + pb) if pa + pb > 0 else 0.5      # or 1.0 / 0.0 / 0.5 from the text alone

A local judge works the same way (e.g. a reward model's ``sigmoid(r(x, a) - r(x, b))``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ml_collections import ConfigDict

from sgpo_jax.data.tokenize import Prompt
from sgpo_jax.eval.evaluator import Evaluator
from sgpo_jax.eval.intervals import paired_change, wilson_interval
from sgpo_jax.models.llama import Decoder
from sgpo_jax.ssapo.instructions import ASSETS_DIR, HELDOUT, VerifiableTask, load_tasks
from sgpo_jax.ssapo.sampling import sample_batches
from sgpo_jax.training.workdir import write_file

__all__ = ["INSTRUCTION_ACC", "INSTRUCTION_CI", "METRIC", "PROMPT_ACC", "PROMPT_CI", "TaskEvaluator", "eval_fields",
           "evaluate_heldout", "export_alpaca_eval", "export_mt_bench_answers", "generate_responses",
           "instruction_pass_rate", "pairwise_win_rate", "pass_rate_text", "task_evaluator"]

Judge = Callable[[str, str, str], float]


PROMPT_ACC, INSTRUCTION_ACC = "prompt_level_strict_acc", "instruction_level_strict_acc"
PROMPT_CI, INSTRUCTION_CI = "prompt_level_ci95", "instruction_level_ci95"
METRIC = "verifiable-instruction pass rate (IFEval-style) on sgpo_jax's held-out tasks"


def instruction_pass_rate(tasks: Sequence[VerifiableTask], responses: Sequence[str]) -> Dict[str, Any]:
    """The verifiable-instruction pass rate (IFEval-style, strict) of ``responses[i]`` on ``tasks[i]``.

    IFEval's two strict accuracies computed with this library's checkers (see the module
    docstring: on sgpo_jax's own tasks this is not an IFEval score). An empty or whitespace-only
    response fails every constraint.

    Returns a dict:

    * ``metric``: :data:`METRIC`, the metric's name;
    * ``num_tasks``: the number of tasks (prompts) scored;
    * ``prompt_level_strict_acc``: fraction of prompts whose response meets *every* constraint;
    * ``prompt_level_ci95``: ``[lo, hi]``, its 95% Wilson score interval (prompts are independent
      draws: the binomial model holds);
    * ``instruction_level_strict_acc``: fraction of all constraints (over all prompts) met;
    * ``instruction_level_ci95``: ``[lo, hi]``, the 95% Wilson interval over the constraints.
      It treats every constraint as an independent trial and so ignores the correlation between
      the constraints of one prompt (a response that ignores the task tends to fail all of them):
      with 1-2 constraints per prompt it is somewhat too narrow;
    * ``num_prompts`` (= ``num_tasks``), ``num_prompts_passed``, ``num_instructions``,
      ``num_instructions_passed``;
    * ``per_constraint``: ``{type: {"acc", "n"}}`` the instruction-level accuracy per constraint type;
    * ``passed``: per prompt, whether it passed.

    Raises ``ValueError`` if the lengths differ or there are no tasks.
    """
    if len(tasks) != len(responses):
        raise ValueError(f"{len(tasks)} tasks but {len(responses)} responses")
    if not tasks:
        raise ValueError("no tasks to score")
    passed, met, kinds = [], 0, {}
    total = 0
    for task, response in zip(tasks, responses):
        results = task.results(response)
        passed.append(all(results))
        met += sum(results)
        total += len(results)
        for constraint, ok in zip(task.constraints, results):
            counts = kinds.setdefault(constraint.kind, [0, 0])
            counts[0] += ok
            counts[1] += 1
    return {
        "metric": METRIC,
        "num_tasks": len(passed),
        PROMPT_ACC: sum(passed) / len(passed),
        PROMPT_CI: list(wilson_interval(sum(passed), len(passed))),
        INSTRUCTION_ACC: met / total,
        INSTRUCTION_CI: list(wilson_interval(met, total)),
        "num_prompts": len(passed),
        "num_prompts_passed": sum(passed),
        "num_instructions": total,
        "num_instructions_passed": met,
        "per_constraint": {kind: {"acc": ok / n, "n": n} for kind, (ok, n) in sorted(kinds.items())},
        "passed": passed,
    }


def generate_responses(model: Decoder, params: Any, tokenizer: Any, prompts: Sequence[Prompt], *,
                       max_new_tokens: int, batch_size: int, max_prompt_length: int, temperature: float = 0.0,
                       top_p: float = 1.0, top_k: int = 0, stop_strings: Optional[Sequence[str]] = None,
                       seed: int = 0, eos_token_ids: Optional[Sequence[int]] = None,
                       progress: bool = True) -> List[str]:
    """One response per prompt, batched with a progress bar (the generation loop of
    :func:`sgpo_jax.ssapo.sampling.sample_batches` with one sample per prompt).

    Args:
      model, params, tokenizer: the :class:`Decoder`, its variables and a ``transformers``
        tokenizer with an EOS token.
      prompts: strings (one user message each) or ``{"role", "content"}`` message lists; the chat
        template is applied as in training (:func:`sgpo_jax.data.tokenize_prompts`).
      max_new_tokens: tokens per response at most.
      batch_size: prompts per batch (every batch, the last one filled up, has this shape).
      max_prompt_length: prompts keep their last ``max_prompt_length`` tokens.
      temperature: 0 (default) is greedy; top_p, top_k as in :func:`sgpo_jax.ssapo.sampling.generate`.
      stop_strings: texts are cut before the first of them.
      seed: sampling seed (unused when greedy); batch ``i`` uses
        :func:`sgpo_jax.ssapo.sampling.batch_keys` ``(seed, i)``.
      eos_token_ids: default ``(tokenizer.eos_token_id,)``.
      progress: show progress bars.

    Returns ``len(prompts)`` texts (special tokens skipped), in prompt order.
    """
    texts: List[str] = []
    for batch in sample_batches(model, params, tokenizer, prompts, num_samples=1, max_new_tokens=max_new_tokens,
                                max_prompt_length=max_prompt_length, batch_size=batch_size, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, stop_strings=stop_strings,
                                eos_token_ids=eos_token_ids, desc="evaluating", progress=progress):
        texts.extend(batch.texts)
    return texts


def evaluate_heldout(model: Decoder, params: Any, tokenizer: Any, tasks: Optional[Sequence[VerifiableTask]] = None,
                     *, max_new_tokens: int = 256, batch_size: int = 16, max_prompt_length: int = 512,
                     **generation: Any) -> Dict[str, Any]:
    """Generates answers to verifiable tasks and scores them: the verifiable-instruction pass rate
    (IFEval-style) on sgpo_jax's held-out tasks, with 95% intervals (:func:`instruction_pass_rate`).

    Args:
      model, params, tokenizer: as in :func:`generate_responses`.
      tasks: the tasks; default the bundled held-out split (``heldout.jsonl``, 100 tasks).
      max_new_tokens, batch_size, max_prompt_length, **generation: passed to
        :func:`generate_responses` (greedy unless ``temperature`` is given).

    Returns :func:`instruction_pass_rate`'s dict plus ``prompts`` and ``responses``.
    """
    tasks = load_tasks(ASSETS_DIR / HELDOUT) if tasks is None else list(tasks)
    prompts = [task.prompt for task in tasks]
    responses = generate_responses(model, params, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, max_prompt_length=max_prompt_length, **generation)
    return {**instruction_pass_rate(tasks, responses), "prompts": prompts, "responses": responses}


class TaskEvaluator(Evaluator):
    """The verifiable-instruction pass rate on fixed tasks (:func:`evaluate_heldout`, greedy), as
    an :class:`~sgpo_jax.eval.evaluator.Evaluator`: the SSAPO loop calls it after every round,
    ``dpo``/``sgpo`` runs at the end.

    Args:
      model, tokenizer: as in :func:`generate_responses`.
      tasks: the tasks scored.
      max_new_tokens, batch_size, max_prompt_length, seed: the generation settings.
    """

    def __init__(self, model: Decoder, tokenizer: Any, tasks: Sequence[VerifiableTask], *, max_new_tokens: int,
                 batch_size: int, max_prompt_length: int, seed: int):
        self.model, self.tokenizer, self.tasks = model, tokenizer, list(tasks)
        self.settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size,
                             max_prompt_length=max_prompt_length, seed=seed)

    def evaluate(self, params: Any, step: int) -> Dict[str, Any]:
        """:func:`evaluate_heldout`'s dict (``step`` does not enter: generation is seeded by ``seed``)."""
        del step
        return evaluate_heldout(self.model, params, self.tokenizer, self.tasks, **self.settings)


def task_evaluator(config: ConfigDict, model: Decoder, tokenizer: Any) -> Optional[TaskEvaluator]:
    """The run's :class:`TaskEvaluator` from ``eval.*`` (``eval.tasks``: ``"heldout"`` = the bundled
    tasks, or a task JSONL; the first ``eval.limit``, 0 = all; generation seeded by
    ``train.seed``, prompts cut to ``data.max_prompt_length``), or None when ``eval.tasks`` is empty."""
    e = config.eval
    if not e.tasks:
        return None
    tasks = load_tasks(ASSETS_DIR / HELDOUT if e.tasks == "heldout" else e.tasks)[: e.limit or None]
    return TaskEvaluator(model, tokenizer, tasks, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                         max_prompt_length=config.data.max_prompt_length, seed=config.train.seed)


def eval_fields(evaluation: Dict[str, Any], initial: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The summary fields of one held-out evaluation (:func:`instruction_pass_rate`): both pass
    rates with their 95% intervals and, given the initial model's evaluation on the same tasks,
    ``vs_initial``: the paired change of the prompt-level rate
    (:func:`sgpo_jax.eval.intervals.paired_change`)."""
    fields = {"pass_rate_prompt": evaluation[PROMPT_ACC], "pass_rate_prompt_ci95": evaluation[PROMPT_CI],
              "pass_rate_instruction": evaluation[INSTRUCTION_ACC],
              "pass_rate_instruction_ci95": evaluation[INSTRUCTION_CI], "eval_tasks": evaluation["num_tasks"]}
    if initial is not None:
        fields["vs_initial"] = paired_change(initial["passed"], evaluation["passed"])
    return fields


def pass_rate_text(fields: Dict[str, Any]) -> str:
    """One line for the console: the pass rates with their intervals, and the change against the
    initial model with its verdict (a change within noise is said to be one)."""
    lo, hi = fields["pass_rate_prompt_ci95"]
    ilo, ihi = fields["pass_rate_instruction_ci95"]
    text = (f"held-out pass rate {fields['pass_rate_prompt']:.3f} [95% CI {lo:.3f}, {hi:.3f}] (prompt), "
            f"{fields['pass_rate_instruction']:.3f} [{ilo:.3f}, {ihi:.3f}] (instruction), "
            f"{fields['eval_tasks']} tasks")
    change = fields.get("vs_initial")
    if change is not None:
        verdict = ("a significant " + ("gain" if change["change"] > 0 else "loss") if change["significant"]
                   else "within noise")
        text += (f"; vs initial {change['change']:+.3f} (+{change['gained']}/-{change['lost']} prompts, "
                 f"McNemar p={change['p_value']:.2f}: {verdict})")
    return text


def _as_list(value: Union[str, Sequence[str]], n: int, name: str) -> List[str]:
    if isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} outputs")
    return value


def export_alpaca_eval(instructions: Sequence[str], outputs: Sequence[str], generator: str,
                       path: Union[str, os.PathLike], *, dataset: Union[str, Sequence[str]] = "alpaca_eval") -> Path:
    """Writes AlpacaEval's ``model_outputs`` JSON: a list of ``{"instruction", "output",
    "generator", "dataset"}`` (UTF-8, indented), for ``alpaca_eval --model_outputs PATH``.

    Args:
      instructions: the evaluation instructions, verbatim (AlpacaEval matches them to its
        reference outputs by text).
      outputs: the model's answers, one per instruction.
      generator: the model's name on the leaderboard.
      path: the file to write (parent directories are created).
      dataset: the source subset per instruction (the eval set's ``dataset`` column), or one
        string for all.

    Returns the path.
    """
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    if not isinstance(generator, str) or not generator:
        raise ValueError(f"generator must be a non-empty string, got {generator!r}")
    datasets_ = _as_list(dataset, len(outputs), "dataset")
    rows = [{"instruction": i, "output": o, "generator": generator, "dataset": d}
            for i, o, d in zip(instructions, outputs, datasets_)]
    return write_file(path, json.dumps(rows, ensure_ascii=False, indent=2) + "\n")


def export_mt_bench_answers(question_ids: Sequence[Union[int, str]], turns: Sequence[Sequence[str]], model_id: str,
                            path: Union[str, os.PathLike]) -> Path:
    """Writes FastChat ``llm_judge`` model answers (JSONL, one line per question):
    ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}``.

    Args:
      question_ids: the MT-Bench ``question_id`` of each question.
      turns: per question, the answers to its turns in order (two for MT-Bench).
      model_id: the name ``gen_judgment.py --model-list`` refers to.
      path: usually ``fastchat/llm_judge/data/mt_bench/model_answer/{model_id}.jsonl``.

    Returns the path.
    """
    if len(question_ids) != len(turns):
        raise ValueError(f"{len(question_ids)} question ids but {len(turns)} answers")
    now = time.time()
    lines = [json.dumps({"question_id": q, "answer_id": f"{model_id}-{q}", "model_id": model_id,
                         "choices": [{"index": 0, "turns": list(t)}], "tstamp": now}, ensure_ascii=False)
             for q, t in zip(question_ids, turns)]
    return write_file(path, "".join(line + "\n" for line in lines))


def pairwise_win_rate(instructions: Sequence[str], outputs: Sequence[str], reference_outputs: Sequence[str],
                      judge: Judge, *, both_orders: bool = True) -> Dict[str, Any]:
    r"""Win rate of ``outputs`` against ``reference_outputs`` under ``judge``.

    ``judge(instruction, a, b)`` returns the probability in ``[0, 1]`` that ``a`` is the better
    answer (1 win, 0 loss, 0.5 tie, or anything between). Example ``i`` scores

    .. math:: s_i = \tfrac12 \big(J(x_i, o_i, r_i) + 1 - J(x_i, r_i, o_i)\big)

    with ``both_orders`` (position-swap debiasing: a judge that always prefers the first answer
    scores 0.5), else :math:`s_i = J(x_i, o_i, r_i)`. Ties therefore count as half a win.

    Returns a dict: ``win_rate`` (mean of :math:`s_i`, in ``[0, 1]``), ``standard_error``
    (sample standard deviation of :math:`s_i` over :math:`\sqrt n`; NaN for ``n = 1``), ``n``,
    ``wins`` / ``ties`` / ``losses`` (:math:`s_i` above, at, below 0.5) and ``scores``.

    Raises ``ValueError`` on mismatched lengths, no examples, or a judge value outside ``[0, 1]``.
    """
    n = len(instructions)
    if not len(outputs) == len(reference_outputs) == n:
        raise ValueError(f"{n} instructions, {len(outputs)} outputs and {len(reference_outputs)} reference outputs")
    if n == 0:
        raise ValueError("no examples")

    def ask(i: int, a: str, b: str) -> float:
        p = float(judge(instructions[i], a, b))
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"judge returned {p!r} for example {i}; it must be a probability in [0, 1]")
        return p

    scores = []
    for i, (out, ref) in enumerate(zip(outputs, reference_outputs)):
        s = ask(i, out, ref)
        if both_orders:
            s = 0.5 * (s + 1.0 - ask(i, ref, out))
        scores.append(s)
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else float("nan")
    return {"win_rate": mean, "standard_error": se, "n": n,
            "wins": sum(s > 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores),
            "losses": sum(s < 0.5 for s in scores), "scores": scores}
