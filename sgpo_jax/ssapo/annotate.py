r"""Self-annotation for SSAPO: sample responses with the policy, score them with its implicit
reward, keep one (chosen, rejected) pair per prompt.

For a prompt :math:`x` the policy :math:`\pi_t` samples ``n`` responses :math:`y_1..y_n`; each is
scored on device by the implicit reward of DPO,

.. math::

    r(y) = \beta \left( \log \pi_t(y \mid x) - \log \pi_\mathrm{ref}(y \mid x) \right)

(summed log-probabilities of the response tokens; the authors use :math:`\beta = 1`, i.e.
``beta=None``, with :math:`\pi_\mathrm{ref}` the SFT model), and :func:`select_pairs` makes the
pair: ``"best_worst"`` (the authors') takes the highest against the lowest reward,
``"max_chosen"`` the highest against a uniformly random other sample.

Pipeline (:func:`annotate`), per batch of ``batch_size`` prompts:

1. prompts tokenized exactly as training tokenizes them
   (:func:`sgpo_jax.data.tokenize_prompts`), left-padded to a bucketed length
   (:func:`sgpo_jax.data.default_buckets` of ``max_prompt_length``); the last batch is filled up
   with copies of its last prompt, so every batch has one compiled shape;
2. :func:`sgpo_jax.ssapo.sampling.generate` (``num_samples`` per prompt) and host decoding
   (:func:`sgpo_jax.ssapo.sampling.decode_text`); with ``stop_strings`` a sample is cut to the longest
   token prefix whose text ends before the first stop string, and that prefix is what is scored
   and stored (text and reward always describe the same tokens);
3. on device, one jitted call: :func:`implicit_rewards` under the policy and the reference
   (with ``share_prompt``, each prompt computed once for all its samples), then
   :func:`select_pairs`;
4. rows for the kept prompts; the others are reported with a reason (:data:`DROP_REASONS`).

A pair is never made of samples with equal or empty text (whitespace-stripped): training would
reject it (:data:`sgpo_jax.data.loading.IDENTICAL`, :data:`~sgpo_jax.data.loading.EMPTY`).

**Determinism and resuming.** Batch ``i`` holds prompts ``[i * batch_size, (i + 1) * batch_size)``
and draws its randomness only from :func:`batch_keys` ``(seed, i)`` (not from a key carried from
batch to batch), so a batch's rows depend on nothing but the parameters, the settings and its
own prompts. A run interrupted after batch ``k - 1`` is continued with ``start_batch=k`` and
yields exactly the rows an uninterrupted run would. A resumable writer::

    done = progress_file.read_text() if progress_file.exists() else "0"
    def on_batch(index, rows, dropped):
        with open("pairs.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        progress_file.write_text(str(index + 1))     # after the rows: at worst a batch is redone
    rows = annotate(..., seed=0, start_batch=int(done), on_batch=on_batch)   # rows.report: drops

(on restart, first drop the rows of ``pairs.jsonl`` whose ``"batch"`` is ``>= start_batch``:
they belong to a batch whose progress was not recorded.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sgpo_jax.console import say
from sgpo_jax.data.tokenize import Prompt
from sgpo_jax.models.llama import Decoder
from sgpo_jax.models.logps import DEFAULT_CHUNK_SIZE, decoder_logps_fn
from sgpo_jax.parallel import distributed, sharding
from sgpo_jax.ssapo.sampling import GenerationOutput, batch_keys, sample_batches

Array = jax.Array
LogpsFn = Callable[[Any, Array, Array, Array], Array]

__all__ = ["AnnotatedRows", "AnnotationReport", "DROP_EMPTY", "DROP_IDENTICAL", "DROP_REASONS", "STRATEGIES",
           "annotate", "identical_samples", "implicit_rewards", "select_pairs", "shared_prompt_rows"]

STRATEGIES = ("best_worst", "max_chosen")
DROP_EMPTY = "fewer than two non-empty samples"
DROP_IDENTICAL = "all non-empty samples identical"
DROP_REASONS = (DROP_EMPTY, DROP_IDENTICAL)


# ----------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------


def implicit_rewards(logps_fn: LogpsFn, policy_params: Any, ref_params: Any, prompt_ids: Array, prompt_mask: Array,
                     output: GenerationOutput, *, beta: Optional[float] = None, share_prompt: bool = False) -> Array:
    r"""Implicit rewards of generated samples, ``[B, n]``, on device and jittable.

    Row ``r`` of ``output`` (prompt ``output.prompt_index[r]``) becomes the sequence
    ``[prompt_ids[b], output.tokens[r]]`` of ``P + T`` tokens with attention on the prompt's real
    tokens and the first ``output.lengths[r]`` new tokens (its EOS included when it finished), and
    a loss mask on those new tokens only. Tokens past a row's length are replaced by id 0 (so any
    ``pad_token_id`` is fine). Then

    .. math:: r = \beta \, (\log \pi(y \mid x) - \log \pi_\mathrm{ref}(y \mid x)),

    with ``beta = None`` meaning no factor (the authors' score).

    ``share_prompt`` (prefix sharing, as ``data.prefix_sharing`` in training) scores the same
    sequences with each prompt computed once: prompt ``b`` and its ``n`` samples become one row
    ``[prompt_ids[b], y_{b,1}, ..., y_{b,n}]`` of ``P + nT`` slots (:func:`shared_prompt_rows`),
    every sample a branch that sees the prompt and itself, its RoPE positions restarting at the
    prompt's length, so every token has the hidden state of its unshared row; the log-probs are
    :func:`sgpo_jax.models.logps.segment_logps` (``logps_fn.segments``) of the samples' chains.
    The prompt's work drops from ``n`` times to once per prompt; the result is the unshared one
    up to float rounding (the softmax runs over a differently laid out, masked key set).

    Args:
      logps_fn: ``logps_fn(params, ids, attention, loss_mask) -> [N]`` summed log-probs, e.g.
        :func:`sgpo_jax.models.decoder_logps_fn` of the model (which also carries the
        ``logps_fn.segments`` that ``share_prompt`` needs).
      policy_params, ref_params: the two models' variables.
      prompt_ids: ``[B, P]`` int prompts as given to :func:`~sgpo_jax.ssapo.sampling.generate`
        (left-padded; ids at padding in range).
      prompt_mask: ``[B, P]``, 1 on real prompt tokens.
      output: ``N = B * n`` rows, prompt-major (as :func:`~sgpo_jax.ssapo.sampling.generate` returns).
      beta: optional factor.
      share_prompt: one row per prompt with its ``n`` samples (above).

    Returns ``[B, n]`` rewards in the log-probs' dtype (float32 for float32/bfloat16 models).
    """
    b, _ = prompt_ids.shape
    n_rows, t = output.tokens.shape
    if n_rows % b:
        raise ValueError(f"output has {n_rows} rows, not a multiple of the {b} prompts")
    response = jnp.arange(t)[None, :] < output.lengths[:, None]  # [N, T]
    tokens = jnp.where(response, output.tokens, 0).astype(jnp.int32)
    if share_prompt:
        *rows, chain = shared_prompt_rows(prompt_ids, prompt_mask, tokens, response)
        logps = lambda params: logps_fn.segments(params, *rows, (chain,))[0]
    else:
        ids = jnp.concatenate([jnp.take(prompt_ids, output.prompt_index, axis=0).astype(jnp.int32), tokens], axis=1)
        prompt_mask = jnp.take(prompt_mask, output.prompt_index, axis=0).astype(jnp.int32)
        attention = jnp.concatenate([prompt_mask, response.astype(jnp.int32)], axis=1)
        loss_mask = jnp.concatenate([jnp.zeros_like(prompt_mask), response.astype(jnp.int32)], axis=1)
        logps = lambda params: logps_fn(params, ids, attention, loss_mask)
    rewards = logps(policy_params) - logps(ref_params)
    if beta is not None:
        rewards = beta * rewards
    return rewards.reshape(b, n_rows // b)


def shared_prompt_rows(prompt_ids: Array, prompt_mask: Array, tokens: Array, response: Array
                       ) -> Tuple[Array, Array, Array, Array, Tuple[Array, Array]]:
    """``(ids, positions, segment_ids, branch_ids, (index, mask))``: each left-padded prompt
    ``[B, P]`` with its ``n`` samples ``tokens [B * n, T]`` (prompt-major; ``response`` marks
    their real tokens) as one row of ``W = P + nT`` slots for
    :func:`sgpo_jax.models.logps.segment_logps`.

    With :math:`p_b` the prompt's real length: slots ``[0, P)`` the prompt (branch 0, positions
    ``0..p_b - 1`` on its real tokens), slots ``P + iT + [0, T)`` sample ``i`` (branch ``i + 1``,
    positions ``p_b, p_b + 1, ...``); segment id 1 on real tokens, 0 on padding (never attended).
    Sample ``r = bn + i``'s chain: ``index = bW + [P - 1, P + iT, ..., P + iT + T - 1]`` (the
    prompt's last slot predicts the first token) and ``mask = [0, response_r]``."""
    b, p = prompt_ids.shape
    n_rows, t = tokens.shape
    n = n_rows // b
    width = p + n * t
    ids = jnp.concatenate([prompt_ids.astype(jnp.int32), tokens.reshape(b, n * t)], axis=1)
    segment_ids = jnp.concatenate([prompt_mask.astype(jnp.int32), response.reshape(b, n * t).astype(jnp.int32)],
                                  axis=1)
    length = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)[:, None]
    positions = jnp.concatenate([jnp.maximum(jnp.cumsum(prompt_mask, axis=1, dtype=jnp.int32) - 1, 0),
                                 length + jnp.tile(jnp.arange(t, dtype=jnp.int32), n)[None, :]], axis=1)
    branch_ids = jnp.broadcast_to(jnp.concatenate([jnp.zeros(p, jnp.int32), jnp.repeat(jnp.arange(1, n + 1), t)]),
                                  (b, width)).astype(jnp.int32)
    rows = jnp.arange(n_rows, dtype=jnp.int32)
    prompt_end = (rows // n) * width + p - 1  # the prompt's last slot
    first = prompt_end + 1 + (rows % n) * t  # the sample's first slot
    index = jnp.concatenate([prompt_end[:, None], first[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]], axis=1)
    mask = jnp.concatenate([jnp.zeros((n_rows, 1), jnp.int32), response.astype(jnp.int32)], axis=1)
    return ids, positions, segment_ids, branch_ids, (index, mask)


def identical_samples(output: GenerationOutput, num_samples: int) -> Array:
    """``[B, n, n]`` bool: ``[b, i, j]`` is True where samples ``i`` and ``j`` of prompt ``b`` are the
    same token sequence (same length, same tokens up to it). On device; the diagonal is True."""
    n_rows, t = output.tokens.shape
    real = jnp.arange(t)[None, :] < output.lengths[:, None]
    tokens = jnp.where(real, output.tokens, -1).reshape(n_rows // num_samples, num_samples, t)
    return jnp.all(tokens[:, :, None] == tokens[:, None], axis=-1)


def select_pairs(rewards: Array, same: Array, *, strategy: str = "best_worst", rng: Optional[Array] = None,
                 valid: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """One (chosen, rejected) sample pair per prompt, on device and jittable.

    ``chosen`` is the valid sample with the highest reward (the first on ties). The candidates for
    ``rejected`` are the valid samples that differ from ``chosen`` (``~same[b, chosen]``):

    * ``"best_worst"``: the candidate with the lowest reward (the first on ties); with
      ``n = 2`` this is simply the higher against the lower sample (the SSAPO authors' rule);
    * ``"max_chosen"``: a candidate drawn uniformly at random (one ``jax.random.uniform`` per
      sample from ``rng``, the largest wins).

    ``keep`` is False where there is no candidate: fewer than two valid samples, or every valid
    sample identical to ``chosen`` (e.g. all samples identical). There ``rejected == chosen``.

    Args:
      rewards: ``[B, n]`` float rewards; non-finite ones count as invalid samples.
      same: ``[B, n, n]`` bool, ``same[b, i, j]`` where samples ``i`` and ``j`` are identical (e.g.
        :func:`identical_samples`, or equal decoded texts); ``i == j`` is treated as identical.
      strategy: one of :data:`STRATEGIES`.
      rng: a PRNG key, required for ``"max_chosen"``.
      valid: ``[B, n]`` bool, samples allowed in a pair (default all; e.g. non-empty texts).

    Returns ``(chosen, rejected, keep)``: int32 ``[B]``, int32 ``[B]``, bool ``[B]``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "max_chosen" and rng is None:
        raise ValueError("strategy 'max_chosen' needs rng")
    b, n = rewards.shape
    if same.shape != (b, n, n):
        raise ValueError(f"same must have shape {(b, n, n)} for rewards {(b, n)}, got {tuple(same.shape)}")
    valid = jnp.isfinite(rewards) & (True if valid is None else jnp.asarray(valid, bool))
    chosen = jnp.argmax(jnp.where(valid, rewards, -jnp.inf), axis=-1).astype(jnp.int32)
    like_chosen = jnp.take_along_axis(same, chosen[:, None, None], axis=1)[:, 0]  # [B, n]
    candidates = valid & ~like_chosen & (jnp.arange(n)[None, :] != chosen[:, None])
    keep = jnp.any(candidates, axis=-1) & jnp.take_along_axis(valid, chosen[:, None], axis=1)[:, 0]
    if strategy == "best_worst":
        rejected = jnp.argmin(jnp.where(candidates, rewards, jnp.inf), axis=-1)
    else:
        rejected = jnp.argmax(jnp.where(candidates, jax.random.uniform(rng, (b, n)), -1.0), axis=-1)
    return chosen, jnp.where(keep, rejected, chosen).astype(jnp.int32), keep


@functools.lru_cache(maxsize=16)
def _score_and_select(model: Decoder, chunk_size: int, strategy: str, beta: Optional[float],
                      share_prompt: bool) -> Callable:
    """The jitted device step of :func:`annotate`, one per model and setting (cached, so repeated
    calls reuse the compilation)."""
    logps_fn = decoder_logps_fn(model, chunk_size=chunk_size)

    @jax.jit
    def run(policy_params, ref_params, prompt_ids, prompt_mask, output, same, valid, rng):
        rewards = implicit_rewards(logps_fn, policy_params, ref_params, prompt_ids, prompt_mask, output, beta=beta,
                                   share_prompt=share_prompt)
        chosen, rejected, keep = select_pairs(rewards, same, strategy=strategy, rng=rng, valid=valid)
        return rewards, chosen, rejected, keep

    return run


# ----------------------------------------------------------------------------------------------
# Self-annotation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AnnotationReport:
    """What :func:`annotate` did: ``prompts`` prompts in ``batches`` batches (from ``start_batch``),
    ``rows`` pairs kept, ``dropped`` counts per reason (:data:`DROP_REASONS`) and the first
    ``max_examples`` dropped prompts as ``(prompt_index, reason)``."""

    prompts: int = 0
    batches: int = 0
    start_batch: int = 0
    rows: int = 0
    dropped: Dict[str, int] = dataclasses.field(default_factory=dict)
    examples: List[Tuple[int, str]] = dataclasses.field(default_factory=list)
    max_examples: int = 5

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def add_dropped(self, prompt_index: int, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append((prompt_index, reason))

    def __str__(self) -> str:
        head = (f"annotated {self.prompts} prompts in {self.batches} batches (from batch {self.start_batch}): "
                f"{self.rows} pairs")
        if not self.dropped:
            return head + ", none dropped"
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        examples = ", ".join(f"prompt {i} ({reason})" for i, reason in self.examples)
        return f"{head}, dropped {self.num_dropped} ({counts}); first: {examples}"


class AnnotatedRows(list):
    """The list of row dicts :func:`annotate` returns, with its :class:`AnnotationReport` as
    ``.report`` (a plain ``list`` otherwise: iterate, index, ``json.dumps`` each row)."""

    def __init__(self, rows: Sequence[Dict[str, Any]] = (), report: Optional[AnnotationReport] = None):
        super().__init__(rows)
        self.report = AnnotationReport() if report is None else report


def annotate(model: Decoder, policy_params: Any, ref_params: Any, tokenizer: Any, prompts: Sequence[Prompt], *,
             max_new_tokens: int, max_prompt_length: int, batch_size: int, num_samples: int = 2,
             temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             strategy: str = "best_worst", beta: Optional[float] = None, stop_strings: Optional[Sequence[str]] = None,
             eos_token_ids: Optional[Sequence[int]] = None, logps_chunk: int = DEFAULT_CHUNK_SIZE,
             share_prompt: bool = False, start_batch: int = 0,
             on_batch: Optional[Callable[[int, List[Dict[str, Any]], List[Dict[str, Any]]], None]] = None,
             progress: bool = True) -> AnnotatedRows:
    """Self-annotated preference pairs: sample, score by implicit reward, select (module docstring).

    Args:
      model: the :class:`Decoder` shared by policy and reference.
      policy_params: the policy's variables (samples and ``log pi``), e.g. :math:`\\pi_{t-1}`.
      ref_params: the reference's variables (``log pi_ref``), e.g. the SFT model.
      tokenizer: a ``transformers`` tokenizer with an EOS token.
      prompts: ``M`` prompts, strings or message lists.
      max_new_tokens: tokens per sample at most (the authors: 300).
      max_prompt_length: prompts keep their last ``max_prompt_length`` tokens (as in training).
      batch_size: prompts per batch; the model sees ``batch_size * num_samples`` rows.
      num_samples: ``n >= 2`` samples per prompt (the authors: 2).
      temperature, top_p, top_k: sampling (the authors: 0.7, 1.0, none).
      seed: the run's seed; batch ``i`` uses :func:`batch_keys` ``(seed, i)``.
      strategy: :func:`select_pairs` strategy, ``"best_worst"`` (the authors') or ``"max_chosen"``.
      beta: reward factor; ``None`` is the authors' unscaled ``log pi - log pi_ref``.
      stop_strings: texts are cut before the first stop string, and the scored tokens with them.
      eos_token_ids: ids that end a sample; default ``(tokenizer.eos_token_id,)``.
      logps_chunk: sequence positions per chunk of the log-prob head
        (:func:`sgpo_jax.models.decoder_logps_fn`).
      share_prompt: score each prompt once with all its samples (prefix sharing,
        :func:`implicit_rewards`; the pipeline passes ``data.prefix_sharing``).
      start_batch: resume at this batch (the rows of earlier batches are not produced).
      on_batch: called after each batch as ``on_batch(batch_index, rows, dropped)`` with that
        batch's rows and ``dropped`` entries ``{"prompt_index", "batch", "reason"}`` (e.g. to
        append them to a JSONL file and record progress).
      progress: show progress bars.

    Returns the rows (an :class:`AnnotatedRows` list), one dict per kept prompt, in prompt order:

    * ``prompt``: the prompt as given; ``chosen``, ``rejected``: response texts (so the rows load
      directly with :func:`sgpo_jax.data.load_preferences`);
    * ``chosen_reward``, ``rejected_reward``: their implicit rewards (floats;
      ``chosen_reward >= rejected_reward`` for ``"best_worst"``);
    * ``prompt_index`` (into ``prompts``), ``batch``, ``num_samples``, ``chosen_sample`` /
      ``rejected_sample`` (sample indices in ``[0, n)``), ``chosen_length`` / ``rejected_length``
      (scored tokens, EOS included) and ``chosen_finished`` / ``rejected_finished`` (ended by EOS
      or a stop string rather than ``max_new_tokens``).

    ``rows.report`` (:class:`AnnotationReport`) counts the dropped prompts per reason, with
    examples; a summary is logged (warning level when prompts were dropped). Per batch, the
    ``on_batch`` callback gets the dropped prompts too.

    Raises ``ValueError`` on bad arguments, ``FloatingPointError`` if a reward is not finite.
    """
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2 to form pairs, got {num_samples!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    n = int(num_samples)
    mesh = sharding.mesh_of(policy_params)
    step = _score_and_select(model, int(logps_chunk), strategy, None if beta is None else float(beta),
                             bool(share_prompt))
    rows: List[Dict[str, Any]] = []
    report = AnnotationReport(start_batch=start_batch)
    for batch in sample_batches(model, policy_params, tokenizer, prompts, num_samples=n,
                                max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                                batch_size=batch_size, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                stop_strings=stop_strings, eos_token_ids=eos_token_ids, start_batch=start_batch,
                                desc="annotating", progress=progress):
        b, total = len(batch.prompt_index), batch_size * n
        stripped = [t.strip() for t in batch.texts] + [""] * (total - b * n)  # filler rows: invalid
        keyed = np.asarray(stripped, dtype=object).reshape(batch_size, n)
        same = keyed[:, :, None] == keyed[:, None, :]
        valid = keyed != ""
        placed = sharding.place_rows(mesh, batch.prompt_ids, batch.prompt_mask, batch.output, same, valid)
        rewards, chosen, rejected, keep = distributed.to_host(step(
            policy_params, ref_params, *placed, batch_keys(seed, batch.index)[1]))
        real_rewards = rewards[:b][valid[:b]]
        if not np.all(np.isfinite(real_rewards)):
            raise FloatingPointError(f"batch {batch.index}: non-finite implicit rewards {real_rewards.tolist()}")
        lengths, finished = np.asarray(batch.output.lengths), np.asarray(batch.output.finished)
        batch_rows, dropped = [], []
        for i in range(b):
            index = int(batch.prompt_index[i])
            if not keep[i]:
                reason = DROP_EMPTY if valid[i].sum() < 2 else DROP_IDENTICAL
                dropped.append({"prompt_index": index, "batch": batch.index, "reason": reason})
                report.add_dropped(index, reason)
                continue
            c, r = int(chosen[i]), int(rejected[i])
            batch_rows.append({
                "prompt": prompts[index], "chosen": batch.texts[i * n + c], "rejected": batch.texts[i * n + r],
                "chosen_reward": float(rewards[i, c]), "rejected_reward": float(rewards[i, r]),
                "prompt_index": index, "batch": batch.index, "num_samples": n,
                "chosen_sample": c, "rejected_sample": r,
                "chosen_length": int(lengths[i * n + c]), "rejected_length": int(lengths[i * n + r]),
                "chosen_finished": bool(finished[i * n + c]), "rejected_finished": bool(finished[i * n + r]),
            })
        rows.extend(batch_rows)
        report.prompts += b
        report.batches += 1
        report.rows += len(batch_rows)
        if on_batch is not None:
            on_batch(batch.index, batch_rows, dropped)
    say(report)
    return AnnotatedRows(rows, report)
