r"""One Flax (linen) implementation of the Llama decoder family: Llama, Mistral and Qwen2.

The three transformers families differ only in switches of one architecture, all carried by
:class:`DecoderConfig`: Qwen2 adds q/k/v biases, Mistral a sliding attention window, Llama 3.1+
the ``llama3`` RoPE frequency scaling. Per layer, with :math:`x \in \mathbb{R}^{B \times T \times H}`:

.. math::

    h &= x + W_o \, \mathrm{Attn}(\mathrm{RoPE}(W_q n), \mathrm{RoPE}(W_k n), W_v n),
        \quad n = \mathrm{RMSNorm}_1(x) \\
    y &= h + W_{down} \left(\mathrm{silu}(W_{gate} m) \odot W_{up} m\right),
        \quad m = \mathrm{RMSNorm}_2(h)

and ``logits = RMSNorm(y_L) @ lm_head`` (``lm_head = embed_tokens^T`` when tied). Attention is
grouped-query: query head ``h`` reads key/value head ``h // (num_attention_heads //
num_key_value_heads)``, as transformers' ``repeat_kv``. Query slot ``i`` may attend key slot ``j``
iff ``j <= i`` (causal), ``attention_mask[j] == 1`` (padding) and, with a sliding window ``w``,
``j > i - w``. Slots are indices in the (cached) sequence, padding included, exactly as transformers
builds its masks; RoPE angles use ``positions`` instead, which by default count real tokens only
(``cumsum(attention_mask) - 1`` clipped at 0), so left- and right-padded rows give the same logits
at their real tokens as unpadded ones. Without a KV cache the queries are processed in causal
blocks of ``attention_block`` slots that score only the keys they may see (:class:`Attention`).

Parameter names map 1:1 to transformers' tensor names. With ``scan_layers=False`` layer ``i``
lives under ``layers_{i}``; with ``scan_layers=True`` all layers live under ``layers`` with a
leading ``[num_hidden_layers]`` axis on every leaf. A Flax Dense ``kernel`` ``[in, out]`` is the
transpose (``T``) of the torch Linear ``weight`` ``[out, in]``::

    Flax path (in variables["params"])          shape      transformers tensor
    embed_tokens/embedding                      [V, H]     model.embed_tokens.weight
    layers_{i}/input_layernorm/weight           [H]        model.layers.{i}.input_layernorm.weight
    layers_{i}/self_attn/q_proj/kernel          [H, N*D]   model.layers.{i}.self_attn.q_proj.weight T
    layers_{i}/self_attn/k_proj/kernel          [H, K*D]   model.layers.{i}.self_attn.k_proj.weight T
    layers_{i}/self_attn/v_proj/kernel          [H, K*D]   model.layers.{i}.self_attn.v_proj.weight T
    layers_{i}/self_attn/{q,k,v}_proj/bias      [N*D|K*D]  model.layers.{i}.self_attn.{q,k,v}_proj.bias
                                                           (only with attention_bias)
    layers_{i}/self_attn/o_proj/kernel          [N*D, H]   model.layers.{i}.self_attn.o_proj.weight T
    layers_{i}/post_attention_layernorm/weight  [H]        model.layers.{i}.post_attention_layernorm.weight
    layers_{i}/mlp/gate_proj/kernel             [H, I]     model.layers.{i}.mlp.gate_proj.weight T
    layers_{i}/mlp/up_proj/kernel               [H, I]     model.layers.{i}.mlp.up_proj.weight T
    layers_{i}/mlp/down_proj/kernel             [I, H]     model.layers.{i}.mlp.down_proj.weight T
    norm/weight                                 [H]        model.norm.weight
    lm_head/kernel                              [H, V]     lm_head.weight T (absent when tied)

(``V`` vocab, ``H`` hidden, ``N``/``K`` query/key-value heads, ``D`` head_dim, ``I`` intermediate.)
:func:`hf_state_dict_to_params` and :func:`params_to_hf_state_dict` convert between the two.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from sgpo_jax.console import say_once
from sgpo_jax.models.attention import ATTENTION_KERNELS, attend_block, attend_fused, attention_kernel, query_blocks
from sgpo_jax.parallel.sharding import constrain_batch

Array = jax.Array

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ATTENTION_KERNELS",
    "attention_kernel",
    "Llama3RopeScaling",
    "DecoderConfig",
    "KVCache",
    "Decoder",
    "rope_inv_freq",
    "hf_state_dict_to_params",
    "params_to_hf_state_dict",
    "output_head",
    "segment_mask",
]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    r"""Llama 3.1's RoPE frequency scaling (transformers' ``rope_type="llama3"``).

    With :math:`\lambda = 2\pi / f` the wavelength of inverse frequency :math:`f`,
    :math:`L` = ``original_max_position_embeddings``: frequencies with
    :math:`\lambda < L / \text{high\_freq\_factor}` are kept, those with
    :math:`\lambda > L / \text{low\_freq\_factor}` are divided by ``factor``, and those in
    between interpolate with :math:`s = (L / \lambda - \text{low}) / (\text{high} - \text{low})`:
    :math:`f' = (1 - s) f / \text{factor} + s f`.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                "rope_scaling: need high_freq_factor > low_freq_factor > 0, got "
                f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}"
            )
        if self.original_max_position_embeddings < 1:
            raise ValueError(
                "rope_scaling.original_max_position_embeddings must be >= 1, got "
                f"{self.original_max_position_embeddings}"
            )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static, hashable architecture of a :class:`Decoder` (validated on construction).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: as in transformers.
      num_attention_heads: query heads ``N``.
      num_key_value_heads: key/value heads ``K``; ``N % K == 0`` (grouped-query attention).
      head_dim: per-head width ``D`` (even, for RoPE); need not equal ``hidden_size / N``.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base; inverse frequencies ``theta ** (-2i / D)``, ``i < D / 2``.
      rope_scaling: ``None`` or :class:`Llama3RopeScaling`.
      tie_word_embeddings: ``lm_head`` is the transposed token embedding.
      attention_bias: q/k/v projections carry a bias (Qwen2); o_proj never does.
      sliding_window: ``None`` for full causal attention, else key slot ``j`` is visible from
        query slot ``i`` only if ``i - w < j <= i`` (Mistral).
      max_position_embeddings: informational (transformers does not enforce it either).
      initializer_range: std of the normal initializer of kernels and embeddings (as
        transformers); norm weights start at 1, biases at 0.
      param_dtype: dtype of the parameters.
      dtype: compute dtype (activations, logits, KV cache); RMSNorm statistics and softmax are
        always computed in float32.
      remat: rematerialize each layer in the backward pass (``nn.remat``).
      scan_layers: run the layers with ``nn.scan`` (params stacked under ``layers``).
      attention_block: query block of the causal attention without a KV cache (training and
        scoring): query slots ``[lo, lo + attention_block)`` score only the key slots
        ``[0, lo + attention_block)`` (from ``lo - sliding_window + 1`` with a window), the only
        ones they may attend, which skips most of the masked upper triangle of the score matrix.
        ``0`` (or a block ``>= T``) scores every key. Outputs at real tokens are the same either
        way. Each block is its own pair of matmuls in the compiled program (``T /
        attention_block`` per layer), so very long sequences want larger blocks.
      attention: the attention kernel without a KV cache (training and scoring; the cached
        decode path always uses the einsum): ``"xla"`` the blocked einsum above; ``"cudnn"``
        cuDNN flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``, CUDA
        only, bf16/fp16 compute, head_dim a multiple of 8 up to 128, 256 on Hopper and later,
        even ``T``); ``"splash"`` Pallas' TPU splash attention (TPU only, ``T`` a multiple of
        128); ``"auto"`` (default) cuDNN on CUDA and splash on TPU where those conditions hold,
        else ``"xla"``, saying once why (nothing is said on CPU, where ``"xla"`` is the only
        kernel, so ``"auto"`` on CPU is exactly ``"xla"``). An explicit ``"cudnn"`` or
        ``"splash"`` that cannot run raises ``ValueError`` naming the reason (see
        :func:`sgpo_jax.models.attention.attention_kernel`; the kernels live in
        :mod:`sgpo_jax.models.attention`). ``init`` runs the einsum whatever the kernel. Outputs
        at real tokens agree with ``"xla"`` up to float rounding (``tests/test_attention.py``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Llama3RopeScaling] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: Optional[int] = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    attention_block: int = 64
    attention: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise ValueError(f"rope_scaling must be None or Llama3RopeScaling, got {self.rope_scaling!r}")
        if (not isinstance(self.attention_block, (int, np.integer)) or isinstance(self.attention_block, bool)
                or self.attention_block < 0):
            raise ValueError(f"attention_block must be an int >= 0 (0 disables blocking), got {self.attention_block!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, (int, np.integer)) or self.sliding_window < 1
        ):
            raise ValueError(f"sliding_window must be None or a positive int, got {self.sliding_window!r}")
        for name in ("param_dtype", "dtype"):
            dt = jnp.dtype(getattr(self, name))
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"{name} must be a floating dtype, got {dt}")
            object.__setattr__(self, name, dt)

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head, ``N // K``."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, config: Any, **overrides: Any) -> "DecoderConfig":
        """Reads a transformers ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``.

        Works with transformers v5 (RoPE settings in ``config.rope_parameters``) and v4
        (``config.rope_theta`` plus ``config.rope_scaling``). ``overrides`` set our own fields
        (``dtype``, ``param_dtype``, ``remat``, ``scan_layers``, ``attention_block``, ``attention``) or
        replace read ones.

        Raises:
          ValueError: naming the field, for anything this implementation would not reproduce
            exactly: another ``model_type``, ``hidden_act`` other than silu, ``mlp_bias``,
            Llama's ``attention_bias`` (it also biases o_proj), RoPE types other than default and
            llama3, partial rotary embeddings, Qwen2 configs mixing full and sliding layers,
            non-zero ``attention_dropout``.
        """
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        hidden_act = getattr(config, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; only 'silu' (SwiGLU)")
        if getattr(config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported (the MLP projections have no bias)")
        if getattr(config, "attention_dropout", 0.0):
            raise ValueError(
                f"attention_dropout={config.attention_dropout} is not supported (this model has no dropout)"
            )

        if model_type == "llama":
            if getattr(config, "attention_bias", False):
                raise ValueError(
                    "attention_bias=True is not supported for llama: it also adds an o_proj bias; "
                    "only Qwen2-style q/k/v biases are implemented"
                )
            attention_bias, sliding_window = False, None
        elif model_type == "mistral":
            attention_bias, sliding_window = False, getattr(config, "sliding_window", None)
        else:
            attention_bias, sliding_window = True, _qwen2_sliding_window(config)

        num_heads = config.num_attention_heads
        rope_theta, rope_scaling = _read_rope(config)
        fields = dict(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=attention_bias,
            sliding_window=sliding_window,
            max_position_embeddings=config.max_position_embeddings,
            initializer_range=float(getattr(config, "initializer_range", 0.02)),
        )
        fields.update(overrides)
        return cls(**fields)


def _read_rope(config: Any) -> Tuple[float, Optional[Llama3RopeScaling]]:
    """``(rope_theta, rope_scaling)`` from a v5 ``rope_parameters`` or v4 ``rope_theta``/``rope_scaling``."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"rope_parameters: per-layer-type RoPE settings are not supported, got {params!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("rope_theta: found neither config.rope_parameters['rope_theta'] nor config.rope_theta")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (RoPE rotates the whole head)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling: rope type {rope_type!r} is not supported; expected 'default' or 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ValueError(f"rope_scaling: llama3 RoPE scaling lacks {missing}")
    scaling = Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", config.max_position_embeddings)
        ),
    )
    return float(theta), scaling


def _qwen2_sliding_window(config: Any) -> Optional[int]:
    """Qwen2's window: ``None`` if every layer is full attention, the window if every layer slides."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # transformers < 4.53 derived the layer types on the fly
        window_on = getattr(config, "use_sliding_window", False) and config.sliding_window is not None
        layer_types = [
            "sliding_attention" if window_on and i >= config.max_window_layers else "full_attention"
            for i in range(config.num_hidden_layers)
        ]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return config.sliding_window
    raise ValueError(
        f"layer_types {list(layer_types)} are not supported: all layers must be 'full_attention' or "
        "all 'sliding_attention'"
    )


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """``[D / 2]`` float32 inverse frequencies, computed step by step as transformers does.

    ``inv_freq[i] = 1 / theta ** (2i / D)``, then the llama3 rescaling of
    :class:`Llama3RopeScaling` if configured (all in float32, as torch).
    """
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    old_len = rs.original_max_position_embeddings
    low_freq_wavelen = old_len / rs.low_freq_factor
    high_freq_wavelen = old_len / rs.high_freq_factor
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(rs.factor), inv_freq).astype(np.float32)
    smooth = ((np.float32(old_len) / wavelen - np.float32(rs.low_freq_factor))
              / np.float32(rs.high_freq_factor - rs.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(rs.factor) + smooth * scaled).astype(np.float32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _rope_cos_sin(cfg: DecoderConfig, positions: Array) -> Tuple[Array, Array]:
    """``cos, sin`` of shape ``[B, T, D]`` (angles ``positions * inv_freq``, duplicated halves)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(cfg.dtype), jnp.sin(emb).astype(cfg.dtype)


def _rotate_half(x: Array) -> Array:
    """transformers' ``rotate_half``: ``[x1, x2] -> [-x2, x1]`` on the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class KVCache:
    """Static-shape key/value cache of all layers (a pytree; make one with :meth:`Decoder.init_cache`).

    Attributes:
      k, v: rotated keys and values of slots ``< index`` (compute dtype), ``[B, K, S, D]`` per
        layer: a tuple of ``L`` such arrays (each layer's buffer is updated in place, no
        ``[L, ...]`` copy per step), or with ``scan_layers`` one stacked ``[L, B, K, S, D]`` array
        (``nn.scan`` slices it per layer). Slots are the third-to-last axis, so a layer's keys
        are ready for the ``[B, K, T, S]`` score matmul without a transpose.
      mask: ``[B, S]`` bool, True where a slot holds a real (non-padding) token.
      index: int32 scalar, number of slots written; the next chunk goes to ``[index, index + T)``.
    """

    k: Any
    v: Any
    mask: Array
    index: Array

    @property
    def max_length(self) -> int:
        """``S``, the number of slots."""
        return self.mask.shape[1]

    def repeat_rows(self, n: int) -> "KVCache":
        """Each batch row repeated ``n`` times: row ``b`` becomes rows ``b * n .. b * n + n - 1``."""
        if n == 1:
            return self
        repeat = lambda x: jnp.repeat(x, n, axis=x.ndim - 4)  # noqa: E731  (the batch axis of k/v)
        return KVCache(k=jax.tree.map(repeat, self.k), v=jax.tree.map(repeat, self.v),
                       mask=jnp.repeat(self.mask, n, axis=0), index=self.index)


class RMSNorm(nn.Module):
    r""":math:`w \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over the last axis, statistics in float32."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def _norm(cfg: DecoderConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)


def _dense(cfg: DecoderConfig, features: int, name: str, use_bias: bool = False) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, over the chunk itself or a :class:`KVCache` layer.

    Without a cache the queries run in the causal blocks of ``cfg.attention_block``: a block of
    queries ``[lo, hi)`` scores only keys ``[key_lo, hi)`` (:func:`~sgpo_jax.models.attention.query_blocks`), every key
    outside being masked for all of its queries. So each query that may attend some key gets the
    output of the unblocked computation (up to the rounding of the softmax sums); a query that
    may attend none (left padding) averages the values of its block's keys instead of all keys.
    The score work falls from ``T^2`` to about ``T^2 / 2 + T * attention_block / 2``.
    """

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x: Array, layer_cache: Optional[Tuple[Array, Array]], cos: Array, sin: Array,
                 mask: Array, cache_index: Optional[Array], segments: Optional[Array] = None
                 ) -> Tuple[Array, Optional[Tuple[Array, Array]]]:
        """Attention output.

        Args:
          x: ``[B, T, H]`` normalized hidden states.
          layer_cache: ``None``, or this layer's ``(k, v)``, each ``[B, K, S, D]``.
          cos, sin: ``[B, T, D]`` RoPE tables of the chunk's positions.
          mask: ``[B, T, S]`` bool (``S = T`` without a cache), True where query may attend key.
          cache_index: int32 scalar slot of the chunk's first token (with a cache).
          segments: ``None``, or ``[B, T]`` int segment ids (packed rows without branches, 0 =
            padding) for splash, whose segment ids then express ``mask`` exactly
            (:meth:`Decoder.__call__`).

        Returns ``([B, T, H], updated (k, v) or None)``.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        kh, g, d = cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim
        x2 = x.reshape(b * t, x.shape[-1])  # 2-D projections: see MLP
        q = _dense(cfg, kh * g * d, "q_proj", cfg.attention_bias)(x2).reshape(b, t, kh, g, d)
        k = _dense(cfg, kh * d, "k_proj", cfg.attention_bias)(x2).reshape(b, t, kh, d)
        v = _dense(cfg, kh * d, "v_proj", cfg.attention_bias)(x2).reshape(b, t, kh, d)
        q = q * cos[:, :, None, None] + _rotate_half(q) * sin[:, :, None, None]
        k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
        # init creates the same params with every kernel: it runs the einsum (its dummy input may
        # be shorter than a fused kernel's block)
        kernel = "xla" if layer_cache is not None or self.is_initializing() else attention_kernel(cfg, t)
        if kernel != "xla":  # fused kernels: the whole chunk at once, key padding from the mask's diagonal
            key_valid = jnp.diagonal(mask, axis1=1, axis2=2)  # [B, T]: slot j is a real token
            out = attend_fused(kernel, q, k, v, key_valid, cfg, segments).reshape(b * t, kh * g * d)
            return _dense(cfg, cfg.hidden_size, "o_proj")(out).reshape(b, t, cfg.hidden_size), layer_cache
        # Head-major: q [B, K, T, G, D] (query head = kv_head * G + group, transformers' repeat_kv),
        # k/v [B, K, T, D].
        q, k, v = q.transpose(0, 2, 1, 3, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if layer_cache is None:
            blocks = query_blocks(cfg, t)
        else:
            k = jax.lax.dynamic_update_slice(layer_cache[0], k.astype(layer_cache[0].dtype), (0, 0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(layer_cache[1], v.astype(layer_cache[1].dtype), (0, 0, cache_index, 0))
            layer_cache = (k, v)
            blocks = [(0, t, 0, k.shape[2])]
        out = jnp.concatenate([
            attend_block(q[:, :, lo:hi], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], mask[:, lo:hi, k_lo:k_hi], cfg.dtype)
            for lo, hi, k_lo, k_hi in blocks], axis=2)
        out = out.transpose(0, 2, 1, 3, 4).reshape(b * t, kh * g * d)
        return _dense(cfg, cfg.hidden_size, "o_proj")(out).reshape(b, t, cfg.hidden_size), layer_cache


class MLP(nn.Module):
    r"""SwiGLU: :math:`W_{down}(\mathrm{silu}(W_{gate} x) \odot W_{up} x)`, ``[B, T, H] -> [B, T, H]``."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        # Token-major 2-D matmuls: with [B, T, H] operands XLA:CPU gives the backward pass's
        # weight-gradient dots transposing fusions (this MLP's fwd+bwd measured ~1.7x slower, the
        # whole decoder's ~1.3x, on CPU at bench/model.py's config). Same math, same params.
        x2 = x.reshape(-1, x.shape[-1])
        gate = _dense(cfg, cfg.intermediate_size, "gate_proj")(x2)
        up = _dense(cfg, cfg.intermediate_size, "up_proj")(x2)
        return _dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(gate) * up).reshape(x.shape)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``. Signature fits ``nn.scan``."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x: Array, layer_cache: Optional[Tuple[Array, Array]], cos: Array, sin: Array,
                 mask: Array, cache_index: Optional[Array], segments: Optional[Array] = None
                 ) -> Tuple[Array, Optional[Tuple[Array, Array]]]:
        """``x [B, T, H] -> ([B, T, H], updated layer cache)``; other arguments as :class:`Attention`."""
        cfg = self.cfg
        h, layer_cache = Attention(cfg, name="self_attn")(_norm(cfg, "input_layernorm")(x), layer_cache, cos, sin,
                                                           mask, cache_index, segments)
        x = x + h
        x = x + MLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x))
        return constrain_batch(x), layer_cache


class Decoder(nn.Module):
    """Causal LM of the Llama family (see the module docstring for math and parameter names).

    ``model.apply(variables, input_ids, attention_mask)`` returns logits (the final normed hidden
    states with ``return_hidden=True``, see :func:`output_head`); with ``cache=`` (from
    :meth:`init_cache`) it returns ``(logits, new_cache)``: call it once on the (left-padded)
    prompt, then once per generated token with ``T = 1``; shapes stay static throughout.
    """

    cfg: DecoderConfig

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty :class:`KVCache` of ``max_length`` slots (prompt plus generated tokens)."""
        cfg = self.cfg
        shape = (batch, cfg.num_key_value_heads, max_length, cfg.head_dim)
        if cfg.scan_layers:
            k = v = jnp.zeros((cfg.num_hidden_layers, *shape), cfg.dtype)
        else:
            k = v = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_hidden_layers))
        return KVCache(k=k, v=v, mask=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32))

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 positions: Optional[Array] = None, cache: Optional[KVCache] = None,
                 return_hidden: bool = False, segment_ids: Optional[Array] = None,
                 branch_ids: Optional[Array] = None):
        """Logits of every position.

        Args:
          input_ids: ``[B, T]`` int token ids (ids at padding are ignored but must be in range).
          attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (left or right); default all 1.
          positions: ``[B, T]`` int RoPE positions; default ``max(cumsum(attention_mask) - 1, 0)``,
            offset by the number of real tokens already in ``cache``.
          cache: ``None``, or a :class:`KVCache`; the chunk fills slots ``[index, index + T)``,
            which must not exceed ``cache.max_length`` (not checkable under ``jit``: writes past
            the end would be clipped).
          return_hidden: return the final normed hidden states ``RMSNorm(y_L)`` ``[B, T, H]``
            instead of logits (the output head is skipped; get it with :func:`output_head`), e.g.
            for :func:`sgpo_jax.models.logps.chunked_sequence_logps`. ``init`` creates the same
            params either way.
          segment_ids, branch_ids: ``None``, or ``[B, T]`` int arrays for rows that hold several
            sequences (packed pairs, a prompt shared by its two responses; see
            :func:`segment_mask`), without a cache; ``positions`` is then required and
            ``attention_mask`` defaults to ``segment_ids > 0``. Without ``branch_ids`` (packing
            alone) splash takes the mask as its segment ids (its causal or local mask in slots
            equals the mask's, positions being consecutive within a sequence); otherwise (branches,
            or cuDNN) such calls run the ``"xla"`` einsum (saying so once where the config asked
            for another kernel).

        Returns ``logits [B, T, V]`` (or ``hidden [B, T, H]``) in the compute dtype; with a cache,
        ``(logits or hidden, new_cache)``.
        """
        cfg = self.cfg
        if segment_ids is not None:
            attention_mask = _check_segments(cfg, input_ids, attention_mask, positions, cache, segment_ids,
                                             branch_ids)
        b, t, attention_mask, positions = self._check_inputs(input_ids, attention_mask, positions, cache)
        if cache is None:
            key_valid, q_slot, k_slot, index, kv = attention_mask, jnp.arange(t), jnp.arange(t), None, None
            real_before = jnp.zeros((b, 1), jnp.int32)
        else:
            index = cache.index
            key_valid = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            q_slot, k_slot, kv = index + jnp.arange(t), jnp.arange(cache.max_length), (cache.k, cache.v)
            real_before = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
        if positions is None:
            positions = jnp.maximum(real_before + jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1, 0)
        visible = k_slot[None, :] <= q_slot[:, None]
        if cfg.sliding_window is not None:
            visible &= k_slot[None, :] > q_slot[:, None] - cfg.sliding_window
        mask = key_valid[:, None, :] & visible[None]  # [B, T, S]
        layer_cfg, segments = cfg, None
        if segment_ids is not None:
            mask = segment_mask(segment_ids, branch_ids, positions, cfg.sliding_window) & key_valid[:, None, :]
            layer_cfg = _segment_layer_config(cfg, t, branch_ids is not None)
            segments = segment_ids.astype(jnp.int32) if layer_cfg.attention == "splash" else None
        cos, sin = _rope_cos_sin(cfg, positions)

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=nn.initializers.normal(cfg.initializer_range), name="embed_tokens")
        x = constrain_batch(embed(input_ids))  # residual stream split over the data axes (if sharding)
        layer = nn.remat(DecoderLayer, prevent_cse=not cfg.scan_layers) if cfg.remat else DecoderLayer
        if cfg.scan_layers:
            stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=cfg.num_hidden_layers)
            x, kv = stack(layer_cfg, name="layers")(x, kv, cos, sin, mask, index, segments)
        else:
            new_kv = []
            for i in range(cfg.num_hidden_layers):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                x, layer_kv = layer(layer_cfg, name=f"layers_{i}")(x, layer_kv, cos, sin, mask, index, segments)
                new_kv.append(layer_kv)
            if kv is not None:
                kv = tuple(zip(*new_kv))  # per-layer buffers: (k_0, ..., k_{L-1}), (v_0, ...)
        x = _norm(cfg, "norm")(x)
        if return_hidden:
            if self.is_initializing() and not cfg.tie_word_embeddings:
                _dense(cfg, cfg.vocab_size, "lm_head")(x)  # create the head's params all the same
            out = x
        else:
            out = embed.attend(x) if cfg.tie_word_embeddings else _dense(cfg, cfg.vocab_size, "lm_head")(x)
        if cache is None:
            return out
        return out, KVCache(k=kv[0], v=kv[1], mask=key_valid, index=index + t)

    def _check_inputs(self, input_ids, attention_mask, positions, cache):
        """Static shape/dtype checks; returns ``(B, T, bool mask, positions or None)``."""
        cfg = self.cfg
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be a [B, T] int array, got {input_ids.dtype}{list(input_ids.shape)}")
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        elif attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(b, t)}")
        if positions is not None and (positions.shape != (b, t) or not jnp.issubdtype(positions.dtype, jnp.integer)):
            raise ValueError(f"positions must be an int array of shape {(b, t)}, got "
                             f"{positions.dtype}{list(positions.shape)}")
        if cache is not None:
            layer = (b, cfg.num_key_value_heads, cache.max_length, cfg.head_dim)
            if cfg.scan_layers:
                expected, layout = [(cfg.num_hidden_layers, *layer)] * 2, "one stacked array"
            else:
                expected, layout = [layer] * (2 * cfg.num_hidden_layers), f"a tuple of {cfg.num_hidden_layers}"
            got = [tuple(a.shape) for a in jax.tree.leaves((cache.k, cache.v))]
            if got != expected or cache.mask.shape != (b, cache.max_length):
                raise ValueError(f"cache k/v shapes {got} do not fit this model and batch; expected {layout} of "
                                 f"{expected[0]} each for k and v (use Decoder.init_cache)")
            if t > cache.max_length:
                raise ValueError(f"chunk of {t} tokens does not fit a cache of {cache.max_length} slots")
        return b, t, attention_mask.astype(bool), positions


def segment_mask(segment_ids: Array, branch_ids: Optional[Array], positions: Array,
                 sliding_window: Optional[int]) -> Array:
    r"""``[B, T, T]`` bool attention mask of rows holding several sequences.

    Query slot ``i`` may attend key slot ``j`` iff ``j <= i`` (causal in slots), ``s_j = s_i``
    and ``s_j > 0`` (``segment_ids``: the same sequence, 0 = padding), ``c_j = 0`` or ``c_j =
    c_i`` (``branch_ids``: branch 0 is seen by every branch of its segment, branches ``c > 0`` see
    only themselves and branch 0; ``None`` = all 0) and, with a sliding window ``w``,
    ``p_i - p_j < w`` in RoPE ``positions`` (slots would count the tokens of another branch).

    E.g. one pair with its prompt shared, ``[prompt, chosen, rejected]`` with branches
    ``[0.., 1.., 2..]`` and the rejected positions restarting at the prompt's end: chosen and
    rejected each see the prompt and themselves, never each other, exactly as in their own rows.
    """
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    t = segment_ids.shape[1]
    mask = (seg_q == seg_k) & (seg_k > 0) & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]
    if branch_ids is not None:
        br_q, br_k = branch_ids[:, :, None], branch_ids[:, None, :]
        mask &= (br_k == 0) | (br_k == br_q)
    if sliding_window is not None:
        mask &= positions[:, :, None] - positions[:, None, :] < sliding_window
    return mask


def _segment_layer_config(cfg: DecoderConfig, t: int, branches: bool) -> DecoderConfig:
    """The layers' config for a :func:`segment_mask`.

    Splash without ``branches`` (packed sequences only): the config itself, its segment ids being
    the rows' (query ``i`` sees key ``j`` iff ``s_i = s_j`` and the causal, or local, mask in
    slots allows it; within a sequence slots and RoPE positions differ by a constant, so a
    window in slots is the mask's window in positions; a padding query, ``s = 0``, sees padding
    keys, and its output is unused). Else the ``"xla"`` einsum (cuDNN takes a causal or windowed
    mask plus key padding only; splash's segment ids cannot let two branches see one prompt but
    not each other) and no slot-based window (the mask holds it in positions, so every query
    block scores all keys before it). Says once per kernel when it replaces one."""
    kernel = attention_kernel(cfg, t) if cfg.attention != "xla" else "xla"
    if kernel == "splash" and not branches:
        return dataclasses.replace(cfg, attention="splash")
    if kernel != "xla":
        say_once(f"attention={cfg.attention!r}: using 'xla' instead of {kernel!r} for packed or prefix-shared rows "
            "(the kernel cannot express their mask)")
    return dataclasses.replace(cfg, attention="xla", sliding_window=None)


def _check_segments(cfg: DecoderConfig, input_ids: Array, attention_mask: Optional[Array],
                    positions: Optional[Array], cache: Optional[KVCache], segment_ids: Array,
                    branch_ids: Optional[Array]) -> Array:
    """Checks the segment arguments of :meth:`Decoder.__call__`; returns the attention mask
    (``segment_ids > 0`` by default)."""
    shape = tuple(input_ids.shape)
    if cache is not None:
        raise ValueError("segment_ids cannot be used with a KV cache")
    if positions is None:
        raise ValueError("segment_ids need explicit positions (they restart per sequence)")
    for name, value in (("segment_ids", segment_ids), ("branch_ids", branch_ids)):
        if value is not None and (tuple(value.shape) != shape or not jnp.issubdtype(value.dtype, jnp.integer)):
            raise ValueError(f"{name} must be an int array of shape {shape}, got {value.dtype}{list(value.shape)}")
    return segment_ids > 0 if attention_mask is None else attention_mask


def output_head(params: Mapping[str, Any], cfg: DecoderConfig) -> Array:
    """The output head's weight as stored: ``lm_head/kernel [H, V]``, or with
    ``cfg.tie_word_embeddings`` the token embedding ``embed_tokens/embedding [V, H]`` (logits are
    ``hidden @ kernel``, resp. ``hidden @ embedding.T``). ``params`` is ``variables`` or
    ``variables["params"]``.
    """
    if set(params) == {"params"}:
        params = params["params"]
    return params["embed_tokens"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"]


# ----------------------------------------------------------------------------------------------
# transformers state dict <-> Flax params
# ----------------------------------------------------------------------------------------------


def _global_tensors(cfg: DecoderConfig) -> List[Tuple[str, Tuple[str, ...], Tuple[int, ...]]]:
    """``(HF name, Flax path, Flax shape)`` of the tensors outside the layers."""
    v, h = cfg.vocab_size, cfg.hidden_size
    out = [("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, h)),
           ("model.norm.weight", ("norm", "weight"), (h,))]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), (h, v)))
    return out


def _layer_tensors(cfg: DecoderConfig) -> List[Tuple[str, Tuple[str, ...], Tuple[int, ...]]]:
    """``(HF name after 'model.layers.{i}.', Flax path inside the layer, Flax shape)`` per layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = [("input_layernorm.weight", ("input_layernorm", "weight"), (h,)),
           ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (h, q)),
           ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (h, kv)),
           ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (h, kv)),
           ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (q, h)),
           ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), (h,)),
           ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (h, i)),
           ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (h, i)),
           ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (i, h))]
    if cfg.attention_bias:
        out += [("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), (q,)),
                ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), (kv,)),
                ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), (kv,))]
    return out


def _hf_shape(path: Tuple[str, ...], shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Torch layout of a Flax leaf: Dense kernels ``[in, out]`` are Linear weights ``[out, in]``."""
    return shape[::-1] if path[-1] == "kernel" else shape


def _hf_shapes(cfg: DecoderConfig) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor name the model needs, with its torch shape."""
    shapes = {name: _hf_shape(path, shape) for name, path, shape in _global_tensors(cfg)}
    for i in range(cfg.num_hidden_layers):
        for suffix, path, shape in _layer_tensors(cfg):
            shapes[f"model.layers.{i}.{suffix}"] = _hf_shape(path, shape)
    return shapes


def _flax_shapes(cfg: DecoderConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """Every Flax param path with its shape (stacked under ``layers`` when ``scan_layers``)."""
    shapes = {path: shape for _, path, shape in _global_tensors(cfg)}
    for _, path, shape in _layer_tensors(cfg):
        if cfg.scan_layers:
            shapes[("layers",) + path] = (cfg.num_hidden_layers,) + shape
        else:
            for i in range(cfg.num_hidden_layers):
                shapes[(f"layers_{i}",) + path] = shape
    return shapes


def _check_tensors(kind: str, got: Mapping[Any, Any], expected: Mapping[Any, Tuple[int, ...]],
                   optional: Mapping[Any, Tuple[int, ...]]) -> None:
    """Raises one ValueError listing missing, unexpected and mis-shaped entries of ``got``."""
    allowed = {**expected, **optional}
    missing = sorted(str(k) for k in expected if k not in got)
    unexpected = sorted(str(k) for k in got if k not in allowed)
    misshaped = sorted(f"{k}: got {tuple(np.shape(got[k]))}, expected {allowed[k]}"
                       for k in got if k in allowed and tuple(np.shape(got[k])) != tuple(allowed[k]))
    problems = [f"{label}: {items}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
    if problems:
        raise ValueError(f"{kind} does not match the config: " + "; ".join(problems))


def hf_state_dict_to_params(state_dict: Mapping[str, np.ndarray], cfg: DecoderConfig) -> Dict[str, Any]:
    """transformers ``*ForCausalLM`` tensors -> Flax variables ``{"params": ...}`` for :class:`Decoder`.

    Linear weights are transposed to Dense kernels, per-layer tensors stacked when
    ``cfg.scan_layers``, and every leaf cast to ``cfg.param_dtype``. With tied embeddings
    ``lm_head.weight`` may be present (``model.state_dict()`` lists it) but must equal
    ``model.embed_tokens.weight``.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped tensor.
    """
    optional = {"lm_head.weight": (cfg.vocab_size, cfg.hidden_size)} if cfg.tie_word_embeddings else {}
    _check_tensors("state dict", state_dict, _hf_shapes(cfg), optional)
    if optional and "lm_head.weight" in state_dict and not np.array_equal(
            np.asarray(state_dict["lm_head.weight"]), np.asarray(state_dict["model.embed_tokens.weight"])):
        raise ValueError("lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings=True")

    def leaf(name: str, path: Tuple[str, ...]) -> np.ndarray:
        array = np.asarray(state_dict[name])
        return array.T if path[-1] == "kernel" else array

    flat = {path: leaf(name, path) for name, path, _ in _global_tensors(cfg)}
    for suffix, path, _ in _layer_tensors(cfg):
        per_layer = [leaf(f"model.layers.{i}.{suffix}", path) for i in range(cfg.num_hidden_layers)]
        if cfg.scan_layers:
            flat[("layers",) + path] = np.stack(per_layer)
        else:
            flat.update({(f"layers_{i}",) + path: a for i, a in enumerate(per_layer)})
    params = traverse_util.unflatten_dict({k: jnp.asarray(a, cfg.param_dtype) for k, a in flat.items()})
    return {"params": params}


def params_to_hf_state_dict(params: Mapping[str, Any], cfg: DecoderConfig) -> Dict[str, np.ndarray]:
    """Flax params (``variables`` or ``variables["params"]``) -> transformers tensor names and layouts.

    The inverse of :func:`hf_state_dict_to_params`; arrays keep their dtype. With tied embeddings
    ``lm_head.weight`` is included as a copy of the embedding, so the result loads into a
    transformers model with ``load_state_dict(strict=True)``.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped parameter.
    """
    if set(params) == {"params"}:
        params = params["params"]
    flat = traverse_util.flatten_dict(dict(params))
    _check_tensors("params", {"/".join(k): v for k, v in flat.items()},
                   {"/".join(k): v for k, v in _flax_shapes(cfg).items()}, {})

    def to_torch_layout(array: Any, path: Tuple[str, ...]) -> np.ndarray:
        array = np.asarray(array)
        return np.array(array.T if path[-1] == "kernel" else array, order="C")  # a writable copy

    out = {name: to_torch_layout(flat[path], path) for name, path, _ in _global_tensors(cfg)}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].copy()
    for suffix, path, _ in _layer_tensors(cfg):
        for i in range(cfg.num_hidden_layers):
            array = flat[("layers",) + path][i] if cfg.scan_layers else flat[(f"layers_{i}",) + path]
            out[f"model.layers.{i}.{suffix}"] = to_torch_layout(array, path)
    return out
