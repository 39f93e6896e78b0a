r"""Causal self-attention kernels of the decoder and the choice between them.

Three kernels compute the same attention of a chunk over itself (no KV cache), for query slot
``i``, key slot ``j``: :math:`o_i = \sum_j \mathrm{softmax}_j(q_i \cdot k_j / \sqrt{D}\ \text{masked}) \, v_j`,
``j`` visible iff ``j <= i`` (causal), key ``j`` is a real token and, with a sliding window ``w``,
``j > i - w``:

* ``"xla"``: the blocked einsum (:func:`query_blocks`, :func:`attend_block`); also the only path
  with a KV cache (prefill and decode).
* ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention`` (CUDA).
* ``"splash"``: Pallas' TPU splash attention; on a multi-device mesh it runs under
  ``shard_map`` (batch over the mesh's batch axes, key/value heads over ``tensor`` where they
  divide), since a Mosaic kernel cannot be partitioned automatically.

:func:`attention_kernel` picks one for ``DecoderConfig.attention`` on the *target* platform
(:func:`sgpo_jax.compat.target_platform`: the host's backend, or the one an ahead-of-time
compile sets with :func:`sgpo_jax.compat.compile_target`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sgpo_jax import compat
from sgpo_jax.console import say_once
from sgpo_jax.parallel.mesh import batch_split
from sgpo_jax.parallel.sharding import current_activation_mesh

Array = jax.Array

ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")

__all__ = ["ATTENTION_KERNELS", "attention_kernel", "query_blocks", "attend_block", "attend_fused"]

# Tests set this to run the fused kernels' code paths on CPU: "cudnn" as
# ``jax.nn.dot_product_attention(implementation="xla")`` with the same masks, "splash" in Pallas
# interpret mode, and no platform check. Never set it outside tests.
_CPU_STANDIN = False


# ----------------------------------------------------------------------------------------------
# The blocked einsum ("xla")
# ----------------------------------------------------------------------------------------------


def query_blocks(cfg: Any, t: int) -> List[Tuple[int, int, int, int]]:
    """Static ``(lo, hi, key_lo, key_hi)`` blocks of a ``T``-token chunk attending to itself (no
    cache): query slots ``[lo, hi)`` may attend key slots ``[key_lo, key_hi) = [max(0, lo - w + 1),
    hi)`` only (``key_lo = 0`` without a sliding window ``w``); blocks of ``cfg.attention_block``
    queries, one block when that is 0 or ``>= T``."""
    size = cfg.attention_block if 0 < cfg.attention_block < t else t
    window = cfg.sliding_window
    return [(lo, min(lo + size, t), 0 if window is None else max(0, lo - window + 1), min(lo + size, t))
            for lo in range(0, t, size)]


def attend_block(q: Array, k: Array, v: Array, mask: Array, dtype: Any) -> Array:
    r"""Masked softmax attention of one query block, per key/value head.

    ``q [B, K, C, G, D]`` (``C`` query slots, ``G`` query heads per key/value head), ``k, v
    [B, K, S, D]``, ``mask [B, C, S]`` -> ``[B, K, C, G, D]``:
    :math:`o_{c,g} = \sum_s \mathrm{softmax}_s(q_{c,g} \cdot k_s / \sqrt{D}\ \text{masked}) \, v_s`,
    as two batched matmuls ``[B, K, C*G, D] x [B, K, D, S]`` and ``[B, K, C*G, S] x [B, K, S, D]``
    (scores and softmax in float32). A query with no visible key averages all ``S`` values.
    """
    b, kh, c, g, d = q.shape
    scores = jnp.einsum("bkqd,bksd->bkqs", q.reshape(b, kh, c * g, d), k) * d ** -0.5
    scores = scores.astype(jnp.float32).reshape(b, kh, c, g, -1)
    scores = jnp.where(mask[:, None, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, kh, c * g, -1)
    return jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kh, c, g, d)


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def _cudnn_problem(cfg: Any, t: int) -> Optional[str]:
    """Why cuDNN flash attention cannot run this config and chunk length, or ``None``."""
    platform = compat.target_platform()
    if not _CPU_STANDIN and platform != "cuda":
        return f"it needs a CUDA GPU and the target is {platform!r}"
    if not compat.has_dot_product_attention_implementation():
        return f"jax {jax.__version__} lacks dot_product_attention(implementation=, local_window_size=)"
    if cfg.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and not _CPU_STANDIN:
        return f"it needs bfloat16 or float16 compute, got dtype {cfg.dtype}"
    capability = compat.target_cuda_capability()
    max_dim = 256 if capability is not None and capability >= (9, 0) else 128
    if cfg.head_dim % 8 or cfg.head_dim > max_dim:
        return f"it needs head_dim a multiple of 8 and <= {max_dim} on this GPU, got {cfg.head_dim}"
    if t % 2:
        return f"it needs an even sequence length with a padding mask, got {t}"
    return None


def _splash_problem(cfg: Any, t: int) -> Optional[str]:
    """Why Pallas splash attention cannot run this config and chunk length, or ``None``."""
    platform = compat.target_platform()
    if not _CPU_STANDIN and platform != "tpu":
        return f"it needs a TPU and the target is {platform!r}"
    if compat.splash_attention() is None:
        return f"jax {jax.__version__} does not ship jax.experimental.pallas.ops.tpu.splash_attention"
    if t % 128:
        return f"it needs a sequence length that is a multiple of 128 (its block), got {t}"
    return None


def attention_kernel(cfg: Any, seq_len: int) -> str:
    """The kernel (``"xla"``, ``"cudnn"`` or ``"splash"``) that ``cfg.attention`` runs for a
    ``seq_len``-token chunk without a KV cache on the target platform
    (:func:`sgpo_jax.compat.target_platform`, by default the host's backend).

    ``"auto"`` picks cuDNN on CUDA and splash on TPU when they can run, else ``"xla"``, and says
    once (per reason, via :func:`sgpo_jax.console.say`) why it fell back on an accelerator; on
    CPU it is ``"xla"`` silently.

    Raises:
      ValueError: ``cfg.attention`` is ``"cudnn"`` or ``"splash"`` and that kernel cannot run
        there, naming why (use ``"auto"`` to fall back instead).
    """
    problems = {"cudnn": _cudnn_problem, "splash": _splash_problem}
    if cfg.attention == "xla":
        return "xla"
    if cfg.attention in problems:
        problem = problems[cfg.attention](cfg, seq_len)
        if problem:
            raise ValueError(f"attention={cfg.attention!r} cannot run: {problem}; use attention='auto' "
                             "to fall back to 'xla', or attention='xla'")
        return cfg.attention
    wanted = {"cuda": "cudnn", "tpu": "splash"}.get(compat.target_platform())
    if wanted is None:
        return "xla"
    problem = problems[wanted](cfg, seq_len)
    if problem:
        say_once(f"attention='auto': using 'xla' instead of {wanted!r} because {problem}")
        return "xla"
    return wanted


# ----------------------------------------------------------------------------------------------
# Fused kernels
# ----------------------------------------------------------------------------------------------


def _attend_dot_product(q: Array, k: Array, v: Array, key_valid: Array, cfg: Any) -> Array:
    r"""Causal self-attention of a whole chunk with ``jax.nn.dot_product_attention``.

    ``q [B, T, K, G, D]``, ``k, v [B, T, K, D]`` (slot-major, before the head-major transpose),
    ``key_valid [B, T]`` -> ``[B, T, K, G, D]``. Query head ``k * G + g`` reads key/value head
    ``k`` (jax's own GQA grouping, as ours). Masks: ``is_causal``, the sliding window as
    ``local_window_size = (w - 1, 0)`` (key ``j`` visible iff ``i - w < j <= i``; cuDNN's
    ``sliding_window_length = w``), and the padding keys as a boolean ``[B, 1, T, T]`` mask
    (cuDNN turns it into an additive bias; sequence lengths would only express right padding).
    A query that may attend no key (left padding) averages all values, as in :func:`attend_block`
    up to its block.
    """
    b, t, kh, g, d = q.shape
    window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    mask = jnp.broadcast_to(key_valid[:, None, None, :], (b, 1, t, t))
    out = jax.nn.dot_product_attention(q.reshape(b, t, kh * g, d), k, v, mask=mask, is_causal=True,
                                       local_window_size=window,
                                       implementation="xla" if _CPU_STANDIN else "cudnn")
    return out.reshape(b, t, kh, g, d)


def _attend_splash_local(q: Array, k: Array, v: Array, segments: Array, cfg: Any) -> Array:
    r"""Pallas' TPU splash attention of the rows and heads on one device.

    Shapes as :func:`_attend_dot_product`, ``segments [B, T]`` int. One MQA kernel per key/value
    head (its ``G`` query heads share the head's keys), ``vmap``-ed over key/value heads and the
    batch. The causal (``CausalMask``) or windowed (``LocalMask`` with window ``(w - 1, 0)``) mask
    is static; the padding (and the sequences of packed rows) come in as segment ids: a query
    attends only keys of its own segment, so a padding query (segment 0) attends padding keys
    (never none, so never a division by zero). Splash does not scale the scores: ``q`` is
    multiplied by ``D ** -0.5`` first.
    """
    kernel_lib, mask_lib = compat.splash_attention()
    b, t, kh, g, d = q.shape
    if cfg.sliding_window is None:
        base = mask_lib.CausalMask(shape=(t, t))
    else:
        base = mask_lib.LocalMask(shape=(t, t), window_size=(cfg.sliding_window - 1, 0), offset=0)
    kernel = kernel_lib.make_splash_mqa_single_device(mask_lib.MultiHeadMask([base] * g),
                                                      interpret=_CPU_STANDIN)
    def one_kv_head(q_, k_, v_, seg):  # [G, T, D], [T, D], [T, D], [T]
        return kernel(q_, k_, v_, segment_ids=kernel_lib.SegmentIds(q=seg, kv=seg))

    per_row = jax.vmap(one_kv_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_row)((q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 3, 1, 4),
                            k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segments)  # [B, K, G, T, D]
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4)


def _attend_splash(q: Array, k: Array, v: Array, segments: Array, cfg: Any) -> Array:
    """Splash attention on the activation mesh (:func:`~sgpo_jax.parallel.sharding.activation_sharding`):
    under ``shard_map`` with the rows split over the mesh's batch axes (``data``, ``fsdp``) and the
    key/value heads over ``tensor``, each where the sizes divide (else that dimension is
    replicated, and every device of the axis computes it whole); on one device, or outside a mesh,
    the kernel itself. Each device runs :func:`_attend_splash_local` on its block: attention never
    mixes rows or key/value heads, so the blocks are independent."""
    mesh = current_activation_mesh()
    if mesh is None or mesh.size == 1:
        return _attend_splash_local(q, k, v, segments, cfg)
    b, kh = q.shape[0], q.shape[2]
    batch_axes, ways = batch_split(mesh)
    rows = batch_axes if batch_axes and b % ways == 0 else None
    heads = "tensor" if "tensor" in mesh.axis_names and kh % mesh.shape["tensor"] == 0 else None
    spec_q, spec_kv, spec_valid = P(rows, None, heads, None, None), P(rows, None, heads, None), P(rows, None)
    local = compat.shard_map(lambda q_, k_, v_, m_: _attend_splash_local(q_, k_, v_, m_, cfg), mesh,
                             in_specs=(spec_q, spec_kv, spec_kv, spec_valid), out_specs=spec_q)
    return local(q, k, v, segments)


def attend_fused(kernel: str, q: Array, k: Array, v: Array, key_valid: Array, cfg: Any,
                 segments: Optional[Array] = None) -> Array:
    """Causal self-attention of a whole chunk with the fused ``kernel`` (``"cudnn"`` or
    ``"splash"``, as :func:`attention_kernel` chose): ``q [B, T, K, G, D]``, ``k, v [B, T, K, D]``,
    ``key_valid [B, T]`` (True at real tokens) -> ``[B, T, K, G, D]``. ``segments`` (splash only):
    ``[B, T]`` int segment ids of packed rows, 0 at padding (default: ``key_valid`` as 1 / 0)."""
    if kernel == "cudnn":
        return _attend_dot_product(q, k, v, key_valid, cfg)
    return _attend_splash(q, k, v, key_valid.astype(jnp.int32) if segments is None else segments, cfg)
