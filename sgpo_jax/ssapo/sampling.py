r"""Jitted, batched sampling from a :class:`~sgpo_jax.models.llama.Decoder` with its KV cache.

:func:`generate` continues ``B`` left-padded prompts ``num_samples`` times each, all on device and
with static shapes:

1. **Prefill.** The ``[B, P]`` prompts run once through the model into a :class:`KVCache` of
   ``S = P + max_new_tokens - 1`` slots (the output head only on the last position). The prompt
   mask goes into the cache's mask, so padding slots are never attended and RoPE positions
   count real tokens only: a left-padded prompt has the logits (and greedy continuation) of the
   same prompt unpadded.
2. **Repeat.** The last-position logits ``[B, V]`` and the cache are repeated ``n = num_samples``
   times along the batch, prompt-major (row ``b * n + j`` is sample ``j`` of prompt ``b``), so the
   prompt is encoded once per prompt, not per sample.
3. **Decode.** A ``jax.lax.while_loop`` samples one token per step for all ``N = B * n`` rows and
   feeds it back through the cache (``T = 1``). A row is finished once it emits one of
   ``eos_token_ids``: from then on it emits ``pad_token_id`` and its fed-back tokens are masked
   out of the cache. The loop ends after ``max_new_tokens`` tokens or as soon as every row is
   finished. The last token is never fed back, hence ``max_new_tokens - 1`` cached steps.

**Sampling rule.** With logits :math:`\ell \in \mathbb{R}^V` (float32), temperature
:math:`\tau > 0`, the allowed set :math:`A` and :math:`q_i \propto \exp(\ell_i / \tau)`:

.. math::

    p_i = \frac{q_i \, [i \in A]}{\sum_{j \in A} q_j}, \qquad
    A = K \cap \Big\{ i : \sum_{j \in K:\, \ell_j > \ell_i} \tilde q_j < \texttt{top\_p} \Big\}

where :math:`K` is the ``top_k`` largest logits (ties with the ``k``-th largest included; all of
``V`` when ``top_k = 0``) and :math:`\tilde q` is :math:`q` renormalized on :math:`K`. So top-k is
applied first and the nucleus is the smallest prefix of the tokens sorted by probability whose
mass reaches ``top_p`` (as transformers' ``TopKLogitsWarper`` then ``TopPLogitsWarper``; tokens
tied with the nucleus' last one are kept too). Both filters use ``lax.top_k``/``sort`` and
``cumsum`` on device and are compiled out when disabled (``top_k = 0``, ``top_p = 1``).
``temperature = 0`` is greedy: ``argmax`` (the first maximum), ignoring ``top_k``/``top_p``.

A token is drawn by inverting the CDF: with one uniform :math:`u_r \in [0, 1)` per row and step
and :math:`c = \mathrm{cumsum}(p)`, row ``r`` takes the first ``i`` with :math:`p_i > 0` and
:math:`c_i > u_r c_V` (computed blockwise, see :func:`sample_logits`). That costs one random
number per row and step instead of ``V`` for the Gumbel-max trick of ``jax.random.categorical``
(which on CPU costs more than the model's output head), and never picks a token outside
:math:`A`. The uniforms of step ``t`` are ``jax.random.uniform(jax.random.fold_in(rng, t), [N])``:
samples are a deterministic function of ``rng`` (and independent of how the batch is sharded),
and differ between rows and samples.

**Memory.** The cache holds ``2 * L * N * S * K * D`` elements of the compute dtype (``L``
layers, ``K`` key/value heads of width ``D``; one ``[N, K, S, D]`` buffer per layer for k and
for v, updated in place by each step, or stacked ``[L, ...]`` with ``scan_layers``), ``n`` times
that of one sample per prompt (the ``B``-row prefill cache it is repeated from is freed after
the repeat); the decode loop also keeps ``[N, V]`` float32 logits and ``[N, max_new_tokens]``
int32 tokens. For the 135M-parameter SmolLM2 (``L = 30, K = 3, D = 64``, float32) that is 46 KB
per row and slot: 64 prompts x 8 samples x 512 slots take 12 GB.

**Sharding.** :func:`generate` is one ``jax.jit`` that follows the shardings of its inputs:
with params placed by :func:`sgpo_jax.parallel.sharding.shard_params` and the prompts by
:func:`sgpo_jax.parallel.sharding.batch_sharding`, the batch stays split over the data axes and XLA
inserts the tensor-parallel collectives; results equal the unsharded ones up to float rounding.

**Stop strings** cannot be matched on device (they depend on decoding), so :func:`generate`
only records them; :func:`decode_text` decodes the rows on the host and cuts each text before
the earliest occurrence of any stop string. ``tokens``/``lengths`` are not cut.

Compilation is cached per model, batch and prompt shape, input shardings and the static
settings ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k`` and ``num_samples``; changing
any of them recompiles (other ``rng``, EOS or padding ids do not).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from sgpo_jax.data.batching import default_buckets
from sgpo_jax.data.tokenize import Prompt, left_pad, tokenize_prompts
from sgpo_jax.models.llama import Decoder, output_head
from sgpo_jax.parallel import distributed, sharding

Array = jax.Array

__all__ = ["GenerationOutput", "SampledBatch", "batch_keys", "decode_text", "generate", "lower_generation",
           "sample_batches", "sample_logits"]

_BLOCK = 256  # tokens per block of the two-level inverse CDF in :func:`sample_logits`


@struct.dataclass
class GenerationOutput:
    """What :func:`generate` returns; ``N = B * num_samples`` rows, prompt-major.

    Attributes:
      tokens: ``[N, max_new_tokens]`` int32 new tokens; a row's EOS token is included and
        everything after it (or after an early exit of the loop) is ``pad_token_id``.
      lengths: ``[N]`` int32 number of new tokens, EOS included.
      finished: ``[N]`` bool, True where the row emitted an EOS token.
      prompt_index: ``[N]`` int32 prompt of each row, ``row // num_samples``.
      stop_strings: the ``stop_strings`` given to :func:`generate` (static, applied by
        :func:`decode_text` on the host).
    """

    tokens: Array
    lengths: Array
    finished: Array
    prompt_index: Array
    stop_strings: Tuple[str, ...] = struct.field(pytree_node=False, default=())


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The static (hashable) settings one compiled :func:`_generate` is specialized to."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    num_samples: int


def _first(mask: Array) -> Array:
    """``[..., M]`` bool -> ``[...]`` int32 index of the first True, ``M`` where there is none.

    A select and a min-reduction: cheaper on CPU than ``argmax``'s variadic (value, index) reduce."""
    iota = jax.lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)
    return jnp.min(jnp.where(mask, iota, mask.shape[-1]), axis=-1)


def _greedy(logits: Array) -> Array:
    """``[N, V] -> [N]`` int32: the first maximum (as ``argmax``)."""
    return jnp.minimum(_first(logits == jnp.max(logits, axis=-1, keepdims=True)), logits.shape[-1] - 1)


def _inverse_cdf(weights: Array, r: Array) -> Tuple[Array, Array]:
    """For ``weights [N, M] >= 0`` and ``r [N]``: the first ``i`` with ``weights[i] > 0`` and
    ``cumsum(weights)[i] > r`` (the largest ``weights`` entry if rounding left none), and the
    mass before it, ``cumsum(weights)[i] - weights[i]``; both ``[N]``."""
    cdf = jnp.cumsum(weights, axis=-1)
    i = _first((cdf > r[:, None]) & (weights > 0))
    i = jnp.where(i < weights.shape[-1], i, _greedy(weights))[:, None]
    return i[:, 0], jnp.take_along_axis(cdf - weights, i, axis=-1)[:, 0]


def sample_logits(logits: Array, uniforms: Optional[Array], *, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0) -> Array:
    """One token per row by the module's sampling rule.

    The inverse CDF is taken in two levels, so no ``[N, V]`` cumsum is needed: with
    ``q = exp(l / temperature - max)`` (0 outside the allowed set) split into blocks of
    ``_BLOCK`` tokens, first the block whose cumulative mass passes ``r = u * sum(q)``, then
    the token inside it whose cumulative mass passes ``r`` minus the mass before the block.

    Args:
      logits: ``[N, V]`` logits (any float dtype; computed in float32).
      uniforms: ``[N]`` uniforms in ``[0, 1)``, one per row (ignored, may be ``None``, when greedy).
      temperature, top_p, top_k: static Python numbers, see :func:`generate`.

    Returns ``[N]`` int32 token ids.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return _greedy(logits)
    logits = logits / temperature
    n, v = logits.shape
    if top_k or top_p < 1:
        # Candidates sorted descending: the top k, or the whole vocabulary for top-p alone.
        ranked = jax.lax.top_k(logits, top_k)[0] if top_k else -jnp.sort(-logits, axis=-1)
        keep = ranked.shape[-1]
        if top_p < 1:
            probs = jax.nn.softmax(ranked, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better-ranked candidates
            keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0
        threshold = jnp.take_along_axis(ranked, jnp.broadcast_to(keep - 1, (n, 1)), axis=-1)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    q = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    blocks = -(-v // _BLOCK)
    q = jnp.pad(q, ((0, 0), (0, blocks * _BLOCK - v))).reshape(n, blocks, _BLOCK)
    block_mass = jnp.sum(q, axis=-1)
    r = uniforms * jnp.sum(block_mass, axis=-1)
    block, before = _inverse_cdf(block_mass, r)
    inner = jnp.take_along_axis(q, block[:, None, None], axis=1)[:, 0]
    token, _ = _inverse_cdf(inner, r - before)
    return block * _BLOCK + token


def _last_logits(model: Decoder, params: Any, hidden: Array) -> Array:
    """``[B, V]`` logits of the last position from the final hidden states ``[B, P, H]``: the
    output head (as the model applies it, in its compute dtype) on one position, not ``P``."""
    cfg = model.cfg
    head = output_head(params, cfg).astype(cfg.dtype)
    last = hidden[:, -1].astype(cfg.dtype)
    return last @ head.T if cfg.tie_word_embeddings else last @ head


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def _generate(model: Decoder, settings: _Settings, params: Any, prompt_ids: Array, prompt_mask: Array,
              rng: Array, is_eos_token: Array, pad_token_id: Array) -> Tuple[Array, Array, Array]:
    """Prefill, repeat and decode (module docstring); returns ``(tokens, lengths, finished)``.

    ``is_eos_token`` is a ``[V]`` bool table and ``pad_token_id`` an int32 scalar, so that other
    EOS or padding ids do not recompile."""
    s = settings
    b, p = prompt_ids.shape
    n_rows = b * s.num_samples

    def draw(logits: Array, step: Array) -> Array:
        uniforms = None if s.temperature == 0 else jax.random.uniform(jax.random.fold_in(rng, step), (n_rows,))
        return sample_logits(logits, uniforms, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)

    cache = model.init_cache(b, p + s.max_new_tokens - 1)
    hidden, cache = model.apply(params, prompt_ids, prompt_mask, cache=cache, return_hidden=True)
    cache = cache.repeat_rows(s.num_samples)  # per-layer buffers or one stacked array alike
    logits = jnp.repeat(_last_logits(model, params, hidden), s.num_samples, axis=0)

    token = draw(logits, jnp.int32(0))
    tokens = jnp.full((n_rows, s.max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    state = (jnp.int32(1), token, tokens, jnp.ones((n_rows,), jnp.int32), is_eos_token[token], cache)

    def cond(state):
        step, _, _, _, finished, _ = state
        return (step < s.max_new_tokens) & ~jnp.all(finished)

    def body(state):
        step, last, tokens, lengths, finished, cache = state
        # Finished rows feed their (ignored) last sample masked out: never attended, no position.
        logits, cache = model.apply(params, last[:, None], ~finished[:, None], cache=cache)
        token = draw(logits[:, 0], step)
        emitted = jnp.where(finished, pad_token_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, emitted[:, None], (0, step))
        return step + 1, token, tokens, lengths + ~finished, finished | is_eos_token[token], cache

    _, _, tokens, lengths, finished, _ = jax.lax.while_loop(cond, body, state)
    return tokens, lengths, finished


def lower_generation(model: Decoder, params: Any, prompt_ids: Any, prompt_mask: Any, rng: Any, *,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     num_samples: int = 1) -> Any:
    """:func:`generate`'s one program (prefill, repeat and the decode loop) lowered for the given
    arguments, which may be ``jax.ShapeDtypeStruct`` s with shardings (``prompt_mask`` bool, ``rng``
    as :func:`batch_keys` makes it), without running it: a ``jax.stages.Lowered`` to compile ahead
    of time (:mod:`sgpo_jax.aot`)."""
    settings = _Settings(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                         top_k=int(top_k), num_samples=int(num_samples))
    return _generate.lower(model, settings, params, prompt_ids, prompt_mask, rng,
                           jax.ShapeDtypeStruct((model.cfg.vocab_size,), jnp.bool_),
                           jax.ShapeDtypeStruct((), jnp.int32))


def generate(model: Decoder, params: Any, prompt_ids: Array, prompt_mask: Array, *, rng: Optional[Array],
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, eos_token_ids: Sequence[int] = (), stop_strings: Optional[Sequence[str]] = None,
             pad_token_id: int = 0) -> GenerationOutput:
    """Samples ``num_samples`` continuations of each prompt (see the module docstring).

    Args:
      model: the :class:`Decoder`.
      params: its variables ``{"params": ...}`` (possibly sharded).
      prompt_ids: ``[B, P]`` int token ids, left-padded (ids at padding must be in range).
      prompt_mask: ``[B, P]``, 1 for real tokens, 0 for padding; every row needs a real token.
      rng: a PRNG key (typed or raw); may be ``None`` when ``temperature == 0``.
      max_new_tokens: ``T >= 1`` tokens generated per row at most.
      temperature: ``>= 0``; 0 is greedy.
      top_p: nucleus mass in ``(0, 1]``; 1 disables it.
      top_k: keep the ``top_k`` largest logits; 0 disables it.
      num_samples: ``n >= 1`` samples per prompt (prompts are repeated after the prefill).
      eos_token_ids: ids that end a row (none: every row runs ``T`` tokens).
      stop_strings: recorded on the output for :func:`decode_text` (host side).
      pad_token_id: id written after a row's end (any int; it is never fed to the model).

    Returns a :class:`GenerationOutput` with ``N = B * num_samples`` rows, prompt-major.

    Raises:
      ValueError: naming the offending argument.
    """
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer) or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be a [B, P] int array with P >= 1, got "
                         f"{prompt_ids.dtype}{list(prompt_ids.shape)}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask shape {tuple(prompt_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    vocab = model.cfg.vocab_size
    if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be an int in [0, vocab_size={vocab}] (0 disables it), got {top_k!r}")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    eos_token_ids = tuple(int(i) for i in eos_token_ids)
    if any(not 0 <= i < vocab for i in eos_token_ids):
        raise ValueError(f"eos_token_ids must lie in [0, vocab_size={vocab}), got {eos_token_ids}")
    if temperature > 0 and rng is None:
        raise ValueError("rng is required when temperature > 0")
    if isinstance(stop_strings, str):
        raise ValueError("stop_strings must be a sequence of strings, not one string")

    settings = _Settings(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                         top_k=int(top_k), num_samples=int(num_samples))
    rng = jax.random.key(0) if rng is None else rng  # unused when greedy
    is_eos_token = np.zeros(vocab, bool)
    is_eos_token[list(eos_token_ids)] = True
    tokens, lengths, finished = _generate(model, settings, params, prompt_ids, prompt_mask.astype(bool), rng,
                                          is_eos_token, np.int32(pad_token_id))
    prompt_index = jnp.repeat(jnp.arange(prompt_ids.shape[0], dtype=jnp.int32), num_samples)
    return GenerationOutput(tokens=tokens, lengths=lengths, finished=finished, prompt_index=prompt_index,
                            stop_strings=tuple(stop_strings or ()))


def decode_text(output: GenerationOutput, tokenizer: Any, stop_strings: Optional[Sequence[str]] = None, *,
                skip_special_tokens: bool = True) -> List[str]:
    """The text of each row (host side): ``tokenizer.decode(tokens[r, :lengths[r]])``, cut before
    the earliest occurrence of any stop string.

    Args:
      output: a :class:`GenerationOutput`.
      tokenizer: anything with ``decode(ids, skip_special_tokens=...)`` (a transformers tokenizer).
      stop_strings: overrides ``output.stop_strings`` (pass ``()`` to disable them).
      skip_special_tokens: forwarded to ``decode`` (drops e.g. the EOS token).

    Returns ``N`` strings, prompt-major as the output's rows.
    """
    stops = output.stop_strings if stop_strings is None else tuple(stop_strings)
    if isinstance(stop_strings, str) or any(not s for s in stops):
        raise ValueError(f"stop_strings must be a sequence of non-empty strings, got {stop_strings!r}")
    tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
    texts = []
    for row, length in zip(tokens, lengths):
        text = tokenizer.decode(row[:length].tolist(), skip_special_tokens=skip_special_tokens)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        texts.append(text[:cut])
    return texts


# ----------------------------------------------------------------------------------- batched generation


def batch_keys(seed: int, batch_index: int) -> Tuple[Array, Array]:
    """``(generation_key, selection_key)`` of batch ``batch_index``: the two halves of
    ``jax.random.split(jax.random.fold_in(jax.random.key(seed), batch_index))``."""
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), batch_index))
    return keys[0], keys[1]


@dataclasses.dataclass(frozen=True)
class SampledBatch:
    """One batch of :func:`sample_batches`; ``b <= B = batch_size`` real prompts, ``n`` samples each.

    Attributes:
      index: the batch index ``i`` (prompts ``[i * B, i * B + b)``).
      prompt_index: int64 ``[b]``, the real prompts' indices into ``prompts``.
      prompt_ids, prompt_mask: int32 ``[B, P]``, left-padded; rows ``b..B-1`` repeat the last prompt.
      output: the :class:`~sgpo_jax.ssapo.sampling.GenerationOutput` of all ``B * n`` rows (NumPy
        arrays, the same on every host: generation is split over the params' devices and hosts,
        then gathered),
        with ``lengths`` (and ``finished``) of the real rows cut at ``stop_strings``.
      texts: the ``b * n`` real rows' texts (prompt-major), each the decoding of its first
        ``lengths`` tokens (special tokens skipped).
      num_samples: ``n``.
    """

    index: int
    prompt_index: np.ndarray
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    output: GenerationOutput
    texts: List[str]
    num_samples: int


def _decode(tokenizer: Any, tokens: np.ndarray) -> str:
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=True)


def _cut_at_stop_strings(output: GenerationOutput, tokenizer: Any, rows: int, stop_strings: Sequence[str]
                         ) -> Tuple[GenerationOutput, List[str]]:
    """Texts of the first ``rows`` rows; where a stop string occurs, the row's length becomes the
    longest token prefix whose text is a prefix of the text before the stop string (binary search
    over prefixes), and the row counts as finished."""
    sliced = GenerationOutput(tokens=np.asarray(output.tokens[:rows]), lengths=np.asarray(output.lengths[:rows]),
                              finished=np.asarray(output.finished[:rows]), prompt_index=output.prompt_index[:rows])
    full = decode_text(sliced, tokenizer, ())
    if not stop_strings:
        return output, full
    cut = decode_text(sliced, tokenizer, stop_strings)
    lengths, finished = np.asarray(output.lengths).copy(), np.asarray(output.finished).copy()
    texts = list(full)
    for r in range(rows):
        if cut[r] == full[r]:
            continue
        tokens = sliced.tokens[r]
        lo, hi = 0, int(lengths[r])  # invariant: prefix lo fits, prefix hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cut[r].startswith(_decode(tokenizer, tokens[:mid])):
                lo = mid
            else:
                hi = mid
        lengths[r], finished[r], texts[r] = lo, True, _decode(tokenizer, tokens[:lo])
    return output.replace(lengths=lengths, finished=finished), texts


def sample_batches(model: Decoder, params: Any, tokenizer: Any, prompts: Sequence[Prompt], *, num_samples: int,
                   max_new_tokens: int, max_prompt_length: int, batch_size: int, temperature: float,
                   top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_strings: Optional[Sequence[str]] = None,
                   eos_token_ids: Optional[Sequence[int]] = None, start_batch: int = 0,
                   desc: str = "generating", progress: bool = True) -> Iterator[SampledBatch]:
    """Batched sampling with a progress bar: the generation loop of :func:`annotate` and
    :func:`sgpo_jax.eval.instructions.generate_responses` (see the module docstring for batches, buckets,
    stop strings and keys: batch ``i`` samples with ``batch_keys(seed, i)[0]``).

    Args:
      model, params: the :class:`Decoder` and its variables.
      tokenizer: a ``transformers`` tokenizer with an EOS token (and a chat template, or the
        plain-text fallback of :func:`sgpo_jax.data.plain_prompt` is used).
      prompts: strings or message lists (:func:`sgpo_jax.data.tokenize_prompts`).
      num_samples, max_new_tokens, temperature, top_p, top_k: as in
        :func:`sgpo_jax.ssapo.sampling.generate`.
      max_prompt_length: prompts keep their last ``max_prompt_length`` tokens.
      batch_size: prompts per batch ``B`` (the model sees ``B * num_samples`` rows).
      seed: the run's seed.
      stop_strings: cut texts before the first occurrence of any of them (see module docstring).
      eos_token_ids: ids that end a sample; default ``(tokenizer.eos_token_id,)``.
      start_batch: the first batch to produce (resuming); earlier prompts are not tokenized.
      desc, progress: the progress bar's label; ``progress=False`` hides it.

    Yields a :class:`SampledBatch` per batch, in order.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of prompts, not one string")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
        raise ValueError(f"start_batch must be a non-negative int, got {start_batch!r}")
    if isinstance(stop_strings, str) or any(not s for s in stop_strings or ()):
        raise ValueError(f"stop_strings must be a sequence of non-empty strings, got {stop_strings!r}")
    if eos_token_ids is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token or pass eos_token_ids")
        eos_token_ids = (tokenizer.eos_token_id,)
    stop_strings = tuple(stop_strings or ())
    first = start_batch * batch_size
    mesh = sharding.mesh_of(params)
    ids, pad_id = tokenize_prompts(tokenizer, prompts[first:], max_prompt_length=max_prompt_length)
    buckets = default_buckets(max_prompt_length)
    with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(ids), batch_size):
            index = start_batch + start // batch_size
            batch = ids[start:start + batch_size]
            b = len(batch)
            longest = max(len(s) for s in batch)
            prompt_ids, prompt_mask = left_pad(batch + [batch[-1]] * (batch_size - b), pad_id,
                                               length=min(x for x in buckets if x >= longest))
            output = generate(model, params, *sharding.place_rows(mesh, prompt_ids, prompt_mask),
                              rng=batch_keys(seed, index)[0], max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, num_samples=num_samples, eos_token_ids=eos_token_ids,
                              stop_strings=stop_strings, pad_token_id=pad_id)
            output = distributed.to_host(output)  # every host gets every row (a collective)
            output, texts = _cut_at_stop_strings(output, tokenizer, b * num_samples, stop_strings)
            yield SampledBatch(index=index, prompt_index=np.arange(first + start, first + start + b, dtype=np.int64),
                               prompt_ids=prompt_ids, prompt_mask=prompt_mask, output=output, texts=texts,
                               num_samples=num_samples)
            bar.update(b)
