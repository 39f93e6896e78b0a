r"""Sequence log-probabilities without materializing the ``[B, T, V]`` logits.

For a causal LM with final (normed) hidden states :math:`h_t \in \mathbb{R}^H` and output head
:math:`W \in \mathbb{R}^{H \times V}` the logits are :math:`z_t = h_t W` and

.. math::

    \log p(x_{t+1} \mid x_{\le t}) = z_{t, x_{t+1}} - \operatorname{logsumexp}_v z_{t, v},
    \qquad
    \mathrm{logp}_b = \sum_{t=1}^{T-1} m_{b,t} \, \log p(x_{b,t} \mid x_{b,<t})

(the convention of :func:`sgpo_jax.core.losses.sequence_logps`: logits at position ``t`` predict
token ``t + 1``; position 0 is never scored). :func:`sgpo_jax.core.losses.sequence_logps` needs the
full logits, ``B * T * V`` floats (plus as much again for the softmax in the backward pass): at
``B = 8, T = 256, V = 32000`` that is 262 MB per copy in float32, and several copies are live
at once under ``jax.grad``. :func:`chunked_sequence_logps` instead scans over chunks of ``C``
sequence positions: each step computes the chunk's ``[B, C, V]`` float32 logits, their
logsumexp and the target logit, and keeps only ``[B, C]`` numbers. The backward pass
recomputes one chunk's logits at a time as well (a ``jax.custom_vjp`` by default, or a
``jax.checkpoint``-ed scan step), with the usual gradients

.. math::

    \frac{\partial \mathrm{logp}_b}{\partial z_{t,v}} = m_{b,t+1} \left(\mathbb{1}[v = x_{t+1}]
        - \operatorname{softmax}(z_t)_v\right), \qquad
    \frac{\partial}{\partial h_t} = \frac{\partial}{\partial z_t} W^\top, \qquad
    \frac{\partial}{\partial W} = \sum_t h_t^\top \frac{\partial}{\partial z_t},

so the peak extra memory is ``O(B * C * V)`` instead of ``O(B * T * V)``, at the price of one
more head matmul (the forward logits are recomputed in the backward pass).

:func:`decoder_logps_fn` wires this to :class:`sgpo_jax.models.Decoder`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from sgpo_jax.models.llama import Decoder, output_head
from sgpo_jax.models.packed import PackedPairs

Array = jax.Array

DEFAULT_CHUNK_SIZE = 64

__all__ = ["DEFAULT_CHUNK_SIZE", "METHODS", "chosen_rejected_logps", "chunked_sequence_logps", "decoder_logps_fn",
           "packed_pair_logps", "segment_logps"]


METHODS = ("custom_vjp", "checkpoint")


def chunked_sequence_logps(hidden: Array, head: Array, input_ids: Array, loss_mask: Array, *,
                           chunk_size: int = DEFAULT_CHUNK_SIZE, tied: bool = False,
                           method: str = "custom_vjp") -> Array:
    r"""Per-row :math:`\sum_t m_t \log p(x_t \mid x_{<t})` from hidden states, chunk by chunk.

    Equals ``sequence_logps(hidden @ head, input_ids, loss_mask)`` (``hidden @ head.T`` when
    ``tied``) up to float rounding, for values and gradients, without ever holding more than one
    chunk's ``[B, chunk_size, V]`` float32 logits (forward or backward).

    Args:
      hidden: ``[B, T, H]`` final normed hidden states; ``hidden[:, t]`` predicts token ``t + 1``.
      head: ``[H, V]`` output kernel, or with ``tied=True`` the token embedding ``[V, H]``.
      input_ids: ``[B, T]`` int token ids (the targets are ``input_ids[:, 1:]``).
      loss_mask: ``[B, T]``, 1 on the tokens to score, 0 elsewhere; position 0 is never scored.
        Treated as a constant (no gradient flows to it).
      chunk_size: sequence positions per chunk ``C`` (static); ``T - 1`` need not be a multiple
        of it (the last chunk is zero-padded, padding is unscored). One chunk's logits take
        ``4 * B * C * V`` bytes.
      tied: ``head`` is the ``[V, H]`` embedding (tied word embeddings); no transposed copy is made.
      method: how the backward pass recomputes the chunks, same values and memory either way:

        * ``"custom_vjp"`` (default): a ``jax.custom_vjp``. The forward scan keeps only the
          per-token :math:`\operatorname{logsumexp}` ``[B, T]``; the backward scan recomputes a
          chunk's logits, forms :math:`G = g_b\, m \,(\mathrm{onehot}(x) - e^{z - \mathrm{lse}})`
          in one fused pass and applies the two matmuls :math:`G W^\top` and :math:`h^\top G`.
          About 2x faster than ``"checkpoint"`` on CPU (``bench/model.py``); reverse mode only
          (no ``jax.jvp``/forward-over-reverse).
        * ``"checkpoint"``: a ``jax.lax.scan`` whose step is wrapped in ``jax.checkpoint``, so
          JAX's own autodiff recomputes each chunk in the backward pass; supports every
          transformation, including forward mode.

    Returns ``[B]`` in float32 (float64 for float64 inputs). The matmul operands are cast to the
    promoted dtype of ``hidden`` and ``head`` (e.g. bfloat16 stays bfloat16) and accumulated in
    float32, so bfloat16 models get float32 logits.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    b, t, h = hidden.shape
    if input_ids.shape != (b, t) or loss_mask.shape != (b, t):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} must be "
                         f"[B, T] = {(b, t)}")
    if head.ndim != 2 or head.shape[1 if tied else 0] != h:
        layout = "[V, H]" if tied else "[H, V]"
        raise ValueError(f"head must be {layout} with H = {h} (tied={tied}), got shape {tuple(head.shape)}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    operand_dtype = jnp.promote_types(hidden.dtype, head.dtype)
    acc_dtype = jnp.promote_types(operand_dtype, jnp.float32)
    if t < 2:
        return jnp.zeros((b,), acc_dtype)  # nothing to score

    length = t - 1  # scored positions: hidden[:, :-1] predicts input_ids[:, 1:]
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    targets = jnp.pad(input_ids[:, 1:].astype(jnp.int32), ((0, 0), (0, pad)))
    mask = jnp.pad(jax.lax.stop_gradient(loss_mask[:, 1:]).astype(acc_dtype), ((0, 0), (0, pad)))
    x = jnp.pad(hidden[:, :-1].astype(operand_dtype), ((0, 0), (0, pad), (0, 0)))
    # [n, B, C, ...]: the scans run over the leading axis.
    x = jnp.moveaxis(x.reshape(b, n_chunks, chunk, h), 1, 0)
    targets = jnp.moveaxis(targets.reshape(b, n_chunks, chunk), 1, 0)
    mask = jnp.moveaxis(mask.reshape(b, n_chunks, chunk), 1, 0)
    w = head.astype(operand_dtype)
    if method == "custom_vjp":
        return _scan_logps(tied, x, w, targets, mask)

    @jax.checkpoint
    def chunk_logps(w, x_c, targets_c, mask_c):
        logits = _chunk_logits(tied, x_c, w)
        picked = jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0]
        return (picked - jax.nn.logsumexp(logits, axis=-1)) * mask_c  # [B, C]

    def step(total, xs):
        return total + jnp.sum(chunk_logps(w, *xs), axis=-1), None

    total, _ = jax.lax.scan(step, jnp.zeros((b,), acc_dtype), (x, targets, mask))
    return total


def _chunk_logits(tied: bool, x_c: Array, w: Array) -> Array:
    """``[B, C, H] x head -> [B, C, V]`` logits, accumulated in (at least) float32."""
    acc_dtype = jnp.promote_types(x_c.dtype, jnp.float32)
    return jnp.einsum("bch,vh->bcv" if tied else "bch,hv->bcv", x_c, w, preferred_element_type=acc_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_logps(tied: bool, x: Array, w: Array, targets: Array, mask: Array) -> Array:
    """Per-row masked log-probs from chunked ``x [n, B, C, H]``, ``targets``/``mask [n, B, C]``."""
    return _scan_logps_fwd(tied, x, w, targets, mask)[0]


def _scan_logps_fwd(tied, x, w, targets, mask):
    def step(total, xs):
        x_c, targets_c, mask_c = xs
        logits = _chunk_logits(tied, x_c, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0]
        return total + jnp.sum((picked - lse) * mask_c, axis=-1), lse

    total, lse = jax.lax.scan(step, jnp.zeros(x.shape[1], mask.dtype), (x, targets, mask))
    return total, (x, w, targets, mask, lse)


def _scan_logps_bwd(tied, residuals, g):
    r"""``d total_b / d z_{b,t,v} = m_{b,t} (1[v = x_{b,t}] - softmax(z_{b,t})_v)``, chunk by chunk."""
    x, w, targets, mask, lse = residuals
    vocab = w.shape[0] if tied else w.shape[1]

    def step(dw, xs):
        x_c, targets_c, mask_c, lse_c = xs
        logits = _chunk_logits(tied, x_c, w)
        onehot = jnp.arange(vocab, dtype=targets_c.dtype) == targets_c[..., None]
        scale = (g[:, None] * mask_c)[..., None]
        dz = (scale * (onehot.astype(logits.dtype) - jnp.exp(logits - lse_c[..., None]))).astype(x_c.dtype)
        if tied:  # w [V, H]
            dx = jnp.einsum("bcv,vh->bch", dz, w, preferred_element_type=dw.dtype)
            dw = dw + jnp.einsum("bcv,bch->vh", dz, x_c, preferred_element_type=dw.dtype)
        else:  # w [H, V]
            dx = jnp.einsum("bcv,hv->bch", dz, w, preferred_element_type=dw.dtype)
            dw = dw + jnp.einsum("bch,bcv->hv", x_c, dz, preferred_element_type=dw.dtype)
        return dw, dx.astype(x_c.dtype)

    dw, dx = jax.lax.scan(step, jnp.zeros(w.shape, mask.dtype), (x, targets, mask, lse))
    return dx, dw.astype(w.dtype), None, None


_scan_logps.defvjp(_scan_logps_fwd, _scan_logps_bwd)


def decoder_logps_fn(model: Decoder, *, chunk_size: int = DEFAULT_CHUNK_SIZE, method: str = "custom_vjp",
                     response_length: Optional[int] = None
                     ) -> Callable[[Mapping[str, Any], Array, Optional[Array], Array], Array]:
    r"""``logps_fn(params, input_ids, attention_mask, loss_mask) -> [B]`` for a :class:`Decoder`.

    Runs ``model`` to its final normed hidden states (``return_hidden=True``) and applies
    :func:`chunked_sequence_logps` with the model's output head (``lm_head`` kernel, or the tied
    embedding), cast to the model's compute dtype as the model's own head does. Equal to
    ``losses.sequence_logps(model.apply(params, input_ids, attention_mask), input_ids, loss_mask)``
    up to rounding (exactly the same math in float32), but with ``O(B * chunk_size * V)`` instead
    of ``O(B * T * V)`` memory for the head; in bfloat16 the logits are accumulated in float32.

    ``response_length``: ``None`` scores all ``T - 1`` positions. An int ``W`` (static, e.g. the
    longest response a batch may hold) runs the head on a window of ``W + 1`` positions per row
    instead: with :math:`f_b` the position predicting the first scored token
    (the first ``f`` with ``loss_mask[b, f + 1] = 1``), the window is :math:`[s_b, s_b + W]`,
    :math:`s_b = \min(f_b, T - W - 1)` (a ``dynamic_slice`` of the hidden states, ids and loss
    mask), so the head scores tokens :math:`s_b + 1 .. s_b + W`. The value is the same wherever
    every row's scored tokens lie within ``W`` consecutive positions (e.g. responses of at most
    ``W`` tokens, prompts included in any position before them); the head's work drops from
    ``T - 1`` to ``W`` positions per row. A batch with a longer span of scored tokens is scored
    on all positions instead (a ``lax.cond``, so the result is exact for every batch).
    ``W >= T - 1`` is the full computation.

    ``params`` is the variables dict ``{"params": ...}`` (``variables["params"]`` alone is accepted
    too); ``input_ids``/``attention_mask``/``loss_mask`` are ``[B, T]`` as in ``Decoder.__call__``
    and :func:`sgpo_jax.core.losses.sequence_logps`; ``chunk_size`` and ``method`` as in
    :func:`chunked_sequence_logps`. Pure and ``jit``/``grad``/``vmap``-able.

    The returned function also carries ``logps_fn.packed(params, packed) -> (chosen [B],
    rejected [B])``: :func:`packed_pair_logps` of this model (same ``chunk_size`` and ``method``)
    for batches laid out as :class:`~sgpo_jax.models.packed.PackedPairs` (prefix sharing,
    packing), which :func:`chosen_rejected_logps` uses when a batch carries one; and
    ``logps_fn.segments(params, ids, positions, segment_ids, branch_ids, chains)``:
    :func:`segment_logps` of this model (e.g. a prompt shared by ``n`` samples, in the judge of
    :func:`sgpo_jax.ssapo.annotate.implicit_rewards`).
    """
    if response_length is not None and (not isinstance(response_length, int) or isinstance(response_length, bool)
                                        or response_length < 1):
        raise ValueError(f"response_length must be None or a positive int, got {response_length!r}")
    cfg = model.cfg

    def logps_fn(params: Mapping[str, Any], input_ids: Array, attention_mask: Optional[Array],
                 loss_mask: Array) -> Array:
        variables = params if set(params) == {"params"} else {"params": params}
        hidden = model.apply(variables, input_ids, attention_mask, return_hidden=True)
        head = output_head(variables, cfg).astype(cfg.dtype)

        def score(hidden, ids, mask):
            return chunked_sequence_logps(hidden, head, ids, mask, chunk_size=chunk_size,
                                          tied=cfg.tie_word_embeddings, method=method)

        if response_length is None or response_length >= input_ids.shape[1] - 1:
            return score(hidden, input_ids, loss_mask)
        start, fits = _response_window(loss_mask, response_length + 1)
        window = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, response_length + 1))
        return jax.lax.cond(fits, lambda h: score(window(h, start), window(input_ids, start), window(loss_mask, start)),
                            lambda h: score(h, input_ids, loss_mask), hidden)

    logps_fn.packed = functools.partial(packed_pair_logps, model, chunk_size=chunk_size, method=method)
    logps_fn.segments = functools.partial(segment_logps, model, chunk_size=chunk_size, method=method)
    return logps_fn


def segment_logps(model: Decoder, params: Mapping[str, Any], ids: Array, positions: Array, segment_ids: Array,
                  branch_ids: Array, chains: Sequence[Tuple[Array, Array]], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  method: str = "custom_vjp") -> Tuple[Array, ...]:
    r"""Sequence log-probs of responses laid out in rows of several sequences and branches
    (:func:`sgpo_jax.models.llama.segment_mask`): one decoder pass over the ``[R, T]`` rows
    (``Decoder.__call__`` with ``segment_ids``, ``branch_ids`` and ``positions``) to the final
    normed hidden states ``h [R, T, H]``, then per ``(index [K, L], mask [K, L])`` of ``chains``
    the chain of flat slots ``c = index`` gathered, :math:`\tilde h_{k,l} = h_{c_{k,l}}`,
    :math:`\tilde x_{k,l} = x_{c_{k,l}}`, and scored by :func:`chunked_sequence_logps`
    (``hidden[:, l]`` predicts token ``l + 1``):
    :math:`\log p(y_k) = \sum_{l \ge 1} m_{k,l} \log \mathrm{softmax}(\tilde h_{k,l-1} W)_{\tilde x_{k,l}}`.
    ``c_{k,0}`` is the slot before the response (the prompt's last token), so a response in a
    branch after another one is still predicted from its own prompt. Returns one ``[K]`` per
    chain set. The gather's transpose adds the gradients of a slot used by several chains (a
    shared prompt). ``params`` is ``{"params": ...}`` or the inner dict."""
    cfg = model.cfg
    variables = params if set(params) == {"params"} else {"params": params}
    hidden = model.apply(variables, ids, None, positions, return_hidden=True, segment_ids=segment_ids,
                         branch_ids=branch_ids)
    head = output_head(variables, cfg).astype(cfg.dtype)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = ids.reshape(-1)
    return tuple(chunked_sequence_logps(jnp.take(flat_hidden, index, axis=0), head, jnp.take(flat_ids, index), mask,
                                        chunk_size=chunk_size, tied=cfg.tie_word_embeddings, method=method)
                 for index, mask in chains)


def packed_pair_logps(model: Decoder, params: Mapping[str, Any], packed: PackedPairs, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, method: str = "custom_vjp") -> Tuple[Array, Array]:
    """``(chosen [B], rejected [B])`` sequence log-probs of pairs packed into rows
    (:class:`~sgpo_jax.models.packed.PackedPairs`): :func:`segment_logps` of its rows with the
    chosen and the rejected chains. Equal to :func:`chosen_rejected_logps` of the unpacked batch
    up to float rounding, values and gradients."""
    return segment_logps(model, params, packed.ids, packed.positions, packed.segment_ids, packed.branch_ids,
                         ((packed.chosen_index, packed.chosen_mask), (packed.rejected_index, packed.rejected_mask)),
                         chunk_size=chunk_size, method=method)


def _response_window(loss_mask: Array, width: int) -> Tuple[Array, Array]:
    """``(start [B] int32, fits bool)``: per row the window ``[start, start + width)`` of
    :func:`decoder_logps_fn` (``start = min(first scored token - 1, T - width)``, 0 for a row
    scoring nothing) and whether every row's scored tokens (positions ``>= 1``) lie in
    ``[start + 1, start + width)``."""
    scored = jax.lax.stop_gradient(loss_mask)[:, 1:] != 0  # [B, T - 1]: token t + 1 is scored
    n = scored.shape[1]
    first = jnp.argmax(scored, axis=-1).astype(jnp.int32)  # 0 when nothing is scored
    last = (n - 1 - jnp.argmax(scored[:, ::-1], axis=-1)).astype(jnp.int32)
    start = jnp.minimum(first, n + 1 - width)
    fits = jnp.all(~jnp.any(scored, axis=-1) | (last < start + width - 1))
    return start, fits


def chosen_rejected_logps(logps_fn: Callable[[Any, Array, Array, Array], Array], params: Any, batch: Any
                          ) -> Tuple[Array, Array]:
    """``(chosen [B], rejected [B])`` sequence log-probs of a preference batch (any object with
    ``chosen_ids``/``_attention``/``_loss_mask`` and the ``rejected_*`` likewise, ``[B, T_c]`` and
    ``[B, T_r]``) in one forward pass over ``[2B, T]``: chosen rows then rejected rows, both
    right-padded to ``T = max(T_c, T_r)``. ``logps_fn(params, ids, attention, loss_mask) -> [2B]``.

    A batch whose ``packed`` field holds a :class:`~sgpo_jax.models.packed.PackedPairs` is scored
    by ``logps_fn.packed(params, packed)`` instead (:func:`decoder_logps_fn` provides it; its
    ``*_ids`` are then unused)."""
    packed = getattr(batch, "packed", None)
    if packed is not None:
        if not hasattr(logps_fn, "packed"):
            raise ValueError("this batch is packed (prefix sharing or packing) but its logps_fn cannot score packed "
                             "rows; use sgpo_jax.models.logps.decoder_logps_fn")
        return logps_fn.packed(params, packed)
    length = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, length - x.shape[1])))
    cat = lambda a, b: jnp.concatenate([pad(a), pad(b)])
    logps = logps_fn(params, cat(batch.chosen_ids, batch.rejected_ids),
                     cat(batch.chosen_attention, batch.rejected_attention),
                     cat(batch.chosen_loss_mask, batch.rejected_loss_mask))
    b = batch.chosen_ids.shape[0]
    return logps[:b], logps[b:]
