r"""LoRA adapters on the decoder's projections, applied with qwix, and the frozen base they ride on.

A targeted projection with Flax kernel :math:`W \in \mathbb{R}^{i \times o}` (``[in, out]``,
the transpose of the torch weight) computes

.. math::

    y = x W + \frac{\alpha}{r} (x A) B, \qquad A \in \mathbb{R}^{i \times r},\ B \in \mathbb{R}^{r \times o},

with ``A`` drawn like PEFT's (``kaiming_uniform(a=sqrt(5))``: uniform on :math:`\pm 1/\sqrt{i}`)
and ``B = 0``, so at initialization the LoRA model *is* the base model. The adapters are leaves
``kernel_lora_a [.., i, r]`` and ``kernel_lora_b [.., r, o]`` next to each targeted ``kernel``
(a leading ``[L]`` axis with scanned layers), the names and layout qwix's ``LoraProvider``
creates and reads: :func:`lora_model` wraps a :class:`~sgpo_jax.models.llama.Decoder` with
``qwix.apply_lora_to_model`` (it intercepts the Dense layers' ``dot_general``; it works with
``nn.scan`` and ``nn.remat`` unchanged), so this module only owns the adapters' creation,
splitting and merging. The adapters are float32 (the trainable "master" copy) and cast to the
compute dtype for the forward pass (:func:`lora_logps_fn`), as the frozen base may be bfloat16.

Training with LoRA (:mod:`sgpo_jax.training.trainer`): the state's ``params`` are the adapters
only (they alone get gradients and AdamW moments, and they alone are checkpointed); the base is
the state's ``frozen`` part. The reference policy is the same base with the adapters off (the
plain decoder on the base weights: no second copy). At the end of a run the adapters are merged,
:math:`W \leftarrow W + \frac{\alpha}{r} A B` (:func:`merge`), so the run's result is an ordinary
parameter tree: the SSAPO loop's next round starts from it with fresh adapters and, with
``ssapo.reference=previous``, takes it (adapters off) as its reference, exactly as in full
fine-tuning.

Targets (``model.lora.targets``): ``q k v o`` (attention) and ``gate up down`` (MLP).

QLoRA (``model.lora.quantize``): the targeted base kernels are stored quantized per output
channel by qwix (:func:`quantize_base`): ``"int8"`` (symmetric absmax, ``W = q * s`` with ``q`` int8
and one float32 scale ``s`` per output column) or ``"nf4"`` (4-bit NormalFloat codes, ``W = nf4[q] *
s``); the adapters stay float32. The forward pass multiplies by the dequantized weights (qwix's
``dot_general``), so it equals the plain forward on the dequantized base (``tests/test_lora.py``).
The reference is then the quantized base with zero adapters (the policy at initialization).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from sgpo_jax.errors import ConfigError
from sgpo_jax.models.llama import Decoder
from sgpo_jax.models.logps import decoder_logps_fn

__all__ = ["ADAPTER_LEAVES", "LORA_TARGETS", "QUANTIZATIONS", "LoraConfig", "adapter_count", "dequantize_base",
           "frozen_and_adapters", "init_adapters", "is_adapter", "join", "lora_config", "lora_logps_fn", "lora_model",
           "merge", "quantize_base", "split", "target_modules"]

# target -> the projection's module name (the same in transformers, hence in PEFT's target_modules)
LORA_TARGETS: Dict[str, str] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ADAPTER_LEAVES = ("kernel_lora_a", "kernel_lora_b")
QUANTIZATIONS = ("", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings (``model.lora``): ``rank`` r >= 1, ``alpha`` (scale ``alpha / rank``),
    ``targets`` a non-empty subset of :data:`LORA_TARGETS`' keys, ``quantize`` one of
    :data:`QUANTIZATIONS` (``""``: the base stays in ``model.param_dtype``)."""

    rank: int
    alpha: float = 16.0
    targets: Tuple[str, ...] = tuple(LORA_TARGETS)
    quantize: str = ""

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        problems = []
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            problems.append(f"model.lora.rank must be a positive int (0 = LoRA off), got {self.rank!r}")
        if not self.alpha > 0:
            problems.append(f"model.lora.alpha must be > 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            problems.append(f"model.lora.targets must be distinct names from {tuple(LORA_TARGETS)}, got "
                            f"{self.targets!r}")
        if self.quantize not in QUANTIZATIONS:
            problems.append(f"model.lora.quantize must be one of {QUANTIZATIONS}, got {self.quantize!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of ``A @ B``."""
        return self.alpha / self.rank


def lora_config(model_config: Any) -> Optional[LoraConfig]:
    """The ``model.lora`` group as a :class:`LoraConfig`, or None when ``rank`` is 0 (or the
    group is absent). Raises ValueError naming the bad field."""
    group = model_config.get("lora") if hasattr(model_config, "get") else None
    if group is None or group.rank == 0:
        return None
    return LoraConfig(rank=group.rank, alpha=float(group.alpha), targets=tuple(group.targets),
                      quantize=group.get("quantize", ""))


def target_modules(lora: LoraConfig) -> Tuple[str, ...]:
    """The targeted projections' module names (``q_proj``, ...), in :data:`LORA_TARGETS` order."""
    return tuple(name for key, name in LORA_TARGETS.items() if key in lora.targets)


def lora_model(model: Decoder, lora: LoraConfig) -> Decoder:
    """``model`` with qwix's LoRA on the targeted projections (the same ``cfg``, params and
    methods; applied to params without adapters it would create them, so give it :func:`join`'s
    tree)."""
    try:
        import qwix  # imported here: the LoRA path's only dependency beyond flax
    except ImportError as err:
        raise ConfigError("model.lora.rank > 0 needs qwix", "pip install 'sgpo_jax[lora]' (qwix==0.1.8)") from err

    pattern = r".*/(" + "|".join(target_modules(lora)) + r")$"
    provider = qwix.LoraProvider(module_path=pattern, rank=lora.rank, alpha=lora.alpha,
                                 weight_qtype=lora.quantize or None)
    return qwix.apply_lora_to_model(model, provider)


def quantize_base(base: Mapping[str, Any], model: Decoder, lora: LoraConfig) -> Dict[str, Any]:
    """``base`` with the targeted kernels quantized per output channel (``lora.quantize``, qwix's
    ``quantize_params``; each kernel becomes a qwix ``WithAux(QArray(qvalue, scale))``); the other
    leaves are kept. Scanned layers are quantized layer by layer (``vmap`` over the ``[L]`` axis),
    so every layer has its own scales."""
    import qwix

    if not lora.quantize:
        raise ValueError("quantize_base needs model.lora.quantize ('int8' or 'nf4')")
    cfg = model.cfg
    ids = jnp.zeros((1, 2), jnp.int32)
    one = dataclasses.replace(cfg, scan_layers=False, num_hidden_layers=1)
    layer = jax.eval_shape(lora_model(Decoder(one), lora).init, jax.random.PRNGKey(0), ids)["params"]["layers_0"]
    params = dict(base["params"] if set(base) == {"params"} else base)
    quantize = lambda tree: qwix.quantize_params(tree, layer, allow_extra_params=True)
    for name in [k for k in params if k == "layers" or k.startswith("layers_")]:
        params[name] = jax.vmap(quantize)(params[name]) if cfg.scan_layers else quantize(params[name])
    return {"params": params}


def dequantize_base(base: Mapping[str, Any], dtype: Any = jnp.float32) -> Dict[str, Any]:
    """A :func:`quantize_base` tree with every quantized kernel replaced by its dequantized
    ``dtype`` array (``qwix.dequantize``); other leaves unchanged (a plain tree comes back as is)."""
    import qwix

    return jax.tree.map(lambda x: qwix.dequantize(x.array).astype(dtype) if _is_quantized(x) else x, dict(base),
                        is_leaf=_is_quantized)


def _is_quantized(x: Any) -> bool:
    """Whether a leaf is a :func:`quantize_base` kernel (qwix's PTQ ``WithAux``, not exported by qwix)."""
    return hasattr(x, "array") and hasattr(x, "how")


def _scales_in(base: Mapping[str, Any], dtype: Any) -> Any:
    """``base`` with every quantized kernel's scales cast to ``dtype``: qwix dequantizes ``W = q s``
    in the scales' dtype, so this is the compute dtype of the quantized matmuls (as the plain
    Dense layers cast their kernels to it); other leaves unchanged."""
    cast = lambda x: x.replace(array=x.array.replace(scale=x.array.scale.astype(dtype))) if _is_quantized(x) else x
    return jax.tree.map(cast, base, is_leaf=_is_quantized)


def is_adapter(path: Tuple[str, ...]) -> bool:
    """Whether a flattened params path is an adapter leaf."""
    return path[-1] in ADAPTER_LEAVES


def _flat(params: Mapping[str, Any]) -> Dict[Tuple[str, ...], Any]:
    if set(params) == {"params"}:
        params = params["params"]
    return traverse_util.flatten_dict(dict(params))


def split(params: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(base, adapters)`` of a params tree (``variables`` or ``variables["params"]``), each as
    ``{"params": ...}``; ``adapters`` is empty when there are none."""
    flat = _flat(params)
    base = {k: v for k, v in flat.items() if not is_adapter(k)}
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    return ({"params": traverse_util.unflatten_dict(base)},
            {"params": traverse_util.unflatten_dict(adapters)} if adapters else {"params": {}})


def join(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> Dict[str, Any]:
    """The union of a base tree and an adapter tree, ``{"params": ...}``, what :func:`lora_model` applies."""
    flat = _flat(base)
    flat.update(_flat(adapters))
    return {"params": traverse_util.unflatten_dict(flat)}


def init_adapters(base: Mapping[str, Any], lora: LoraConfig, rng: jax.Array) -> Dict[str, Any]:
    """Fresh float32 adapters for every targeted kernel of ``base``: ``A`` uniform on
    :math:`\\pm 1/\\sqrt{i}` (independent per layer and projection), ``B = 0``. Works for scanned
    (``[L, i, o]``) and unrolled (``[i, o]``) kernels alike."""
    pattern = re.compile(r"(^|/)(" + "|".join(target_modules(lora)) + r")/kernel$")
    out = {}
    kernels = sorted(k for k in _flat(base) if pattern.search("/".join(k)))
    if not kernels:
        raise ValueError(f"no kernel matches the LoRA targets {lora.targets}")
    flat = _flat(base)
    for key, path in zip(jax.random.split(rng, len(kernels)), kernels):
        shape = flat[path].shape
        *lead, fan_in, fan_out = shape
        bound = 1.0 / math.sqrt(fan_in)
        out[path[:-1] + ("kernel_lora_a",)] = jax.random.uniform(key, (*lead, fan_in, lora.rank), jnp.float32,
                                                                 -bound, bound)
        out[path[:-1] + ("kernel_lora_b",)] = jnp.zeros((*lead, lora.rank, fan_out), jnp.float32)
    return {"params": traverse_util.unflatten_dict(out)}


def frozen_and_adapters(base: Mapping[str, Any], model: Decoder, lora: LoraConfig,
                        rng: jax.Array) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(frozen, adapters)``, the LoRA training state's two parts on ``base``: ``frozen`` is
    ``base`` itself (the very same arrays: never copied) or, for QLoRA, :func:`quantize_base` of
    it; ``adapters`` are :func:`init_adapters`' fresh ones. Shape-only under ``jax.eval_shape``
    (the ahead-of-time compile builds the trainer's state with it)."""
    frozen = quantize_base(base, model, lora) if lora.quantize else base
    return frozen, init_adapters(base, lora, rng)


def adapter_count(adapters: Mapping[str, Any]) -> int:
    """Trainable elements in an adapter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(adapters))


def merge(base: Mapping[str, Any], adapters: Mapping[str, Any], lora: LoraConfig) -> Dict[str, Any]:
    """``base`` (dequantized first, for QLoRA) with every adapted kernel replaced by
    :math:`W + \\frac{\\alpha}{r} A B` (computed
    in float32 or wider, stored in the kernel's dtype): the plain decoder on the result computes what the
    LoRA model computes on ``(base, adapters)`` (up to the rounding of the merged weights)."""
    flat = _flat(dequantize_base(base))
    adapter = _flat(adapters)
    for path in [k for k in adapter if k[-1] == "kernel_lora_a"]:
        kernel = path[:-1] + ("kernel",)
        w = flat[kernel]
        a, b = adapter[path], adapter[path[:-1] + ("kernel_lora_b",)]
        wide = jnp.promote_types(w.dtype, jnp.float32)
        delta = jnp.matmul(a.astype(wide), b.astype(wide), precision=jax.lax.Precision.HIGHEST)
        flat[kernel] = (w.astype(wide) + lora.scale * delta).astype(w.dtype)
    return {"params": traverse_util.unflatten_dict(flat)}


def lora_logps_fn(model: Decoder, lora: LoraConfig, **kwargs: Any) -> Callable[..., jax.Array]:
    """``logps_fn((base, adapters), input_ids, attention_mask, loss_mask) -> [B]``: the LoRA
    model's sequence log-probs (:func:`sgpo_jax.models.logps.decoder_logps_fn`, ``kwargs`` passed
    on), with the float32 adapters and a QLoRA base's scales cast to the compute dtype (the
    adapters' gradient flows back in float32). The form :class:`sgpo_jax.core.step.TrainState`
    calls with a ``frozen`` part."""
    inner = decoder_logps_fn(lora_model(model, lora), **kwargs)
    dtype = model.cfg.dtype

    def logps_fn(parts, input_ids, attention_mask, loss_mask):
        base, adapters = parts
        return inner(join(_scales_in(base, dtype), jax.tree.map(lambda x: x.astype(dtype), adapters)), input_ids,
                     attention_mask, loss_mask)

    return logps_fn
